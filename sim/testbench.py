"""Reusable testbench verbs for Amaranth's simulator (async testbench API of Amaranth 0.5).

Streams follow ``amaranth.lib.stream`` rules: the producer holds ``valid`` and the payload until a cycle
in which ``ready`` is sampled high. The verbs here obey those rules from the testbench side, and can
insert random idle cycles (stalls) on either side to shake out flow-control bugs.

    async def feeder(ctx):
        for x in data:
            await stream_put(ctx, dut.i, x, stalls=stalls)

    async def checker(ctx):
        for want in expected:
            assert (await stream_get(ctx, dut.o, stalls=stalls)) == want
"""

import random

__all__ = ["Stalls", "stream_put", "stream_get", "stream_put_many", "stream_get_many"]


class Stalls:
    """A seeded source of random idle cycles.

    Parameters
    ----------
    probability : float
        Chance, per cycle, of inserting one more idle cycle before a transfer (0 disables stalls).
    seed : int
        Seed for the private RNG, so a failing run can be replayed.
    """

    def __init__(self, probability=0.0, seed=0):
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"stall probability must be in [0, 1), not {probability!r}")
        self.probability = probability
        self._rng = random.Random(seed)

    async def wait(self, ctx):
        while self.probability and self._rng.random() < self.probability:
            await ctx.tick()


async def stream_put(ctx, stream, payload, *, stalls=None):
    """Offer one beat on ``stream`` (an ``In``-side stream of the DUT) and wait until it is taken."""
    if stalls is not None:
        await stalls.wait(ctx)
    ctx.set(stream.valid, 1)
    ctx.set(stream.payload, payload)
    await ctx.tick().until(stream.ready)
    ctx.set(stream.valid, 0)


async def stream_get(ctx, stream, *, stalls=None):
    """Accept one beat from ``stream`` (an ``Out``-side stream of the DUT) and return its payload."""
    if stalls is not None:
        await stalls.wait(ctx)
    ctx.set(stream.ready, 1)
    payload, = await ctx.tick().sample(stream.payload).until(stream.valid)
    ctx.set(stream.ready, 0)
    return payload


async def stream_put_many(ctx, stream, payloads, *, stalls=None):
    for p in payloads:
        await stream_put(ctx, stream, p, stalls=stalls)


async def stream_get_many(ctx, stream, count, *, stalls=None):
    return [await stream_get(ctx, stream, stalls=stalls) for _ in range(count)]
