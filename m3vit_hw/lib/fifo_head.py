"""A FIFO's head held in two registers, so that a handshake on the head ends at flip-flops."""

from amaranth.hdl import Signal

__all__ = ["FifoHead"]


class FifoHead:
    """The head of an Amaranth ``SyncFIFO``/``SyncFIFOBuffered`` in two registers: :attr:`cur` (valid
    :attr:`cur_v`), the entry in use, and a second one waiting behind it.

    The FIFO is read whenever the second register is empty (a decision of flip-flops), and
    :meth:`advance` with ``pop`` high moves the second register (or the FIFO's head) into :attr:`cur`.
    A consumer that steers a handshake by :attr:`cur` (the read arbiter's and the SoC read
    interleaver's response routing) then ends that handshake at these registers, not in the FIFO's
    pointer and level logic (docs/timing.md, "Registered grants and routing").

    Parameters
    ----------
    m : Module
        The module the registers and the FIFO's read enable are added to.
    fifo : amaranth.lib.fifo.SyncFIFO or SyncFIFOBuffered
        Its ``r_en`` is driven here; ``r_data`` has the entries' shape.
    name : str
        Prefix of the registers' names.
    """

    def __init__(self, m, fifo, *, name):
        self._fifo = fifo
        shape = len(fifo.r_data)
        #: The entry in use.
        self.cur = Signal(shape, name=f"{name}_cur")
        #: ``cur`` holds an entry.
        self.cur_v = Signal(name=f"{name}_cur_v")
        self._nxt = Signal(shape, name=f"{name}_nxt")
        self._nxt_v = Signal(name=f"{name}_nxt_v")
        self._take = fifo.r_rdy & ~self._nxt_v
        m.d.comb += fifo.r_en.eq(self._take)

    def advance(self, m, pop):
        """Add the update: ``pop`` (the consumer is done with :attr:`cur` in this cycle) or an empty
        :attr:`cur` takes the next entry, if there is one."""
        cur, cur_v, nxt, nxt_v, take = self.cur, self.cur_v, self._nxt, self._nxt_v, self._take
        with m.If(pop | ~cur_v):
            with m.If(nxt_v):
                m.d.sync += [cur.eq(nxt), cur_v.eq(1), nxt_v.eq(0)]
            with m.Elif(take):
                m.d.sync += [cur.eq(self._fifo.r_data), cur_v.eq(1)]
            with m.Else():
                m.d.sync += cur_v.eq(0)
        with m.Elif(take):
            m.d.sync += [nxt.eq(self._fifo.r_data), nxt_v.eq(1)]
