"""Occupancy flags a cycle ahead, for the row units' buffer and queue counts.

A unit that tracks how full a buffer is keeps a count ``c`` updated as ``c + inc - dec``. Testing
``c < limit`` in front of the decision that sets ``inc`` puts an adder's output (the count) and a
compare in series with the handshake logic. :func:`below_next` computes the flag for the count's next
value instead, to be registered: the three compares of the current count against constants run in
parallel with the logic that decides ``inc`` and ``dec``, which only selects one of them. The decision
then reads a flip-flop. It is exact: no capacity is lost.
"""

from amaranth.hdl import Mux

__all__ = ["below_next"]


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
