"""Stream plumbing between the accelerator's ports and its AXI masters.

* :class:`BurstSplitter` cuts a long transfer (``addr``, ``beats``) into requests of at most
  ``max_burst`` beats that never cross a 4 KiB boundary (the AXI4 rule the memory ports promise).
* :class:`Gearbox` converts a stream of ``in_bytes``-wide words into ``out_bytes``-wide words (one of
  the two a power-of-two multiple of the other), little-endian, byte strobes carried along.
* :class:`ReadInterleaver` spreads one read port's requests round-robin over ``n`` read ports (one per
  AXI master, i.e. per Zynq HP port) and returns the responses in request order, so the weight streams
  of one port draw on the bandwidth of several.
* :class:`PageSplitter` cuts a read request that would cross 4 KiB in two (a guard: the read-port
  contract already forbids such requests), so the AXI masters never issue one.

All are :mod:`amaranth.lib.stream` citizens: ``valid`` never waits on ``ready`` and payloads hold until
they are transferred.
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from ..lib.mem_port import BOUNDARY_BYTES, ReadPortSignature

__all__ = ["TransferLayout", "BurstSplitter", "BeatLayout", "Gearbox", "ReadInterleaver", "PageSplitter"]


class TransferLayout(data.StructLayout):
    """A whole transfer: byte address ``addr`` (beat-aligned) and ``beats`` (any count, 0 allowed)."""

    def __init__(self, addr_width, len_width):
        super().__init__({"addr": unsigned(addr_width), "beats": unsigned(len_width)})


class BurstSplitter(wiring.Component):
    """Cut transfers into bursts of at most ``max_burst`` beats that do not cross 4 KiB.

    Parameters
    ----------
    addr_width, data_bytes, max_burst : int
        As in :class:`~m3vit_hw.lib.mem_port.ReadPortSignature`.
    len_width : int
        Width of a transfer's beat count (1..32).

    Interface attributes
    --------------------
    cmd : ``In(stream.Signature(TransferLayout))``
        Transfers; the next is accepted once every burst of the current one has been issued.
    req : ``Out(stream.Signature(ReadRequestLayout))``
        Bursts, in address order (same layout as a read or write port request).
    idle : ``Out(1)``
        No transfer in progress.

    Each burst is ``min(max_burst, beats left, beats to the next 4 KiB boundary)`` long; a transfer
    of 0 beats issues nothing.
    """

    def __init__(self, *, addr_width=32, data_bytes=16, max_burst=16, len_width=24):
        sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        _check_int("len_width", len_width, 1, 32)
        self._p = (addr_width, data_bytes, max_burst, len_width)
        super().__init__({
            "cmd": In(stream.Signature(TransferLayout(addr_width, len_width))),
            "req": Out(sig.members["req"].signature),
            "idle": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        aw, db, mb, lw = self._p
        shift = db.bit_length() - 1
        addr = Signal(aw)
        left = Signal(lw)
        # Beats from addr to the next 4 KiB boundary: BOUNDARY - (addr mod BOUNDARY), in beats.
        low = addr[shift:(BOUNDARY_BYTES.bit_length() - 1)] if db < BOUNDARY_BYTES else 0
        to_bound = Signal(range(BOUNDARY_BYTES // db + 1))
        m.d.comb += to_bound.eq((BOUNDARY_BYTES // db) - low)
        cap = Signal(range(mb + 1))
        n = Signal(range(mb + 1))
        m.d.comb += [cap.eq(Mux(left < mb, left, mb)), n.eq(Mux(to_bound < cap, to_bound, cap))]
        m.d.comb += [
            self.req.valid.eq(left != 0), self.req.p.addr.eq(addr), self.req.p.beats.eq(n),
            self.cmd.ready.eq(left == 0), self.idle.eq(left == 0),
        ]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [addr.eq(self.cmd.p.addr), left.eq(self.cmd.p.beats)]
        with m.If(self.req.valid & self.req.ready):
            m.d.sync += [addr.eq(addr + (n << shift)), left.eq(left - n)]
        return m


class BeatLayout(data.StructLayout):
    """A word of ``nbytes`` little-endian bytes with one strobe bit per byte."""

    def __init__(self, nbytes):
        super().__init__({"data": unsigned(8 * nbytes), "strb": unsigned(nbytes)})


class Gearbox(wiring.Component):
    """Width converter between ``in_bytes`` and ``out_bytes`` words (little-endian).

    Narrowing (``in_bytes = n * out_bytes``): each input word leaves as ``n`` output words, lowest bytes
    first. Widening (``out_bytes = n * in_bytes``): ``n`` input words make one output word, the first
    in the lowest bytes. Equal widths pass straight through.

    Interface attributes
    --------------------
    i : ``In(stream.Signature(BeatLayout(in_bytes)))``
    o : ``Out(stream.Signature(BeatLayout(out_bytes)))``
    """

    def __init__(self, in_bytes, out_bytes):
        for name, v in (("in_bytes", in_bytes), ("out_bytes", out_bytes)):
            _check_int(name, v, 1, 4096)
        big, small = max(in_bytes, out_bytes), min(in_bytes, out_bytes)
        if big % small or (big // small) & (big // small - 1):
            raise ValueError(f"out_bytes must be a power-of-two multiple or fraction of "
                             f"in_bytes={in_bytes}, not {out_bytes}")
        self._ib, self._ob = in_bytes, out_bytes
        super().__init__({
            "i": In(stream.Signature(BeatLayout(in_bytes))),
            "o": Out(stream.Signature(BeatLayout(out_bytes))),
        })

    def elaborate(self, platform):
        m = Module()
        ib, ob = self._ib, self._ob
        i, o = self.i, self.o
        if ib == ob:
            wiring.connect(m, wiring.flipped(i), wiring.flipped(o))
        elif ib > ob:
            n = ib // ob
            buf = Signal(BeatLayout(ib))
            full = Signal()
            idx = Signal(range(n))
            last = idx == n - 1
            m.d.comb += [
                o.valid.eq(full),
                o.p.data.eq(buf.data.word_select(idx, 8 * ob)),
                o.p.strb.eq(buf.strb.word_select(idx, ob)),
                i.ready.eq(~full | (o.ready & last)),
            ]
            with m.If(o.valid & o.ready):
                m.d.sync += idx.eq(Mux(last, 0, idx + 1))
                with m.If(last):
                    m.d.sync += full.eq(0)
            with m.If(i.valid & i.ready):
                m.d.sync += [buf.eq(i.p), full.eq(1)]
        else:
            n = ob // ib
            buf = Signal(BeatLayout(ob))
            cnt = Signal(range(n + 1))
            m.d.comb += [
                o.valid.eq(cnt == n), o.payload.eq(buf),
                i.ready.eq(cnt != n),
            ]
            with m.If(o.valid & o.ready):
                m.d.sync += cnt.eq(0)
            with m.If(i.valid & i.ready):
                # Shift down: the newest word enters at the top, so the first ends up lowest.
                m.d.sync += [
                    buf.data.eq((buf.data >> (8 * ib)) | (i.p.data << (8 * (ob - ib)))),
                    buf.strb.eq((buf.strb >> ib) | (i.p.strb << (ob - ib))),
                    cnt.eq(cnt + 1),
                ]
        return m


class ReadInterleaver(wiring.Component):
    """Spread one read port's requests round-robin over ``n`` ports; responses come back in order.

    Parameters
    ----------
    n : int
        Downstream ports, 1..4.
    addr_width, data_bytes, max_burst : int
        The read-port parameters (the same on every side).
    depth : int
        Requests outstanding over all ports (the order FIFO), 1..256.

    Interface attributes
    --------------------
    up : ``In(ReadPortSignature(...))``
        From the master (or an arbiter).
    down : ``Out(ReadPortSignature(...)).array(n)``
        To the memories (AXI masters). Request ``k`` (counting from reset) goes to port ``k mod n``.
    """

    def __init__(self, n, *, addr_width=32, data_bytes=16, max_burst=16, depth=16):
        _check_int("n", n, 1, 4)
        _check_int("depth", depth, 1, 256)
        sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        self._n, self._depth = n, depth
        super().__init__({"up": In(sig), "down": Out(sig).array(n)})

    def elaborate(self, platform):
        m = Module()
        n, up = self._n, self.up
        m.submodules.order = order = fifo.SyncFIFOBuffered(width=max(1, (n - 1).bit_length()),
                                                          depth=self._depth)
        nxt = Signal(range(n))
        for k in range(n):
            d = self.down[k]
            m.d.comb += [d.req.p.eq(up.req.p), d.req.valid.eq(up.req.valid & order.w_rdy & (nxt == k))]
        with m.Switch(nxt):
            for k in range(n):
                with m.Case(k):
                    m.d.comb += up.req.ready.eq(self.down[k].req.ready & order.w_rdy)
        go = up.req.valid & up.req.ready
        m.d.comb += [order.w_en.eq(go), order.w_data.eq(nxt)]
        with m.If(go):
            m.d.sync += nxt.eq(Mux(nxt == n - 1, 0, nxt + 1))

        head = order.r_data
        with m.Switch(head):
            for k in range(n):
                with m.Case(k):
                    d = self.down[k]
                    m.d.comb += [up.resp.valid.eq(d.resp.valid & order.r_rdy), up.resp.p.eq(d.resp.p)]
        for k in range(n):
            m.d.comb += self.down[k].resp.ready.eq(up.resp.ready & order.r_rdy & (head == k))
        m.d.comb += order.r_en.eq(up.resp.valid & up.resp.ready & up.resp.p.last)
        return m


class PageSplitter(wiring.Component):
    """Cut every read request that would cross a 4 KiB boundary in two; responses keep the request's ``last``.

    The read-port contract (:mod:`m3vit_hw.lib.mem_port`) already forbids such requests; this stage
    makes the AXI masters safe even when a unit breaks it (a unit whose burst alignment assumes a
    page-aligned base: LayerNorm records at ``PARAM_BASE`` + offset did, with ``PARAM_BASE`` only
    beat-aligned). Requests that fit pass unchanged, one cycle later.

    Parameters
    ----------
    addr_width, data_bytes, max_burst : int
        The read-port parameters (the same on both sides).
    depth : int
        Downstream requests outstanding (the FIFO of "not the final part" flags), 1..256.

    Interface attributes
    --------------------
    up : ``In(ReadPortSignature(...))``
    down : ``Out(ReadPortSignature(...))``
        Every request within one 4 KiB page; a split request's first part answers with ``last`` on
        its final beat, which ``up`` does not see.
    """

    def __init__(self, *, addr_width=32, data_bytes=16, max_burst=16, depth=16):
        _check_int("depth", depth, 1, 256)
        sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        self._db, self._depth = data_bytes, depth
        super().__init__({"up": In(sig), "down": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        up, down = self.up, self.down
        db = self._db
        shift = db.bit_length() - 1
        page_bits = BOUNDARY_BYTES.bit_length() - 1
        m.submodules.parts = parts = fifo.SyncFIFOBuffered(width=1, depth=self._depth)

        # One held request (registered, so the page arithmetic starts at a register).
        hv = Signal()
        addr = Signal.like(up.req.p.addr)
        beats = Signal.like(up.req.p.beats)
        m.d.comb += up.req.ready.eq(~hv)
        with m.If(up.req.valid & up.req.ready):
            m.d.sync += [hv.eq(1), addr.eq(up.req.p.addr), beats.eq(up.req.p.beats)]
        room = Signal(page_bits - shift + 1)        # beats from addr to the end of its page
        m.d.comb += room.eq((BOUNDARY_BYTES - addr[:page_bits]) >> shift)
        first = Signal.like(beats)
        m.d.comb += first.eq(Mux(beats <= room, beats, room))
        more = beats != first
        m.d.comb += [down.req.valid.eq(hv & parts.w_rdy), down.req.p.addr.eq(addr), down.req.p.beats.eq(first),
                     parts.w_en.eq(down.req.valid & down.req.ready), parts.w_data.eq(more)]
        with m.If(down.req.valid & down.req.ready):
            with m.If(more):
                m.d.sync += [addr.eq(addr + (first << shift)), beats.eq(beats - first)]
            with m.Else():
                m.d.sync += hv.eq(0)

        m.d.comb += [up.resp.valid.eq(down.resp.valid & parts.r_rdy), up.resp.p.data.eq(down.resp.p.data),
                     up.resp.p.last.eq(down.resp.p.last & ~parts.r_data),
                     down.resp.ready.eq(up.resp.ready & parts.r_rdy),
                     parts.r_en.eq(down.resp.valid & down.resp.ready & down.resp.p.last)]
        return m
