# amaranth: UnusedElaboratable=no
"""Divider: exact against Python integer division, with random stalls on both streams."""

import random

import pytest
from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.sim import Simulator

from m3vit_hw.lib.divider import Divider
from sim.testbench import Stalls, stream_get, stream_put, StreamPassthrough, transfer_logger

# Constructors that reject their parameters leave a half-built Elaboratable behind; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _expected(dividend, divisor, qw):
    if divisor == 0 or dividend // divisor >= (1 << qw):
        return {"quotient": (1 << qw) - 1, "remainder": 0, "overflow": 1}
    return {"quotient": dividend // divisor, "remainder": dividend % divisor, "overflow": 0}


def _run(dut, operands, *, stall_p=0.3, seed=0):
    """Feed ``operands`` and collect every result; returns (results, output cycles, input cycles)."""
    got, when, in_when = [], [], []

    async def feeder(ctx):
        stalls = Stalls(stall_p, seed)
        for a, b in operands:
            await stream_put(ctx, dut.i, {"dividend": a, "divisor": b}, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p, seed + 1)
        for _ in operands:
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append({"quotient": p.quotient, "remainder": p.remainder, "overflow": p.overflow})
        # Nothing extra may come out.
        for _ in range(40):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "divider produced an extra result"

    monitor, (in_when, when) = transfer_logger(dut.i, dut.o)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.add_process(monitor)
    sim.run()
    return got, when, in_when


def _check(dut, operands, got):
    """``operands`` are port values: the dividend is ``a << dut.dividend_shift``."""
    assert len(got) == len(operands), f"divider: {len(operands)} operands in, {len(got)} results out"
    sh = dut.dividend_shift
    for n, ((a, b), g) in enumerate(zip(operands, got)):
        want = _expected(a << sh, b, dut.quotient_width)
        assert g == want, (f"divider: first mismatch at operand {n} (({a} << {sh}) / {b}): "
                           f"expected {want}, got {g}")


@pytest.mark.parametrize("qw,k,pipe", [(5, 1, False), (5, 2, False), (3, 1, False), (3, 2, False), (2, 3, False),
                                        (5, 1, True), (3, 1, True)])
def test_exhaustive_small(qw, k, pipe):
    """Every 5-bit dividend by every 3-bit divisor (incl. 0 and overflow), under random stalls."""
    dut = Divider(5, 3, qw, bits_per_cycle=k, pipelined=pipe)
    operands = [(a, b) for a in range(32) for b in range(8)]
    got, _, _ = _run(dut, operands, seed=qw * 10 + k)
    _check(dut, operands, got)


def _random_operands(rng, dw, vw, lo, n=60):
    """``n`` (dividend, divisor) pairs: divisors at the extremes of [lo, 2**vw) and random, dividends at
    the top bit, all ones and random."""
    operands = []
    for _ in range(n):
        b = rng.choice([lo, (1 << vw) - 1, rng.randrange(lo, 1 << vw), rng.randrange(lo, lo + 1000)])
        a = rng.choice([1 << (dw - 1), (1 << dw) - 1, rng.randrange(1 << dw)])
        operands.append((a, b))
    return operands


@pytest.mark.parametrize("dw,vw,qw,k,lo,pipe", [
    (33, 25, 33, 1, 1, False),      # LayerNorm: floor(2**32 / den), den = isqrt(var) in [1, 2**25)
    (40, 26, 33, 2, 255, False),    # attention: floor(out_mult * 2**16 / l), l >= 255
    (32, 26, 17, 4, 1 << 15, False),  # router: floor(2**31 / sum(e16)), sum >= 2**15
    (33, 25, 33, 1, 1, True),
    (40, 26, 33, 1, 255, True),
])
def test_random_full_width(dw, vw, qw, k, lo, pipe):
    operands = _random_operands(random.Random(dw * 1000 + k), dw, vw, lo)
    dut = Divider(dw, vw, qw, bits_per_cycle=k, pipelined=pipe)
    got, _, _ = _run(dut, operands, seed=k + pipe)
    _check(dut, operands, got)


@pytest.mark.parametrize("dw,sh,qw,k,pipe", [
    (3, 2, 5, 1, False), (3, 2, 5, 1, True), (3, 2, 3, 2, False), (3, 2, 3, 1, True),
    (2, 4, 4, 1, True),             # qw < shift: the load remainder holds zero bits below the port's
    (1, 5, 6, 1, True),             # LayerNorm's form: a single port bit, 2**5 / divisor
    (4, 1, 7, 1, True),             # qw > dw + shift: quotient bits above the dividend
])
def test_exhaustive_shifted(dw, sh, qw, k, pipe):
    """``dividend_shift``: every port dividend by every 3-bit divisor (incl. 0 and overflow), stalls."""
    dut = Divider(dw, 3, qw, bits_per_cycle=k, pipelined=pipe, dividend_shift=sh)
    operands = [(a, b) for a in range(1 << dw) for b in range(8)]
    got, _, _ = _run(dut, operands, seed=dw * 100 + sh * 10 + qw)
    _check(dut, operands, got)


@pytest.mark.parametrize("dw,sh,vw,qw,lo,pipe", [
    (1, 32, 23, 33, 1, True),       # LayerNorm at D=192: floor(1 << 32 / den), den in [1, 2**23)
    (16, 16, 23, 25, 255, True),    # softmax: floor((out_mult | 2**15) << 16 / sum), sum >= 255
    (16, 16, 23, 25, 255, False),
])
def test_random_shifted(dw, sh, vw, qw, lo, pipe):
    operands = _random_operands(random.Random(dw * 1000 + sh), dw, vw, lo)
    dut = Divider(dw, vw, qw, pipelined=pipe, dividend_shift=sh)
    got, _, _ = _run(dut, operands, seed=sh + pipe)
    _check(dut, operands, got)


@pytest.mark.parametrize("k,pipe", [(1, False), (2, False), (4, False), (1, True)])
def test_back_to_back_period(k, pipe):
    """Without stalls a division retires every ``period`` = ceil(qw/k) + 1 cycles (1 pipelined)."""
    dut = Divider(33, 25, 33, bits_per_cycle=k, pipelined=pipe)
    operands = [(1 << 32, d) for d in range(1, 21)]
    got, when, in_when = _run(dut, operands, stall_p=0.0)
    _check(dut, operands, got)
    per_op = (when[-1] - when[0]) / (len(when) - 1)
    print(f"divider k={k} pipelined={pipe}: {per_op:.2f} cycles/division (period {dut.period}, latency {dut.latency})")
    assert per_op == dut.period
    assert when[0] - in_when[0] == dut.latency


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(dividend_width=0, divisor_width=4), ValueError, "dividend_width must be an integer >= 1, not 0"),
    (dict(dividend_width=8, divisor_width=-1), ValueError, "divisor_width must be an integer >= 1, not -1"),
    (dict(dividend_width=8, divisor_width=4, quotient_width=0), ValueError, "quotient_width"),
    (dict(dividend_width=8.0, divisor_width=4), TypeError, "dividend_width must be an integer"),
    (dict(dividend_width=8, divisor_width=4, bits_per_cycle=9), ValueError,
     r"bits_per_cycle must be in \[1, 8\], not 9"),
    (dict(dividend_width=8, divisor_width=4, bits_per_cycle=2, pipelined=True), ValueError,
     "bits_per_cycle must be 1 when pipelined, not 2"),
    (dict(dividend_width=8, divisor_width=4, pipelined=1), TypeError, "pipelined must be a bool"),
    (dict(dividend_width=8, divisor_width=4, dividend_shift=-1), ValueError,
     "dividend_shift must be an integer >= 0, not -1"),
    (dict(dividend_width=8, divisor_width=4, dividend_shift=2.0), TypeError, "dividend_shift must be an integer"),
])
def test_bad_parameters(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        Divider(**kwargs)


class _Top(wiring.Component):
    """A design embedding the divider: its input comes from the top's port, its output goes through
    another component, all by ``wiring.connect``."""

    def __init__(self):
        self.div = Divider(33, 25, 33, bits_per_cycle=2)
        super().__init__(dict(self.div.signature.members))

    def elaborate(self, platform):
        m = Module()
        m.submodules.div = self.div
        m.submodules.stage = stage = StreamPassthrough(self.div.o.signature)
        wiring.connect(m, wiring.flipped(self.i), self.div.i)
        wiring.connect(m, self.div.o, stage.i)
        wiring.connect(m, stage.o, wiring.flipped(self.o))
        return m


def test_verilog_standalone():
    assert "module divider" in verilog.convert(Divider(33, 25, 33, bits_per_cycle=2), name="divider")


def test_embedded_with_connect():
    top = _Top()
    assert "module top" in verilog.convert(top, name="top")
    got, _, _ = _run(top, [(100, 7), (1 << 32, 3)], stall_p=0.2)
    assert got == [_expected(100, 7, 33), _expected(1 << 32, 3, 33)]
