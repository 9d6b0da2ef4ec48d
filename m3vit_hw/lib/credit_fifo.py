"""The output FIFO of a stall-free pipeline, with the credit count that keeps it from overflowing.

A pipeline whose stages have no enable (the cheapest registers, and no ``ready`` net fanning out to
every stage) cannot stop a beat once it is inside. So it takes a new input only while its output
FIFO has room for every beat already in flight: :class:`CreditFIFO` counts beats in (``take``) and
out (``o`` transfers), and ``room`` is a register, so the pipeline's ``i.ready`` has no
combinational path from ``o.ready``.
"""

from amaranth.hdl import Module, Mux, Shape, Signal
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int

__all__ = ["CreditFIFO"]


class CreditFIFO(wiring.Component):
    """Output FIFO plus credit counter for a pipeline without stalls.

    Parameters
    ----------
    shape : shape-like
        Payload of one result.
    depth : int
        FIFO entries, >= 1. With ``depth`` > the cycles from ``take`` to the result's ``o`` transfer
        (the pipeline's latency plus :attr:`LATENCY`), ``room`` never drops while ``o.ready`` is high.

    Interface attributes
    --------------------
    take : In(1)
        A beat that will write a result enters the pipeline this cycle (use only while ``room``).
    room : Out(1)
        A register: every beat in flight or in the FIFO still has an entry, so one more may enter.
    w_data : In(shape), w_en : In(1)
        The pipeline's result; ``w_en`` for one cycle per ``take`` (the credits guarantee room).
    o : Out(stream.Signature(shape))
        Results in order.
    busy : Out(1)
        A beat is in flight (taken, not yet transferred on ``o``).

    Latency
    -------
    :attr:`LATENCY` (2) cycles from ``w_en`` to ``o.valid``.
    """

    LATENCY = 2

    def __init__(self, shape, depth):
        try:
            Shape.cast(shape)
        except TypeError:
            raise TypeError(f"shape must be a shape-like object, not {shape!r}") from None
        check_int("depth", depth, 1)
        self._depth = depth
        super().__init__({
            "take": In(1), "room": Out(1, init=1),
            "w_data": In(shape), "w_en": In(1),
            "o": Out(stream.Signature(shape)),
            "busy": Out(1),
        })

    @property
    def depth(self):
        return self._depth

    def elaborate(self, platform):
        m = Module()
        depth = self._depth
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=Shape.cast(self.w_data.shape()).width, depth=depth)
        m.d.comb += [
            q.w_data.eq(self.w_data), q.w_en.eq(self.w_en),
            self.o.valid.eq(q.r_rdy), self.o.payload.eq(q.r_data), q.r_en.eq(self.o.ready),
        ]
        count = Signal(range(depth + 1))
        give = self.o.valid & self.o.ready
        m.d.sync += count.eq(count + self.take - give)
        m.d.comb += self.busy.eq(count != 0)
        # room' = count + take - give < depth, decided from the constant compares of the current
        # count, so take and give (o.ready comes from outside) reach the register through one mux
        # and no adder.
        inc = self.take & ~give
        dec = give & ~self.take
        m.d.sync += self.room.eq(Mux(inc, count < depth - 1, dec | (count < depth)))
        return m
