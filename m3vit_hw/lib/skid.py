"""A skid buffer: a stream register stage whose ``ready`` is a flip-flop.

Used wherever a combinational ``ready`` chain (consumer -> producer -> its producer ...) would
otherwise set the clock: one :class:`SkidBuffer` cuts the chain at the cost of one cycle of latency
and no throughput.
"""

from amaranth.hdl import Module, Mux, Shape, Signal, Value
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """A registered stream stage with a skid register (full throughput, registered ready).

    ``o.valid``, ``o.payload`` and ``i.ready`` all come from flip-flops; throughput is one transfer
    per cycle; nothing is lost or duplicated. When the output stalls, the one transfer already
    accepted on the input goes into the skid register. The payload registers have no reset (only
    the two valid flags do), so a synthesizer need not route a reset to a wide datapath.

    Parameters
    ----------
    shape : int or shape-like
        Payload: a bit count (>= 1) or any shape-like (e.g. a ``StructLayout``).

    Interface attributes
    --------------------
    i : ``In(stream.Signature(shape))``
    o : ``Out(stream.Signature(shape))``

    Latency and throughput
    ----------------------
    1 cycle, one transfer per cycle.
    """

    LATENCY = 1

    def __init__(self, shape):
        if isinstance(shape, int):
            check_int("shape", shape, 1)
        else:
            try:
                Shape.cast(shape)
            except TypeError:
                raise TypeError(f"shape must be a bit count or a shape-like object, not {shape!r}") from None
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape))})

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        skid = Signal.like(i.payload, reset_less=True)
        out = Signal.like(i.payload, reset_less=True)
        skid_valid = Signal()
        skid_valid_next = Signal()
        # i.ready is ~skid_valid kept in a register of its own: skid_valid also selects the whole
        # payload mux, and the producer's ready logic should not sit behind that fanout.
        ready = Signal(init=1)
        m.d.comb += [i.ready.eq(ready), o.payload.eq(out), skid_valid_next.eq(skid_valid)]
        with m.If(o.ready | ~o.valid):
            # The output register can take a new value: the skid entry first (it is older). It
            # loads whether or not the input is valid (o.valid says whether it holds a beat), so
            # i.valid, which comes from the producer's logic, does not reach the wide payload
            # register's enable.
            m.d.sync += out.eq(Mux(skid_valid, Value.cast(skid), Value.cast(i.payload)))
            with m.If(skid_valid):
                m.d.sync += o.valid.eq(1)
                m.d.comb += skid_valid_next.eq(0)
            with m.Elif(i.valid):
                m.d.sync += o.valid.eq(1)
            with m.Else():
                m.d.sync += o.valid.eq(0)
        with m.Elif(i.valid & ready):
            m.d.comb += skid_valid_next.eq(1)
        # The skid register copies the input whenever it is empty: its enable is a register, not a
        # function of o.ready (a stale copy is never used, skid_valid says whether it holds a beat).
        with m.If(~skid_valid):
            m.d.sync += skid.eq(i.payload)
        m.d.sync += [skid_valid.eq(skid_valid_next), ready.eq(~skid_valid_next)]
        return m
