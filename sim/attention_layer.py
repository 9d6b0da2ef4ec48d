"""Standalone attention sub-layer runner: the RTL :class:`~m3vit_hw.attention.AttentionLayer` against the
golden model (``x + proj(attention(h))`` of ``reference.golden_model``).

:func:`attn_config` builds a small :class:`AcceleratorConfig` around one attention sub-layer,
:func:`make_attn_workload` random but realistic integer operands (no torch), and :class:`AttnLayerSim`
elaborates one layer, places the :func:`~m3vit_hw.attention.attn_layout.pack_attention` image in an
:class:`~sim.ext_memory.ExternalMemory` and runs one or more sub-layers on it, with random stalls on the
memory and on every external stream (load, start, read-back) when ``stall_prob > 0``.
"""

import math
import time

import numpy as np
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.attention import AttentionLayer, AttnLoadTarget, Phase, pack_attention, start_fields
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.model_config import ModelConfig
from reference import golden as g
from reference import golden_model
from reference.qparams import QAttention, QLinear
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_get, stream_put, wait_done

__all__ = ["attn_config", "make_attn_workload", "golden_attn", "AttnLayerSim", "IMAGE_BASE",
           "run_attention_layer", "main"]

#: External byte address of the parameter image (not 0, so the base address is exercised).
IMAGE_BASE = 0x4000


def attn_config(*, dim, heads, tokens, pe_rows=4, pe_cols=4, q_tile=None, weight_buffer_bytes=None,
                **accel):
    """An :class:`AcceleratorConfig` for one attention sub-layer (``tokens`` tokens incl. cls).

    Every buffer is the config's own (its ``act_buffer_needs`` include the attention buffer map); only
    the model and the array are chosen here. ``accel``: further :class:`AcceleratorConfig` fields
    (``mem_data_bytes``, ``softmax_lanes``, ...).
    """
    model = ModelConfig(name=f"attn-D{dim}-H{heads}", img_size=(1, max(1, tokens - 1)), patch_size=1,
                        in_chans=1, dim=dim, depth=2, heads=heads, experts=2, top_k=1,
                        tasks=("t0",), task_channels=(1,))
    return AcceleratorConfig(model=model, pe_rows=pe_rows, pe_cols=pe_cols, q_tile=q_tile,
                             weight_buffer_bytes=weight_buffer_bytes, **accel)


def _mult_for(k, rng, shape, target):
    real = target / (40.0 * 40.0 * math.sqrt(k))
    shift = int(math.floor(math.log2(((1 << numerics.MULT_BITS) - 1) / (real * 1.5))))
    return np.round(real * rng.uniform(0.5, 1.5, shape) * (1 << shift)).astype(np.int64), shift


def make_attn_workload(dim, heads, tokens, seed=0, *, temperature=2.0):
    """``{"h", "x", "qattn"}``: int8 h [T, D], int16 x [T, D] and a :class:`QAttention`.

    ``temperature`` is the standard deviation of the scores in nats (larger: peakier softmax rows).
    """
    rng = np.random.default_rng(seed)
    h = np.clip(np.round(rng.normal(0, 40, (tokens, dim))), -128, 127).astype(np.int64)
    x = rng.integers(-6000, 6000, (tokens, dim))
    wq = np.clip(np.round(rng.normal(0, 40, (3 * dim, dim))), -127, 127).astype(np.int64)
    mq, sq = _mult_for(dim, rng, 3 * dim, 40.0)
    wp = np.clip(np.round(rng.normal(0, 40, (dim, dim))), -127, 127).astype(np.int64)
    mp, spr = _mult_for(dim, rng, dim, 3000.0)
    hd = dim // heads
    score_std = 40.0 * 40.0 * math.sqrt(hd)
    real = temperature / score_std * math.log2(math.e) * (1 << numerics.EXP_FRAC_BITS)
    c_shift = int(math.floor(math.log2(((1 << numerics.SOFTMAX_MULT_BITS) - 1) / real)))
    qattn = QAttention(
        qkv=QLinear(wq, rng.integers(-3000, 3000, 3 * dim), mq, sq, numerics.ACT_BITS),
        c_mult=int(round(real * (1 << c_shift))), c_shift=c_shift,
        out_mult=int(rng.integers(12000, 24000)), out_shift=14,
        proj=QLinear(wp, rng.integers(-3000, 3000, dim), mp, spr, numerics.RES_BITS))
    return {"h": h, "x": x, "qattn": qattn}


def golden_attn(h, x, qattn, heads, q_tile):
    """``x + proj(attention(h))`` as the golden model computes it (query-tiled)."""
    ctx = golden_model.attention(h, qattn, heads, q_tile)
    return g.residual_add(x, golden_model.linear(ctx, qattn.proj))


def _words(matrix, C, rw):
    """``matrix`` rows as buffer words of ``C`` lanes, ``rw`` words a row (the design's pitch)."""
    t, d = matrix.shape
    padded = np.zeros((t, rw * C), dtype=np.int64)
    padded[:, :d] = matrix
    return padded.reshape(t * rw, C)


class AttnLayerSim:
    """One elaborated AttentionLayer, one or more parameter images, any number of runs (``run``).

    ``qattn`` is the design's own model (packed at :data:`IMAGE_BASE`, started without a run-time
    shape). ``models``: further ``(qattn, heads)`` of other shapes (run-time ``dims``, see
    :func:`~m3vit_hw.attention.attn_layout.plan_attention`), packed after it; a run ``(h, x, j)``
    uses model ``j`` (0: ``qattn``; ``j >= 1``: ``models[j - 1]``).
    """

    def __init__(self, config, qattn, *, mem_bytes_per_cycle=16, latency=20, stall_prob=0.0, seed=0,
                 models=()):
        self.config = config
        self.qattn = qattn
        self.dut = AttentionLayer(config)
        image, self.layout = pack_attention(qattn, config)
        #: Per model: (qattn, heads, layout, base, explicit dims).
        self.models = [(qattn, config.model.heads, self.layout, IMAGE_BASE, False)]
        blob = bytearray(image)
        for q, heads in models:
            img, lay = pack_attention(q, config, heads=heads)
            blob += bytes(-len(blob) % 4096)
            self.models.append((q, heads, lay, IMAGE_BASE + len(blob), True))
            blob += img
        self.image = np.zeros(IMAGE_BASE + len(blob), dtype=np.uint8)
        self.image[IMAGE_BASE:] = np.frombuffer(bytes(blob), dtype=np.uint8)
        self.mem_args = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                             seed=seed)
        self.stall_prob = stall_prob
        self.seed = seed

    def run(self, runs, *, timeout=500_000):
        """Run ``[(h, x), ...]`` (or ``(h, x, model)``) back to back; return one dict per run: ``x``
        (read back), the counters and ``image_bytes`` (of the run's model)."""
        dut, cfg = self.dut, self.config
        C = cfg.pe_cols
        mem = ExternalMemory(self.image, **self.mem_args)
        results = [None] * len(runs)

        async def host(ctx):
            st = Stalls(self.stall_prob, self.seed + 7)
            for r, run in enumerate(runs):
                h, x = run[:2]
                q, _, lay, base, explicit = self.models[run[2] if len(run) > 2 else 0]
                t0 = time.time()
                T = h.shape[0]
                for target, mat in ((AttnLoadTarget.H, h), (AttnLoadTarget.X, x)):
                    for a, word in enumerate(_words(mat, C, cfg.row_words)):
                        await stream_put(ctx, dut.load, {"target": target, "addr": a,
                                                         "data": [int(v) for v in word]}, stalls=st)
                fields = start_fields(q, T, base=base, layout=lay if explicit else None)
                await stream_put(ctx, dut.start, fields, stalls=st)
                await wait_done(ctx, dut.done, timeout=timeout, what=f"AttentionLayer (run {r})")
                res = {name: int(ctx.get(getattr(dut, name))) for name in
                       ("cycles", "compute_cycles", "engine_idle_cycles", "attn_cycles",
                        "attn_compute_cycles", "softmax_cycles", "overlap_cycles", "weight_bytes")}
                res["phase_cycles"] = {k.name: int(ctx.get(dut.phase_cycles[k.value])) for k in Phase}
                words = []
                for a in range(T * cfg.row_words):
                    await stream_put(ctx, dut.rd_addr, a, stalls=st)
                    words.append([int(v) for v in await stream_get(ctx, dut.rd_data, stalls=st)])
                res["x"] = np.array(words, dtype=np.int64).reshape(T, cfg.row_words * C)[:, :x.shape[1]]
                res["image_bytes"] = lay.image_bytes
                res["sim_seconds"] = time.time() - t0
                results[r] = res

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(host)
        sim.run()
        self.memory = mem
        return results


def run_attention_layer(*, dim=16, heads=2, tokens=9, q_tile=None, pe_rows=4, pe_cols=4, seed=0,
                        mem_bytes_per_cycle=16.0, latency=20, stall_prob=0.0):
    """Build a workload, simulate one attention sub-layer, return a report dict: ``bit_exact``,
    ``mismatches``, ``first_mismatch``, ``cycles``, ``macs``, the per-phase cycles and the PE-array
    utilization during attention."""
    cfg = attn_config(dim=dim, heads=heads, tokens=tokens, q_tile=q_tile, pe_rows=pe_rows, pe_cols=pe_cols)
    wl = make_attn_workload(dim, heads, tokens, seed=seed)
    t0 = time.time()
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                       stall_prob=stall_prob, seed=seed)
    res = sim.run([(wl["h"], wl["x"])])[0]
    want = golden_attn(wl["h"], wl["x"], wl["qattn"], heads, cfg.q_tile)
    bad = np.argwhere(res["x"] != want)
    hd = cfg.model.head_dim
    macs = {"QKV": tokens * dim * 3 * dim, "QK": heads * tokens * tokens * hd,
            "AV": heads * tokens * tokens * hd, "PROJ": tokens * dim * dim}
    rep = {
        "bit_exact": not len(bad),
        "mismatches": int(len(bad)),
        "first_mismatch": None if not len(bad) else {
            "op": "attention+proj (residual out)", "token": int(bad[0][0]), "channel": int(bad[0][1]),
            "expected": int(want[tuple(bad[0])]), "got": int(res["x"][tuple(bad[0])])},
        "cycles": res["cycles"],
        "compute_cycles": res["compute_cycles"],
        "macs": sum(macs.values()),
        "macs_per_phase": macs,
        "phase_cycles": res["phase_cycles"],
        "engine_idle_cycles": res["engine_idle_cycles"],
        "attn_cycles": res["attn_cycles"],
        "attn_compute_cycles": res["attn_compute_cycles"],
        "attn_pe_utilization": round(res["attn_compute_cycles"] / res["attn_cycles"], 4)
        if res["attn_cycles"] else None,
        "softmax_cycles": res["softmax_cycles"],
        "softmax_overlap_cycles": res["overlap_cycles"],
        "weight_bytes_fetched": res["weight_bytes"],
        "weight_image_bytes": sim.layout.image_bytes,
        "config": dict(dim=dim, heads=heads, tokens=tokens, q_tile=cfg.q_tile, pe_rows=pe_rows,
                       pe_cols=pe_cols, seed=seed, mem_bytes_per_cycle=mem_bytes_per_cycle,
                       latency=latency, stall_prob=stall_prob, act_buffer_bytes=cfg.act_buffer_bytes),
        "wall_seconds": round(time.time() - t0, 2),
    }
    return rep


def main(argv=None):
    """``python -m sim attention-layer``: returns the process exit code."""
    import argparse
    import json
    import os
    import sys
    p = argparse.ArgumentParser(prog="python -m sim attention-layer",
                                description="Simulate one attention sub-layer (x + proj(attn(h))) in "
                                            "Amaranth's simulator against the integer golden model.")
    a = p.add_argument
    a("--dim", type=int, default=16, help="D (default 16)")
    a("--heads", type=int, default=2, help="heads, dividing D (default 2)")
    a("--tokens", type=int, default=9, help="T (default 9)")
    a("--q-tile", type=int, default=None, help="query rows per tile (default: pe_rows)")
    a("--pe-rows", type=int, default=4, help="PE rows (default 4)")
    a("--pe-cols", type=int, default=4, help="PE columns (default 4)")
    a("--seed", type=int, default=0, help="workload and stall seed (default 0)")
    a("--mem-bytes-per-cycle", type=float, default=16.0, help="external memory bandwidth (default 16)")
    a("--latency", type=int, default=20, help="external memory latency (default 20)")
    a("--stall-prob", type=float, default=0.0, help="random stall probability on memory and streams")
    a("--json", metavar="FILE", help="write the report as JSON")
    args = p.parse_args(argv)
    try:
        for name in ("dim", "heads", "tokens", "pe_rows", "pe_cols", "latency"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
        if args.dim % args.heads:
            raise ValueError(f"--heads must divide --dim ({args.dim}), not {args.heads}")
        if not 0 <= args.stall_prob < 1:
            raise ValueError(f"--stall-prob must be in [0, 1), not {args.stall_prob}")
        if not args.mem_bytes_per_cycle > 0:
            raise ValueError(f"--mem-bytes-per-cycle must be > 0, not {args.mem_bytes_per_cycle}")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json: the directory of {args.json!r} does not exist")
        cfg = attn_config(dim=args.dim, heads=args.heads, tokens=args.tokens, q_tile=args.q_tile,
                          pe_rows=args.pe_rows, pe_cols=args.pe_cols)
        # A config that validates elaborates: the config's own checks above are the layer's.
        rep = run_attention_layer(dim=args.dim, heads=args.heads, tokens=args.tokens, q_tile=args.q_tile,
                                  pe_rows=args.pe_rows, pe_cols=args.pe_cols, seed=args.seed,
                                  mem_bytes_per_cycle=args.mem_bytes_per_cycle, latency=args.latency,
                                  stall_prob=args.stall_prob)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"attention sub-layer D={args.dim} heads={args.heads} T={args.tokens} q_tile={rep['config']['q_tile']} "
          f"on {args.pe_rows}x{args.pe_cols}: bit_exact={rep['bit_exact']} ({rep['mismatches']} mismatches)")
    print(f"  cycles {rep['cycles']}, PE beats {rep['compute_cycles']}, engine idle {rep['engine_idle_cycles']}")
    print(f"  cycles per phase (oldest engine command): {rep['phase_cycles']}")
    print(f"  attention window {rep['attn_cycles']} cycles, PE busy {rep['attn_pe_utilization']}; softmax busy "
          f"{rep['softmax_cycles']}, of which {rep['softmax_overlap_cycles']} overlap PE work")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["bit_exact"] else 1
