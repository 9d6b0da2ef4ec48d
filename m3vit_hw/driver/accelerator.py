"""``Accelerator``: load a quantized MoE layer, run it on the hardware (or its simulation), read counters.

The compute core behind the AXI top is today one MoE layer (see :mod:`m3vit_hw.soc.top`), so a run takes
the layer's int8 input ``h`` [T, D] and int16 residual ``x`` [T, D] and returns the new ``x``. When the
encoder top replaces the core, :meth:`Accelerator.run` will take the uint8 HWC image instead; the session
structure (ID check, buffers, start, wait, errors, counters) stays.

Backends implement five operations (synchronously, or as coroutines for :meth:`Accelerator.run_async`):

``read(offset) -> int`` / ``write(offset, value)``
    32-bit register access on the AXI4-Lite slave;
``alloc(name, nbytes) -> int``
    a DDR buffer visible to the accelerator (physical address, 4 KiB aligned), reused by name;
``mem_write(name, data)`` / ``mem_read(name, nbytes) -> bytes``
    copy into / out of such a buffer (the backend handles cache maintenance);
``wait_done(timeout_s)``
    return once ``STATUS.DONE`` is set (the interrupt or polling, as the backend likes).
"""

import dataclasses
import inspect
import time

import numpy as np

from ..config import AcceleratorConfig
from ..moe.expert_layout import pack_moe
from ..soc.image import ImageLayout, config_id, pack_image, pack_program, unpack_output
from ..soc.regmap import ERRORS, FIELDS, OFFSETS

__all__ = ["Accelerator", "AcceleratorError", "ConfigMismatch", "RunResult"]

_COUNTERS = ("LOAD_CYCLES", "LAYER_CYCLES", "COMPUTE_CYCLES", "STORE_CYCLES", "EXPERT_BYTES",
             "GATE_BYTES", "ACTIVE_EXPERTS")


class AcceleratorError(RuntimeError):
    """The hardware finished a run with error bits set (the message names them)."""


class ConfigMismatch(RuntimeError):
    """The hardware's config ID is not the one the driver's memory image was built for."""


@dataclasses.dataclass
class RunResult:
    """One run: the output ``x`` [T, D], the hardware counters and the host-measured wall time."""
    x: np.ndarray
    counters: dict
    wall_seconds: float


class Accelerator:
    """Driver for one accelerator instance.

    Parameters
    ----------
    config : AcceleratorConfig
        The config the bitstream was built from.
    backend : object
        Implements the operations in the module docstring.
    axi_masters : int
        The number of AXI masters of the build (it enters the config ID, as does every config field).
    """

    def __init__(self, config, backend, *, axi_masters=1):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self.config = config
        self.backend = backend
        self.layout = ImageLayout(config)
        self.data_bytes = config.mem_data_bytes
        self.expected_id = config_id(config, axi_masters=axi_masters)
        self._qmoe = None
        self._weights = None

    def load(self, qmoe):
        """Take a quantized MoE layer (:class:`reference.qparams.QMoE`); copied to DDR on the next run."""
        image, _ = pack_moe(qmoe, self.config)
        self._qmoe = qmoe
        self._weights = image
        self._weights_written = False

    def session(self, h, x, task):
        """The run as a generator of backend operations (see the module docstring); returns a RunResult."""
        if self._qmoe is None:
            raise RuntimeError("load() a model before run()")
        h = np.asarray(h)
        x = np.asarray(x)
        T = h.shape[0]
        if x.shape != h.shape or h.ndim != 2 or h.shape[1] != self.config.model.dim:
            raise ValueError(f"h and x must both be [T, dim={self.config.model.dim}], not {h.shape} "
                             f"and {x.shape}")
        tasks = self.config.model.num_tasks
        if not 0 <= task < tasks:
            raise ValueError(f"task must be in [0, {tasks}), not {task}")
        hw_id = yield ("read", OFFSETS["ID"])
        if hw_id != self.expected_id:
            raise ConfigMismatch(f"hardware config ID 0x{hw_id:08X} != 0x{self.expected_id:08X} of this "
                                 f"driver's config: the bitstream was built for another config")
        t0 = time.time()
        bufs = {
            "program": pack_program(self._qmoe, self.layout, T, self.expected_id),
            "image": pack_image(h, x, self.layout),
        }
        addrs = {}
        if not self._weights_written:
            bufs["weights"] = self._weights
        for name, data in bufs.items():
            addrs[name] = yield ("alloc", name, len(data))
            yield ("mem_write", name, data)
        if self._weights_written:
            addrs["weights"] = yield ("alloc", "weights", len(self._weights))
        self._weights_written = True
        out_bytes = self.layout.output_bytes(T)
        addrs["output"] = yield ("alloc", "output", out_bytes)
        for name, a in addrs.items():
            yield ("write", OFFSETS[f"{name.upper()}_BASE_LO"], a & 0xFFFFFFFF)
            yield ("write", OFFSETS[f"{name.upper()}_BASE_HI"], a >> 32)
        yield ("write", OFFSETS["TASK"], task)
        yield ("write", OFFSETS["IRQ_ENABLE"], 1)
        yield ("write", OFFSETS["CTRL"], FIELDS[("CTRL", "START")].mask)
        yield ("wait_done", 10.0)
        yield ("write", OFFSETS["IRQ_STATUS"], FIELDS[("IRQ_STATUS", "DONE")].mask)
        err = yield ("read", OFFSETS["ERROR"])
        if err:
            names = [f.name for f in ERRORS if err & f.mask]
            raise AcceleratorError(f"run failed with ERROR=0x{err:X} ({', '.join(names)})")
        counters = {}
        lo = yield ("read", OFFSETS["CYCLES_LO"])
        hi = yield ("read", OFFSETS["CYCLES_HI"])
        counters["cycles"] = hi << 32 | lo
        for name in _COUNTERS:
            counters[name.lower()] = yield ("read", OFFSETS[name])
        raw = yield ("mem_read", "output", out_bytes)
        return RunResult(unpack_output(raw, self.layout, T), counters, time.time() - t0)

    def run(self, h, x, task):
        """Run one layer with a synchronous backend; returns a :class:`RunResult`."""
        gen = self.session(h, x, task)
        value = None
        try:
            while True:
                op, *args = gen.send(value)
                value = getattr(self.backend, op)(*args)
        except StopIteration as stop:
            return stop.value

    async def run_async(self, h, x, task):
        """Run one layer with a backend whose operations are coroutines (a simulation)."""
        gen = self.session(h, x, task)
        value = None
        try:
            while True:
                op, *args = gen.send(value)
                value = getattr(self.backend, op)(*args)
                if inspect.isawaitable(value):
                    value = await value
        except StopIteration as stop:
            return stop.value
