"""The output FIFO of a stall-free pipeline, with the credit count that keeps it from overflowing.

A pipeline whose stages have no enable (the cheapest registers, and no ``ready`` net fanning out to
every stage) cannot stop a beat once it is inside. So it takes a new input only while its output
FIFO has room for every beat already in flight: :class:`CreditFIFO` counts beats in (``take``) and
out (``o`` transfers), and ``room`` is a register, so the pipeline's ``i.ready`` has no
combinational path from ``o.ready``.
"""

from amaranth.hdl import Module, Mux, Shape, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
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
    :attr:`LATENCY` (1) cycle from ``w_en`` to ``o.valid``: a result written while the FIFO is empty
    goes straight into the output register, otherwise it waits in a distributed-RAM queue. The output
    register is a real flip-flop (its input chooses between the queue and ``w_data``), so ``o.payload``
    starts every downstream path at a register.
    """

    LATENCY = 1

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
        o = self.o
        # One result in the output register, up to depth - 1 in the queue behind it.
        q_depth = depth - 1
        out = Signal.like(self.w_data, reset_less=True)
        m.d.comb += o.payload.eq(out)
        pop = o.valid & o.ready
        out_free = ~o.valid | pop
        if q_depth:
            m.submodules.queue = queue = Memory(shape=self.w_data.shape(), depth=q_depth, init=[])
            wp = queue.write_port()
            rp = queue.read_port(domain="comb")
            wptr = Signal(range(q_depth))
            rptr = Signal(range(q_depth))
            # The queue never overflows (the credits), so "empty" is all it needs to know: a flag
            # register. A read without a write empties it when the advanced read pointer meets the
            # write pointer; no count and no adder behind o.ready.
            nonempty = Signal()
            # rptr + 1 (wrapping), kept in a register of its own so no incrementer sits before the
            # compare with wptr.
            rptr_next = Signal(range(q_depth), init=1 % q_depth)
            q_read = out_free & nonempty
            q_write = self.w_en & ~(out_free & ~nonempty)
            m.d.comb += [wp.addr.eq(wptr), wp.data.eq(self.w_data), wp.en.eq(q_write), rp.addr.eq(rptr)]
            with m.If(q_write):
                m.d.sync += wptr.eq(Mux(wptr == q_depth - 1, 0, wptr + 1))
            with m.If(q_read):
                m.d.sync += [rptr.eq(rptr_next),
                             rptr_next.eq(Mux(rptr_next == q_depth - 1, 0, rptr_next + 1))]
            m.d.sync += nonempty.eq(Mux(q_write & ~q_read, 1,
                                        Mux(q_read & ~q_write, rptr_next != wptr, nonempty)))
            head = rp.data
        else:
            nonempty = 0
            head = self.w_data
        with m.If(out_free):
            with m.If(nonempty):
                m.d.sync += [out.eq(head), o.valid.eq(1)]
            with m.Elif(self.w_en):
                m.d.sync += [out.eq(self.w_data), o.valid.eq(1)]
            with m.Else():
                m.d.sync += o.valid.eq(0)

        # Credits in use: ``count`` plus a take registered in ``take_q`` and counted a cycle later,
        # so the pipeline's take (its input handshake, from outside) reaches no adder: only
        # ``room``'s multiplexer.
        count = Signal(range(depth + 1))
        take_q = Signal()
        give = pop
        m.d.sync += [take_q.eq(self.take), count.eq(count + take_q - give)]
        m.d.comb += self.busy.eq((count != 0) | take_q)
        # room' = count + take_q - give + take < depth, decided from the constant compares of the
        # current count, so take and give (o.ready comes from outside) reach the register through
        # multiplexers and no adder.
        inc = take_q & ~give
        dec = give & ~take_q
        base = Mux(inc, count < depth - 1, Mux(dec, count < depth + 1, count < depth))
        base_t = Mux(inc, count < depth - 2, Mux(dec, count < depth, count < depth - 1))
        m.d.sync += self.room.eq(Mux(self.take, base_t, base))
        return m
