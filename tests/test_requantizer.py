"""Requantizer: golden.requantize lane by lane, with random stalls; Verilog; wiring.connect."""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module, unsigned
from amaranth.lib import stream, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.gemm.requantizer import RequantInLayout, RequantOutLayout, Requantizer
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put

LANES = 3


def _beats(rng, n):
    lo, hi = numerics.int_range(32)
    beats = []
    for t in range(n):
        acc = rng.integers(lo, hi, size=LANES, endpoint=True)
        bias = rng.integers(lo, hi, size=LANES, endpoint=True)
        mult = rng.integers(0, 1 << numerics.MULT_BITS, size=LANES)
        if t % 5 == 0:
            mult[:] = (1 << numerics.MULT_BITS) - 1
        if t % 7 == 0:
            acc[:], bias[:] = hi, hi                  # the 33-bit corner of acc + bias
        shift = [0, numerics.SHIFT_MAX, int(rng.integers(0, numerics.SHIFT_MAX + 1)),
                 int(rng.integers(38, 50))][t % 4]
        beats.append(dict(acc=acc, bias=bias, mult=mult, shift=shift, out16=t % 2, raw=int(t % 6 == 5)))
    return beats


def test_bit_exact_with_stalls():
    rng = np.random.default_rng(11)
    beats = _beats(rng, 80)
    dut = Requantizer(LANES, unsigned(8))
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    got = []

    async def feeder(ctx):
        stalls = Stalls(0.3, 1)
        for t, b in enumerate(beats):
            await stream_put(ctx, dut.i, {k: ([int(x) for x in v] if isinstance(v, np.ndarray) else v)
                                          for k, v in b.items()} | {"meta": t}, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(0.3, 2)
        for _ in beats:
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append((p.meta, [p.data[j] for j in range(LANES)]))

    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.run()
    assert [g[0] for g in got] == list(range(len(beats))), "Requantizer: beats lost, duplicated or reordered"
    sat_lo = sat_hi = 0
    for t, (b, (_, data)) in enumerate(zip(beats, got)):
        if b["raw"]:
            want = b["acc"]
        else:
            want = golden.requantize(b["acc"], b["bias"], b["mult"], b["shift"], 16 if b["out16"] else 8)
            lo, hi = numerics.int_range(16 if b["out16"] else 8)
            sat_lo += int((want == lo).sum())
            sat_hi += int((want == hi).sum())
        for j in range(LANES):
            assert data[j] == want[j], f"Requantizer beat {t} lane {j}: expected {want[j]}, got {data[j]}"
    print(f"Requantizer: {len(beats)} beats exact ({sat_lo} saturated low, {sat_hi} high)")
    assert sat_lo and sat_hi


def test_verilog_and_connect():
    assert "module requantizer" in verilog.convert(Requantizer(4), name="requantizer")

    class Wrapper(wiring.Component):
        def __init__(self):
            super().__init__({"i": wiring.In(stream.Signature(RequantInLayout(2, unsigned(3)))),
                              "o": wiring.Out(stream.Signature(RequantOutLayout(2, unsigned(3))))})

        def elaborate(self, platform):
            m = Module()
            m.submodules.rq = rq = Requantizer(2, unsigned(3))
            wiring.connect(m, wiring.flipped(self.i), rq.i)
            wiring.connect(m, rq.o, wiring.flipped(self.o))
            return m

    assert "module wrapper" in verilog.convert(Wrapper(), name="wrapper")


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(lanes=0), ValueError, "lanes"), (dict(lanes="4"), TypeError, "lanes"),
    (dict(lanes=2, meta="x"), TypeError, "meta"),
])
def test_bad_parameters(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        Requantizer(**kwargs)


def test_latency_matches_constant():
    """The first result leaves LATENCY cycles after its input transfer (output always ready)."""
    dut = Requantizer(1)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    seen = []

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.valid, 1)
        ctx.set(dut.i.payload.acc[0], 1000)
        ctx.set(dut.i.payload.mult[0], 3)
        ctx.set(dut.i.payload.shift, 2)
        await ctx.tick()                        # the input transfers on this edge
        ctx.set(dut.i.valid, 0)
        for cycle in range(1, 3 * Requantizer.LATENCY):
            await ctx.delay(1e-9)
            if ctx.get(dut.o.valid):
                seen.append((cycle, ctx.get(dut.o.payload.data[0])))
                break
            await ctx.tick()

    sim.add_testbench(bench)
    sim.run()
    want = int(golden.requantize(np.array([1000]), np.array([0]), np.array([3]), 2, 8)[0])
    assert seen == [(Requantizer.LATENCY, want)], f"Requantizer: expected (LATENCY, {want}), got {seen}"
