"""``Accelerator``: load a compiled encoder, run camera frames on the hardware (or its simulation).

A compiled encoder (:func:`~m3vit_hw.control.compiler.compile_model`: the program and the one
external-memory image, :mod:`~m3vit_hw.control.image_layout`) is copied to DDR once. Each run then
writes the uint8 HWC frame into a frame buffer of its own, sets the base registers and the task,
starts, waits for done, checks the error bits, and reads the int16 tokens ``[T, D]`` and the counters.

Register use (:mod:`m3vit_hw.soc.regmap`): ``PARAM_BASE`` = the image buffer, ``PROGRAM_BASE`` = the
image buffer + ``layout.program_addr``, ``IMAGE_BASE`` = the frame buffer - ``layout.input_addr``
(``LOAD_IMAGE`` reads at ``IMAGE_BASE + img_addr``), ``OUTPUT_BASE`` = a token buffer (``STORE`` writes
``T`` rows of ``row_words`` int16 words of ``pe_cols`` lanes there).

Backends implement five operations (synchronously, or as coroutines for :meth:`Accelerator.run_async`):

``read(offset) -> int`` / ``write(offset, value)``
    32-bit register access on the AXI4-Lite slave;
``alloc(name, nbytes) -> int``
    a DDR buffer visible to the accelerator (physical address, 4 KiB aligned), reused by name;
``mem_write(name, data, offset)`` / ``mem_read(name, nbytes) -> bytes``
    copy into (at byte ``offset``) / out of such a buffer (the backend handles cache maintenance);
``wait_done(timeout_s)``
    return once ``STATUS.DONE`` is set (the interrupt or polling, as the backend likes).
"""

import dataclasses
import inspect
import time

import numpy as np

from ..config import AcceleratorConfig
from ..control.compiler import Program, compile_model
from ..control.image_layout import output_row_bytes
from ..encoder.top import CounterPhase
from ..soc.regmap import COUNTED_OPS, ERRORS, FIELDS, OFFSETS, config_id

__all__ = ["Accelerator", "AcceleratorError", "ConfigMismatch", "RunResult", "unpack_tokens"]


class AcceleratorError(RuntimeError):
    """The hardware finished a run with error bits set (the message names them)."""


class ConfigMismatch(RuntimeError):
    """The hardware's config ID is not the one the driver's compiled image was built for."""


@dataclasses.dataclass
class RunResult:
    """One run: the int16 tokens ``[T, D]``, the hardware counters and the host-measured wall time."""
    tokens: np.ndarray
    counters: dict
    wall_seconds: float


def unpack_tokens(raw, view):
    """The int16 tokens ``[T, D]`` (as int64) from the bytes ``STORE`` wrote for ``view`` (the
    program's ``model_config``): ``T`` rows of ``row_words * pe_cols`` little-endian int16 lanes."""
    m = view.model
    n = m.tokens * view.row_words * view.pe_cols
    if len(raw) < 2 * n:
        raise ValueError(f"raw must hold {2 * n} bytes of tokens, not {len(raw)}")
    out = np.frombuffer(bytes(raw[:2 * n]), dtype="<i2").astype(np.int64)
    return out.reshape(m.tokens, view.row_words * view.pe_cols)[:, :m.dim]


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
        self.axi_masters = axi_masters
        self.program = None
        self.expected_id = None
        self._image_written = False

    def load(self, model):
        """Take a compiled :class:`~m3vit_hw.control.compiler.Program`, or a quantized encoder
        (``reference.qparams.QuantizedEncoder``) to compile for ``config``; copied to DDR on the next run.

        Raises
        ------
        ValueError
            When the program was compiled for another accelerator config.
        """
        program = model if isinstance(model, Program) else compile_model(self.config, model)
        if program.config != self.config:
            raise ValueError("the program was compiled for another AcceleratorConfig than this driver's")
        self.program = program
        # The ID the hardware must show for this image: the image's own config and the SoC build.
        self.expected_id = config_id(program.config, axi_masters=self.axi_masters)
        self._image_written = False

    def _slack(self):
        # The sequencer's fetcher may read up to one FIFO (at most 2 bursts, or one instruction) past END.
        cfg = self.config
        return max(2 * cfg.mem_max_burst * cfg.mem_data_bytes, self.program.isa.bits // 8)

    def session(self, image_u8, task):
        """The run as a generator of backend operations (see the module docstring); returns a RunResult."""
        if self.program is None:
            raise RuntimeError("load() a model before run()")
        prog = self.program
        view = prog.model_config
        lay = prog.layout
        m = view.model
        img = np.asarray(image_u8)
        shape = (m.img_size[0], m.img_size[1], m.in_chans)
        if img.dtype != np.uint8 or img.shape != shape:
            raise ValueError(f"image_u8 must be uint8 of shape {shape} (H, W, C), not {img.dtype} {img.shape}")
        if not isinstance(task, int) or not 0 <= task < m.num_tasks:
            raise ValueError(f"task must be an int in [0, {m.num_tasks}), not {task!r}")
        hw_id = yield ("read", OFFSETS["ID"])
        if hw_id != self.expected_id:
            raise ConfigMismatch(f"hardware config ID 0x{hw_id:08X} != 0x{self.expected_id:08X} of this "
                                 f"driver's compiled image: the bitstream was built for another config")
        t0 = time.time()
        base = yield ("alloc", "image", len(prog.image) + self._slack())
        if not self._image_written:
            yield ("mem_write", "image", bytes(prog.image), 0)
            self._image_written = True
        # The loader reads whole beats: a beat of slack after the frame.
        frame = yield ("alloc", "frame", lay.input_bytes + self.config.mem_data_bytes)
        yield ("mem_write", "frame", np.ascontiguousarray(img).tobytes(), 0)
        out_bytes = m.tokens * output_row_bytes(view)
        out = yield ("alloc", "output", out_bytes)
        image_base = (frame - lay.input_addr) % (1 << 64)
        for name, a in (("PROGRAM", base + lay.program_addr), ("PARAM", base), ("OUTPUT", out),
                        ("IMAGE", image_base)):
            yield ("write", OFFSETS[f"{name}_BASE_LO"], a & 0xFFFFFFFF)
            yield ("write", OFFSETS[f"{name}_BASE_HI"], a >> 32)
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
        counters["insn_count"] = yield ("read", OFFSETS["INSN_COUNT"])
        for op in COUNTED_OPS:
            counters[f"op_cycles_{op.name.lower()}"] = yield ("read", OFFSETS[f"OP_CYCLES_{op.name}"])
            counters[f"pe_cycles_{op.name.lower()}"] = yield ("read", OFFSETS[f"PE_CYCLES_{op.name}"])
        for p in CounterPhase:
            counters[f"phase_cycles_{p.name.lower()}"] = yield ("read", OFFSETS[f"PHASE_CYCLES_{p.name}"])
            counters[f"phase_pe_cycles_{p.name.lower()}"] = yield ("read", OFFSETS[f"PHASE_PE_CYCLES_{p.name}"])
        raw = yield ("mem_read", "output", out_bytes)
        return RunResult(unpack_tokens(raw, view), counters, time.time() - t0)

    def run(self, image_u8, task):
        """Run one frame with a synchronous backend; returns a :class:`RunResult` (``.tokens`` int16 [T, D])."""
        gen = self.session(image_u8, task)
        value = None
        try:
            while True:
                op, *args = gen.send(value)
                value = getattr(self.backend, op)(*args)
        except StopIteration as stop:
            return stop.value

    async def run_async(self, image_u8, task):
        """Run one frame with a backend whose operations are coroutines (a simulation)."""
        gen = self.session(image_u8, task)
        value = None
        try:
            while True:
                op, *args = gen.send(value)
                value = getattr(self.backend, op)(*args)
                if inspect.isawaitable(value):
                    value = await value
        except StopIteration as stop:
            return stop.value
