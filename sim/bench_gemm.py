"""GEMM engine harness and throughput benchmark.

:class:`GemmHarness` wires a :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` (with ``wiring.connect``) to
the buffers it reads and writes: activation, weight, residual, row-table and column-parameter
memories, with the B port's MSB selecting the activation buffer. :func:`simulate` runs a list of
commands through it in Amaranth's simulator and returns what came out. The tests use both; run this
module to measure throughput::

    python -m sim.bench_gemm --rows 8 --cols 8 --m 64 --k 64 --n 64
    python -m sim.bench_gemm --rows 16 --cols 16            # the W1 block's GEMM shapes

prints, for each shape, whether the result is bit-exact against numpy (it stops otherwise), cycles (command accepted -> last result written), MAC/cycle and utilization of
``rows * cols`` for one ``M x K x N`` int8 product with operands already on chip and no stalls.
"""

import argparse
import json
import sys
import time

import numpy as np
from amaranth.hdl import Elaboratable, Module, Mux, Signal, signed
from amaranth.lib import data, memory, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.gemm.epilogue import EpilogueMode
from m3vit_hw.gemm.gemm_engine import ColParamLayout, GemmEngine, RowEntryLayout, check_command
from m3vit_hw.checks import check_output_path
from sim.testbench import Stalls, stream_put

__all__ = ["GemmHarness", "simulate", "bench_config", "bench", "W1_SHAPES", "main"]


def _rows(array, words):
    """Memory init rows from a [words, lanes] integer array (missing rows are zero)."""
    if array is None:
        return []
    return [[int(x) for x in row] for row in np.asarray(array)[:words]]


class GemmHarness(Elaboratable):
    """A GemmEngine connected to a full set of on-chip buffers.

    Parameters
    ----------
    config : AcceleratorConfig
    act, weights, res : array [words, pe_cols] or None
        Initial buffer contents (int8, int8, int16). Depths come from ``config``.
    rowtab : array [entries, 2] or None
        ``(token, scale)`` per row-table entry.
    colp : array [words, pe_cols, 2] or None
        ``(bias, mult)`` per column.
    """

    def __init__(self, config, *, act=None, weights=None, res=None, rowtab=None, colp=None):
        self.config = config
        self.engine = GemmEngine(config)
        C = config.pe_cols
        w8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        self.act = memory.Memory(shape=w8, depth=config.act_buffer_words,
                                 init=_rows(act, config.act_buffer_words))
        self.weights = memory.Memory(shape=w8, depth=config.weight_buffer_words,
                                     init=_rows(weights, config.weight_buffer_words))
        self.res = memory.Memory(shape=data.ArrayLayout(signed(numerics.RES_BITS), C),
                                 depth=config.res_buffer_words,
                                 init=_rows(res, config.res_buffer_words))
        rt = [] if rowtab is None else [{"token": int(t), "scale": int(s)} for t, s in rowtab]
        self.rowtab = memory.Memory(shape=RowEntryLayout(config), depth=config.rowtab_entries, init=rt)
        cp = [] if colp is None else [[{"bias": int(b), "mult": int(mu)} for b, mu in word]
                                      for word in np.asarray(colp)]
        self.colp = memory.Memory(shape=data.ArrayLayout(ColParamLayout(), C),
                                  depth=config.param_buffer_words, init=cp)

    def elaborate(self, platform):
        m = Module()
        e = self.engine
        m.submodules.engine = e
        for name in ("act", "weights", "res", "rowtab", "colp"):
            m.submodules[name] = getattr(self, name)
        wiring.connect(m, e.a_rd, self.act.read_port())
        wiring.connect(m, e.act_wr, self.act.write_port(granularity=1))
        wiring.connect(m, e.res_rd, self.res.read_port())
        wiring.connect(m, e.res_wr, self.res.write_port(granularity=1))
        wiring.connect(m, e.rowtab_rd, self.rowtab.read_port())
        wiring.connect(m, e.colp_rd, self.colp.read_port())

        # B port: the address MSB selects the activation buffer (QK^T, AV) over the weight buffer.
        cfg = self.config
        act_b = self.act.read_port()
        w_b = self.weights.read_port()
        msb = e.b_rd.addr[cfg.b_addr_bits - 1]
        sel = Signal()
        with m.If(e.b_rd.en):
            m.d.sync += sel.eq(msb)
        m.d.comb += [
            act_b.addr.eq(e.b_rd.addr), act_b.en.eq(e.b_rd.en & msb),
            w_b.addr.eq(e.b_rd.addr), w_b.en.eq(e.b_rd.en & ~msb),
            e.b_rd.data.eq(Mux(sel, act_b.data, w_b.data)),
        ]
        return m


def simulate(harness, commands, *, lut=None, cmd_stalls=0.0, o_stalls=0.0, seed=0, timeout=200_000):
    """Run ``commands`` (dicts of :class:`GemmCommand` fields) and return the outcome.

    Returns a dict with ``stream`` (RAW beats as ``(addr, mask, [lanes], last)``), ``done`` (pulse
    count), ``cycles`` (first command accepted -> last ``done``), ``accepts`` (cycle of each command
    accept), ``act`` and ``res`` (final buffer contents as arrays).
    """
    e = harness.engine
    cfg = harness.config
    C = cfg.pe_cols
    for c in commands:          # refuse an oversize command here rather than simulate a truncated one
        check_command(cfg, {k: v for k, v in c.items() if k != "mode"})
    sim = Simulator(harness)
    sim.add_clock(1e-8)
    out = {"stream": [], "done": 0, "accepts": [], "done_at": []}
    n_cmds = len(commands)

    async def feeder(ctx):
        if lut is not None:
            for a in range(256):
                ctx.set(e.gelu_lut.addr, a)
                ctx.set(e.gelu_lut.data, int(lut[a]))
                ctx.set(e.gelu_lut.en, 1)
                await ctx.tick()
            ctx.set(e.gelu_lut.en, 0)
        stalls = Stalls(cmd_stalls, seed)
        for c in commands:
            await stream_put(ctx, e.cmd, c, stalls=stalls)

    async def drain(ctx):
        # A per-cycle consumer (it must run for as long as the engine may produce): ready is
        # randomly low with probability o_stalls; a beat is taken when valid & ready were sampled.
        rng = np.random.default_rng(seed + 1)
        ctx.set(e.o.ready, int(rng.random() >= o_stalls))
        async for _, _, valid, ready, payload in ctx.tick().sample(e.o.valid, e.o.ready, e.o.payload):
            if valid and ready:
                out["stream"].append((payload.addr, payload.mask, [payload.data[j] for j in range(C)],
                                      payload.last))
            ctx.set(e.o.ready, int(rng.random() >= o_stalls))

    async def monitor(ctx):
        cycle = 0
        async for _, _, valid, ready, done in ctx.tick().sample(e.cmd.valid, e.cmd.ready, e.done):
            if valid and ready:
                out["accepts"].append(cycle)
            if done:
                out["done"] += 1
                out["done_at"].append(cycle)
            cycle += 1

    async def finish(ctx):
        cycles = 0
        while out["done"] < n_cmds:
            await ctx.tick()
            cycles += 1
            if cycles > timeout:
                raise TimeoutError(f"GemmEngine: {out['done']} of {n_cmds} commands done after {timeout} cycles")
        for _ in range(2 * cfg.pe_rows + 16):     # anything extra would show up here
            await ctx.tick()
        out["busy_at_end"] = ctx.get(e.busy)
        out["act"] = np.array([list(ctx.get(harness.act.data[a])) for a in range(cfg.act_buffer_words)])
        out["res"] = np.array([list(ctx.get(harness.res.data[a])) for a in range(cfg.res_buffer_words)])

    sim.add_testbench(feeder)
    sim.add_process(drain)
    sim.add_process(monitor)
    sim.add_testbench(finish)
    sim.run()
    if out["accepts"] and out["done_at"]:
        out["cycles"] = out["done_at"][-1] - out["accepts"][0]
    return out


def bench_config(rows, cols, m, k, n):
    """A ``rows x cols`` config sized for one ``m x k x n`` GEMM (any m, k, n >= 1).

    The model is a stand-in whose command limits cover the problem: ``m`` tokens (token_capacity), a
    dense MLP ``max(k, n)`` wide (so ``largest_k >= k`` and ``largest_n >= n``) and a small ``dim`` (so
    nothing else grows). The activation buffer holds A and the RAW output addresses (``m x
    ceil(max(k, n) / cols)`` words) and each weight-buffer half holds all of B's panels; every other
    size is the config's own derivation.
    """
    from m3vit_hw.model_config import ModelConfig

    def up(x, q):
        return -(-x // q) * q

    hidden = max(k, n)
    model = ModelConfig(name=f"gemm-{m}x{k}x{n}", img_size=(1, max(1, m - 1)), patch_size=1, in_chans=1,
                        dim=cols, depth=1, heads=1, experts=1, top_k=1, tasks=("t",), task_channels=(1,),
                        mlp_hidden=hidden, expert_hidden=cols, moe_every=1)
    base = AcceleratorConfig(model=model, pe_rows=rows, pe_cols=cols, token_capacity=max(m, model.tokens))
    words = m * -(-hidden // cols)
    words_b = -(-n // cols) * k
    unit = 2 * base.weight_half_unit_bytes
    return base.with_(
        act_buffer_bytes=max(base.act_buffer_bytes, up(words * cols, cols)),
        weight_buffer_bytes=max(base.weight_buffer_bytes, up(2 * words_b * cols, unit)))


def bench(rows, cols, m, k, n, seed=0, epi_lanes=None):
    """Simulate one dense RAW-mode GEMM with on-chip operands; return (cycles, mac_per_cycle, util).
    ``epi_lanes``: the epilogue's lanes (default ``cols``; fewer drain each PE row in several beats)."""
    cfg = bench_config(rows, cols, m, k, n)
    if epi_lanes is not None:
        cfg = cfg.with_(epi_lanes=epi_lanes)
    rng = np.random.default_rng(seed)
    kw = -(-k // cols)
    nt = -(-n // cols)
    a = rng.integers(-128, 128, size=(m, kw * cols))
    b = rng.integers(-128, 128, size=(k, nt * cols))
    act = a.reshape(m * kw, cols)
    # Weight panels: for each column tile, k consecutive words.
    weights = np.concatenate([b[:, t * cols:(t + 1) * cols] for t in range(nt)], axis=0)
    h = GemmHarness(cfg, act=act, weights=weights)
    cmd = dict(m=m, k=k, n=n, a_base=0, a_stride=kw, b_base=0, b_tile_stride=k, b_k_stride=1,
               dst_base=0, dst_stride=nt, mode=EpilogueMode.RAW)
    res = simulate(h, [cmd])
    got = np.zeros((m, nt * cols), dtype=np.int64)
    for idx, (addr, _, lanes, _) in enumerate(res["stream"]):
        row, tile = divmod(addr, nt)
        got[row, tile * cols:(tile + 1) * cols] = lanes
    want = a[:, :k] @ b[:k, :n]
    if not np.array_equal(got[:, :n], want):
        raise AssertionError("bench_gemm: GEMM result differs from numpy")
    cycles = res["cycles"]
    macs = m * k * n
    return cycles, macs / cycles, macs / cycles / (rows * cols)


#: The GEMM shapes of one W1 (vit-tiny-cityscapes) block: M x K x N.
W1_SHAPES = {
    "qkv": (129, 192, 576),
    "qk": (129, 64, 129),
    "av": (129, 129, 64),
    "expert_fc1 (16 tokens)": (16, 192, 384),
    "expert_fc2 (16 tokens)": (16, 384, 192),
}


def _parse_shape(text):
    parts = text.lower().split("x")
    if len(parts) != 3:
        raise ValueError(f"--shape must be MxKxN, not {text!r}")
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--shape must be MxKxN with integers, not {text!r}") from None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m sim.bench_gemm", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="PE rows (default 8)")
    parser.add_argument("--cols", type=int, default=8, help="PE columns = buffer word lanes (default 8)")
    parser.add_argument("--m", type=int, default=None, help="rows of A and C")
    parser.add_argument("--k", type=int, default=None, help="reduction length")
    parser.add_argument("--n", type=int, default=None, help="columns of B and C")
    parser.add_argument("--shape", action="append", default=[], metavar="MxKxN",
                        help="a GEMM shape (repeatable); without --m/--k/--n or --shape: the W1 shapes "
                             + ", ".join(f"{a}x{b}x{c}" for a, b, c in W1_SHAPES.values()))
    parser.add_argument("--epi-lanes", type=int, default=None,
                        help="epilogue lanes, a divisor of --cols (default --cols: one PE row per cycle)")
    parser.add_argument("--seed", type=int, default=0, help="operand RNG seed")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)
    try:
        for name in ("rows", "cols"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, not {getattr(args, name)}")
        given = [args.m, args.k, args.n]
        if any(v is not None for v in given):
            if None in given:
                raise ValueError("--m, --k and --n go together")
            shapes = {f"{args.m}x{args.k}x{args.n}": tuple(given)}
        elif args.shape:
            shapes = {text: _parse_shape(text) for text in args.shape}
        else:
            shapes = dict(W1_SHAPES)
        for label, dims in shapes.items():
            for name, v in zip("mkn", dims):
                if v < 1:
                    raise ValueError(f"{label}: {name} must be >= 1, not {v}")
        check_output_path(args.json, "--json")
        # Build every config first, so a size the datapath cannot take fails before any simulation.
        for dims in shapes.values():
            cfg = bench_config(args.rows, args.cols, *dims)
            if args.epi_lanes is not None:
                cfg.with_(epi_lanes=args.epi_lanes)
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = []
    for label, (m, k, n) in shapes.items():
        t0 = time.time()
        cycles, mpc, util = bench(args.rows, args.cols, m, k, n, args.seed, args.epi_lanes)
        ideal = -(-m * k * n // (args.rows * args.cols))
        name = label if label == f"{m}x{k}x{n}" else f"{label} {m}x{k}x{n}"
        epi = f", {args.epi_lanes}-lane epilogue" if args.epi_lanes else ""
        print(f"GEMM {name} on {args.rows}x{args.cols} PEs{epi}: bit-exact vs numpy, {cycles} "
              f"cycles (ideal {ideal}), {mpc:.2f} MAC/cycle, utilization {util:.4f} "
              f"[simulated in {time.time() - t0:.1f} s]", flush=True)
        results.append(dict(label=label, m=m, k=k, n=n, rows=args.rows, cols=args.cols,
                            epi_lanes=args.epi_lanes or args.cols, cycles=cycles,
                            ideal_cycles=ideal, mac_per_cycle=round(mpc, 3),
                            utilization=round(util, 4), bit_exact=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
