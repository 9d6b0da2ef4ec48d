"""``python -m sim frame``: one camera frame through the :class:`~m3vit_hw.encoder.EncoderTop` in
Amaranth's simulator, against the integer golden model.

What a driver does, done by the testbench: the compiled image (:func:`~m3vit_hw.control.compile_model`)
is placed in an external-memory model at ``param_base``, the uint8 HWC camera frame is written into its
``input`` section, the base registers and the task go into the top's ``start`` stream, and the run
ends at ``done``. The encoder tokens the ``STORE`` wrote are compared with
``reference.golden_model.encode`` (or, for a program with opcodes left out, with
:func:`sim.program_executor.execute` of the same program).

Diff ladder
-----------
Whenever the sequencer dispatches an instruction whose ``wait`` bit is set, every unit is idle and
every earlier instruction has finished: the testbench then reads back the residual buffer and the
LayerNorm output rows (``h``, activation words ``0 .. T*row_words``) from the simulated memories.
:func:`sim.program_executor.execute` reports its buffers after every instruction; on a mismatch the
first read-back that differs from the executor's state names the instructions since the previous
read-back (usually exactly one) as the first that went wrong.

Several programs can run one after another on **one** simulated top (:func:`run_frames`): that is how
"one elaborated design runs two models" is shown.
"""

import dataclasses
import json
import os
import sys
import time

import numpy as np
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import SIZINGS, AcceleratorConfig
from m3vit_hw.control.compiler import compile_model
from m3vit_hw.control.isa import Opcode
from m3vit_hw.encoder import CounterPhase, EncoderTop, SeqError
from m3vit_hw.lib.lane_memory import peek_word
from m3vit_hw.model_config import PRESETS, ModelConfig
from reference import golden_model
from reference.random_qparams import random_quantized
from sim.ext_memory import ExternalMemory
from sim.program_executor import execute, read_tokens
from sim.testbench import Stalls, stream_put

__all__ = ["FrameJob", "make_job", "strip_program", "run_frames", "run_verilator", "analytic_projection",
           "model_from_args", "main", "OP_CLASS_NAMES"]

#: Op classes reported (the opcodes that have a unit), lower-case names as in the JSON.
OP_CLASS_NAMES = {op: op.name.lower() for op in Opcode if op not in (Opcode.END, Opcode.SYNC)}


@dataclasses.dataclass
class FrameJob:
    """One program run: the compiled program, the camera frame, the task, where the image goes, and
    the expected tokens (``None``: from the executor)."""

    program: object
    img: np.ndarray
    task: int
    param_base: int = 0
    expected: np.ndarray = None
    label: str = ""
    #: ``{image offset: byte}`` written into the simulated memory only (not the executor's copy): a
    #: fault to show the diff ladder at work.
    rtl_patch: dict = None


def strip_program(program, drop):
    """``program`` without the instructions whose opcode is in ``drop`` (same image otherwise): a
    partial program for a top that lacks those units."""
    isa = program.isa
    insns = [(op, f, w) for op, f, w in program.instructions if op not in set(drop)]
    words = []
    for op, f, w in insns:
        words += isa.encode(op, wait=w, **f)
    image = bytearray(program.image)
    at = program.program_addr
    image[at:at + program.layout.program_bytes] = bytes(program.layout.program_bytes)
    image[at:at + 4 * len(words)] = b"".join(w.to_bytes(4, "little") for w in words)
    return dataclasses.replace(program, instructions=insns, words=words, image=image)


def make_job(config, model, *, seed, task, drop=(), param_base=0, label=""):
    """Random quantized parameters for ``model`` (seed ``seed``), compiled for ``config``, a random
    frame (seed ``seed + 1``), and the golden tokens for ``task`` (``None`` when ``drop`` removes
    opcodes: the executor is the reference then)."""
    qm = random_quantized(model, seed)
    program = compile_model(config, qm)
    if drop:
        program = strip_program(program, drop)
    rng = np.random.default_rng(seed + 1)
    H, W = model.img_size
    img = rng.integers(0, 256, (H, W, model.in_chans)).astype(np.uint8)
    expected = None
    if not drop:
        expected = golden_model.encode(qm, img.astype(np.int64).transpose(2, 0, 1) - 128, task)
    return FrameJob(program=program, img=img, task=task, param_base=param_base, expected=expected,
                    label=label or model.name)


def _block_names(program):
    """``[(block, op name)]`` per instruction: ``embed`` for LOAD_IMAGE, block index from the
    LayerNorm count, ``output`` for STORE/END."""
    out, lns = [], 0
    for op, _, _ in program.instructions:
        if op is Opcode.LAYERNORM:
            lns += 1
        if op is Opcode.LOAD_IMAGE:
            block = "embed"
        elif op in (Opcode.STORE, Opcode.END):
            block = "output"
        else:
            block = (lns - 1) // 2
        out.append((block, op.name))
    return out


def _words(ctx, mem, lo, hi, bits, lanes):
    """Words ``lo .. hi-1`` of a simulated memory (or ``LaneMemory``) as an int64 array ``[hi - lo, lanes]``."""
    mask = (1 << bits) - 1
    out = np.zeros((hi - lo, lanes), dtype=np.int64)
    for i in range(lo, hi):
        raw = peek_word(ctx, mem, i)
        for c in range(lanes):
            v = (raw >> (bits * c)) & mask
            out[i - lo, c] = v - (1 << bits) if v >> (bits - 1) else v
    return out


def _layout_memory(jobs, slack):
    """Place every job's image (beat- and page-aligned) and return the memory size."""
    at = 0
    for j in jobs:
        if j.param_base is None or j.param_base < at:
            j.param_base = at
        at = -(-(j.param_base + len(j.program.image)) // 4096) * 4096
    return at + slack


def run_frames(config, jobs, *, stall_prob=0.0, latency=8, bytes_per_cycle=None, seed=0,
               max_cycles=5_000_000, progress=0, log=sys.stderr):
    """Run ``jobs`` (:class:`FrameJob`) one after another on one simulated :class:`EncoderTop` of
    ``config``; return one report dict per job.

    Parameters
    ----------
    stall_prob, latency, bytes_per_cycle, seed
        External-memory model (read and write side): random stalls, read latency, bandwidth (default:
        one beat a cycle).
    max_cycles : int
        Per job; exceeding it raises RuntimeError.
    progress : int
        Print a progress line on ``log`` every ``progress`` cycles (0: never).
    """
    top = EncoderTop(config)
    db = config.mem_data_bytes
    size = _layout_memory(jobs, slack=top.sequencer.fifo_beats * db + 4096)
    mem = bytearray(size)
    for j in jobs:
        lay = j.program.layout
        mem[j.param_base:j.param_base + len(j.program.image)] = j.program.image
        at = j.param_base + lay.input_addr
        mem[at:at + lay.input_bytes] = np.ascontiguousarray(j.img).tobytes()
        for off, byte in (j.rtl_patch or {}).items():
            mem[j.param_base + off] = byte
    xm = ExternalMemory(mem, bytes_per_cycle=bytes_per_cycle or db, latency=latency, stall_prob=stall_prob,
                        seed=seed, max_outstanding=4)
    mem = xm.data                     # the model's own (mutable) copy: STORE writes land there
    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(xm.serve(top.mem), background=True)
    sim.add_testbench(xm.serve_write(top.wr), background=True)
    dp, seq = top.datapath, top.sequencer
    C = config.pe_cols
    reports = []

    async def host(ctx):
        stalls = Stalls(stall_prob, seed + 7)
        for j in jobs:
            lay = j.program.layout
            view = j.program.model_config
            T, rw = view.model.tokens, view.row_words
            snaps = []                       # (instruction index, res words, h words)
            await stream_put(ctx, top.start, {
                "task": j.task, "program_base": j.param_base + lay.program_addr,
                "param_base": j.param_base, "output_base": j.param_base + lay.output_addr,
                "image_base": j.param_base}, stalls=stalls)
            t0 = time.time()
            read0 = xm.bytes_served
            cycles, index = 0, 0
            while not ctx.get(top.done):
                await ctx.tick()
                cycles += 1
                if ctx.get(seq.insn.valid) and ctx.get(seq.insn.ready):
                    if ctx.get(seq.insn.payload.wait):
                        snaps.append((index, _words(ctx, dp.res_buffer, 0, T * rw, numerics.RES_BITS, C),
                                      _words(ctx, dp.act_buffer, 0, T * rw, numerics.ACT_BITS, C)))
                    index += 1
                if progress and cycles % progress == 0:
                    print(f"  [{j.label}] cycle {cycles}, instruction {index}/{len(j.program.instructions)}, "
                          f"{cycles / max(time.time() - t0, 1e-9):.0f} cycles/s", file=log, flush=True)
                if cycles > max_cycles:
                    raise RuntimeError(f"{j.label}: no done within {max_cycles} cycles (instruction {index})")
            rep = {
                "label": j.label, "task": j.task, "cycles": ctx.get(top.cycles),
                "error": SeqError(ctx.get(top.error)).name,
                "instructions": ctx.get(top.insn_count),
                "cycles_per_op_class": {n: ctx.get(top.op_cycles[op.value]) for op, n in OP_CLASS_NAMES.items()},
                "pe_active_per_op_class": {n: ctx.get(top.pe_cycles[op.value])
                                           for op, n in OP_CLASS_NAMES.items()},
                "cycles_per_phase": {p.name.lower(): ctx.get(top.phase_cycles[p.value]) for p in CounterPhase},
                "pe_active_per_phase": {p.name.lower(): ctx.get(top.phase_pe_cycles[p.value])
                                        for p in CounterPhase},
                "wall_seconds": round(time.time() - t0, 1),
                "bytes_read": xm.bytes_served - read0,
                "dispatch_overhead_cycles": None,
                "_snaps": snaps,
            }
            reports.append(rep)
            await ctx.tick()

    sim.add_testbench(host)
    sim.run()
    for j, rep in zip(jobs, reports):
        _check(config, j, rep, mem)
    return reports


def _check(config, job, rep, mem):
    """Fill ``rep`` with the comparison against the golden model and, on a mismatch, the ladder."""
    prog = job.program
    view = prog.model_config
    lay = prog.layout
    got = read_tokens(mem, view, job.param_base + lay.output_addr)
    # The executor on a private copy of the same memory: the reference states, MACs, and the tokens
    # of a partial program.
    emem = bytearray(len(prog.image) + 4096)
    emem[:len(prog.image)] = prog.image
    emem[lay.input_addr:lay.input_addr + lay.input_bytes] = np.ascontiguousarray(job.img).tobytes()
    states = {}
    T, rw = view.model.tokens, view.row_words

    def observer(i, op, fields, act, res):
        states[i] = (res[:T * rw].copy(), act[:T * rw].copy())

    res = execute(emem, prog.config, view, task=job.task, param_base=0, program_base=lay.program_addr,
                  output_base=lay.output_addr, observer=observer)
    want = job.expected if job.expected is not None else read_tokens(emem, view, lay.output_addr)
    bad = np.argwhere(got != want)
    snaps = rep.pop("_snaps")
    ops, pe = rep["cycles_per_op_class"], rep["pe_active_per_op_class"]
    # PE-array busy fraction while each class owns the datapath, and the cycles no unit was busy
    # (program fetch, decode, dispatch; units never overlap in the programs the compiler emits).
    rep["pe_busy_fraction_per_op_class"] = {k: round(pe[k] / ops[k], 4) if ops[k] else 0.0 for k in ops}
    rep["dispatch_overhead_cycles"] = rep["cycles"] - sum(ops.values())
    rep.update(bit_exact=bool(not len(bad)) and rep["error"] == "NONE", mismatches=int(len(bad)),
               first_mismatch=None, macs=int(res.macs), reference="golden_model.encode"
               if job.expected is not None else "program_executor")
    if not len(bad):
        return rep
    names = _block_names(prog)
    t, c = (int(v) for v in bad[0])
    first = {"block": "output", "op": "STORE", "index": [t, c], "expected": int(want[t, c]),
             "got": int(got[t, c]), "instructions": None}
    D = view.model.dim
    prev = -1
    for index, rtl_res, rtl_act in snaps:
        ref = states.get(index - 1)
        if ref is None:
            prev = index
            continue
        # ``h`` is compared once a LayerNorm has written it (before that the patch loader's rows,
        # which the executor does not model, sit there).
        after_ln = any(names[i][1] == "LAYERNORM" for i in range(index))
        checks = [("residual", rtl_res, ref[0])] + ([("h", rtl_act, ref[1])] if after_ln else [])
        for what, a, b in checks:
            ra = a.reshape(T, rw * config.pe_cols)[:, :D]
            rb = b.reshape(T, rw * config.pe_cols)[:, :D]
            d = np.argwhere(ra != rb)
            if len(d):
                tt, cc = (int(v) for v in d[0])
                lo = max(prev, 0)
                block, op = names[index - 1]
                first = {"block": block, "op": op, "buffer": what, "index": [tt, cc],
                         "expected": int(rb[tt, cc]), "got": int(ra[tt, cc]),
                         "instructions": [lo, index - 1],
                         "ops": [names[i][1] for i in range(lo, index)]}
                rep["first_mismatch"] = first
                return rep
        prev = index
    rep["first_mismatch"] = first
    return rep


def _config(args, model):
    """The accelerator: the preset's (``ACCEL_PRESETS``) when ``--preset`` names one, reshaped by
    ``--pe-rows`` / ``--pe-cols`` if given, else ``--pe-rows x --pe-cols`` (default 4x4) around
    ``model``; ``--mem-data-bytes`` sets the memory beat of either; ``--sizing`` picks the
    preset's accelerator from ``SIZINGS`` (``small`` for W1's fast 16x16, ``device`` for the
    xczu7ev-sized one)."""
    from m3vit_hw.config import ACCEL_PRESETS
    over = {} if getattr(args, "mem_data_bytes", None) is None else {"mem_data_bytes": args.mem_data_bytes}
    sizing = getattr(args, "sizing", "default")
    for item in getattr(args, "accel_set", None) or ():
        name, sep, value = item.partition("=")
        if not sep or name not in AcceleratorConfig.__dataclass_fields__ or name == "model":
            raise ValueError(f"--accel-set must be FIELD=INT with FIELD an AcceleratorConfig field, not {item!r}")
        try:
            over[name] = int(value)
        except ValueError:
            raise ValueError(f"--accel-set {name}: {value!r} is not an integer") from None
    if args.preset in ACCEL_PRESETS:
        # The PE flags reshape the preset's accelerator (its buffers stay).
        over.update({k: v for k, v in (("pe_rows", args.pe_rows), ("pe_cols", args.pe_cols)) if v is not None})
        return AcceleratorConfig.from_preset(args.preset, sizing=sizing).with_(model=model, **over)
    if sizing != "default":
        raise ValueError(f"--sizing {sizing} needs a --preset with an accelerator preset (m3vit_hw.config.ACCEL_PRESETS), not {args.preset!r}")
    return AcceleratorConfig(model=model, pe_rows=args.pe_rows or 4, pe_cols=args.pe_cols or 4, **over)


def run_verilator(config, job, *, stall_prob=0.0, latency=8, seed=0, bytes_per_cycle=None,
                  progress_seconds=0.0, log=sys.stderr):
    """One :class:`FrameJob` on the compiled (Verilator) :class:`EncoderTop`: the same report keys as
    :func:`run_frames` plus the simulator's own speed and build times. No diff ladder (no
    per-instruction read-back): on a mismatch, re-run with ``--backend pysim`` to name the op.
    ``progress_seconds`` > 0 prints cycles done, cycles/s and an ETA (against the analytic model's
    uniform-routing projection) on ``log`` about that often."""
    from sim.perf_model import project_program
    from sim.verilator.frame import VerilatorFrameSim
    t0 = time.time()
    vs = VerilatorFrameSim(config, log=(lambda m: print(f"  {m}", file=log, flush=True))
                           if progress_seconds else None)
    build_seconds = time.time() - t0
    expected = None
    if progress_seconds:
        expected = round(project_program(job.program, latency=latency,
                                         bytes_per_cycle=bytes_per_cycle or config.mem_data_bytes)["cycles"])
    t0 = time.time()
    r = vs.run(job.program, job.img, job.task, param_base=job.param_base,
               mem_bytes_per_cycle=bytes_per_cycle or config.mem_data_bytes, latency=latency,
               stall_prob=stall_prob, seed=seed, timeout=max(50_000_000, 4 * (expected or 0)),
               progress_seconds=progress_seconds, expected_cycles=expected, label=job.label, log=log)
    got = np.asarray(r["tokens"], dtype=np.int64)
    if job.expected is not None:
        want, reference = np.asarray(job.expected, dtype=np.int64), "golden_model.encode"
    else:
        prog = job.program
        emem = bytearray(len(prog.image) + 4096)
        emem[:len(prog.image)] = prog.image
        lay = prog.layout
        emem[lay.input_addr:lay.input_addr + lay.input_bytes] = np.ascontiguousarray(job.img).tobytes()
        execute(emem, prog.config, prog.model_config, task=job.task, param_base=0,
                program_base=lay.program_addr, output_base=lay.output_addr)
        want, reference = np.asarray(read_tokens(emem, prog.model_config, lay.output_addr)), "executor"
    bad = np.argwhere(got != want)
    first = None
    if len(bad):
        t, c = (int(v) for v in bad[0])
        first = {"block": "output", "op": "STORE", "index": [t, c], "expected": int(want[t, c]),
                 "got": int(got[t, c]), "hint": "re-run with --backend pysim for the diff ladder"}
    return {
        "label": job.label, "task": job.task, "cycles": r["cycles"], "error": SeqError(r["error"]).name,
        "instructions": r["insn_count"], "cycles_per_op_class": r["cycles_per_op_class"],
        "pe_active_per_op_class": r["pe_active_per_op_class"],
        "cycles_per_phase": r["cycles_per_phase"], "pe_active_per_phase": r["pe_active_per_phase"],
        "macs": r["macs"], "bytes_read": r["bytes_read"],
        "bit_exact": not len(bad), "mismatches": int(len(bad)), "reference": reference,
        "first_mismatch": first, "wall_seconds": round(time.time() - t0, 1),
        "simulator": {"cycles_per_second": r["cycles_per_second"], "sim_seconds": r["sim_seconds"],
                      "model_seconds": round(build_seconds, 1), "build": dict(vs.model.build)},
    }


def analytic_projection(config, job, *, qm=None, seed=0, latency=8, bytes_per_cycle=None):
    """:func:`sim.perf_model.project_program` of ``job``'s program with the golden model's routing of
    ``job``'s own frame and task (``qm``: its parameters; default ``random_quantized(model, seed)``, as
    :func:`make_job` builds them), for the same memory model: ``{"cycles", "per_op_class"}``, the
    analytic model's prediction to hold against the RTL's counters."""
    from sim import perf_model as pm
    model = job.program.model_config.model
    qm = random_quantized(model, seed) if qm is None else qm
    img = np.asarray(job.img, dtype=np.int64).transpose(2, 0, 1) - 128
    inter = golden_model.encode(qm, img, job.task, q_tile=config.q_tile, return_intermediates=True)
    counts = {b: pm.routing_counts(r["experts"], model.experts) for b, r in inter["routing"].items()}
    proj = pm.project_program(job.program, routing=counts, latency=latency,
                              bytes_per_cycle=bytes_per_cycle or config.mem_data_bytes)
    per = {}
    for o in proj["ops"]:
        per[o["op"].lower()] = per.get(o["op"].lower(), 0) + o["cycles"]
    return {"cycles": round(proj["cycles"]), "per_op_class": {k: round(v) for k, v in per.items()},
            "weight_bytes_minimum": pm.weight_minimum(job.program.model_config, counts)}


def model_from_args(args):
    """The :class:`ModelConfig` of ``--preset`` or the model flags (raises ValueError on bad ones)."""
    if args.preset:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, not {args.preset!r}")
        model = PRESETS[args.preset]
        changes = {}
    else:
        model = None
        changes = {}
    flags = {"dim": args.dim, "heads": args.heads, "depth": args.depth, "mlp_hidden": args.mlp_hidden,
             "experts": args.experts, "top_k": args.top_k, "expert_hidden": args.expert_hidden,
             "patch_size": args.patch}
    changes.update({k: v for k, v in flags.items() if v is not None})
    if args.image:
        try:
            h, w = (int(v) for v in args.image.lower().split("x"))
        except ValueError:
            raise ValueError(f"--image must be HxW (e.g. 32x64), not {args.image!r}") from None
        changes["img_size"] = (h, w)
    if args.tasks is not None:
        if args.tasks < 1:
            raise ValueError(f"--tasks must be >= 1, not {args.tasks}")
        changes["tasks"] = tuple(f"t{i}" for i in range(args.tasks))
        changes["task_channels"] = (1,) * args.tasks
    if model is None:
        base = dict(name="custom", img_size=(32, 64), dim=32, depth=2, heads=2, experts=4, top_k=2,
                    tasks=("t0", "t1"), task_channels=(1, 1), decoder_channels=8)
        base.update(changes)
        return ModelConfig(**base)
    return model.with_(**changes) if changes else model


def main(argv=None):
    """``python -m sim frame``: returns the process exit code."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m sim frame",
                                description="One camera frame through the encoder top (program sequencer + "
                                            "shared datapath) in Amaranth's simulator, against the golden model.")
    a = p.add_argument
    a("--preset", help=f"model preset ({', '.join(sorted(PRESETS))}); flags below override its fields")
    for name, help_ in (("dim", "D"), ("heads", "attention heads"), ("depth", "blocks"),
                        ("mlp-hidden", "dense MLP hidden width"), ("experts", "experts E"),
                        ("top-k", "experts per token"), ("expert-hidden", "expert hidden width h"),
                        ("patch", "patch edge (default 16)")):
        a(f"--{name}", type=int, default=None, help=help_)
    a("--image", help="image size HxW (multiples of the patch)")
    a("--tasks", type=int, default=None, help="number of tasks")
    a("--task", type=int, default=0, help="the run-time task (default 0)")
    a("--seed", type=int, default=0, help="parameters, frame and stall seed (default 0)")
    a("--pe-rows", type=int, default=None, help="PE rows (default: the preset's accelerator, else 4)")
    a("--pe-cols", type=int, default=None, help="PE columns (default: the preset's accelerator, else 4)")
    a("--backend", default="pysim",
      help="pysim (Amaranth's simulator, with the diff ladder) or verilator (compiled, cached; "
           "the ladder then needs a pysim re-run)")
    a("--sizing", choices=tuple(SIZINGS), default="default",
      help="accelerator sizing of the preset (m3vit_hw.config.SIZINGS; default: W1 and W2 device-sized, "
           "the test presets small; small: W1 16x16, W2 32x32, fast; device: the xczu7ev-sized PE array, W1/W2 only)")
    a("--accel-set", action="append", metavar="FIELD=INT",
      help="override one integer AcceleratorConfig field (e.g. act_buffer_bytes=153600); repeatable")
    a("--mem-data-bytes", type=int, default=None,
      help="memory beat in bytes, a power of two up to 128 (default: the accelerator's)")
    a("--mem-bytes-per-cycle", type=float, default=None,
      help="external-memory bandwidth (default: one beat a cycle)")
    a("--clock-mhz", type=float, default=None, help="clock for latency_ms (default: the config's)")
    a("--plot", metavar="FILE.png", help="draw the cycle breakdown (matplotlib)")
    a("--stall-prob", type=float, default=0.0, help="random memory stalls (default 0)")
    a("--latency", type=int, default=8, help="external memory read latency (default 8)")
    a("--progress", type=int, default=20000, help="pysim: progress line every N cycles on stderr (0: none)")
    a("--progress-seconds", type=float, default=30.0,
      help="verilator: progress line (cycles, cycles/s, ETA) about every S seconds on stderr (0: none)")
    a("--drop", default="", help="comma-separated opcodes to leave out of the program (e.g. attention,moe)")
    a("--json", metavar="FILE", help="write the report as JSON")
    args = p.parse_args(argv)
    try:
        if args.backend not in ("pysim", "verilator"):
            raise ValueError(f"--backend must be pysim or verilator, not {args.backend!r}")
        for flag, path in (("--json", args.json), ("--plot", args.plot)):
            if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ValueError(f"{flag}: the directory of {path!r} does not exist")
        if args.mem_bytes_per_cycle is not None and args.mem_bytes_per_cycle <= 0:
            raise ValueError(f"--mem-bytes-per-cycle must be > 0, not {args.mem_bytes_per_cycle}")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json: the directory of {args.json!r} does not exist")
        if args.progress_seconds < 0:
            raise ValueError(f"--progress-seconds must be >= 0, not {args.progress_seconds}")
        if not 0 <= args.stall_prob < 1:
            raise ValueError(f"--stall-prob must be in [0, 1), not {args.stall_prob}")
        model = model_from_args(args)
        if not 0 <= args.task < model.num_tasks:
            raise ValueError(f"--task must be in [0, {model.num_tasks - 1}], not {args.task}")
        drop = []
        for name in filter(None, args.drop.split(",")):
            try:
                drop.append(Opcode[name.strip().upper()])
            except KeyError:
                raise ValueError(f"--drop: unknown opcode {name!r}") from None
        config = _config(args, model)
        # The sequencer's own limits (a beat divides the instruction or holds whole ones), before
        # any long run.
        from m3vit_hw.encoder.sequencer import ProgramSequencer
        ProgramSequencer(config)
        job = make_job(config, model, seed=args.seed, task=args.task, drop=drop)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"frame: {model.name} D={model.dim} heads={model.heads} depth={model.depth} E={model.experts} "
          f"top-{model.top_k} image {model.img_size[0]}x{model.img_size[1]} ({model.tokens} tokens), task "
          f"{args.task}, {config.pe_rows}x{config.pe_cols} PEs, {len(job.program.instructions)} instructions",
          file=sys.stderr)
    if args.backend == "verilator":
        rep = run_verilator(config, job, stall_prob=args.stall_prob, latency=args.latency, seed=args.seed,
                            bytes_per_cycle=args.mem_bytes_per_cycle, progress_seconds=args.progress_seconds)
    else:
        rep = run_frames(config, [job], stall_prob=args.stall_prob, latency=args.latency, seed=args.seed,
                         bytes_per_cycle=args.mem_bytes_per_cycle, progress=args.progress)[0]
    rep["backend"] = args.backend
    if not drop:
        am = analytic_projection(config, job, seed=args.seed, latency=args.latency,
                                 bytes_per_cycle=args.mem_bytes_per_cycle)
        am["error"] = round((am["cycles"] - rep["cycles"]) / rep["cycles"], 5)
        rep["analytic_model"] = am
        # Every read but the program and the image is a weight or parameter byte: the memory model's
        # count less those two gives what crossed the port, against the frame's minimum (each active
        # expert once per layer). The program fetch reads up to a burst past END, so this is an upper
        # bound by at most that burst.
        lay = job.program.layout
        rep["weight_bytes_fetched"] = rep["bytes_read"] - lay.program_bytes - lay.input_bytes
        rep["weight_bytes_minimum"] = am["weight_bytes_minimum"]
        print(f"analytic model: {am['cycles']} cycles ({100 * am['error']:+.2f} % against the RTL)",
              file=sys.stderr)
    rep["mem_bytes_per_cycle"] = min(float(args.mem_bytes_per_cycle or config.mem_data_bytes),
                                     config.mem_data_bytes)
    rep["model"] = dataclasses.asdict(model)
    rep["pe"] = [config.pe_rows, config.pe_cols]
    from sim import perf_report
    perf = perf_report.make_report(perf_report.from_frame(rep, config), config, clock_mhz=args.clock_mhz)
    rep["performance"] = perf
    print(perf_report.summary(perf, title=f"{model.name} task {args.task} ({args.backend})"), file=sys.stderr)
    if args.plot:
        perf_report.plot_breakdown([(f"{model.name} task {args.task}", perf)], args.plot,
                                   title=f"{model.name}: cycles per op class ({args.backend})")
    print(f"bit_exact={rep['bit_exact']} ({rep['mismatches']} mismatches vs {rep['reference']}), "
          f"{rep['cycles']} cycles, {rep['macs']} MACs, error {rep['error']}")
    print("  cycles per op class: " + ", ".join(f"{k} {v}" for k, v in rep["cycles_per_op_class"].items()))
    print("  PE-busy per op class: " + ", ".join(f"{k} {v}" for k, v in rep["pe_active_per_op_class"].items()))
    print("  phases (cycles / PE-busy): " + ", ".join(f"{k} {v} / {rep['pe_active_per_phase'][k]}"
                                                      for k, v in rep["cycles_per_phase"].items()))
    if rep["first_mismatch"]:
        print(f"  first mismatch: {rep['first_mismatch']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2, default=str)
    return 0 if rep["bit_exact"] else 1
