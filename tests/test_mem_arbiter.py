# amaranth: UnusedElaboratable=no
"""ReadArbiter: several read masters share one external-memory port; nothing lost, duplicated or misrouted."""

import gc

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from m3vit_hw.lib.mem_arbiter import ReadArbiter
from m3vit_hw.lib.mem_port import ReadPortSignature
from m3vit_hw.weights.weight_buffer import WeightBuffer
from m3vit_hw.weights.weight_streamer import WeightStreamer
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_get, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

DB = 8


def _requests(rng, n, region, count):
    """``count`` random aligned requests inside master ``n``'s 4 KiB region, none crossing 4 KiB."""
    reqs = []
    for _ in range(count):
        beats = int(rng.integers(1, 9))
        start = int(rng.integers(0, 4096 // DB - beats))
        reqs.append((region * 4096 + start * DB, beats))
    return reqs


def _watchdog(limit):
    """A background testbench that fails the simulation after ``limit`` cycles (plain ticks only)."""
    async def tb(ctx):
        for _ in range(limit):
            await ctx.tick()
        raise AssertionError(f"simulation did not finish within {limit} cycles")
    return tb


def _simulate(masters, reqs, store, *, stall, latency, bytes_per_cycle, seed=0, depth=4):
    dut = ReadArbiter(masters, addr_width=16, data_bytes=DB, max_burst=8, depth=depth)
    mem = ExternalMemory(store, bytes_per_cycle=bytes_per_cycle, latency=latency, stall_prob=stall,
                         seed=seed, max_outstanding=4)
    got = [[] for _ in range(masters)]
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(dut.mem), background=True)
    sim.add_testbench(_watchdog(20000), background=True)

    def issuer(n):
        async def tb(ctx):
            st = Stalls(stall, seed + 10 + n)
            for addr, beats in reqs[n]:
                await stream_put(ctx, dut.masters[n].req, {"addr": addr, "beats": beats}, stalls=st)
        return tb

    def consumer(n):
        async def tb(ctx):
            st = Stalls(stall, seed + 20 + n)
            for _ in range(sum(b for _, b in reqs[n])):
                p = await stream_get(ctx, dut.masters[n].resp, stalls=st)
                got[n].append((int(p.data), int(p.last)))
            for _ in range(latency + 20):           # nothing extra may arrive
                await ctx.tick()
                assert not ctx.get(dut.masters[n].resp.valid), f"ReadArbiter: extra beat to master {n}"
        return tb

    for n in range(masters):
        sim.add_testbench(issuer(n))
        sim.add_testbench(consumer(n))
    sim.run()
    return got, mem


def _expected(reqs, store):
    beats = []
    for addr, n in reqs:
        for b in range(n):
            beats.append((int.from_bytes(store[addr + b * DB:addr + (b + 1) * DB], "little"), int(b == n - 1)))
    return beats


@pytest.mark.parametrize("masters, stall, latency, bpc", [(2, 0.3, 5, 8), (2, 0.0, 1, 8), (3, 0.2, 12, 3.5)])
def test_every_master_gets_exactly_its_data(masters, stall, latency, bpc):
    """Random bursts from every master at once, random stalls everywhere: each master receives its
    beats, in its request order, with ``last`` on each burst's final beat, and nothing else."""
    rng = np.random.default_rng(masters * 7 + latency)
    store = rng.integers(0, 256, masters * 4096, dtype=np.uint8).tobytes()
    reqs = [_requests(rng, n, n, 12) for n in range(masters)]
    got, mem = _simulate(masters, reqs, store, stall=stall, latency=latency, bytes_per_cycle=bpc)
    for n in range(masters):
        want = _expected(reqs[n], store)
        assert len(got[n]) == len(want), f"ReadArbiter master {n}: {len(got[n])} beats, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got[n], want)):
            assert g == w, f"ReadArbiter master {n} beat {i}: expected {w}, got {g}"
    assert mem.request_count == sum(len(r) for r in reqs)
    print(f"ReadArbiter {masters} masters: {mem.request_count} requests, {mem.beats_served} beats, "
          f"delivered {mem.bandwidth():.2f} B/cycle (memory {bpc})")


def test_round_robin_alternates():
    """With both masters always requesting, grants alternate (neither master starves)."""
    store = bytes(8192)
    reqs = [[(0 + i * DB, 1) for i in range(10)], [(4096 + i * DB, 1) for i in range(10)]]
    _, mem = _simulate(2, reqs, store, stall=0.0, latency=2, bytes_per_cycle=8)
    order = [r.addr // 4096 for r in mem.log]
    print(f"ReadArbiter grant order: {order}")
    assert order[:18] == [0, 1] * 9 or order[:18] == [1, 0] * 9


def test_full_bandwidth_one_master():
    """A single busy master through the arbiter still gets one beat per cycle."""
    store = bytes(8192)
    reqs = [[(i * 8 * DB, 8) for i in range(16)], []]
    _, mem = _simulate(2, reqs, store, stall=0.0, latency=4, bytes_per_cycle=8, depth=8)
    bw = mem.bandwidth()
    print(f"ReadArbiter one master: {bw:.3f} B/cycle of {DB}")
    assert bw >= DB * 0.99


class _TwoStreamers(wiring.Component):
    """Two weight streamers into two buffers, sharing one memory port through the arbiter."""

    def __init__(self):
        kw = dict(addr_width=16, data_bytes=16, max_burst=8)
        self.s0, self.s1 = WeightStreamer(256, **kw), WeightStreamer(128, **kw)
        self.b0, self.b1 = WeightBuffer(256, 4, write_bytes=16), WeightBuffer(128, 32, write_bytes=16)
        self.arb = ReadArbiter(2, **kw)
        super().__init__({
            "cmd0": In(self.s0.cmd.signature.flip()), "cmd1": In(self.s1.cmd.signature.flip()),
            "mem": Out(ReadPortSignature(**kw)),
            "read0": In(self.b0.read.signature.flip()), "read1": In(self.b1.read.signature.flip()),
        })

    def elaborate(self, platform):
        m = Module()
        for name in ("s0", "s1", "b0", "b1", "arb"):
            m.submodules[name] = getattr(self, name)
        wiring.connect(m, self.s0.mem, self.arb.masters[0])
        wiring.connect(m, self.s1.mem, self.arb.masters[1])
        wiring.connect(m, self.arb.mem, wiring.flipped(self.mem))
        wiring.connect(m, self.s0.buf, self.b0.write)
        wiring.connect(m, self.s1.buf, self.b1.write)
        wiring.connect(m, wiring.flipped(self.cmd0), self.s0.cmd)
        wiring.connect(m, wiring.flipped(self.cmd1), self.s1.cmd)
        wiring.connect(m, wiring.flipped(self.read0), self.b0.read)
        wiring.connect(m, wiring.flipped(self.read1), self.b1.read)
        return m


def test_verilog_and_embedding():
    """Converts alone, and inside a design where two streamers share it through wiring.connect."""
    assert "module arbiter" in verilog.convert(ReadArbiter(2), name="arbiter")
    assert "module two_streamers" in verilog.convert(_TwoStreamers(), name="two_streamers")


def test_interface():
    arb = ReadArbiter(3, addr_width=20, data_bytes=8, max_burst=4, depth=5)
    sig = ReadPortSignature(addr_width=20, data_bytes=8, max_burst=4)
    assert arb.mem.signature == sig and arb.port_signature == sig
    assert len(arb.masters) == 3 and arb.masters[2].signature == sig.flip()
    assert arb.depth == 5


@pytest.mark.parametrize("args, kwargs, exc, words", [
    ((0,), {}, ValueError, r"masters must be in \[1, 16\], not 0"),
    (("2",), {}, TypeError, r"masters must be an integer, not '2'"),
    ((2,), {"depth": 0}, ValueError, r"depth must be in \[1, 256\], not 0"),
    ((2,), {"data_bytes": 6}, ValueError, r"data_bytes must be a power of two"),
])
def test_bad_parameters(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        ReadArbiter(*args, **kwargs)
    gc.collect()


def test_outstanding_requests_capped_at_depth():
    """Slow consumers behind a memory that accepts 16 requests ahead: requests at the memory whose
    last beat the memory has not returned never exceed ``depth`` (``room`` counts every request
    until its last beat is routed), and do reach it (no capacity lost); every beat still arrives."""
    depth, masters = 3, 2
    rng = np.random.default_rng(5)
    store = rng.integers(0, 256, masters * 4096, dtype=np.uint8).tobytes()
    reqs = [_requests(rng, n, n, 10) for n in range(masters)]
    dut = ReadArbiter(masters, addr_width=16, data_bytes=DB, max_burst=8, depth=depth)
    mem = ExternalMemory(store, bytes_per_cycle=DB, latency=2, max_outstanding=16)
    got = [[] for _ in range(masters)]
    peak = [0]
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(dut.mem), background=True)
    sim.add_testbench(_watchdog(20000), background=True)

    async def monitor(ctx):
        out = 0
        async for _, _, rv, rr, pv, pr, last in ctx.tick().sample(
                dut.mem.req.valid, dut.mem.req.ready,
                dut.mem.resp.valid, dut.mem.resp.ready, dut.mem.resp.payload.last):
            out += int(rv and rr) - int(pv and pr and last)
            assert out <= depth, f"ReadArbiter: {out} requests outstanding, depth {depth}"
            peak[0] = max(peak[0], out)

    def issuer(n):
        async def tb(ctx):
            for addr, beats in reqs[n]:
                await stream_put(ctx, dut.masters[n].req, {"addr": addr, "beats": beats})
        return tb

    def consumer(n):
        async def tb(ctx):
            st = Stalls(0.8, 30 + n)
            for _ in range(sum(b for _, b in reqs[n])):
                p = await stream_get(ctx, dut.masters[n].resp, stalls=st)
                got[n].append((int(p.data), int(p.last)))
        return tb

    sim.add_testbench(monitor, background=True)
    for n in range(masters):
        sim.add_testbench(issuer(n))
        sim.add_testbench(consumer(n))
    sim.run()
    print(f"ReadArbiter depth {depth}: peak {peak[0]} requests outstanding")
    for n in range(masters):
        assert got[n] == _expected(reqs[n], store), f"ReadArbiter master {n}: wrong beats"
    assert peak[0] == depth, f"ReadArbiter: peak {peak[0]} outstanding, expected depth {depth}"
