# amaranth: UnusedElaboratable=no
"""ResidualStage: golden.residual_add / golden.moe_combine read-modify-writes on a real memory,
with repeated addresses and random stalls; Verilog; wiring.connect."""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.gemm.residual import ResidualInLayout, ResidualOutLayout, ResidualStage, ResOp
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put

LANES, AW = 3, 3


class _Harness(Elaboratable):
    def __init__(self, init):
        self.dut = ResidualStage(LANES, AW, unsigned(8))
        self.mem = memory.Memory(shape=data.ArrayLayout(signed(16), LANES), depth=1 << AW,
                                 init=[[int(v) for v in r] for r in init])

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut, m.submodules.mem = self.dut, self.mem
        wiring.connect(m, self.dut.rd, self.mem.read_port())        # not transparent
        wiring.connect(m, self.dut.wr, self.mem.write_port(granularity=1))
        return m


@pytest.mark.parametrize("stall_p", [0.0, 0.4])
def test_bit_exact_rmw(stall_p):
    rng = np.random.default_rng(13)
    lo16, hi16 = numerics.int_range(16)
    init = rng.integers(lo16, hi16 + 1, size=(1 << AW, LANES))
    init[0, :] = hi16
    beats = []
    for t in range(70):
        op = [ResOp.ADD, ResOp.COMBINE, ResOp.WRITE, ResOp.PASS][int(rng.integers(4))]
        beats.append(dict(data=rng.integers(lo16, hi16 + 1, size=LANES), op=op,
                          weight=int(rng.choice([0, 1 << 15, int(rng.integers(0, 1 << 15))])),
                          addr=int(rng.integers(0, 3)),          # few words: back-to-back repeats
                          mask=int(rng.integers(0, 1 << LANES))))
    # Golden, applied in order.
    mem = init.astype(np.int64).copy()
    want_out = []
    for b in beats:
        old = mem[b["addr"]].copy()
        if b["op"] == ResOp.ADD:
            new = golden.residual_add(old, b["data"])
        elif b["op"] == ResOp.COMBINE:
            new = golden.moe_combine(old, b["data"], b["weight"])
        else:
            new = b["data"]
        if b["op"] != ResOp.PASS:
            for j in range(LANES):
                if b["mask"] >> j & 1:
                    mem[b["addr"], j] = new[j]
        want_out.append(list(new))

    h = _Harness(init)
    dut = h.dut
    sim = Simulator(h)
    sim.add_clock(1e-8)
    got, final = [], {}

    async def feeder(ctx):
        stalls = Stalls(stall_p, 5)
        for t, b in enumerate(beats):
            await stream_put(ctx, dut.i, {"data": [int(v) for v in b["data"]], "op": b["op"],
                                          "weight": b["weight"], "addr": b["addr"], "mask": b["mask"],
                                          "meta": t}, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p, 6)
        for _ in beats:
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append((p.meta, [p.data[j] for j in range(LANES)]))
        await ctx.tick()
        final["mem"] = np.array([list(ctx.get(h.mem.data[a])) for a in range(1 << AW)])

    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.run()
    assert [g[0] for g in got] == list(range(len(beats))), "ResidualStage: beats lost, duplicated or reordered"
    for t, ((_, data), want) in enumerate(zip(got, want_out)):
        assert data == [int(v) for v in want], f"ResidualStage beat {t}: expected {want}, got {data}"
    bad = np.argwhere(final["mem"] != mem)
    assert not len(bad), (f"ResidualStage word {bad[0][0]} lane {bad[0][1]}: expected "
                          f"{mem[tuple(bad[0])]}, got {final['mem'][tuple(bad[0])]}")


def test_verilog_and_connect():
    assert "module residual" in verilog.convert(ResidualStage(4, 6), name="residual")
    assert "module harness" in verilog.convert(_Harness(np.zeros((1 << AW, LANES), int)), name="harness", ports=[])

    class Wrapper(wiring.Component):
        def __init__(self):
            super().__init__({"i": wiring.In(stream.Signature(ResidualInLayout(2, 4, unsigned(0)))),
                              "o": wiring.Out(stream.Signature(ResidualOutLayout(2, 4, unsigned(0))))})

        def elaborate(self, platform):
            m = Module()
            m.submodules.r = r = ResidualStage(2, 4)
            m.submodules.mem = mem = memory.Memory(shape=data.ArrayLayout(signed(16), 2), depth=16, init=[])
            wiring.connect(m, wiring.flipped(self.i), r.i)
            wiring.connect(m, r.o, wiring.flipped(self.o))
            wiring.connect(m, r.rd, mem.read_port())
            wiring.connect(m, r.wr, mem.write_port(granularity=1))
            return m

    assert "module wrapper" in verilog.convert(Wrapper(), name="wrapper")


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(lanes=0, addr_width=4), ValueError, "lanes"),
    (dict(lanes=2, addr_width=0), ValueError, "addr_width"),
    (dict(lanes=2, addr_width=4.0), TypeError, "addr_width"),
])
def test_bad_parameters(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ResidualStage(**kwargs)
