"""FlagQueue (the router's logit FIFO, the score path's read-ahead FIFO) against a Python FIFO model.

Random write and read enables (``w_en`` / ``r_en`` drop and rise at random, as the router's fork and
join drive them); every written word must come out once, in order; the queue never holds more than ``depth``
words (output register included), and with no reads it fills to exactly ``depth``.
"""

import random
from collections import deque

import pytest

from m3vit_hw.moe.router import FlagQueue
from sim.testbench import run_until_done


@pytest.mark.parametrize("depth,seed", [(2, 1), (6, 2), (17, 3)])
def test_flag_queue_order_and_capacity(depth, seed):
    dut = FlagQueue(12, depth)
    rng = random.Random(seed)
    words = [rng.randrange(1 << 12) for _ in range(8 * depth + 40)]
    got = []
    model = deque()       # words written and not yet read
    state = {"phase": "fill", "low": 0}

    async def bench(ctx):
        n_in = 0
        for cycle in range(40 * len(words)):
            if len(got) == len(words):
                break
            # First fill to capacity with no reads (the capacity check), then run at random.
            filling = state["phase"] == "fill"
            w_en = n_in < len(words) and (filling or rng.random() < 0.6)
            r_en = not filling and rng.random() < 0.6
            ctx.set(dut.w_en, int(w_en))
            ctx.set(dut.w_data, words[n_in] if n_in < len(words) else 0)
            ctx.set(dut.r_en, int(r_en))
            w_rdy, r_rdy, r_data = ctx.get(dut.w_rdy), ctx.get(dut.r_rdy), ctx.get(dut.r_data)
            # w_rdy is the storage's room: it may drop for a cycle while the first word moves on
            # to the output register, so the fill ends after w_rdy has stayed low for 4 cycles.
            state["low"] = 0 if w_rdy else state["low"] + 1
            if filling and state["low"] == 4:
                assert len(model) == depth, (
                    f"FlagQueue depth={depth}: full with {len(model)} words held, expected {depth}")
                state["phase"] = "run"
            if r_en and r_rdy:
                want = model.popleft()
                assert r_data == want, (
                    f"FlagQueue depth={depth}, word {len(got)}: expected {want:#x}, got {r_data:#x}")
                got.append(r_data)
            if w_en and w_rdy:
                model.append(words[n_in])
                n_in += 1
                assert len(model) <= depth, (
                    f"FlagQueue depth={depth}, cycle {cycle}: {len(model)} words held, capacity {depth}")
            await ctx.tick()
        assert got == words, f"FlagQueue depth={depth}: {len(got)} of {len(words)} words came out"

    run_until_done(dut, [bench], max_cycles=60 * len(words))
