"""``BurstRequester``: any-length reads as legal external-memory read requests (the patch loader, the
store DMA, the GEMM executor's table fetch and the MoE client's record fetches share it)."""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .mem_port import BOUNDARY_BYTES, ReadRequestLayout

__all__ = ["BurstRequester"]


class BurstRequester(wiring.Component):
    """Turns ``{addr, beats}`` reads of any length into legal read requests (at most ``max_burst``
    beats, never crossing a 4 KiB boundary), in order. ``cmd.ready`` is high when the previous
    command's requests have all been sent. ``addr`` must be a multiple of ``data_bytes``."""

    def __init__(self, *, addr_width, data_bytes, max_burst, max_beats):
        self._aw, self._db, self._mb = addr_width, data_bytes, max_burst
        super().__init__({
            "cmd": In(stream.Signature(data.StructLayout({"addr": unsigned(addr_width),
                                                          "beats": range(max_beats + 1)}))),
            "req": Out(stream.Signature(ReadRequestLayout(addr_width, max_burst))),
        })

    def elaborate(self, platform):
        m = Module()
        db = self._db
        lb = db.bit_length() - 1
        addr = Signal(self._aw)
        left = Signal.like(self.cmd.payload.beats)
        # The next burst's length is registered (one cycle after the command or the previous request)
        # so that the request's address adder does not follow the three-way minimum.
        burst = Signal(range(self._mb + 1))
        have = Signal()                             # ``burst`` is the length of the request at ``addr``
        page_beats = BOUNDARY_BYTES // db
        page_bits = BOUNDARY_BYTES.bit_length() - 1
        beat_in_page = addr[lb:page_bits] if self._aw > lb else 0
        room = Signal(range(page_beats + 1))
        capped = Mux(left > self._mb, self._mb, left)
        m.d.comb += room.eq(page_beats - beat_in_page)
        m.d.comb += [
            self.cmd.ready.eq(left == 0),
            self.req.valid.eq(have),
            self.req.payload.addr.eq(addr),
            self.req.payload.beats.eq(burst),
        ]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.payload.addr), left.eq(self.cmd.payload.beats)]
        with m.Elif(self.req.valid & self.req.ready):
            m.d.sync += [addr.eq(addr + (burst << lb)), left.eq(left - burst), have.eq(0)]
        with m.Elif((left != 0) & ~have):
            m.d.sync += [burst.eq(Mux(capped > room, room, capped)), have.eq(1)]
        return m
