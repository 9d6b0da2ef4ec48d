"""Width converters between the core's memory beat and a narrower AXI port.

The Zynq UltraScale+ PS takes at most 128-bit AXI masters (``S_AXI_HP0..3_FPD``, ``S_AXI_HPC0/1_FPD``):
a core built with 32 or 64-byte beats cannot be wired to one port at full width. These converters keep
the core's port contract (:mod:`m3vit_hw.lib.mem_port`) on the wide side and present the same
contract, ``ratio = wide_bytes / narrow_bytes`` times narrower and with ``ratio`` times longer bursts,
on the narrow side. A wide request of ``beats`` beats at ``addr`` is one narrow request of
``ratio * beats`` beats at ``addr``: the same bytes, so a request that keeps inside a 4 KiB page
still does, and the narrow burst (at most ``ratio * max_burst`` beats, ``max_burst * wide_bytes <=
4096`` bytes) is a legal AXI4 INCR burst.

One narrow port delivers ``narrow_bytes`` a cycle, so it is the bandwidth of the board's port that
limits, not the core's beat: 64 bytes a cycle need four 128-bit ports, which the
:class:`~m3vit_hw.soc.top.AcceleratorTop` stripes requests over (its ``ReadInterleaver``, one
:class:`ReadDownsizer` per port). The downsizer buffers whole bursts (it issues a request only when
its FIFO has room for every beat of it), so a port whose turn in the interleaver's in-order return
has not come keeps streaming into its FIFO instead of stalling its AXI read channel.
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from ..lib.mem_port import ReadPortSignature, WritePortSignature

__all__ = ["ReadDownsizer", "WriteDownsizer"]


def _ratio(wide_bytes, narrow_bytes):
    _check_int("narrow_bytes", narrow_bytes, 1)
    _check_int("wide_bytes", wide_bytes, narrow_bytes)
    if wide_bytes % narrow_bytes:
        raise ValueError(f"wide_bytes={wide_bytes} must be a multiple of narrow_bytes={narrow_bytes}")
    return wide_bytes // narrow_bytes


class ReadDownsizer(wiring.Component):
    """A wide read port served by a narrow one, with a burst buffer.

    Parameters
    ----------
    addr_width, max_burst : int
        Of the wide port (the narrow one has ``ratio * max_burst``).
    wide_bytes, narrow_bytes : int
        Beat widths; ``wide_bytes`` a multiple of ``narrow_bytes``.
    depth : int
        Wide beats the FIFO holds, at least ``max_burst`` (default ``2 * max_burst``: one burst
        drains upstream while the next one arrives).

    Interface attributes
    --------------------
    up : ``In(ReadPortSignature(addr_width, wide_bytes, max_burst))``
    down : ``Out(ReadPortSignature(addr_width, narrow_bytes, ratio * max_burst))``

    Behaviour: a request goes down (``beats * ratio`` narrow beats, same address) only when the FIFO
    has room for all its beats counting those still in flight, so ``down.resp.ready`` never drops;
    ``ratio`` narrow beats (the first in the low bytes) make one wide beat, whose ``last`` is the
    last narrow beat's.
    """

    def __init__(self, *, addr_width=32, wide_bytes=64, narrow_bytes=16, max_burst=16, depth=None):
        self._ratio = _ratio(wide_bytes, narrow_bytes)
        depth = 2 * max_burst if depth is None else depth
        _check_int("depth", depth, max_burst, 1024)
        self._wb, self._nb, self._mb, self._depth = wide_bytes, narrow_bytes, max_burst, depth
        super().__init__({
            "up": In(ReadPortSignature(addr_width=addr_width, data_bytes=wide_bytes, max_burst=max_burst)),
            "down": Out(ReadPortSignature(addr_width=addr_width, data_bytes=narrow_bytes,
                                          max_burst=self._ratio * max_burst)),
        })

    def elaborate(self, platform):
        m = Module()
        r, nbits, depth = self._ratio, 8 * self._nb, self._depth
        up, down = self.up, self.down
        m.submodules.fifo = fq = fifo.SyncFIFOBuffered(width=8 * self._wb + 1, depth=depth)

        # Free FIFO entries less the beats requested but not yet assembled: a register, so the
        # request's valid is one compare against the (held) request's beat count.
        space = Signal(range(depth + 1), init=depth)
        room = space >= up.req.payload.beats
        m.d.comb += [
            down.req.payload.addr.eq(up.req.payload.addr),
            down.req.payload.beats.eq(up.req.payload.beats * r),
            down.req.valid.eq(up.req.valid & room),
            up.req.ready.eq(down.req.ready & room),
        ]
        sent = down.req.valid & down.req.ready
        popped = up.resp.valid & up.resp.ready
        m.d.sync += space.eq(space - (sent * up.req.payload.beats) + popped)

        # Assembly: narrow beats shift in at the top; the r-th one completes the wide beat.
        acc = Signal(nbits * (r - 1))
        n = Signal(range(r))
        m.d.comb += [
            down.resp.ready.eq(fq.w_rdy),
            fq.w_data.eq(Cat(acc, down.resp.payload.data, down.resp.payload.last)),
            fq.w_en.eq(down.resp.valid & (n == r - 1)),
        ]
        with m.If(down.resp.valid & down.resp.ready):
            m.d.sync += [acc.eq(Cat(acc[nbits:], down.resp.payload.data)),
                         n.eq(0 if r == 1 else (n + 1) % r)]
        m.d.comb += [
            up.resp.valid.eq(fq.r_rdy),
            up.resp.payload.data.eq(fq.r_data[:8 * self._wb]),
            up.resp.payload.last.eq(fq.r_data[8 * self._wb]),
            fq.r_en.eq(up.resp.ready),
        ]
        return m


class WriteDownsizer(wiring.Component):
    """A wide write port served by a narrow one: each wide beat goes out as ``ratio`` narrow beats.

    Parameters
    ----------
    addr_width, max_burst : int
        Of the wide port (the narrow one has ``ratio * max_burst``).
    wide_bytes, narrow_bytes : int
        Beat widths; ``wide_bytes`` a multiple of ``narrow_bytes``.

    Interface attributes
    --------------------
    up : ``In(WritePortSignature(addr_width, wide_bytes, max_burst))``
    down : ``Out(WritePortSignature(addr_width, narrow_bytes, ratio * max_burst))``

    Requests and responses pass straight through (``beats * ratio``); data beats are split, low bytes
    first, with their byte strobes. The next wide beat is taken as the last narrow piece of the
    current one leaves, so the narrow side streams without bubbles.
    """

    def __init__(self, *, addr_width=32, wide_bytes=64, narrow_bytes=16, max_burst=16):
        self._ratio = _ratio(wide_bytes, narrow_bytes)
        self._wb, self._nb = wide_bytes, narrow_bytes
        super().__init__({
            "up": In(WritePortSignature(addr_width=addr_width, data_bytes=wide_bytes, max_burst=max_burst)),
            "down": Out(WritePortSignature(addr_width=addr_width, data_bytes=narrow_bytes,
                                           max_burst=self._ratio * max_burst)),
        })

    def elaborate(self, platform):
        m = Module()
        r, nb = self._ratio, self._nb
        up, down = self.up, self.down
        m.d.comb += [
            down.req.payload.addr.eq(up.req.payload.addr),
            down.req.payload.beats.eq(up.req.payload.beats * r),
            down.req.valid.eq(up.req.valid),
            up.req.ready.eq(down.req.ready),
            up.resp.payload.eq(down.resp.payload),
            up.resp.valid.eq(down.resp.valid),
            down.resp.ready.eq(up.resp.ready),
        ]
        data = Signal(8 * self._wb)
        strb = Signal(self._wb)
        left = Signal(range(r + 1))        # narrow pieces of ``data`` not yet sent
        out = down.data.valid & down.data.ready
        take = (left == 0) | ((left == 1) & out)
        m.d.comb += [
            down.data.valid.eq(left != 0),
            down.data.payload.data.eq(data[:8 * nb]),
            down.data.payload.strb.eq(strb[:nb]),
            up.data.ready.eq(take),
        ]
        with m.If(up.data.valid & take):
            m.d.sync += [data.eq(up.data.payload.data), strb.eq(up.data.payload.strb), left.eq(r)]
        with m.Elif(out):
            m.d.sync += [data.eq(data >> (8 * nb)), strb.eq(strb >> nb), left.eq(left - 1)]
        return m
