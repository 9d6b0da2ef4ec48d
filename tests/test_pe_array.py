# amaranth: UnusedElaboratable=no
"""PEArray (one or two MACs per DSP): exact int32 tile sums against numpy int64, with random stalls on
both streams."""

import time

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.sim import Simulator

from m3vit_hw.gemm.pe_array import OperandLayout, PEArray, ResultLayout
from sim.testbench import Stalls, stream_get, stream_put


def _tiles(rng, rows, cols, count, k_max, extremes=False):
    """Random tiles: (a [rows, K] raw ints, b [K, cols], a_unsigned, rows_valid)."""
    tiles = []
    for t in range(count):
        k = int(rng.integers(1, k_max + 1))
        unsigned_a = bool(t % 2)
        lo, hi = (0, 255) if unsigned_a else (-128, 127)
        if extremes:
            a = rng.choice([lo, hi], size=(rows, k))
            b = rng.choice([-128, 127], size=(k, cols))
        else:
            a = rng.integers(lo, hi + 1, size=(rows, k))
            b = rng.integers(-128, 128, size=(k, cols))
        tiles.append((a, b, unsigned_a, int(rng.integers(1, rows + 1))))
    return tiles


def _run(rows, cols, tiles, stall_p, seed=0, pack=1, drain_interval=1):
    dut = PEArray(rows, cols, pack, drain_interval)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    expected = []
    for a, b, _, rv in tiles:
        c = a.astype(np.int64) @ b.astype(np.int64)
        expected += [(r, c[r]) for r in range(rv)]
    got = []
    cycles = []

    async def feeder(ctx):
        stalls = Stalls(stall_p, seed)
        for a, b, unsigned_a, rv in tiles:
            k = a.shape[1]
            for kk in range(k):
                await stream_put(ctx, dut.i, {
                    "a": [int(x) & 0xFF for x in a[:, kk]], "b": [int(x) for x in b[kk]],
                    "a_unsigned": int(unsigned_a), "first": int(kk == 0), "last": int(kk == k - 1),
                    "rows_valid": rv}, stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p, seed + 1)
        n = 0
        for _ in range(len(expected)):
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append((p.row, [p.acc[j] for j in range(cols)], p.last))
            n += 1
        # Nothing extra may come out.
        for _ in range(10):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "PEArray: extra output row after the expected ones"
        cycles.append(n)

    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.run()

    assert len(got) == len(expected), f"PEArray: {len(got)} rows out, expected {len(expected)}"
    idx = 0
    for (row, acc, last), (erow, ecol) in zip(got, expected):
        assert row == erow, f"PEArray: output {idx}: row index expected {erow}, got {row}"
        for j in range(cols):
            assert acc[j] == ecol[j], (f"PEArray: output {idx} (row {erow}) col {j}: "
                                       f"expected {ecol[j]}, got {acc[j]}")
        idx += 1
    # last flags: exactly at the end of each tile
    lasts = [g[2] for g in got]
    want_lasts = []
    for _, _, _, rv in tiles:
        want_lasts += [int(r == rv - 1) for r in range(rv)]
    assert lasts == want_lasts, "PEArray: last flags misplaced"


@pytest.mark.parametrize("rows,cols,pack,drain_interval", [(4, 4, 1, 1), (3, 5, 1, 1), (4, 4, 2, 1), (3, 6, 2, 1),
                                                            (4, 4, 1, 2), (4, 4, 2, 2), (3, 6, 2, 2)])
def test_random_tiles_with_stalls(rows, cols, pack, drain_interval):
    rng = np.random.default_rng(rows * 10 + cols)
    _run(rows, cols, _tiles(rng, rows, cols, count=10, k_max=9), stall_p=0.3, pack=pack,
         drain_interval=drain_interval)


@pytest.mark.parametrize("pack", [1, 2])
def test_extremes_int8_and_uint8(pack):
    # -128 * -128 and 255 * -128 sums, incl. one-beat tiles and tiles shorter than the drain.
    rng = np.random.default_rng(7)
    rows = cols = 4
    tiles = _tiles(rng, rows, cols, count=8, k_max=40, extremes=True)
    tiles.append((np.full((rows, 1), 255), np.full((1, cols), -128), True, rows))
    tiles.append((np.full((rows, 1), -128), np.full((1, cols), -128), False, rows))
    tiles.append((np.full((rows, 300), 255), np.full((300, cols), -128), True, 2))
    _run(rows, cols, tiles, stall_p=0.2, seed=3, pack=pack)


@pytest.mark.parametrize("long_k", [(1201,), pytest.param((1201, 1300), marks=pytest.mark.slow)])
def test_packed_low_field_spill_boundaries(long_k):
    """pack=2: the low column's 16-bit field in the DSP wraps after two or three extreme products;
    K around every early wrap (1..6), K = 1,201 (W2's AV product) and beyond, every sign pattern of
    the two packed columns (-128/127 and uint8 255 everywhere), random stalls."""
    rows, cols = 4, 4
    rng = np.random.default_rng(12 + len(long_k))
    # Column pairs (hi, lo): both -128, hi 127 / lo -128, hi -128 / lo 127, both 127.
    b_row = np.array([-128, -128, 127, -128])
    b_row2 = np.array([-128, 127, 127, 127])
    tiles = []
    for k in (1, 2, 3, 4, 5, 6) + long_k:
        for unsigned_a, a_val in ((True, 255), (False, -128), (False, 127)):
            if k > 6 and (a_val == 127 or len(long_k) == 1 and not unsigned_a):
                continue
            a = np.full((rows, k), a_val)
            a[1] = 255 if unsigned_a else -128 if a_val == 127 else 127
            b = np.tile(b_row if k % 2 else b_row2, (k, 1))
            tiles.append((a, b, unsigned_a, int(rng.integers(1, rows + 1))))
    # Random extremes at K = 1,201: the low sum crosses its field many times both ways.
    tiles += [(a, b, u, rv) for a, b, u, rv in _tiles(rng, rows, cols, count=2, k_max=1, extremes=True)]
    for unsigned_a in (True, False)[:len(long_k)]:
        lo, hi = (0, 255) if unsigned_a else (-128, 127)
        tiles.append((rng.choice([lo, hi], size=(rows, 1201)), rng.choice([-128, 127], size=(1201, cols)),
                      unsigned_a, rows))
    _run(rows, cols, tiles, stall_p=0.2, seed=12, pack=2)


@pytest.mark.parametrize("pack,drain_interval", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_throughput_no_stalls(pack, drain_interval):
    """Back-to-back tiles with K >= drain_interval * rows + 4 keep the array busy every cycle."""
    rows = cols = 4
    k, n_tiles = drain_interval * rows + 4, 6
    dut = PEArray(rows, cols, pack, drain_interval)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    result = {}

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        beats = 0
        start = None
        ctx.set(dut.i.valid, 1)
        t = 0
        while beats < k * n_tiles:
            kk = beats % k
            ctx.set(dut.i.payload, {"a": [1] * rows, "b": [1] * cols, "a_unsigned": 0,
                                    "first": int(kk == 0), "last": int(kk == k - 1),
                                    "rows_valid": rows})
            if start is None:
                start = t
            ready = ctx.get(dut.i.ready)
            if ctx.get(dut.o.valid):
                out_cycles.append(t)
            await ctx.tick()
            t += 1
            beats += ready
        ctx.set(dut.i.valid, 0)
        result["cycles"] = t - start

    out_cycles = []
    sim.add_testbench(tb)
    sim.run()
    util = k * n_tiles / result["cycles"]
    print(f"PEArray {rows}x{cols}: {k * n_tiles} beats in {result['cycles']} cycles, utilization {util:.3f}")
    assert util == 1.0
    # Rows leave at the interval's pace: back to back within a tile, or every other cycle.
    gaps = {b - a for a, b in zip(out_cycles, out_cycles[1:])}
    assert min(gaps) == drain_interval, f"PEArray: row spacing {sorted(gaps)}, drain_interval {drain_interval}"


@pytest.mark.parametrize("rows,cols", [(2, 3), (4, 4)])
def test_verilog_and_connect(rows, cols):
    t0 = time.time()
    text = verilog.convert(PEArray(rows, cols), name="pe_array")
    assert "module pe_array" in text
    print(f"verilog.convert PEArray({rows}, {cols}): {len(text)} chars in {time.time() - t0:.1f} s")

    class Wrapper(wiring.Component):
        """Embeds a PEArray behind flipped stream ports via wiring.connect."""

        def __init__(self):
            super().__init__({
                "i": wiring.In(stream.Signature(OperandLayout(rows, cols))),
                "o": wiring.Out(stream.Signature(ResultLayout(rows, cols))),
            })

        def elaborate(self, platform):
            m = Module()
            m.submodules.pe = pe = PEArray(rows, cols)
            wiring.connect(m, wiring.flipped(self.i), pe.i)
            wiring.connect(m, pe.o, wiring.flipped(self.o))
            return m

    assert "module wrapper" in verilog.convert(Wrapper(), name="wrapper")


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (257, ValueError),
                                     (2.0, TypeError), (True, TypeError)])
def test_bad_parameters(bad, exc):
    with pytest.raises(exc, match="rows"):
        PEArray(bad, 4)
    with pytest.raises(exc, match="cols"):
        PEArray(4, bad)
    with pytest.raises(exc, match="pack"):
        PEArray(4, 4, bad)
    with pytest.raises(exc, match="drain_interval"):
        PEArray(4, 4, 1, bad)


def test_from_config_drains_as_the_engine_needs():
    """The engine's array (PEArray.from_config): interval 2 when a row is two or more epilogue beats."""
    from m3vit_hw.config import AcceleratorConfig
    w1 = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    pe = PEArray.from_config(w1)
    assert (pe.rows, pe.cols, pe.pack) == (w1.pe_rows, w1.pe_cols, w1.pe_pack)
    assert w1.epi_beats == 4 and pe.drain_interval == 2
    one_beat = AcceleratorConfig.from_preset("tiny", epi_lanes=4, pe_cols=4)
    assert one_beat.epi_beats == 1 and PEArray.from_config(one_beat).drain_interval == 1


def test_bad_pack():
    with pytest.raises(ValueError, match=r"pack must be in \[1, 2\], not 3"):
        PEArray(4, 4, 3)
    with pytest.raises(ValueError, match="cols must be even with pack=2"):
        PEArray(4, 5, 2)
