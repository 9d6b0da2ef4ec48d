"""Standalone patch-embedding runner: :class:`~m3vit_hw.dense.PatchEmbed` from a uint8 HWC camera image
in external memory to the residual stream, against ``reference.golden_model.embed``.

:func:`embed_config` builds a small :class:`AcceleratorConfig`, :func:`make_embed_workload` a random
image and integer parameters (no torch), :func:`run_patch_embed` simulates one frame and reports.
"""

import math
import time
from types import SimpleNamespace

import numpy as np
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.dense.embed_layout import pack_embed, start_fields
from m3vit_hw.dense.patch_embed import PatchEmbed
from m3vit_hw.model_config import ModelConfig
from reference import golden_model
from reference.qparams import QLinear
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_get, stream_put, wait_done

__all__ = ["embed_config", "make_embed_workload", "golden_embed", "PatchEmbedSim", "run_patch_embed", "main",
           "PARAM_BASE", "IMAGE_BASE"]

#: External byte addresses of the embedding image and (at least) of the camera frame (deliberately unaligned).
PARAM_BASE = 0x1000
IMAGE_BASE = 0x3003


def embed_config(*, img, patch, dim, in_chans=3, pe_rows=4, pe_cols=4, act_buffer_bytes=None,
                 weight_buffer_bytes=None, **accel):
    """An :class:`AcceleratorConfig` for an ``img`` = (H, W) image of ``patch`` x ``patch`` patches
    (every derived buffer is the config's own: its ``act_buffer_needs`` include two patch slots).
    ``accel``: further :class:`AcceleratorConfig` fields (``mem_data_bytes``, ``mem_max_burst``, ...)."""
    model = ModelConfig(name=f"embed-{img[0]}x{img[1]}-p{patch}-D{dim}", img_size=tuple(img),
                        patch_size=patch, in_chans=in_chans, dim=dim, depth=2, heads=1, experts=2, top_k=1,
                        tasks=("t0",), task_channels=(1,))
    return AcceleratorConfig(model=model, pe_rows=pe_rows, pe_cols=pe_cols, act_buffer_bytes=act_buffer_bytes,
                             weight_buffer_bytes=weight_buffer_bytes, **accel)


def make_embed_workload(config, seed=0, *, extremes=False):
    """``{"img" (uint8 [H, W, Cin]), "qpatch", "cls_int", "pos_int"}``."""
    rng = np.random.default_rng(seed)
    mc = config.model
    H, W = mc.img_size
    D, K, T = mc.dim, mc.patch_dim, mc.tokens
    if extremes:
        img = rng.choice([0, 255], (H, W, mc.in_chans)).astype(np.uint8)
        w = rng.choice([-128, 127], (D, K))
        q = QLinear(w, rng.choice([-(1 << 31), (1 << 31) - 1], D), np.full(D, (1 << numerics.MULT_BITS) - 1),
                    16, numerics.RES_BITS)
        pos = rng.choice([-32768, 32767], (T, D))
        return {"img": img, "qpatch": q, "cls_int": rng.choice([-32768, 32767], D), "pos_int": pos}
    img = rng.integers(0, 256, (H, W, mc.in_chans)).astype(np.uint8)
    w = np.clip(np.round(rng.normal(0, 40, (D, K))), -127, 127).astype(np.int64)
    real = 3000.0 / (40.0 * 74.0 * math.sqrt(K))
    shift = int(math.floor(math.log2(((1 << numerics.MULT_BITS) - 1) / (real * 1.5))))
    mult = np.round(real * rng.uniform(0.5, 1.5, D) * (1 << shift)).astype(np.int64)
    q = QLinear(w, rng.integers(-30000, 30000, D), mult, shift, numerics.RES_BITS)
    return {"img": img, "qpatch": q, "cls_int": rng.integers(-3000, 3000, D),
            "pos_int": rng.integers(-3000, 3000, (T, D))}


def golden_embed(config, wl):
    """``golden_model.embed`` on the image as the encoder's int8 input (``pixel - 128``, CHW)."""
    qm = SimpleNamespace(cfg=config.model, patch=wl["qpatch"], cls_int=np.asarray(wl["cls_int"]),
                         pos_int=np.asarray(wl["pos_int"]))
    img_q = wl["img"].astype(np.int64).transpose(2, 0, 1) - 128
    return golden_model.embed(qm, img_q)


class PatchEmbedSim:
    """One elaborated PatchEmbed with one workload in external memory; ``run()`` does one frame."""

    def __init__(self, config, wl, *, patch_tile=None, mem_bytes_per_cycle=16, latency=20, stall_prob=0.0,
                 seed=0):
        self.config, self.wl = config, wl
        mem_data_bytes = config.mem_data_bytes
        self.dut = PatchEmbed(config, patch_tile=patch_tile)
        image, self.layout = pack_embed(wl["qpatch"], wl["cls_int"], wl["pos_int"], config)
        # The frame goes 3 bytes past the first 4 KiB page after the parameters (unaligned on purpose).
        self.img_base = max(IMAGE_BASE, -(-(PARAM_BASE + len(image)) // 4096) * 4096 + 3)
        frame = wl["img"].reshape(-1)
        # The loader reads whole beats: the frame is readable up to the beat after its last byte.
        mem = np.zeros(self.img_base + len(frame) + 2 * mem_data_bytes, dtype=np.uint8)
        mem[PARAM_BASE:PARAM_BASE + len(image)] = np.frombuffer(image, dtype=np.uint8)
        mem[self.img_base:self.img_base + len(frame)] = frame
        self.image = mem
        self.mem_args = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                             seed=seed)
        self.stall_prob, self.seed = stall_prob, seed

    def run(self, *, frames=1, timeout=1_000_000):
        dut, cfg = self.dut, self.config
        C, T = cfg.pe_cols, cfg.model.tokens
        mem = ExternalMemory(self.image, **self.mem_args)
        results = []

        async def host(ctx):
            st = Stalls(self.stall_prob, self.seed + 11)
            for _ in range(frames):
                t0 = time.time()
                await stream_put(ctx, dut.start, start_fields(self.wl["qpatch"], base=PARAM_BASE,
                                                              img_base=self.img_base), stalls=st)
                await wait_done(ctx, dut.done, timeout=timeout, what="PatchEmbed")
                res = {k: int(ctx.get(getattr(dut, k))) for k in
                       ("cycles", "compute_cycles", "gemm_cycles", "patch_wait_cycles", "weight_wait_cycles",
                        "init_cycles")}
                words = []
                for a in range(T * cfg.row_words):
                    await stream_put(ctx, dut.rd_addr, a, stalls=st)
                    words.append([int(v) for v in await stream_get(ctx, dut.rd_data, stalls=st)])
                res["x"] = np.array(words, dtype=np.int64).reshape(T, cfg.row_words * C)[:, :cfg.model.dim]
                res["sim_seconds"] = time.time() - t0
                results.append(res)

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(host)
        sim.run()
        self.memory = mem
        return results


def run_patch_embed(*, img=(8, 12), patch=2, dim=12, in_chans=3, pe_rows=4, pe_cols=4, patch_tile=None,
                    seed=0, extremes=False, mem_bytes_per_cycle=16.0, latency=20, stall_prob=0.0):
    """Simulate one frame; report ``bit_exact``, ``mismatches``, ``first_mismatch``, ``cycles``, ``macs``,
    ``macs_per_cycle`` and the counters."""
    cfg = embed_config(img=img, patch=patch, dim=dim, in_chans=in_chans, pe_rows=pe_rows, pe_cols=pe_cols)
    wl = make_embed_workload(cfg, seed, extremes=extremes)
    t0 = time.time()
    sim = PatchEmbedSim(cfg, wl, patch_tile=patch_tile, mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                        stall_prob=stall_prob, seed=seed)
    res = sim.run()[0]
    want = golden_embed(cfg, wl)
    bad = np.argwhere(res["x"] != want)
    mc = cfg.model
    macs = mc.patches * mc.patch_dim * dim
    return {
        "bit_exact": not len(bad), "mismatches": int(len(bad)),
        "first_mismatch": None if not len(bad) else {
            "op": "patch_embed (residual out)", "token": int(bad[0][0]), "channel": int(bad[0][1]),
            "expected": int(want[tuple(bad[0])]), "got": int(res["x"][tuple(bad[0])])},
        **{k: res[k] for k in ("cycles", "compute_cycles", "gemm_cycles", "patch_wait_cycles",
                               "weight_wait_cycles", "init_cycles")},
        "macs": macs, "macs_per_cycle": round(macs / res["cycles"], 3), "peak_macs_per_cycle": pe_rows * pe_cols,
        "patch_tile": sim.dut.buffer_map.patch_tile, "weight_tiles": len(sim.layout.tiles),
        "bytes_fetched": sim.memory.bytes_served,
        "config": dict(img=list(img), patch=patch, dim=dim, in_chans=in_chans, pe_rows=pe_rows, pe_cols=pe_cols,
                       seed=seed, extremes=extremes, mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                       stall_prob=stall_prob),
        "wall_seconds": round(time.time() - t0, 2),
    }


def main(argv=None):
    """``python -m sim patch-embed``: returns the process exit code."""
    import argparse
    import json
    import os
    import sys
    p = argparse.ArgumentParser(prog="python -m sim patch-embed",
                                description="Simulate the patch embedding (uint8 HWC image in external memory "
                                            "-> residual stream) against the integer golden model.")
    a = p.add_argument
    a("--image", default="8x12", help="HxW in pixels (default 8x12)")
    a("--patch", type=int, default=2, help="patch size (default 2)")
    a("--in-chans", type=int, default=3, help="image channels (default 3)")
    a("--dim", type=int, default=12, help="D (default 12)")
    a("--patch-tile", type=int, default=None, help="patch rows per slot (default: what fits)")
    a("--pe-rows", type=int, default=4, help="PE rows (default 4)")
    a("--pe-cols", type=int, default=4, help="PE columns (default 4)")
    a("--seed", type=int, default=0, help="workload and stall seed (default 0)")
    a("--extremes", action="store_true", help="operands at their range ends")
    a("--mem-bytes-per-cycle", type=float, default=16.0, help="external memory bandwidth (default 16)")
    a("--latency", type=int, default=20, help="external memory latency (default 20)")
    a("--stall-prob", type=float, default=0.0, help="random stall probability on memory and streams")
    a("--json", metavar="FILE", help="write the report as JSON")
    args = p.parse_args(argv)
    try:
        try:
            img = tuple(int(v) for v in args.image.lower().split("x"))
            if len(img) != 2:
                raise ValueError
        except ValueError:
            raise ValueError(f"--image must be HxW, not {args.image!r}") from None
        for name in ("patch", "in_chans", "dim", "pe_rows", "pe_cols", "latency"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(args, name)}")
        if not 0 <= args.stall_prob < 1:
            raise ValueError(f"--stall-prob must be in [0, 1), not {args.stall_prob}")
        if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
            raise ValueError(f"--json: the directory of {args.json!r} does not exist")
        rep = run_patch_embed(img=img, patch=args.patch, dim=args.dim, in_chans=args.in_chans,
                              pe_rows=args.pe_rows, pe_cols=args.pe_cols, patch_tile=args.patch_tile,
                              seed=args.seed, extremes=args.extremes,
                              mem_bytes_per_cycle=args.mem_bytes_per_cycle, latency=args.latency,
                              stall_prob=args.stall_prob)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"patch embedding {args.image} p{args.patch} D={args.dim} on {args.pe_rows}x{args.pe_cols}: "
          f"bit_exact={rep['bit_exact']} ({rep['mismatches']} mismatches)")
    print(f"  cycles {rep['cycles']}, {rep['macs_per_cycle']} MAC/cycle (peak {rep['peak_macs_per_cycle']}), "
          f"GEMM {rep['gemm_cycles']}, waiting for patches {rep['patch_wait_cycles']} / weights "
          f"{rep['weight_wait_cycles']}, residual init {rep['init_cycles']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0 if rep["bit_exact"] else 1
