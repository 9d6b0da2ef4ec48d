# amaranth: UnusedElaboratable=no
"""ISqrt: exact against ``math.isqrt`` (and ``golden.isqrt``), with random stalls on both streams."""

import math
import random

import numpy as np
import pytest
from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.sim import Simulator

from m3vit_hw.lib.isqrt import ISqrt
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put, StreamPassthrough, transfer_logger

# Constructors that reject their parameters leave a half-built Elaboratable behind; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _run(dut, values, *, stall_p=0.3, seed=0):
    """Feed ``values``; returns ([(root, remainder)], output cycles, input cycles)."""
    got, when, in_when = [], [], []

    async def feeder(ctx):
        stalls = Stalls(stall_p, seed)
        for v in values:
            await stream_put(ctx, dut.i, v, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p, seed + 1)
        for _ in values:
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append((p.root, p.remainder))
        for _ in range(40):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "isqrt produced an extra result"

    monitor, (in_when, when) = transfer_logger(dut.i, dut.o)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.add_process(monitor)
    sim.run()
    return got, when, in_when


def _check(values, got):
    assert len(got) == len(values), f"isqrt: {len(values)} operands in, {len(got)} results out"
    for n, (v, g) in enumerate(zip(values, got)):
        r = math.isqrt(v)
        want = (r, v - r * r)
        assert g == want, f"isqrt: first mismatch at operand {n} (isqrt({v})): expected {want}, got {g}"


@pytest.mark.parametrize("width,k,pipe", [(8, 1, False), (7, 2, False), (8, 3, False), (1, 1, False), (2, 1, False),
                                          (8, 1, True), (7, 1, True), (1, 1, True)])
def test_exhaustive_small(width, k, pipe):
    values = list(range(1 << width))
    got, _, _ = _run(ISqrt(width, bits_per_cycle=k, pipelined=pipe), values, seed=width * 10 + k + pipe)
    _check(values, got)


@pytest.mark.parametrize("width,k,pipe", [(49, 1, False), (49, 2, False), (40, 4, False), (64, 3, False),
                                          (49, 1, True), (46, 1, True), (9, 1, True)])
def test_random_full_width(width, k, pipe):
    """LayerNorm widths (var_n of D=384 is 49 bits) plus squares, their neighbours and the maximum."""
    rng = random.Random(width + k)
    values = [0, 1, (1 << width) - 1, 1 << (width - 1)]
    for _ in range(30):
        r = rng.randrange(1 << (width // 2))
        values += [r * r, r * r - 1 if r else 0, rng.randrange(1 << width)]
    got, _, _ = _run(ISqrt(width, bits_per_cycle=k, pipelined=pipe), values, seed=k + pipe)
    _check(values, got)
    if width < 63:
        # golden.isqrt is LayerNorm's oracle (int64); it must agree with the unit on these too.
        assert [g[0] for g in got] == golden.isqrt(np.array(values, dtype=np.int64)).tolist()


@pytest.mark.parametrize("k,pipe", [(1, False), (2, False), (4, False), (1, True)])
def test_back_to_back_period(k, pipe):
    dut = ISqrt(49, bits_per_cycle=k, pipelined=pipe)
    values = list(range(1000, 1020))
    got, when, in_when = _run(dut, values, stall_p=0.0)
    _check(values, got)
    per_op = (when[-1] - when[0]) / (len(when) - 1)
    print(f"isqrt k={k} pipelined={pipe}: {per_op:.2f} cycles/root (period {dut.period}, latency {dut.latency})")
    assert per_op == dut.period
    assert when[0] - in_when[0] == dut.latency


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(width=0), ValueError, "width must be an integer >= 1, not 0"),
    (dict(width="8"), TypeError, "width must be an integer, not '8'"),
    (dict(width=8, bits_per_cycle=0), ValueError, r"bits_per_cycle must be in \[1, 8\], not 0"),
    (dict(width=8, bits_per_cycle=2, pipelined=True), ValueError, "bits_per_cycle must be 1 when pipelined, not 2"),
    (dict(width=8, pipelined="yes"), TypeError, "pipelined must be a bool"),
])
def test_bad_parameters(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        ISqrt(**kwargs)


class _Top(wiring.Component):
    """A design embedding the unit, wired purely with ``wiring.connect``."""

    def __init__(self):
        self.unit = ISqrt(49, bits_per_cycle=2)
        super().__init__(dict(self.unit.signature.members))

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.stage = stage = StreamPassthrough(self.unit.o.signature)
        wiring.connect(m, wiring.flipped(self.i), self.unit.i)
        wiring.connect(m, self.unit.o, stage.i)
        wiring.connect(m, stage.o, wiring.flipped(self.o))
        return m


def test_verilog_standalone():
    assert "module isqrt" in verilog.convert(ISqrt(49, bits_per_cycle=2), name="isqrt")


def test_embedded_with_connect():
    top = _Top()
    assert "module top" in verilog.convert(top, name="top")
    values = [0, 99, (1 << 49) - 1]
    got, _, _ = _run(top, values, stall_p=0.2)
    _check(values, got)
