"""Occupancy flags a cycle ahead, for the row units' buffer and queue counts.

A unit that tracks how full a buffer is keeps a count ``c`` updated as ``c + inc - dec``. Testing
``c < limit`` in front of the decision that sets ``inc`` puts an adder's output (the count) and a
compare in series with the handshake logic. :func:`below_next` computes the flag for the count's next
value instead, to be registered: the three compares of the current count against constants run in
parallel with the logic that decides ``inc`` and ``dec``, which only selects one of them. The decision
then reads a flip-flop. It is exact: no capacity is lost.
"""

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal

from ..checks import check_int

__all__ = ["below_next", "thermometer_step", "ShiftQueue"]


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


class ShiftQueue(Elaboratable):
    """A small FIFO in flip-flops with ``SyncFIFO``'s interface and no adder anywhere.

    The entries shift towards the head (``r_data`` is the register of entry 0), and the count is a
    thermometer code (:func:`thermometer_step`), so ``r_rdy`` and ``w_rdy`` are flip-flops and a read
    or write enable reaches only LUTs in front of registers: no level compare in front of the
    handshake and no adder behind it (a ``SyncFIFOBuffered``'s level adder behind its read enable
    missed 300 MHz in the whole top). For queues of a few narrow entries (tile row counts, command
    phases): each entry costs its width in flip-flops.

    Parameters
    ----------
    shape : shape-like
        One entry.
    depth : int
        Entries, >= 1.

    Attributes
    ----------
    w_en, w_data, w_rdy, r_en, r_data, r_rdy
        As ``amaranth.lib.fifo.SyncFIFO``: a write (``w_en & w_rdy``) is readable the next cycle;
        ``r_data`` is the oldest entry while ``r_rdy``; a read and a write may happen in one cycle.
    """

    def __init__(self, shape, depth):
        check_int("depth", depth, 1)
        self.depth = depth
        self.w_en, self.w_data, self.w_rdy = Signal(), Signal(shape), Signal()
        self.r_en, self.r_data, self.r_rdy = Signal(), Signal(shape), Signal()

    def elaborate(self, platform):
        m = Module()
        n = self.depth
        cells = [Signal.like(self.w_data, name=f"cell{i}") for i in range(n)]
        therm = Signal(n)                   # bit i: more than i entries
        push = self.w_en & self.w_rdy
        pop = self.r_en & self.r_rdy
        m.d.comb += [self.r_data.eq(cells[0]), self.r_rdy.eq(therm[0]), self.w_rdy.eq(~therm[n - 1])]
        for i in range(n):
            keep = cells[i + 1] if i + 1 < n else cells[i]
            # The write goes to entry "count" (count - 1 with a read): count == i is bit i - 1 set
            # (or i == 0) and bit i clear.
            at = ~therm[i] if i == 0 else therm[i - 1] & ~therm[i]
            at_next = therm[i] & ~therm[i + 1] if i + 1 < n else therm[i]
            with m.If(push & Mux(pop, at_next, at)):
                m.d.sync += cells[i].eq(self.w_data)
            with m.Elif(pop):
                m.d.sync += cells[i].eq(keep)
        thermometer_step(m, therm, push, pop)
        return m
