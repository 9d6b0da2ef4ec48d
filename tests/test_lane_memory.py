# amaranth: UnusedElaboratable=no
"""LaneMemory (m3vit_hw.lib.lane_memory): a lane-split memory reads and writes like one memory (random
lane-granular writes, reads with enable holds, read-before-write in the same cycle), peek_word reads
it back, and bad parameters are refused; AcceleratorConfig.lane_split picks the URAM-filling split."""

import random

import pytest
from amaranth.hdl import Fragment, Module, signed
from amaranth.lib import data, memory
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.onchip import budget, buffer_report, fits
from m3vit_hw.lib.lane_memory import LaneMemory, peek_word

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _lanes(raw, bits, lanes):
    return [((raw >> (bits * i)) & ((1 << bits) - 1)) - (((raw >> (bits * i + bits - 1)) & 1) << bits)
            for i in range(lanes)]


@pytest.mark.parametrize("bits, lanes, split", [(8, 5, 3), (16, 5, 4), (8, 9, 1), (16, 4, 2)])
def test_reads_and_writes_like_one_memory(bits, lanes, split):
    depth, cycles = 13, 600
    mem = LaneMemory(lane_shape=signed(bits), lanes=lanes, split=split, depth=depth)
    ref = memory.Memory(shape=data.ArrayLayout(signed(bits), lanes), depth=depth, init=[])
    m = Module()
    m.submodules.mem, m.submodules.ref = mem, ref
    ports = [(mem.write_port(granularity=1), mem.read_port()),
             (ref.write_port(granularity=1), ref.read_port())]
    rng = random.Random(bits * 100 + lanes * 10 + split)
    sim = Simulator(m)
    sim.add_clock(1e-6)
    model = [[0] * lanes for _ in range(depth)]

    async def bench(ctx):
        held = [0] * lanes
        for cycle in range(cycles):
            wa, ra = rng.randrange(depth), rng.randrange(depth)
            # Same-address read and write in one cycle now and then: the read sees the old word.
            if rng.random() < 0.2:
                ra = wa
            words = [rng.randrange(-(1 << bits - 1), 1 << bits - 1) for _ in range(lanes)]
            en = rng.randrange(1 << lanes) if rng.random() < 0.6 else 0
            ren = rng.random() < 0.7
            for w, r in ports:
                ctx.set(w.addr, wa)
                ctx.set(w.data, words)
                ctx.set(w.en, en)
                ctx.set(r.addr, ra)
                ctx.set(r.en, ren)
            if ren:
                held = list(model[ra])
            for i in range(lanes):
                if en >> i & 1:
                    model[wa][i] = words[i]
            await ctx.tick()
            got, want_ref = list(ctx.get(ports[0][1].data)), list(ctx.get(ports[1][1].data))
            assert got == held, (f"LaneMemory {bits}-bit x {lanes} split {split}, cycle {cycle}: read "
                                 f"word {ra}: expected {held}, got {got}")
            assert want_ref == held, f"reference Memory disagrees with the model at cycle {cycle}"
        for a in range(depth):
            got = _lanes(peek_word(ctx, mem, a), bits, lanes)
            assert got == model[a], f"peek_word word {a}: expected {model[a]}, got {got}"
            assert _lanes(peek_word(ctx, ref, a), bits, lanes) == model[a]

    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(lanes=1, split=1), ValueError, "lanes"),
    (dict(lanes=4, split=0), ValueError, r"split must be in \[1, 3\], not 0"),
    (dict(lanes=4, split=4), ValueError, r"split must be in \[1, 3\], not 4"),
    (dict(lanes=4, split=2.0), TypeError, "split"),
    (dict(lanes=4, split=2, depth=0), ValueError, "depth"),
])
def test_refuses_bad_parameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LaneMemory(**{"lane_shape": signed(8), "depth": 8, **kwargs})


def test_write_port_granularity():
    mem = LaneMemory(lane_shape=signed(8), lanes=4, split=2, depth=8)
    with pytest.raises(ValueError, match="granularity must be 1, not 2"):
        mem.write_port(granularity=2)
    Fragment.get(mem, None)             # (and it elaborates without ports)


def test_config_lane_split():
    """The split fills whole 72-bit URAM columns: 64 int8 lanes as 63 (7 URAMs) + 1, 64 int16 lanes as
    63 (14) + 1; at 32 lanes only int16 splits (the int8 rest would be 40 bits, dearer than a URAM).
    W2's default uses it, and its buffers then need 8 URAMs fewer."""
    w2 = AcceleratorConfig.from_preset("vit-small-nyud")
    assert w2.lane_split and (w2.lane_split_at(numerics.ACT_BITS), w2.lane_split_at(numerics.RES_BITS)) == (63, 63)
    off = w2.with_(lane_split=False)
    assert off.lane_split_at(numerics.ACT_BITS) is None and off.lane_split_at(numerics.RES_BITS) is None
    c32 = AcceleratorConfig(model=w2.model, pe_rows=32, pe_cols=32, lane_split=True)
    assert (c32.lane_split_at(numerics.ACT_BITS), c32.lane_split_at(numerics.RES_BITS)) == (None, 31)
    # The lower activation bank 40 -> 35 URAM, the Q|K|V copy 8 -> 7, the residual 30 -> 28; their last
    # lanes take 5 + 1 + 4 BRAM36.
    blocks = {b.name: (b.uram_blocks, b.bram36_blocks) for b in buffer_report(w2)}
    assert {k: v for k, v in blocks.items() if "lane" in k} == {
        "activation (lower bank) lanes 0-62": (35, 280), "activation (lower bank) lane 63": (5, 5),
        "activation Q|K|V copy lanes 0-62": (7, 56), "activation Q|K|V copy lane 63": (1, 1),
        "residual lanes 0-62": (28, 210), "residual lane 63": (2, 4)}
    whole = {b.name: b.uram_blocks for b in buffer_report(off)}
    assert (whole["activation (lower bank)"], whole["activation Q|K|V copy"], whole["residual"]) == (40, 8, 30)
    assert fits(buffer_report(w2, budget()), budget())[2]
    with pytest.raises(TypeError, match="lane_split must be a bool, not 1"):
        w2.with_(lane_split=1)
    with pytest.raises(ValueError, match="lane_split needs .* not pe_cols=16"):
        AcceleratorConfig.from_preset("tiny", pe_cols=16, lane_split=True)
