"""Whole programs on the encoder top in Verilator: :class:`VerilatorFrameSim`.

The top is :class:`~m3vit_hw.encoder.top.EncoderTop` (one external-memory read port ``mem``, one write
port ``wr`` for ``STORE``). The run places the compiled image (program, parameters, camera frame) in
the C++ memory model at ``param_base`` exactly as :func:`sim.program_executor.run_program` does, lets
``wr`` write into the same store, starts the sequencer and waits for ``done``; the encoder tokens are
read from the written store at the output address, and the counters (``cycles``, ``op_cycles``,
``pe_cycles``, ``insn_count``, ``error``) come back per opcode class
(lower-case :class:`~m3vit_hw.control.isa.Opcode` names), the phase counters (``phase_cycles``,
``phase_pe_cycles``) per lower-case :class:`~m3vit_hw.encoder.top.CounterPhase` name. Python is not in the clock loop.
``python -m sim frame --backend verilator`` runs it (:func:`sim.frame.run_verilator`); a partial
program (:func:`sim.frame.strip_program`) runs the same way.
"""

import sys
import time

import numpy as np

from m3vit_hw.control.isa import Opcode
from m3vit_hw.encoder.top import CounterPhase, EncoderTop
from .model import Job, VerilatorModel
from .toolchain import find_verilator
from .vcache import design_key

__all__ = ["VerilatorFrameSim", "frame_memory", "PREFETCH_SLACK", "PARAM_BASE"]

#: Byte address of the image (as :func:`sim.program_executor.run_program`'s default).
PARAM_BASE = 0x1000

_MODELS = {}     # (config, threads, cache) -> (EncoderTop, VerilatorModel), per process


#: Readable bytes after the image: the sequencer prefetches whole bursts past ``END`` (at most its
#: beat FIFO, documented in docs/isa.md), so the memory must answer them.
PREFETCH_SLACK = 4096


def frame_memory(program, img_u8, *, param_base=PARAM_BASE):
    """The external memory of one frame: ``program.image`` at ``param_base`` and the camera frame at its
    input address (a bytearray, :data:`PREFETCH_SLACK` readable bytes after the image), as
    :func:`sim.program_executor.run_program` builds it."""
    lay = program.layout
    img = np.asarray(img_u8)
    if img.dtype != np.uint8 or img.size != lay.input_bytes:
        raise ValueError(f"img_u8 must be uint8 with {lay.input_bytes} values (H, W, C), not {img.dtype} "
                         f"with {img.size}")
    mem = bytearray(param_base + len(program.image) + PREFETCH_SLACK)
    mem[param_base:param_base + len(program.image)] = program.image
    at = param_base + lay.input_addr
    mem[at:at + lay.input_bytes] = img.tobytes()
    return mem


def _program_macs(program):
    from sim.perf_model import project_program
    return project_program(program)["macs"]


class VerilatorFrameSim:
    """The encoder top compiled with Verilator (Verilog and model cached).

    Parameters
    ----------
    config : AcceleratorConfig
    threads, cache, log : as :class:`~sim.verilator.model.VerilatorModel`.

    Attributes
    ----------
    model : VerilatorModel
    last_run : RunResult
    """

    def __init__(self, config, *, threads=1, cache=None, log=None):
        self.config = config
        key = (repr(config), threads, str(cache))
        if key in _MODELS:
            self.dut, self.model = _MODELS[key]
        else:
            find_verilator()
            self.dut = EncoderTop(config)
            self.model = VerilatorModel(self.dut, pulses=("done",), threads=threads, cache=cache, log=log,
                                        verilog_key=design_key(EncoderTop, config))
            _MODELS[key] = (self.dut, self.model)

    def run(self, program, img_u8, task, *, param_base=PARAM_BASE, mem_bytes_per_cycle=16.0, latency=20,
            stall_prob=0.0, seed=0, timeout=50_000_000, progress_seconds=0.0, expected_cycles=None,
            label="frame", log=sys.stderr):
        """Run one frame; return a dict: ``tokens`` (int16 [T, D] from the written store), ``cycles``,
        ``cycles_per_op_class`` / ``pe_active_per_op_class`` (lower-case opcode names),
        ``cycles_per_phase`` / ``pe_active_per_phase`` (lower-case ``CounterPhase`` names), ``insn_count``,
        ``error``, ``macs`` (of the program's instructions, as :func:`sim.perf_model.project_program`
        counts them), ``bytes_read``, ``bytes_written``, ``job_cycles``, ``sim_seconds``,
        ``cycles_per_second``, ``wall_seconds``. :func:`sim.perf_report.from_frame` takes it.

        ``progress_seconds`` > 0 prints a line on ``log`` about that often while the clock runs: cycles
        done, cycles/s and, given ``expected_cycles`` (e.g. the analytic model's), the fraction done and
        the ETA."""
        from sim.program_executor import read_tokens
        t0 = time.time()
        mem = frame_memory(program, img_u8, param_base=param_base)
        lay = program.layout
        job = Job(self.model.spec)
        job.memory("mem", mem, base=0, bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                   stall_prob=stall_prob, seed=seed)
        job.write_memory("wr", share="mem", stall_prob=stall_prob, seed=seed)
        job.host(stall_prob, seed + 7)
        job.put("start", [{"task": task, "program_base": param_base + lay.program_addr,
                           "param_base": param_base, "output_base": param_base + lay.output_addr,
                           "image_base": param_base}])
        job.wait("done", timeout).sample()
        report = None
        if progress_seconds > 0:
            def report(cycle, seconds):
                rate = cycle / seconds if seconds > 0 else 0.0
                line = f"  [{label}] cycle {cycle:,}, {rate:,.0f} cycles/s, {seconds:.0f} s"
                if expected_cycles and rate > 0:
                    line += (f", {100 * cycle / expected_cycles:.1f} % of ~{expected_cycles:,} expected, "
                             f"ETA {max(expected_cycles - cycle, 0) / rate:.0f} s")
                print(line, file=log, flush=True)
        res = self.model.run(job, progress=report, progress_seconds=progress_seconds or 30.0)
        self.last_run = res
        s = res.samples[0]
        cw = self.config.counter_width

        def per_class(bits):
            return {op.name.lower(): (bits >> (cw * op.value)) & ((1 << cw) - 1) for op in Opcode
                    if op not in (Opcode.END, Opcode.SYNC)}

        def per_phase(bits):
            return {p.name.lower(): (bits >> (cw * p.value)) & ((1 << cw) - 1) for p in CounterPhase}

        written = res.written["wr"]
        out = {
            "tokens": read_tokens(bytearray(written["data"].tobytes()), program.model_config,
                                  param_base + lay.output_addr),
            "cycles": int(s["cycles"]),
            "cycles_per_op_class": per_class(int(s["op_cycles"])),
            "pe_active_per_op_class": per_class(int(s["pe_cycles"])),
            "cycles_per_phase": per_phase(int(s["phase_cycles"])),
            "pe_active_per_phase": per_phase(int(s["phase_pe_cycles"])),
            "insn_count": int(s["insn_count"]),
            "error": int(s["error"]),
            "macs": _program_macs(program),
            "bytes_read": res.memory["mem"]["bytes_served"],
            "bytes_written": written["bytes_written"],
            "job_cycles": res.cycles,
            "sim_seconds": round(res.sim_seconds, 4),
            "cycles_per_second": round(res.cycles_per_second or 0),
            "wall_seconds": round(time.time() - t0, 2),
        }
        return out
