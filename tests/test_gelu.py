# amaranth: UnusedElaboratable=no
"""GeluStage: golden.gelu through a loaded table, with random stalls; Verilog; wiring.connect."""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module, signed, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.sim import Simulator

from m3vit_hw.gemm.gelu import GeluInLayout, GeluOutLayout, GeluStage
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put

LANES = 4


def test_bit_exact_with_stalls():
    rng = np.random.default_rng(12)
    lut = rng.integers(-128, 128, size=256)
    xs = [rng.integers(-128, 128, size=LANES) for _ in range(60)]
    xs[0][:] = [-128, 127, 0, -1]                    # table ends
    enables = [int(t % 3 != 2) for t in range(len(xs))]
    dut = GeluStage(LANES, unsigned(8))
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    got = []

    async def feeder(ctx):
        for a in range(256):
            ctx.set(dut.lut.addr, a)
            ctx.set(dut.lut.data, int(lut[a]))
            ctx.set(dut.lut.en, 1)
            await ctx.tick()
        ctx.set(dut.lut.en, 0)
        stalls = Stalls(0.3, 3)
        for t, (x, en) in enumerate(zip(xs, enables)):
            await stream_put(ctx, dut.i, {"data": [int(v) for v in x], "enable": en, "meta": t}, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(0.3, 4)
        for _ in xs:
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append((p.meta, [p.data[j] for j in range(LANES)]))

    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.run()
    assert [g[0] for g in got] == list(range(len(xs))), "GeluStage: beats lost, duplicated or reordered"
    for t, (x, en, (_, data)) in enumerate(zip(xs, enables, got)):
        want = golden.gelu(x, lut) if en else x
        for j in range(LANES):
            assert data[j] == want[j], f"GeluStage beat {t} lane {j}: expected {want[j]}, got {data[j]}"
    print(f"GeluStage: {len(xs)} beats exact")


def test_verilog_and_connect():
    assert "module gelu" in verilog.convert(GeluStage(4), name="gelu")

    class Wrapper(wiring.Component):
        """GELU stage with its table port connected to a loader-side flipped port."""

        def __init__(self):
            super().__init__({"i": wiring.In(stream.Signature(GeluInLayout(2, unsigned(1)))),
                              "o": wiring.Out(stream.Signature(GeluOutLayout(2, unsigned(1)))),
                              "lut": wiring.Out(memory.WritePort.Signature(addr_width=8, shape=signed(8)))})

        def elaborate(self, platform):
            m = Module()
            m.submodules.g = g = GeluStage(2, unsigned(1))
            wiring.connect(m, wiring.flipped(self.i), g.i)
            wiring.connect(m, g.o, wiring.flipped(self.o))
            wiring.connect(m, g.lut, wiring.flipped(self.lut))
            return m

    assert "module wrapper" in verilog.convert(Wrapper(), name="wrapper")


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(lanes=0), ValueError, "lanes"), (dict(lanes=None), TypeError, "lanes"),
])
def test_bad_parameters(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        GeluStage(**kwargs)
