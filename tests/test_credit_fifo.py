# amaranth: UnusedElaboratable=no
"""CreditFIFO and SkidBuffer (m3vit_hw.lib): nothing lost or duplicated, in order, under random stalls;
CreditFIFO's latency; registered ready; parameter checks."""

import random

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.lib import CreditFIFO, SkidBuffer
from sim.testbench import Stalls, run_until_done, stream_get, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


class _DelayLine(wiring.Component):
    """A stall-free pipeline of `stages` registers ending in a CreditFIFO: the pattern the units use."""

    def __init__(self, stages, depth, width=16):
        self.stages, self.depth = stages, depth
        super().__init__({"i": In(stream.Signature(width)), "o": Out(stream.Signature(width))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.fifo = f = CreditFIFO(len(self.i.payload), self.depth)
        take = self.i.valid & f.room
        m.d.comb += [self.i.ready.eq(f.room), f.take.eq(take)]
        v, d = take, self.i.payload
        for s in range(self.stages):
            nv, nd = Signal(name=f"v{s}"), Signal.like(self.i.payload, name=f"d{s}")
            m.d.sync += [nv.eq(v), nd.eq(d)]
            v, d = nv, nd
        m.d.comb += [f.w_en.eq(v), f.w_data.eq(d)]
        wiring.connect(m, f.o, wiring.flipped(self.o))
        return m


@pytest.mark.parametrize("stages, depth, p_in, p_out", [
    (3, 3 + CreditFIFO.LATENCY + 1, 0.3, 0.5),   # the units' sizing: full rate when o is ready
    (5, 2, 0.0, 0.3),                            # a FIFO smaller than the pipeline: credits throttle
    (0, 1, 0.2, 0.2),                            # no queue, the output register alone
])
def test_credit_fifo_loses_nothing(stages, depth, p_in, p_out):
    dut = _DelayLine(stages, depth)
    vals = [random.Random(stages * 7 + depth).randrange(1 << 16) for _ in range(150)]
    got = []

    async def feed(ctx):
        st = Stalls(p_in, 1)
        for v in vals:
            await stream_put(ctx, dut.i, v, stalls=st)

    async def take(ctx):
        st = Stalls(p_out, 2)
        for _ in vals:
            got.append(await stream_get(ctx, dut.o, stalls=st))

    run_until_done(dut, [feed, take])
    assert got == vals, f"CreditFIFO(depth={depth}) after {stages} stages: order or values differ"


def test_credit_fifo_latency_and_rate():
    """With o always ready: the first result appears stages + LATENCY cycles after its input, then one per cycle."""
    stages = 4
    dut = _DelayLine(stages, stages + CreditFIFO.LATENCY + 1)
    seen = []

    async def bench(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i.valid, 1)
        for cyc in range(30):
            ctx.set(dut.i.payload, cyc)
            if ctx.get(dut.o.valid):
                seen.append((cyc, ctx.get(dut.o.payload)))
            assert ctx.get(dut.i.ready), f"CreditFIFO: input throttled at cycle {cyc} with o always ready"
            await ctx.tick()

    run_until_done(dut, [bench])
    assert seen[0] == (stages + CreditFIFO.LATENCY, 0), f"CreditFIFO latency: first output {seen[0]}"
    assert [v for _, v in seen] == list(range(len(seen)))


def test_skid_buffer_struct_payload_with_stalls():
    layout = data.StructLayout({"a": 8, "b": 3})
    dut = SkidBuffer(layout)
    vals = [{"a": random.Random(i).randrange(256), "b": i % 8} for i in range(120)]
    got = []

    async def feed(ctx):
        st = Stalls(0.3, 3)
        for v in vals:
            await stream_put(ctx, dut.i, v, stalls=st)

    async def take(ctx):
        st = Stalls(0.5, 4)
        for _ in vals:
            p = await stream_get(ctx, dut.o, stalls=st)
            got.append({"a": int(p.a), "b": int(p.b)})

    run_until_done(dut, [feed, take])
    assert got == vals


@pytest.mark.parametrize("cls, args, exc, words", [
    (CreditFIFO, (8, 0), ValueError, r"depth must be an integer >= 1, not 0"),
    (CreditFIFO, ("x", 4), TypeError, r"shape must be a shape-like object"),
    (SkidBuffer, (0,), ValueError, r"shape must be an integer >= 1, not 0"),
    (SkidBuffer, ("x",), TypeError, r"shape must be a bit count or a shape-like object"),
])
def test_bad_parameters(cls, args, exc, words):
    with pytest.raises(exc, match=words):
        cls(*args)
