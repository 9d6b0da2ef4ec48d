"""BurstRequester: any-length reads -> legal read requests, against the AXI4 splitting rule (at most
``max_burst`` beats, never across a 4 KiB boundary, in order), with random stalls on both streams."""

import random

import pytest

from m3vit_hw.lib.burst_requester import BurstRequester
from m3vit_hw.lib.mem_port import BOUNDARY_BYTES
from sim.testbench import Stalls, run_until_done, stream_get, stream_put


def _split(addr, beats, data_bytes, max_burst):
    """The reference: greedy split at ``max_burst`` beats and at every 4 KiB boundary."""
    out = []
    while beats:
        room = (BOUNDARY_BYTES - addr % BOUNDARY_BYTES) // data_bytes
        n = min(beats, max_burst, room)
        out.append((addr, n))
        addr += n * data_bytes
        beats -= n
    return out


@pytest.mark.parametrize("addr_width, data_bytes, max_burst, max_beats, stall, seed", [
    (32, 16, 16, 300, 0.0, 1),     # the default port: no stalls, back-to-back commands
    (32, 16, 16, 300, 0.4, 2),     # the same with stalls on both streams
    (20, 32, 7, 200, 0.3, 3),      # an odd max_burst, 32-byte beats
    (11, 4, 256, 2000, 0.3, 4),    # memory narrower than a page, longest AXI burst
    (32, 64, 64, 70, 0.2, 5),      # one page is exactly one max burst
    (16, 16, 16, 5, 0.3, 6),       # commands shorter than a burst (a narrow beats field)
])
def test_burst_requester_splits(addr_width, data_bytes, max_burst, max_beats, stall, seed):
    rng = random.Random(seed)
    dut = BurstRequester(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst,
                         max_beats=max_beats)
    page = BOUNDARY_BYTES // data_bytes
    cmds = []
    for _ in range(40):
        kind = rng.random()
        if kind < 0.3:                                  # just below a page boundary
            beat = page * rng.randrange(1, 4) - rng.randrange(1, max_burst + 2)
        else:
            beat = rng.randrange(0, 3 * page)
        beats = rng.choice([0, 1, max_burst, max_burst + 1, max_beats, rng.randrange(0, max_beats + 1)])
        addr = (beat * data_bytes) % (1 << addr_width)
        if addr + beats * data_bytes > (1 << addr_width):
            beats = ((1 << addr_width) - addr) // data_bytes
        cmds.append({"addr": addr, "beats": min(beats, max_beats)})
    want = [r for c in cmds for r in _split(c["addr"], c["beats"], data_bytes, max_burst)]
    got = []

    async def feed(ctx):
        stalls = Stalls(stall, seed)
        for c in cmds:
            await stream_put(ctx, dut.cmd, c, stalls=stalls)

    async def drain(ctx):
        stalls = Stalls(stall, seed + 100)
        for _ in want:
            p = await stream_get(ctx, dut.req, stalls=stalls)
            got.append((int(p.addr), int(p.beats)))
        # Nothing more: no duplicated request after the last one.
        for _ in range(8):
            assert not ctx.get(dut.req.valid), "BurstRequester: a request beyond the expected ones"
            await ctx.tick()

    run_until_done(dut, [feed, drain], max_cycles=20000 + 40 * len(want))
    for i, (w, g) in enumerate(zip(want, got)):
        assert g == w, f"BurstRequester: request {i}: expected (addr, beats) {w}, got {g}"
    assert len(got) == len(want)


def test_burst_requester_rate():
    """A request one cycle after the previous transfer (two cycles a request) with ``req.ready`` high."""
    from sim.testbench import transfer_logger
    from amaranth.sim import Simulator
    dut = BurstRequester(addr_width=32, data_bytes=16, max_burst=16, max_beats=256)
    proc, logs = transfer_logger(dut.req)

    async def bench(ctx):
        ctx.set(dut.req.ready, 1)
        await stream_put(ctx, dut.cmd, {"addr": 0xFF0, "beats": 65})
        for _ in range(20):
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_process(proc)
    sim.add_testbench(bench)
    sim.run()
    # 0xFF0: one beat to the boundary, then 16, 16, 16, 16 (65 beats in 5 requests).
    assert len(logs[0]) == 5
    assert [b - a for a, b in zip(logs[0], logs[0][1:])] == [2, 2, 2, 2]
