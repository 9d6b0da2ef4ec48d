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

import numbers
import random

from amaranth.hdl import Module as _Module
from amaranth.hdl import Shape as _Shape
from amaranth.lib import data as _data
from amaranth.lib import wiring as _wiring

__all__ = ["Stalls", "check_payload", "stream_put", "stream_get", "stream_put_many", "stream_get_many", "transfer_logger",
           "wait_done", "run_until_done", "StreamPassthrough", "EmbeddingHarness"]


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


def check_payload(shape, value, name="payload"):
    """Check that ``value`` fits ``shape`` field by field before a testbench drives it.

    ``ctx.set`` truncates an integer that does not fit its field (20 in a 4-bit field becomes 4), so an
    oversize command would silently run as a different one. Dicts are checked against struct layouts,
    lists against array layouts, integers against their field's range; anything else (enum members,
    constants) is left to Amaranth.

    Raises
    ------
    ValueError
        ``"{name}.{field} = {value} does not fit {shape} ([lo, hi])"`` naming the first bad field.
    """
    if isinstance(shape, _data.StructLayout) and isinstance(value, dict):
        for key, v in value.items():
            if key not in dict(shape):
                raise ValueError(f"{name} has no field {key!r}; fields: {sorted(dict(shape))}")
            check_payload(shape[key].shape, v, f"{name}.{key}")
    elif isinstance(shape, _data.ArrayLayout) and isinstance(value, (list, tuple)):
        if len(value) > shape.length:
            raise ValueError(f"{name} has {shape.length} elements, not {len(value)}")
        for i, v in enumerate(value):
            check_payload(shape.elem_shape, v, f"{name}[{i}]")
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        try:
            cast = _Shape.cast(shape)
        except TypeError:
            return
        if isinstance(shape, type):                  # an enum: Amaranth checks its members
            return
        lo, hi = ((-(1 << (cast.width - 1)), (1 << (cast.width - 1)) - 1) if cast.signed
                  else (0, (1 << cast.width) - 1))
        if not lo <= value <= hi:
            raise ValueError(f"{name} = {value} does not fit {cast!r} ([{lo}, {hi}]): the simulator "
                             f"would silently truncate it")


async def stream_put(ctx, stream, payload, *, stalls=None):
    """Offer one beat on ``stream`` (an ``In``-side stream of the DUT) and wait until it is taken.

    ``payload`` is checked against the stream's payload shape first (:func:`check_payload`): a field
    out of range raises instead of being truncated."""
    check_payload(stream.payload.shape(), payload)
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


async def wait_done(ctx, done, *, timeout, what):
    """Tick until ``done`` is high, then one more cycle (the counters settle on the cycle after ``done``).

    Plain ticks rather than ``.until()``: a testbench suspended in ``.until()`` when the simulation ends
    upsets CPython 3.11 at exit (see :func:`run_until_done`).

    Raises
    ------
    TimeoutError
        ``"{what}: no done within {timeout} cycles"``.
    """
    waited = 0
    while not ctx.get(done):
        await ctx.tick()
        waited += 1
        if waited > timeout:
            raise TimeoutError(f"{what}: no done within {timeout} cycles")
    await ctx.tick()


def transfer_logger(*streams):
    """A simulator *process* that logs, per stream, the cycles in which a transfer happens.

    Returns ``(process, logs)``: add ``process`` with ``sim.add_process``; ``logs[i]`` fills with the
    cycle numbers of the transfers on ``streams[i]`` (cycle 0 is the first clock edge). It samples just
    before each clock edge, so a transfer is logged in the cycle it happens.
    """
    logs = [[] for _ in streams]
    signals = [s for st in streams for s in (st.valid, st.ready)]

    async def process(ctx):
        cycle = 0
        async for _, _, *vals in ctx.tick().sample(*signals):
            for i in range(len(streams)):
                if vals[2 * i] and vals[2 * i + 1]:
                    logs[i].append(cycle)
            cycle += 1

    return process, logs


def run_until_done(dut, testbenches, *, max_cycles=50000):
    """Run ``testbenches`` on ``dut`` with a watchdog; return the cycle count when all have finished.

    The watchdog is a background testbench that waits only with plain ``await ctx.tick()``: on CPython
    3.11.7 a background testbench still suspended inside ``.until()``/``async for`` when the simulation
    ends makes the interpreter report a SystemError at exit (see ``sim/ext_memory.py``).
    """
    from amaranth.sim import Simulator

    cycles = [0]
    done = []

    async def clock(ctx):
        while len(done) < len(testbenches):
            await ctx.tick()
            cycles[0] += 1
            if cycles[0] > max_cycles:
                raise AssertionError(f"simulation did not finish within {max_cycles} cycles")

    def finishing(bench):
        async def wrapped(ctx):
            await bench(ctx)
            done.append(bench)
        return wrapped

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for b in testbenches:
        sim.add_testbench(finishing(b))
    sim.add_testbench(clock, background=True)
    sim.run()
    return cycles[0]


class StreamPassthrough(_wiring.Component):
    """A register-free stage with the stream signature ``sig`` on both sides (``i`` -> ``o``).

    Test designs connect a unit's output to it with ``wiring.connect``, to prove the unit embeds.
    """

    def __init__(self, sig):
        super().__init__({"i": _wiring.In(sig), "o": _wiring.Out(sig)})

    def elaborate(self, platform):
        m = _Module()
        _wiring.connect(m, _wiring.flipped(self.i), _wiring.flipped(self.o))
        return m


class EmbeddingHarness(_wiring.Component):
    """Embeds ``unit`` and connects each interface member to the harness's own port of the same name:
    sub-interfaces through ``wiring.connect``, plain ports by assignment."""

    def __init__(self, unit):
        self._unit = unit
        super().__init__(dict(unit.signature.members.items()))

    def elaborate(self, platform):
        m = _Module()
        m.submodules.unit = self._unit
        for name, member in self.signature.members.items():
            outer, inner = getattr(self, name), getattr(self._unit, name)
            if member.is_port:
                m.d.comb += (inner.eq(outer) if member.flow == _wiring.In else outer.eq(inner))
            else:
                _wiring.connect(m, _wiring.flipped(outer), inner)
        return m
