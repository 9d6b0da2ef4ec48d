"""The MoE-layer runner on Verilator: :class:`VerilatorMoELayerSim`, a drop-in for
:class:`sim.moe_layer.MoELayerSim`.

Same design (``MoELayer(config)``), same memory image at :data:`sim.moe_layer.IMAGE_BASE`, same host
sequence (GELU table once; per run: load ``h`` and ``x``, start, wait for ``done`` and one more cycle,
read the counters, read ``x`` back) and the same memory timing, so ``cycles`` and ``compute_cycles``
equal pysim's for the same memory parameters. The monitors that :class:`~sim.moe_layer.MoELayerSim`
samples in Python (start, queue walk, GEMM commands, weight commands and commits, ``done``) are
probed out of the design and logged by the harness, so the run returns the same dicts, timing
included.

Differences from pysim: the random stalls (memory and host streams) come from the harness's own
seeded generator, so with ``stall_prob > 0`` the two backends see different stall patterns (results
still bit-exact, cycle counts differ); the read-back overlaps address and data streams; and
``sim_seconds`` is the C++ clock loop of the whole job (all runs).
"""

import time

import numpy as np

from m3vit_hw.moe.expert_layout import pack_moe, start_fields
from m3vit_hw.moe.moe_layer import LoadTarget, MoELayer
from .model import Job, VerilatorModel
from .vcache import design_key
from .toolchain import find_verilator

__all__ = ["VerilatorMoELayerSim"]

_MODELS = {}    # (config, threads, trace, cache) -> (MoELayer, VerilatorModel), per process


class VerilatorMoELayerSim:
    """One MoE layer compiled with Verilator, run against the memory model of :mod:`sim.ext_memory`.

    Parameters
    ----------
    config : AcceleratorConfig
    qmoe : reference.golden_model MoE parameters
        Placed at :data:`sim.moe_layer.IMAGE_BASE` by :func:`~m3vit_hw.moe.expert_layout.pack_moe`.
    mem_bytes_per_cycle, latency, stall_prob, seed :
        As :class:`sim.moe_layer.MoELayerSim` (``stall_prob`` stalls the memory and every host stream).
    threads, trace, cache, log :
        As :class:`~sim.verilator.model.VerilatorModel`.

    Attributes
    ----------
    model : VerilatorModel
        ``model.build`` says whether the compile was cached and how long it took.
    last_run : RunResult
        The raw result of the last :meth:`run`.
    """

    def __init__(self, config, qmoe, *, mem_bytes_per_cycle=16, latency=20, stall_prob=0.0, seed=0,
                 threads=1, trace=None, cache=None, log=None):
        from sim.moe_layer import IMAGE_BASE
        self.config = config
        self.qmoe = qmoe
        key = (repr(config), threads, trace, str(cache))
        if key in _MODELS:
            # Same design in this process (a bandwidth sweep): skip even the Verilog conversion.
            self.dut, self.model = _MODELS[key]
            self.model.build["cached"] = True
        else:
            find_verilator()    # fail before elaborating anything
            self.dut = dut = MoELayer(config)
            ctl = dut.controller
            self.model = VerilatorModel(
                dut, monitors={"start": dut.start, "q": dut.queues.o, "gemm": ctl.gemm,
                               "wcmd": ctl.wcmd, "wcommit": dut.wstream.buf.commit,
                               "pcommit": dut.pstream.buf.commit},
                pulses=("done",), threads=threads, trace=trace, cache=cache, log=log,
                verilog_key=design_key(MoELayer, config))
            _MODELS[key] = (dut, self.model)
        self.data_bytes = config.mem_data_bytes
        self.image, self.layout = pack_moe(qmoe, config)
        self.base = IMAGE_BASE
        self.mem_kwargs = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                               stall_prob=stall_prob, seed=seed, max_outstanding=4)
        self.stall_prob = stall_prob
        self.seed = seed

    def job(self, runs, *, timeout=2_000_000):
        """The host script for ``runs`` = ``[(h, x, task)]`` (see the module docstring)."""
        from sim.moe_layer import _words
        cfg = self.config
        C = cfg.pe_cols
        job = Job(self.model.spec)
        job.memory("mem", self.image, base=self.base, **self.mem_kwargs)
        job.host(self.stall_prob, self.seed + 7)
        lut = np.asarray(self.qmoe.gelu_lut, dtype=np.int64)
        job.put("load", [{"target": LoadTarget.GELU, "addr": a, "data": [int(lut[a])] + [0] * (C - 1)}
                         for a in range(256)])
        for h, x, task in runs:
            for target, mat in ((LoadTarget.H, h), (LoadTarget.X, x)):
                job.put("load", [{"target": target, "addr": a, "data": [int(v) for v in word]}
                                 for a, word in enumerate(_words(mat, C))])
            job.mark()
            T = h.shape[0]
            job.put("start", [start_fields(self.qmoe, task, T, self.layout, base=self.base)])
            job.wait("done", timeout)
            job.sample()
            job.xfer("rd_addr", "rd_data", list(range(T * cfg.row_words)))
        job.mark()
        return job

    def run(self, runs, *, timeout=2_000_000, trace_file=None, trace_window=(0, 2**63 - 1)):
        """Run layers ``[(h, x, task)]`` back to back; return one dict per run, with the keys of
        :meth:`sim.moe_layer.MoELayerSim.run`."""
        from sim.moe_layer import _timing
        cfg = self.config
        C = cfg.pe_cols
        spec = self.model.spec
        t0 = time.time()
        job = self.job(runs, timeout=timeout)
        res = self.model.run(job, trace_file=trace_file, trace_window=trace_window)
        self.last_run = res
        results = []
        for r, (h, x, task) in enumerate(runs):
            lo, hi = res.marks[r], res.marks[r + 1]
            s = res.samples[r]
            out = {name: int(s[name]) for name in
                   ("cycles", "compute_cycles", "expert_bytes", "gate_bytes", "active_experts",
                    "overflow")}
            T = h.shape[0]
            lanes = res.gets[r].astype("<u4").view("<i2").reshape(T * cfg.row_words, -1)[:, :C]
            out["x"] = lanes.astype(np.int64).reshape(T, cfg.row_words * C)[:, :x.shape[1]]
            ev = dict(expert_tokens={}, gemm=[], wcommit=[], pcommit=[], wcmd=[], done=None, start=None)

            def window(name):
                return [(c, spec.decode(name, b)) for c, b in res.monitors[name] if lo <= c < hi]

            for c, _ in window("start"):
                ev["start"] = c
            for c, q in window("q"):
                if q.header:
                    ev["expert_tokens"][int(q.expert)] = int(q.count)
                    ev.setdefault("first_header", c)
                if q.last:
                    ev["walk_done"] = c
            for c, g in window("gemm"):
                ev["gemm"].append((c, int(getattr(g.mode, "value", g.mode))))
            for name in ("wcmd", "wcommit", "pcommit"):
                for c, p in window(name):
                    ev[name].append((c, int(p.tag)))
            for c in res.pulses["done"]:
                if lo <= c < hi:
                    ev["done"] = c
            out["events"] = ev
            out["expert_tokens"] = dict(sorted(ev["expert_tokens"].items()))
            out.update(_timing(ev))
            out["sim_seconds"] = res.sim_seconds
            results.append(out)
        self.wall_seconds = time.time() - t0
        return results
