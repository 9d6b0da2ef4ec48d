# amaranth: UnusedElaboratable=no
"""The SoC's width converters: a 64-byte core beat over 16-byte (128-bit, HP-port) AXI masters. Every
byte and ``last`` flag compared against the memory, random stalls on both sides; the striped read
path (interleaver + four downsizers) measured in bytes per cycle."""

import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from m3vit_hw.soc.datapath import ReadInterleaver
from m3vit_hw.soc.width import ReadDownsizer, WriteDownsizer
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_get, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

WIDE, NARROW, BURST = 64, 16, 4


def _requests(rng, n, size):
    """``n`` random ``(addr, beats)`` wide requests inside ``size`` bytes, none across 4 KiB."""
    out = []
    while len(out) < n:
        beats = rng.randint(1, BURST)
        addr = rng.randrange(0, size - BURST * WIDE, WIDE)
        if addr // 4096 == (addr + beats * WIDE - 1) // 4096:
            out.append((addr, beats))
    return out


class _Striped(wiring.Component):
    """ReadInterleaver(n) in front of ``n`` ReadDownsizers: what AcceleratorTop builds."""

    def __init__(self, n):
        self._n = n
        self.il = ReadInterleaver(n, data_bytes=WIDE, max_burst=BURST, depth=16)
        self.ds = [ReadDownsizer(wide_bytes=WIDE, narrow_bytes=NARROW, max_burst=BURST) for _ in range(n)]
        super().__init__({"up": wiring.In(self.il.up.signature.flip()),
                          "down": wiring.Out(self.ds[0].down.signature).array(n)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.il = self.il
        wiring.connect(m, wiring.flipped(self.up), self.il.up)
        for k, ds in enumerate(self.ds):
            m.submodules[f"ds{k}"] = ds
            wiring.connect(m, self.il.down[k], ds.up)
            wiring.connect(m, ds.down, wiring.flipped(self.down[k]))
        return m


def _read(dut, n_ports, reqs, mem, *, stall, latency, seed):
    """Issue ``reqs`` on ``dut.up``, collect every response beat; returns (beats, cycles)."""
    xms = [ExternalMemory(mem, bytes_per_cycle=NARROW, latency=latency, stall_prob=stall, seed=seed + k,
                          max_outstanding=4) for k in range(n_ports)]
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    downs = [dut.down] if n_ports == 1 else list(dut.down)
    for xm, d in zip(xms, downs):
        sim.add_testbench(xm.serve(d), background=True)
    got, out = [], {}

    async def issue(ctx):
        st = Stalls(stall, seed + 11)
        for a, b in reqs:
            await stream_put(ctx, dut.up.req, {"addr": a, "beats": b}, stalls=st)

    async def collect(ctx):
        st = Stalls(stall, seed + 13)
        total = sum(b for _, b in reqs)
        t0 = None
        for _ in range(total):
            p = await stream_get(ctx, dut.up.resp, stalls=st)
            t0 = xms[0].cycle if t0 is None else t0
            got.append((int(p.data), int(p.last)))
        out["cycles"] = xms[0].cycle - t0 + 1

    sim.add_testbench(issue, background=True)
    sim.add_testbench(collect)
    sim.run()
    return got, out["cycles"], xms


def _expected(reqs, mem):
    want = []
    for a, b in reqs:
        for i in range(b):
            want.append((int.from_bytes(mem[a + i * WIDE:a + (i + 1) * WIDE], "little"), int(i == b - 1)))
    return want


def _compare(got, want, what):
    assert len(got) == len(want), f"{what}: {len(got)} beats, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{what}: beat {i}: expected data {w[0]:#x} last {w[1]}, got {g[0]:#x} last {g[1]}"


@pytest.mark.parametrize("stall, seed", [(0.0, 1), (0.3, 2)])
def test_read_downsizer_bit_exact(stall, seed):
    rng = random.Random(seed)
    mem = bytes(rng.randrange(256) for _ in range(3 * 4096))
    reqs = _requests(rng, 40, len(mem))
    dut = ReadDownsizer(wide_bytes=WIDE, narrow_bytes=NARROW, max_burst=BURST)
    got, cycles, xms = _read(dut, 1, reqs, mem, stall=stall, latency=6, seed=seed)
    _compare(got, _expected(reqs, mem), f"ReadDownsizer stall {stall}")
    # One narrow request per wide request, four times the beats, at the same address.
    assert [(r.addr, r.beats) for r in xms[0].log] == [(a, 4 * b) for a, b in reqs]


@pytest.mark.parametrize("stall, seed", [(0.0, 3), (0.25, 4)])
def test_striped_read_bit_exact_and_bandwidth(stall, seed):
    """Four 16-byte ports behind the interleaver deliver 64-byte beats in request order; the
    bandwidth is printed (full bursts, latency 20 per port)."""
    rng = random.Random(seed)
    mem = bytes(rng.randrange(256) for _ in range(8 * 4096))
    reqs = [(a, BURST) for a in range(0, 48 * BURST * WIDE, BURST * WIDE)]
    dut = _Striped(4)
    got, cycles, xms = _read(dut, 4, reqs, mem, stall=stall, latency=20, seed=seed)
    _compare(got, _expected(reqs, mem), f"striped read stall {stall}")
    for k, xm in enumerate(xms):
        assert [r.addr for r in xm.log] == [a for a, _ in reqs[k::4]], f"port {k}: not round-robin"
    nbytes = sum(b for _, b in reqs) * WIDE
    print(f"striped 4 x {NARROW} B ports, stall {stall}: {nbytes} bytes in {cycles} cycles = "
          f"{nbytes / cycles:.1f} B/cycle")


@pytest.mark.parametrize("stall, seed", [(0.0, 5), (0.3, 6)])
def test_write_downsizer_splits_beats_and_strobes(stall, seed):
    rng = random.Random(seed)
    dut = WriteDownsizer(wide_bytes=WIDE, narrow_bytes=NARROW, max_burst=BURST)
    reqs = [(rng.randrange(0, 1 << 20, WIDE), rng.randint(1, BURST)) for _ in range(12)]
    beats = [(rng.getrandbits(8 * WIDE), rng.getrandbits(WIDE)) for _ in range(sum(b for _, b in reqs))]
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    got_req, got_data, got_resp = [], [], []

    async def up(ctx):
        st = Stalls(stall, seed)
        for a, b in reqs:
            await stream_put(ctx, dut.up.req, {"addr": a, "beats": b}, stalls=st)

    async def up_data(ctx):
        st = Stalls(stall, seed + 1)
        for d, s in beats:
            await stream_put(ctx, dut.up.data, {"data": d, "strb": s}, stalls=st)

    async def down(ctx):
        st = Stalls(stall, seed + 2)
        for _ in range(len(reqs)):
            p = await stream_get(ctx, dut.down.req, stalls=st)
            got_req.append((int(p.addr), int(p.beats)))

    async def down_data(ctx):
        st = Stalls(stall, seed + 3)
        for i in range(4 * len(beats)):
            p = await stream_get(ctx, dut.down.data, stalls=st)
            got_data.append((int(p.data), int(p.strb)))
            if len(got_data) == sum(4 * b for _, b in reqs[:len(got_resp) + 1]):
                await stream_put(ctx, dut.down.resp, len(got_resp) % 2)
                got_resp.append(len(got_resp) % 2)

    async def up_resp(ctx):
        for i in range(len(reqs)):
            p = await stream_get(ctx, dut.up.resp)
            assert int(p) == i % 2, f"response {i}: error flag {int(p)}, expected {i % 2}"

    for tb in (up, up_data, down, down_data):
        sim.add_testbench(tb, background=True)
    sim.add_testbench(up_resp)
    sim.run()
    assert got_req == [(a, 4 * b) for a, b in reqs], got_req
    for i, (d, s) in enumerate(beats):
        for j in range(4):
            want = ((d >> (8 * NARROW * j)) & ((1 << 8 * NARROW) - 1), (s >> (NARROW * j)) & 0xFFFF)
            assert got_data[4 * i + j] == want, f"wide beat {i} piece {j}: expected {want}, got {got_data[4 * i + j]}"


def test_refuses_bad_widths():
    with pytest.raises(ValueError, match="wide_bytes=48 must be a multiple of narrow_bytes=32"):
        ReadDownsizer(wide_bytes=48, narrow_bytes=32)
    with pytest.raises(ValueError, match="depth"):
        ReadDownsizer(wide_bytes=64, narrow_bytes=16, max_burst=16, depth=8)
