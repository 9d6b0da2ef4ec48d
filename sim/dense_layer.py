"""Standalone dense MLP sub-layer runner: the RTL :class:`~m3vit_hw.dense.DenseLayer` against the golden
model (``reference.golden_model.dense_mlp``: ``x + fc2(gelu(fc1(h)))``).

:func:`dense_config` builds a small :class:`AcceleratorConfig`, :func:`make_dense_workload` random but
realistic integer operands (no torch), and :class:`DenseLayerSim` elaborates one layer, places the
:func:`~m3vit_hw.dense.pack_dense` image in an :class:`~sim.ext_memory.ExternalMemory` and runs it,
with random stalls on the memory and on every external stream when ``stall_prob > 0``.
"""

import math
import time

import numpy as np
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.dense import DenseLayer, DenseLoadTarget, DensePhase, pack_dense, start_fields
from m3vit_hw.model_config import ModelConfig
from reference import golden_model
from reference.qparams import QDenseMlp, QLinear
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_get, stream_put, wait_done

__all__ = ["dense_config", "make_dense_workload", "DenseLayerSim", "NormMlpSim", "IMAGE_BASE", "run_dense_layer", "main",
           "words_of"]

#: External byte address of the parameter image (not 0, so the base address is exercised).
IMAGE_BASE = 0x2000


def dense_config(*, dim, tokens, hidden, pe_rows=4, pe_cols=4, act_buffer_bytes=None, weight_buffer_bytes=None,
                 **accel):
    """An :class:`AcceleratorConfig` around one dense MLP of width ``hidden`` (``tokens`` incl. cls).

    The model's ``mlp_hidden`` is ``hidden``; every buffer the config derives is the config's own (its
    ``act_buffer_needs`` include the dense MLP, its weight halves are whole memory beats). ``accel``:
    further :class:`AcceleratorConfig` fields (``mem_data_bytes``, ``mem_max_burst``, ...).
    """
    model = ModelConfig(name=f"dense-D{dim}-H{hidden}", img_size=(1, max(1, tokens - 1)), patch_size=1,
                        in_chans=1, dim=dim, depth=2, heads=1, experts=2, top_k=1, tasks=("t0",),
                        task_channels=(1,), mlp_hidden=hidden)
    return AcceleratorConfig(model=model, pe_rows=pe_rows, pe_cols=pe_cols, act_buffer_bytes=act_buffer_bytes,
                             weight_buffer_bytes=weight_buffer_bytes, **accel)


def _mult_for(k, rng, shape, target):
    real = target / (40.0 * 40.0 * math.sqrt(k))
    shift = int(math.floor(math.log2(((1 << numerics.MULT_BITS) - 1) / (real * 1.5))))
    return np.round(real * rng.uniform(0.5, 1.5, shape) * (1 << shift)).astype(np.int64), shift


def make_dense_workload(dim, hidden, tokens, seed=0, *, extremes=False):
    """``{"h", "x", "qdense"}``: int8 h [T, D], int16 x [T, D] and a :class:`QDenseMlp`.

    ``extremes`` takes every operand from its range ends (h and weights -128/127, residual
    -32768/32767, the largest multipliers), so that requantization and the residual add saturate.
    """
    rng = np.random.default_rng(seed)
    # The GELU table holds uint8 codes (numerics.GELU_CODE_BITS), which fc2 reads unsigned.
    lut = np.clip(np.round(rng.normal(100, 70, 256)), 0, 255).astype(np.int64)
    if extremes:
        h = rng.choice([-128, 127], (tokens, dim))
        x = rng.choice([-32768, 32767, 0], (tokens, dim))
        w1 = rng.choice([-128, 127], (hidden, dim))
        w2 = rng.choice([-128, 127], (dim, hidden))
        top = (1 << numerics.MULT_BITS) - 1
        fc1 = QLinear(w1, rng.choice([-(1 << 31), (1 << 31) - 1], hidden), np.full(hidden, top), 20,
                      numerics.ACT_BITS)
        fc2 = QLinear(w2, rng.choice([-(1 << 31), (1 << 31) - 1], dim), np.full(dim, top), 20,
                      numerics.RES_BITS)
        lut[0], lut[255] = 0, 255
        return {"h": h, "x": x, "qdense": QDenseMlp(fc1, lut, fc2)}
    h = np.clip(np.round(rng.normal(0, 40, (tokens, dim))), -128, 127).astype(np.int64)
    x = rng.integers(-6000, 6000, (tokens, dim))
    w1 = np.clip(np.round(rng.normal(0, 40, (hidden, dim))), -127, 127).astype(np.int64)
    m1, s1 = _mult_for(dim, rng, hidden, 40.0)
    w2 = np.clip(np.round(rng.normal(0, 40, (dim, hidden))), -127, 127).astype(np.int64)
    m2, s2 = _mult_for(hidden, rng, dim, 3000.0)
    qd = QDenseMlp(QLinear(w1, rng.integers(-3000, 3000, hidden), m1, s1, numerics.ACT_BITS), lut,
                   QLinear(w2, rng.integers(-3000, 3000, dim), m2, s2, numerics.RES_BITS))
    return {"h": h, "x": x, "qdense": qd}


def words_of(matrix, C):
    """Rows of ``matrix`` [T, D] as buffer words [T * ceil(D / C), C] (padding lanes zero)."""
    t, d = matrix.shape
    rw = -(-d // C)
    padded = np.zeros((t, rw * C), dtype=np.int64)
    padded[:, :d] = matrix
    return padded.reshape(t * rw, C)


class DenseLayerSim:
    """One elaborated DenseLayer, one parameter image, any number of runs (``run``)."""

    def __init__(self, config, qdense, *, token_tile=None, mem_bytes_per_cycle=16, latency=20,
                 stall_prob=0.0, seed=0):
        self.config = config
        self.qdense = qdense
        hidden = np.asarray(qdense.fc1.w).shape[0]
        self.dut = DenseLayer(config, hidden=hidden, token_tile=token_tile)
        image, self.layout = pack_dense(qdense, config)
        self.image = np.zeros(IMAGE_BASE + len(image), dtype=np.uint8)
        self.image[IMAGE_BASE:] = np.frombuffer(image, dtype=np.uint8)
        self.mem_args = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                             seed=seed)
        self.stall_prob = stall_prob
        self.seed = seed

    def run(self, runs, *, timeout=500_000):
        """Run ``[(h, x), ...]`` back to back; return one dict per run: ``x`` (read back) and counters."""
        dut, cfg = self.dut, self.config
        C = cfg.pe_cols
        mem = ExternalMemory(self.image, **self.mem_args)
        results = [None] * len(runs)

        async def host(ctx):
            st = Stalls(self.stall_prob, self.seed + 7)
            for r, (h, x) in enumerate(runs):
                t0 = time.time()
                T = h.shape[0]
                for target, mat in ((DenseLoadTarget.H, h), (DenseLoadTarget.X, x)):
                    for a, word in enumerate(words_of(mat, C)):
                        await stream_put(ctx, dut.load, {"target": target, "addr": a,
                                                         "data": [int(v) for v in word]}, stalls=st)
                await stream_put(ctx, dut.start, start_fields(self.qdense, T, base=IMAGE_BASE), stalls=st)
                await wait_done(ctx, dut.done, timeout=timeout, what=f"DenseLayer (run {r})")
                res = {name: int(ctx.get(getattr(dut, name)))
                       for name in ("cycles", "compute_cycles", "wait_cycles")}
                res["phase_cycles"] = {k.name: int(ctx.get(dut.phase_cycles[k.value])) for k in DensePhase}
                words = []
                for a in range(T * cfg.row_words):
                    await stream_put(ctx, dut.rd_addr, a, stalls=st)
                    words.append([int(v) for v in await stream_get(ctx, dut.rd_data, stalls=st)])
                res["x"] = np.array(words, dtype=np.int64).reshape(T, cfg.row_words * C)[:, :x.shape[1]]
                res["sim_seconds"] = time.time() - t0
                results[r] = res

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(host)
        sim.run()
        self.memory = mem
        return results


def run_dense_layer(*, dim=16, hidden=64, tokens=9, pe_rows=4, pe_cols=4, token_tile=None, seed=0,
                    extremes=False, weight_buffer_bytes=None, mem_bytes_per_cycle=16.0, latency=20,
                    stall_prob=0.0):
    """Build a workload, simulate one dense MLP, return a report dict (``bit_exact``, ``mismatches``,
    ``first_mismatch``, ``cycles``, ``macs``, ``macs_per_cycle``, per-phase cycles, weight bytes)."""
    cfg = dense_config(dim=dim, tokens=tokens, hidden=hidden, pe_rows=pe_rows, pe_cols=pe_cols,
                       weight_buffer_bytes=weight_buffer_bytes)
    wl = make_dense_workload(dim, hidden, tokens, seed=seed, extremes=extremes)
    t0 = time.time()
    sim = DenseLayerSim(cfg, wl["qdense"], token_tile=token_tile, mem_bytes_per_cycle=mem_bytes_per_cycle,
                        latency=latency, stall_prob=stall_prob, seed=seed)
    res = sim.run([(wl["h"], wl["x"])])[0]
    want = golden_model.dense_mlp(wl["x"], wl["h"], wl["qdense"])
    bad = np.argwhere(res["x"] != want)
    macs = 2 * tokens * dim * hidden
    bm = sim.dut.buffer_map
    return {
        "bit_exact": not len(bad),
        "mismatches": int(len(bad)),
        "first_mismatch": None if not len(bad) else {
            "op": "dense_mlp (residual out)", "token": int(bad[0][0]), "channel": int(bad[0][1]),
            "expected": int(want[tuple(bad[0])]), "got": int(res["x"][tuple(bad[0])])},
        "cycles": res["cycles"],
        "compute_cycles": res["compute_cycles"],
        "wait_cycles": res["wait_cycles"],
        "phase_cycles": res["phase_cycles"],
        "macs": macs,
        "macs_per_cycle": round(macs / res["cycles"], 3),
        "peak_macs_per_cycle": pe_rows * pe_cols,
        "token_tile": bm.token_tile,
        "token_tiles": -(-tokens // bm.token_tile),
        "weight_tiles": len(sim.layout.tiles),
        "bytes_fetched": sim.memory.bytes_served,
        "config": dict(dim=dim, hidden=hidden, tokens=tokens, pe_rows=pe_rows, pe_cols=pe_cols, seed=seed,
                       extremes=extremes, mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                       stall_prob=stall_prob, act_buffer_bytes=cfg.act_buffer_bytes,
                       weight_buffer_bytes=cfg.weight_buffer_bytes),
        "wall_seconds": round(time.time() - t0, 2),
    }


def main(argv=None):
    """``python -m sim dense-layer``: returns the process exit code."""
    import argparse
    import json
    import os
    import sys
    p = argparse.ArgumentParser(prog="python -m sim dense-layer",
                                description="Simulate one dense MLP sub-layer (x + fc2(gelu(fc1(h)))) in "
                                            "Amaranth's simulator against the integer golden model.")
    a = p.add_argument
    a("--dim", type=int, default=16, help="D (default 16)")
    a("--hidden", type=int, default=64, help="hidden width (default 64)")
    a("--tokens", type=int, default=9, help="T (default 9)")
    a("--token-tile", type=int, default=None, help="rows of the hidden slot (default: what fits)")
    a("--pe-rows", type=int, default=4, help="PE rows (default 4)")
    a("--pe-cols", type=int, default=4, help="PE columns (default 4)")
    a("--weight-buffer-bytes", type=int, default=None, help="both weight-buffer halves (default: one expert)")
    a("--seed", type=int, default=0, help="workload and stall seed (default 0)")
    a("--extremes", action="store_true", help="operands at their range ends")
    a("--mem-bytes-per-cycle", type=float, default=16.0, help="external memory bandwidth (default 16)")
    a("--latency", type=int, default=20, help="external memory latency (default 20)")
    a("--stall-prob", type=float, default=0.0, help="random stall probability on memory and streams")
    a("--json", metavar="FILE", help="write the report as JSON")
    args = p.parse_args(argv)
    try:
        for name in ("dim", "hidden", "tokens", "pe_rows", "pe_cols", "latency"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
        if not 0 <= args.stall_prob < 1:
            raise ValueError(f"--stall-prob must be in [0, 1), not {args.stall_prob}")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json: the directory of {args.json!r} does not exist")
        rep = run_dense_layer(dim=args.dim, hidden=args.hidden, tokens=args.tokens, pe_rows=args.pe_rows,
                              pe_cols=args.pe_cols, token_tile=args.token_tile, seed=args.seed,
                              extremes=args.extremes, weight_buffer_bytes=args.weight_buffer_bytes,
                              mem_bytes_per_cycle=args.mem_bytes_per_cycle,
                              latency=args.latency, stall_prob=args.stall_prob)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dense MLP D={args.dim} hidden={args.hidden} T={args.tokens} on {args.pe_rows}x{args.pe_cols}: "
          f"bit_exact={rep['bit_exact']} ({rep['mismatches']} mismatches)")
    print(f"  cycles {rep['cycles']}, PE beats {rep['compute_cycles']}, {rep['macs_per_cycle']} MAC/cycle "
          f"(peak {rep['peak_macs_per_cycle']}); per phase {rep['phase_cycles']}, waiting {rep['wait_cycles']}")
    print(f"  token tile {rep['token_tile']} ({rep['token_tiles']} tiles), {rep['weight_tiles']} weight "
          f"tiles, {rep['bytes_fetched']} B fetched")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["bit_exact"] else 1


class NormMlpSim:
    """One elaborated :class:`~m3vit_hw.dense.norm_mlp.NormMlp` (LayerNorm + MLP on one engine);
    ``run(x, qln)`` returns the residual after ``x + mlp(layernorm(x))`` and the phase cycles."""

    def __init__(self, config, qdense, *, token_tile=None, mem_bytes_per_cycle=16, latency=20, stall_prob=0.0,
                 seed=0):
        from m3vit_hw.dense.norm_mlp import NormMlp
        self.config, self.qdense = config, qdense
        hidden = np.asarray(qdense.fc1.w).shape[0]
        self.dut = NormMlp(config, hidden=hidden, token_tile=token_tile)
        self.image_bytes, self.layout = pack_dense(qdense, config)
        self.ln_base = IMAGE_BASE + -(-len(self.image_bytes) // 256) * 256
        self.mem_args = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                             seed=seed)
        self.stall_prob, self.seed = stall_prob, seed

    def run(self, x, qln, *, timeout=500_000):
        from m3vit_hw.dense.norm_stage import pack_norm_params
        dut, cfg = self.dut, self.config
        C, T = cfg.pe_cols, x.shape[0]
        recs = pack_norm_params(qln, cfg)
        backing = np.zeros(self.ln_base + len(recs), dtype=np.uint8)
        backing[IMAGE_BASE:IMAGE_BASE + len(self.image_bytes)] = np.frombuffer(self.image_bytes, dtype=np.uint8)
        backing[self.ln_base:] = np.frombuffer(recs, dtype=np.uint8)
        mem = ExternalMemory(backing, **self.mem_args)
        out = {}

        async def host(ctx):
            st = Stalls(self.stall_prob, self.seed + 5)
            for a, word in enumerate(words_of(x, C)):
                await stream_put(ctx, dut.load, {"target": DenseLoadTarget.X, "addr": a,
                                                 "data": [int(v) for v in word]}, stalls=st)
            await stream_put(ctx, dut.start, {"tokens": T, "base": IMAGE_BASE, "ln_base": self.ln_base,
                                              "fc1_shift": int(self.qdense.fc1.shift),
                                              "fc2_shift": int(self.qdense.fc2.shift)}, stalls=st)
            await wait_done(ctx, dut.done, timeout=timeout, what="NormMlp")
            out["norm_cycles"], out["mlp_cycles"] = int(ctx.get(dut.norm_cycles)), int(ctx.get(dut.mlp_cycles))
            words = []
            for a in range(T * cfg.row_words):
                await stream_put(ctx, dut.rd_addr, a, stalls=st)
                words.append([int(v) for v in await stream_get(ctx, dut.rd_data, stalls=st)])
            out["x"] = np.array(words, dtype=np.int64).reshape(T, cfg.row_words * C)[:, :x.shape[1]]

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(host)
        sim.run()
        return out
