# amaranth: UnusedElaboratable=no
"""SoftmaxUnit: bit-exact with golden.attention_weights / attention_recip / router_probs, with stalls."""


import numpy as np
import pytest
from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.rowops.softmax import SoftmaxMode, SoftmaxUnit
from m3vit_hw.config import AcceleratorConfig
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put, StreamPassthrough, transfer_logger

# Constructors that reject their parameters leave a half-built Elaboratable behind; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

S_LO, S_HI = numerics.int_range(numerics.ACC_BITS)
C_MULT_MAX = (1 << numerics.SOFTMAX_MULT_BITS) - 1
OUT_MULT_MAX = (1 << numerics.AV_OUT_MULT_BITS) - 1


class Cmd:
    """One command: rows of one length, one mode, one set of parameters."""

    def __init__(self, mode, rows, c_mult, c_shift, out_mult=0):
        self.mode = mode
        self.rows = np.asarray(rows, dtype=np.int64)
        assert self.rows.ndim == 2
        self.c_mult, self.c_shift, self.out_mult = int(c_mult), int(c_shift), int(out_mult)

    @property
    def length(self):
        return self.rows.shape[1]

    def payload(self):
        return {"mode": self.mode, "length": self.length, "rows": self.rows.shape[0],
                "c_mult": self.c_mult, "c_shift": self.c_shift, "out_mult": self.out_mult}

    def expected(self):
        """Per row: (values, row_sum, recip) from the golden model."""
        if self.mode == SoftmaxMode.ATTENTION:
            e8, l = golden.attention_weights(self.rows, self.c_mult, self.c_shift)
            recip = golden.attention_recip(l, self.out_mult)
            return [(e8[r], int(l[r]), int(recip[r])) for r in range(len(self.rows))]
        p = golden.router_probs(self.rows, self.c_mult, self.c_shift)
        s = golden.softmax_exp(self.rows, self.c_mult, self.c_shift).sum(-1)
        recip = (1 << numerics.ROUTER_RECIP_BITS) // s
        return [(p[r], int(s[r]), int(recip[r])) for r in range(len(self.rows))]


def _beats(dut, n):
    return -(-n // dut.lanes)


def _run(dut, cmds, *, stall_p=0.3, seed=0):
    """Send the commands and their rows; collect every output beat.

    Returns (beats as (data, last, row_sum, recip), output cycles, input cycles).
    """
    L = dut.lanes
    total = sum(c.rows.shape[0] * _beats(dut, c.length) for c in cmds)
    beats, when, in_when = [], [], []

    async def cmd_feeder(ctx):
        stalls = Stalls(stall_p, seed)
        for c in cmds:
            await stream_put(ctx, dut.cmd, c.payload(), stalls=stalls)

    async def data_feeder(ctx):
        stalls = Stalls(stall_p, seed + 1)
        rng = np.random.default_rng(seed)
        for c in cmds:
            for row in c.rows:
                # The lanes past the row's end carry junk: the unit must ignore them.
                junk = rng.integers(S_LO, S_HI, _beats(dut, c.length) * L - c.length)
                padded = np.concatenate([row, junk])
                for b in range(_beats(dut, c.length)):
                    await stream_put(ctx, dut.i, padded[b * L:(b + 1) * L].tolist(), stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p, seed + 2)
        for _ in range(total):
            p = await stream_get(ctx, dut.o, stalls=stalls)
            beats.append((list(p.data), p.last, p.row_sum, p.recip))
        for _ in range(3 * dut.exp_buffer_depth):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "softmax: extra output beat after the last expected one"

    monitor, (in_when, when) = transfer_logger(dut.i, dut.o)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(cmd_feeder)
    sim.add_testbench(data_feeder)
    sim.add_testbench(checker)
    sim.add_process(monitor)
    sim.run()
    return beats, when, in_when


def _check(dut, cmds, beats):
    pos = 0
    for ci, c in enumerate(cmds):
        for r, (want_v, want_sum, want_recip) in enumerate(c.expected()):
            nb = _beats(dut, c.length)
            row = beats[pos:pos + nb]
            pos += nb
            where = f"softmax ({c.mode.name.lower()}): command {ci}, row {r}"
            got_v = np.array([v for b in row for v in b[0]], dtype=np.int64)
            bad = np.flatnonzero(got_v[:c.length] != want_v)
            if bad.size:
                e = bad[0]
                raise AssertionError(f"{where}, element {e}: expected {want_v[e]}, got {got_v[e]} "
                                     f"(row {c.rows[r].tolist()})")
            assert not got_v[c.length:].any(), f"{where}: padding lanes not 0: {got_v[c.length:].tolist()}"
            lasts = [b[1] for b in row]
            assert lasts == [0] * (nb - 1) + [1], f"{where}: last expected on the final beat only, got {lasts}"
            assert all(b[2] == 0 and b[3] == 0 for b in row[:-1]), f"{where}: row_sum/recip before the last beat"
            assert row[-1][2] == want_sum, f"{where}: row_sum expected {want_sum}, got {row[-1][2]}"
            assert row[-1][3] == want_recip, f"{where}: recip expected {want_recip}, got {row[-1][3]}"
    assert pos == len(beats)


def _random_scores(rng, n, length, c_mult, c_shift, spread_t=5000):
    """Scores whose log2 distances t span about [0, spread_t / 256] octaves."""
    spread = max(1, int(spread_t * (1 << c_shift) / max(c_mult, 1)))
    base = int(rng.integers(S_LO // 2, S_HI // 2))
    s = base + rng.integers(-min(spread, S_HI // 2), min(spread, S_HI // 2) + 1, size=(n, length))
    return np.clip(s, S_LO, S_HI)


def test_attention_random_with_stalls():
    dut = SoftmaxUnit(4, 24)
    rng = np.random.default_rng(10)
    cmds = []
    for length, n in [(24, 3), (13, 2), (1, 2), (5, 3), (8, 1)]:
        c_shift = int(rng.integers(8, 26))
        c_mult = int(rng.integers(1, C_MULT_MAX + 1))
        cmds.append(Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, n, length, c_mult, c_shift),
                        c_mult, c_shift, int(rng.integers(0, OUT_MULT_MAX + 1))))
    beats, _, _ = _run(dut, cmds, stall_p=0.3, seed=10)
    _check(dut, cmds, beats)


def test_attention_extremes():
    """All-equal rows (every e8 = 255), huge spreads (most exps 0), the int32 rails, c_mult = 0 and
    maximum, c_shift = 0 and 63, out_mult = 0 and maximum, maximum row length."""
    dut = SoftmaxUnit(4, 18)
    n = 18
    rails = np.array([[S_HI, S_LO] * (n // 2)])
    ramp = np.array([np.arange(n) * 97])
    cmds = [
        Cmd(SoftmaxMode.ATTENTION, np.full((2, n), 12345), 1000, 10, OUT_MULT_MAX),     # all equal
        Cmd(SoftmaxMode.ATTENTION, np.full((1, n), S_LO), C_MULT_MAX, 0, 1),
        Cmd(SoftmaxMode.ATTENTION, rails, C_MULT_MAX, 0, OUT_MULT_MAX),               # spread 2**32
        Cmd(SoftmaxMode.ATTENTION, rails, 1, 63, 7),                                  # t = 0: all 255
        Cmd(SoftmaxMode.ATTENTION, ramp, 0, 0, 0),                                    # c_mult = 0
        Cmd(SoftmaxMode.ATTENTION, ramp, C_MULT_MAX, 12, 300),
        Cmd(SoftmaxMode.ATTENTION, ramp, 1, 0, 300),                                  # t = distance
        Cmd(SoftmaxMode.ATTENTION, np.array([[S_LO] * (n - 1) + [S_HI]]), 1, 20, OUT_MULT_MAX),
        Cmd(SoftmaxMode.ATTENTION, np.array([[5]]), 77, 3, OUT_MULT_MAX),                # length 1
    ]
    beats, _, _ = _run(dut, cmds, stall_p=0.2, seed=11)
    _check(dut, cmds, beats)


@pytest.mark.parametrize("experts", [1, 2, 3, 16, 64])
def test_router_rows_with_ties(experts):
    """Router rows for E experts: random logits, exact ties at the maximum and elsewhere."""
    dut = SoftmaxUnit(4, 64)
    rng = np.random.default_rng(experts)
    rows = rng.integers(-3000, 3000, size=(4, experts))
    rows[1] = rows[1] // 500 * 500                     # many ties
    rows[2, :] = rows[2, 0]                            # all tied
    rows[3, : (experts + 1) // 2] = rows[3].max()      # tie at the maximum
    cmds = [Cmd(SoftmaxMode.ROUTER, rows, 23000, 12),
            Cmd(SoftmaxMode.ROUTER, rows[:2], C_MULT_MAX, 0),
            Cmd(SoftmaxMode.ROUTER, rows[:1], 1, 63)]
    beats, _, _ = _run(dut, cmds, stall_p=0.3, seed=experts)
    _check(dut, cmds, beats)


@pytest.mark.parametrize("lanes,tokens,experts", [(16, 129, 16), (32, 1201, 16)])
def test_workload_shapes(lanes, tokens, experts):
    """W1 / W2 shapes at the config's default lanes (pe_cols): full-length attention rows (the last
    beat partial) followed by router rows, with stalls."""
    dut = SoftmaxUnit(lanes, tokens)
    rng = np.random.default_rng(tokens)
    cmds = [Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, 2, tokens, 9000, 18), 9000, 18, 30000),
            Cmd(SoftmaxMode.ROUTER, rng.integers(-4000, 4000, (3, experts)), 23000, 12)]
    beats, _, _ = _run(dut, cmds, stall_p=0.2, seed=tokens)
    _check(dut, cmds, beats)


@pytest.mark.parametrize("lanes,max_length", [(1, 5), (8, 3), (5, 7)])
def test_small_shapes(lanes, max_length):
    """One lane; more lanes than elements (every row is one partial beat); odd lane counts."""
    dut = SoftmaxUnit(lanes, max_length)
    rng = np.random.default_rng(lanes * 100 + max_length)
    cmds = []
    for length in sorted({1, max_length, max(1, max_length - 2)}):
        cmds.append(Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, 2, length, 7000, 15), 7000, 15, 5000))
        cmds.append(Cmd(SoftmaxMode.ROUTER, rng.integers(-900, 900, (2, length)), 7000, 10))
    beats, _, _ = _run(dut, cmds, stall_p=0.3, seed=lanes)
    _check(dut, cmds, beats)


def test_mixed_modes_back_to_back():
    """Attention and router commands interleaved, with a no-op command (rows = 0) in between."""
    dut = SoftmaxUnit(3, 16)
    rng = np.random.default_rng(12)
    cmds = [
        Cmd(SoftmaxMode.ROUTER, rng.integers(-2000, 2000, (3, 16)), 20000, 12),
        Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, 2, 11, 4000, 14), 4000, 14, 1234),
        Cmd(SoftmaxMode.ROUTER, np.zeros((0, 4), dtype=np.int64), 1, 1),
        Cmd(SoftmaxMode.ROUTER, rng.integers(-2000, 2000, (2, 4)), 20000, 12),
        Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, 2, 16, 60000, 20), 60000, 20, OUT_MULT_MAX),
    ]
    beats, _, _ = _run(dut, cmds, stall_p=0.25, seed=12)
    _check(dut, cmds, beats)


@pytest.mark.parametrize("lanes,length,n", [(4, 40, 6), (16, 129, 6), (32, 1201, 3)])
def test_throughput_long_rows(lanes, length, n):
    """Attention rows at max_length: one beat per cycle in and out, no bubble between rows.
    (16, 129) and (32, 1201) are W1 and W2 at the config's default lanes."""
    dut = SoftmaxUnit(lanes, length)
    rng = np.random.default_rng(13)
    cmds = [Cmd(SoftmaxMode.ATTENTION, _random_scores(rng, n, length, 5000, 16), 5000, 16, 999)]
    beats, when, in_when = _run(dut, cmds, stall_p=0.0)
    _check(dut, cmds, beats)
    nb = _beats(dut, length)
    rate_out = n * nb / (when[-1] - when[0] + 1)
    rate_in = n * nb / (in_when[-1] - in_when[0] + 1)
    latency = when[0] - in_when[nb - 1]
    print(f"softmax lanes={lanes} rows of {length} ({nb} beats, min_row_beats {dut.min_row_beats}, "
          f"k={dut.div_bits_per_cycle}): in {rate_in:.3f}, out {rate_out:.3f} beats/cycle "
          f"({n * length / (when[-1] - when[0] + 1):.2f} elements/cycle, the last beat of a row partial); "
          f"last-in to first-out latency {latency} cycles (documented {dut.row_latency(length)})")
    assert rate_in == 1.0 and rate_out == 1.0
    assert latency == dut.row_latency(length)


@pytest.mark.parametrize("experts,lanes", [(16, 4), (16, 16), (64, 8)])
def test_throughput_router_rows(experts, lanes):
    """Short router rows: one row per max(row beats, min_row_beats) cycles."""
    dut = SoftmaxUnit(lanes, 129)
    rng = np.random.default_rng(14)
    n = 12
    cmds = [Cmd(SoftmaxMode.ROUTER, rng.integers(-3000, 3000, (n, experts)), 23000, 12)]
    beats, when, _ = _run(dut, cmds, stall_p=0.0)
    _check(dut, cmds, beats)
    nb = _beats(dut, experts)
    per_row = (when[-1] - when[nb - 1]) / (n - 1)
    print(f"softmax router E={experts} lanes={lanes} ({nb} beats/row): {per_row:.2f} cycles/row, "
          f"{experts / per_row:.2f} elements/cycle ({experts / per_row / lanes:.3f} per lane); "
          f"min_row_beats {dut.min_row_beats} (k={dut.div_bits_per_cycle})")
    assert per_row <= max(nb, dut.min_row_beats)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(lanes=0, max_length=8), ValueError, "lanes must be an integer >= 1, not 0"),
    (dict(lanes="4", max_length=8), TypeError, "lanes must be an integer, not '4'"),
    (dict(lanes=4, max_length=0), ValueError, r"max_length must be in \[1, 65536\], not 0"),
    (dict(lanes=4, max_length=1 << 17), ValueError, r"max_length must be in \[1, 65536\], not 131072"),
    (dict(lanes=4, max_length=8, div_bits_per_cycle=9), ValueError,
     r"div_bits_per_cycle must be in \[1, 8\], not 9"),
])
def test_bad_parameters(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        SoftmaxUnit(**kwargs)


def test_from_config():
    cfg = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    unit = SoftmaxUnit.from_config(cfg)
    assert (unit.lanes, unit.max_length) == (16, 129)
    print(f"softmax W1 (lanes 16, T=129): k={unit.div_bits_per_cycle}, min_row_beats {unit.min_row_beats}, "
          f"buffers {unit.score_buffer_depth} + {unit.exp_buffer_depth} beats")
    small = SoftmaxUnit.from_config(AcceleratorConfig.from_preset("tiny", experts=64, softmax_lanes=2))
    assert small.max_length == 64                      # router rows (E=64 > T=9) must fit too


class _Top(wiring.Component):
    """A design embedding the unit; every stream is wired with ``wiring.connect``."""

    def __init__(self, lanes, max_length):
        self.unit = SoftmaxUnit(lanes, max_length)
        self.lanes, self.exp_buffer_depth = lanes, self.unit.exp_buffer_depth
        super().__init__(dict(self.unit.signature.members))

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.stage = stage = StreamPassthrough(self.unit.o.signature)
        wiring.connect(m, wiring.flipped(self.cmd), self.unit.cmd)
        wiring.connect(m, wiring.flipped(self.i), self.unit.i)
        wiring.connect(m, self.unit.o, stage.i)
        wiring.connect(m, stage.o, wiring.flipped(self.o))
        return m


def test_verilog_standalone():
    assert "module softmax" in verilog.convert(SoftmaxUnit(4, 64), name="softmax")


def test_embedded_with_connect():
    top = _Top(2, 8)
    assert "module top" in verilog.convert(top, name="top")
    rng = np.random.default_rng(15)
    cmds = [Cmd(SoftmaxMode.ATTENTION, rng.integers(-1000, 1000, (2, 7)), 3000, 12, 100),
            Cmd(SoftmaxMode.ROUTER, rng.integers(-1000, 1000, (2, 3)), 3000, 12)]
    beats, _, _ = _run(top, cmds, stall_p=0.2)
    _check(top, cmds, beats)


class _LongCmd(Cmd):
    """A command whose ``length`` field is above the unit's ``max_length`` (its rows are
    ``max_length`` long): the unit clamps it."""

    def __init__(self, declared, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.declared = declared

    def payload(self):
        return dict(super().payload(), length=self.declared)


@pytest.mark.parametrize("lanes,max_length", [(4, 6), (4, 8), (3, 5)])
def test_length_above_max_is_clamped(lanes, max_length):
    """``length > max_length`` runs as ``max_length``: the last beat's lane mask, the row's beat count
    and the results are those of a ``max_length`` row (golden model on the clamped rows)."""
    dut = SoftmaxUnit(lanes, max_length)
    rng = np.random.default_rng(lanes * 10 + max_length)
    declared = (1 << max_length.bit_length()) - 1       # the largest the length field holds
    assert declared > max_length
    cmds = [_LongCmd(declared, SoftmaxMode.ATTENTION, _random_scores(rng, 2, max_length, 7000, 15),
                     7000, 15, 5000),
            _LongCmd(declared, SoftmaxMode.ROUTER, rng.integers(-900, 900, (2, max_length)), 7000, 10)]
    beats, _, _ = _run(dut, cmds, stall_p=0.3, seed=lanes)
    _check(dut, cmds, beats)
