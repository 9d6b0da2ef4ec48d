"""``BurstRequester``: any-length reads as legal external-memory read requests (the patch loader, the
store DMA, the GEMM executor's table fetch and the MoE client's record fetches share it)."""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .mem_port import BOUNDARY_BYTES, ReadRequestLayout

__all__ = ["BurstRequester"]


class BurstRequester(wiring.Component):
    """Turns ``{addr, beats}`` reads of any length into legal read requests (at most ``max_burst``
    beats, never crossing a 4 KiB boundary), in order. ``cmd.ready`` is high when the previous
    command's requests have all been sent. ``addr`` must be a multiple of ``data_bytes``.

    Timing: a request is presented one cycle after the command or the previous request's transfer.
    Everything the burst length needs is kept in registers updated with the address, so that the
    cycle registering ``burst`` holds one short compare and two muxes (the estimate's budget):
    the room left in the 4 KiB page less one, ``room1`` (a modular down-counter: ``~beat_in_page`` at
    the command, minus the burst at each request; it wraps to a full page exactly when a burst ends
    on the boundary), and ``left > max_burst`` as the sign of a second down-counter ``left - max_burst - 1``.
    """

    def __init__(self, *, addr_width, data_bytes, max_burst, max_beats):
        self._aw, self._db, self._mb = addr_width, data_bytes, max_burst
        super().__init__({
            "cmd": In(stream.Signature(data.StructLayout({"addr": unsigned(addr_width),
                                                          "beats": range(max_beats + 1)}))),
            "req": Out(stream.Signature(ReadRequestLayout(addr_width, max_burst))),
        })

    def elaborate(self, platform):
        m = Module()
        db, mb = self._db, self._mb
        lb = db.bit_length() - 1
        page_beats = BOUNDARY_BYTES // db
        page_bits = max(page_beats.bit_length() - 1, 0)  # beat-in-page bits (0: one beat per page)
        beats = self.cmd.payload.beats
        addr = Signal(self._aw)
        left = Signal.like(beats)
        idle = Signal(init=1)                          # ``left == 0``, registered (``cmd.ready``)
        # ``left - (max_burst + 1)``: its sign bit is ``left <= max_burst``.
        over = Signal(signed(max(len(beats), (mb + 1).bit_length()) + 1))
        room1 = Signal(page_bits)                      # beats left in the page, less one (mod a page)
        burst = Signal(range(mb + 1))
        have = Signal()                                # ``burst`` is the length of the request at ``addr``

        m.d.comb += [
            self.cmd.ready.eq(idle),
            self.req.valid.eq(have),
            self.req.payload.addr.eq(addr),
            self.req.payload.beats.eq(burst),
        ]
        # The next burst, min(left, max_burst, room), from registers only: the capped length is a mux
        # on the registered sign, compared against room1 (``capped <= room1`` is ``capped < room``).
        cw = max(mb.bit_length(), 1)
        capped = Signal(cw)
        m.d.comb += capped.eq(Mux(over[-1], left[:cw], mb))
        room = room1 + 1 if page_bits else 1
        fits = (capped <= room1) if page_bits else (capped <= 0)

        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.payload.addr), left.eq(beats), idle.eq(beats == 0),
                         over.eq(beats - (mb + 1))]
            if page_bits:
                # Zero-extended first: an address narrower than a page still has its high page bits 0.
                bip = Signal(page_bits)
                m.d.comb += bip.eq(self.cmd.payload.addr[lb:lb + page_bits])
                m.d.sync += room1.eq(~bip)
        with m.Elif(self.req.valid & self.req.ready):
            m.d.sync += [addr.eq(addr + (burst << lb)), left.eq(left - burst), idle.eq(left == burst),
                         over.eq(over - burst), have.eq(0)]
            if page_bits:
                m.d.sync += room1.eq(room1 - burst)
        with m.Elif(~idle & ~have):
            m.d.sync += [burst.eq(Mux(fits, capped, room)), have.eq(1)]
        return m
