"""ShiftQueue (rowops.counts): cycle for cycle against a Python FIFO model, random reads and writes."""

import collections
import random

import pytest
from amaranth.hdl import unsigned
from amaranth.sim import Simulator

from m3vit_hw.rowops.counts import ShiftQueue


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_shift_queue_matches_a_fifo(depth):
    """Every cycle: ``r_rdy``, ``w_rdy`` and ``r_data`` are the model's (count > 0, count < depth,
    oldest entry); random enables (also while full or empty, which must not transfer), reads and
    writes in the same cycle; nothing lost or duplicated."""
    dut = ShiftQueue(unsigned(8), depth)
    rng = random.Random(depth)
    model = collections.deque()
    seen = {"pushes": 0, "pops": 0, "both": 0}

    async def bench(ctx):
        for cycle in range(600):
            # Bias towards filling, then towards draining, so both ends are reached.
            phase = (cycle // 50) % 2
            w_en = rng.random() < (0.7 if phase == 0 else 0.3)
            r_en = rng.random() < (0.3 if phase == 0 else 0.7)
            data = rng.randrange(256)
            ctx.set(dut.w_en, w_en)
            ctx.set(dut.w_data, data)
            ctx.set(dut.r_en, r_en)
            r_rdy, w_rdy, r_data = ctx.get(dut.r_rdy), ctx.get(dut.w_rdy), ctx.get(dut.r_data)
            assert r_rdy == (len(model) > 0), f"ShiftQueue depth {depth} cycle {cycle}: r_rdy {r_rdy}, count {len(model)}"
            assert w_rdy == (len(model) < depth), f"ShiftQueue depth {depth} cycle {cycle}: w_rdy {w_rdy}, count {len(model)}"
            if model:
                assert r_data == model[0], f"ShiftQueue depth {depth} cycle {cycle}: head expected {model[0]}, got {r_data}"
            pop = r_en and r_rdy
            push = w_en and w_rdy
            if pop:
                model.popleft()
                seen["pops"] += 1
            if push:
                model.append(data)
                seen["pushes"] += 1
            seen["both"] += pop and push
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    # Depth 1 never reads and writes in one cycle (w_rdy is low while it holds its entry).
    assert seen["pushes"] > 50 and seen["pops"] > 50 and (seen["both"] > 5 or depth == 1), seen
