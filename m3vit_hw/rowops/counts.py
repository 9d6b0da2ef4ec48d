"""Occupancy flags a cycle ahead, for the row units' buffer and queue counts.

A unit that tracks how full a buffer is keeps a count ``c`` updated as ``c + inc - dec``. Testing
``c < limit`` in front of the decision that sets ``inc`` puts an adder's output (the count) and a
compare in series with the handshake logic. :func:`below_next` computes the flag for the count's next
value instead, to be registered: the three compares of the current count against constants run in
parallel with the logic that decides ``inc`` and ``dec``, which only selects one of them. The decision
then reads a flip-flop. It is exact: no capacity is lost.
"""

from amaranth.hdl import Cat, Const, Mux

__all__ = ["below_next", "thermometer_step"]


def below_next(count, inc, dec, limit):
    """``count + inc - dec < limit``, computed without the adder.

    Parameters
    ----------
    count : Value
        The current count (the register being updated to ``count + inc - dec``).
    inc, dec : Value
        One bit each.
    limit : int
        The constant bound.

    Returns
    -------
    Value
        One bit; register it (with the same init as ``0 < limit``) next to the count.
    """
    return Mux(inc & ~dec, count < limit - 1, Mux(dec & ~inc, count < limit + 1, count < limit))


def thermometer_step(m, therm, inc, dec):
    """Update a small count kept as a thermometer code: ``therm[i]`` is ``count > i``.

    An increment shifts a one in, a decrement shifts it out, both at once keep it: each bit's next
    value is a LUT of ``inc``, ``dec`` and its two neighbours (no adder, which a synthesizer would
    put behind the handshake logic that decides ``inc`` and ``dec``), and ``count < k`` is the
    register bit ``~therm[k - 1]``. For the row queues' counts (a handful of entries).

    Parameters
    ----------
    m : Module
    therm : Signal
        ``depth`` bits, reset 0 (count 0). The caller never increments a full count or
        decrements an empty one.
    inc, dec : Value
        One bit each.
    """
    n = len(therm)
    up = Cat(Const(1, 1), therm[:n - 1])              # count + 1
    down = Cat(therm[1:], Const(0, 1))                 # count - 1
    m.d.sync += therm.eq(Mux(inc & ~dec, up, Mux(dec & ~inc, down, therm)))
