"""Stream plumbing between the accelerator's ports and its AXI masters.

* :class:`ReadInterleaver` spreads one read port's requests round-robin over ``n`` read ports (one per
  AXI master, i.e. per Zynq HP port) and returns the responses in request order, so the weight streams
  of one port draw on the bandwidth of several.
* :class:`PageSplitter` cuts a read request that would cross 4 KiB in two (a guard: the read-port
  contract already forbids such requests), so the AXI masters never issue one.

All are :mod:`amaranth.lib.stream` citizens: ``valid`` never waits on ``ready`` and payloads hold until
they are transferred.
"""

from amaranth.hdl import Assert, Cat, Const, Module, Mux, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from ..lib.fifo_head import FifoHead
from ..lib.mem_port import BOUNDARY_BYTES, ReadPortSignature
from ..lib.skid import SkidBuffer
from ..rowops.counts import ShiftQueue, below_next

__all__ = ["ReadInterleaver", "PageSplitter"]


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
    register : bool
        A :class:`~m3vit_hw.lib.skid.SkidBuffer` on ``up``'s request and response streams (default):
        the unit upstream (the page splitter) then sees only flip-flops at ``up``, and the order
        FIFO's head, level and read enable stay inside this unit (in the accelerator top they ran
        through the splitter's response and request handshakes into its FIFO and its held request, up
        to 4.2 ns). One cycle each way, full throughput.

    Interface attributes
    --------------------
    up : ``In(ReadPortSignature(...))``
        From the master (or an arbiter).
    down : ``Out(ReadPortSignature(...)).array(n)``
        To the memories (AXI masters). Request ``k`` (counting from reset) goes to port ``k mod n``.
    """

    def __init__(self, n, *, addr_width=32, data_bytes=16, max_burst=16, depth=16, register=True):
        _check_int("n", n, 1, 4)
        _check_int("depth", depth, 1, 256)
        if not isinstance(register, bool):
            raise TypeError(f"register must be a bool, not {register!r}")
        sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        self._n, self._depth, self._register = n, depth, register
        self._sig = sig
        super().__init__({"up": In(sig), "down": Out(sig).array(n)})

    def elaborate(self, platform):
        m = Module()
        n = self._n
        if self._register:
            # ``up`` as seen by the logic below: the far side of two skid buffers.
            up = self._sig.flip().create()
            m.submodules.req_skid = rq = SkidBuffer(self.up.req.payload.shape())
            m.submodules.resp_skid = rs = SkidBuffer(self.up.resp.payload.shape())
            wiring.connect(m, wiring.flipped(self.up.req), rq.i)
            wiring.connect(m, rq.o, up.req)
            wiring.connect(m, up.resp, rs.i)
            wiring.connect(m, rs.o, wiring.flipped(self.up.resp))
        else:
            up = self.up
        # ``room`` admits at most ``depth`` requests whose last beat has not been returned, so the
        # FIFO's own ready never binds. Its head is copied into two registers (below).
        ib = max(1, (n - 1).bit_length())
        m.submodules.order = order = fifo.SyncFIFO(width=ib, depth=self._depth)
        # Requests outstanding and whether one more may go out, both registers (the count a cycle
        # ahead, compared with constants): each port's request valid is one LUT of flip-flops, not
        # behind the FIFO's level compare (it runs on into the AXI master's register slice).
        outstanding = Signal(range(self._depth + 2))
        room = Signal(init=1)
        nxt = Signal(range(n))
        for k in range(n):
            d = self.down[k]
            m.d.comb += [d.req.p.eq(up.req.p), d.req.valid.eq(up.req.valid & room & (nxt == k))]
        with m.Switch(nxt):
            for k in range(n):
                with m.Case(k):
                    m.d.comb += up.req.ready.eq(self.down[k].req.ready & room)
        go = up.req.valid & up.req.ready
        # The order FIFO's write is registered (``go`` and ``nxt`` a cycle later) and
        # ``outstanding`` adds that register, not ``go``: the request handshake (nxt -> the ready
        # mux -> go) ends in one LUT before ``room``, not in the FIFO's level adder or the count's.
        # ``room`` counts the request in the write register and this cycle's ``go``. A response
        # cannot pass its port number: ``cur_v`` waits on the FIFO.
        go_q, port_q = Signal(), Signal(ib)
        m.d.sync += [go_q.eq(go), port_q.eq(nxt)]
        m.d.comb += [order.w_en.eq(go_q), order.w_data.eq(port_q),
                     Assert(~go_q | order.w_rdy, "ReadInterleaver: the order FIFO overflowed")]
        # A returned last beat counts a cycle late (conservative for ``room``; the response
        # handshake stays out of the count's adder).
        pop_q = Signal()
        inc, dec = go_q, pop_q
        dep = self._depth
        m.d.sync += [
            outstanding.eq(outstanding + inc - dec),
            room.eq(Mux(go, below_next(outstanding, inc, dec, dep - 1),
                        below_next(outstanding, inc, dec, dep))),
        ]
        with m.If(go):
            m.d.sync += nxt.eq(Mux(nxt == n - 1, 0, nxt + 1))

        # The order FIFO's head in registers (FifoHead): ``cur`` is the port now returning, and the
        # response handshake ends at these registers, not in the FIFO's pointer and level logic.
        oh = FifoHead(m, order, name="order")
        cur, cur_v = oh.cur, oh.cur_v
        with m.Switch(cur):
            for k in range(n):
                with m.Case(k):
                    d = self.down[k]
                    m.d.comb += [up.resp.valid.eq(d.resp.valid & cur_v), up.resp.p.eq(d.resp.p)]
        for k in range(n):
            m.d.comb += self.down[k].resp.ready.eq(up.resp.ready & cur_v & (cur == k))
        pop = up.resp.valid & up.resp.ready & up.resp.p.last
        m.d.sync += pop_q.eq(pop)
        oh.advance(m, pop)
        return m


class PageSplitter(wiring.Component):
    """Cut every read request that would cross a 4 KiB boundary in two; responses keep the request's ``last``.

    The read-port contract (:mod:`m3vit_hw.lib.mem_port`) already forbids such requests; this stage
    makes the AXI masters safe even when a unit breaks it (a unit whose burst alignment assumes a
    page-aligned base: LayerNorm records at ``PARAM_BASE`` + offset did, with ``PARAM_BASE`` only
    beat-aligned). Requests that fit pass unchanged, one cycle later, one request per cycle; a split
    request's second part follows its first after one idle cycle.

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
        self._db, self._depth, self._mb = data_bytes, depth, max_burst
        super().__init__({"up": In(sig), "down": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        up, down = self.up, self.down
        db = self._db
        shift = db.bit_length() - 1
        page_bits = BOUNDARY_BYTES.bit_length() - 1
        # A ShiftQueue: its r_rdy is a flip-flop and a read reaches only the entries' and the
        # thermometer count's LUTs (a SyncFIFOBuffered put its level adder behind the response
        # handshake, 4 LUT + 2 CARRY4 from its r_rdy in the W1 top), and its w_rdy is exact, so
        # ``room`` (at most ``depth`` flags held) never meets a refused write.
        m.submodules.parts = parts = ShiftQueue(1, self._depth)

        # One held request, its first part's length and whether more parts follow all in registers:
        # the page arithmetic (a subtract and a compare) runs on the incoming payload when it is
        # taken, so the handshake (down.req.ready -> up.req.ready) sees only flip-flops.
        hv = Signal()
        addr = Signal.like(up.req.p.addr)
        beats = Signal.like(up.req.p.beats)
        first = Signal.like(beats)                  # beats of the part offered now
        more = Signal()                             # parts follow the one offered now
        ok = Signal()                               # first/more belong to addr/beats

        def split(a, b):
            # (first part's beats, more parts follow) of a request at byte address a of b beats.
            # idx = a's beat within its page. With b <= 2**lb <= page beats (lb = ceil(log2
            # max_burst); max_burst * data_bytes <= BOUNDARY_BYTES), idx + b > page beats needs
            # idx's bits above lb all set, and then it is idx_lo + b > 2**lb (idx_lo = idx's low lb
            # bits): a LUT function of a few bits and an AND, no carry chain behind the request's
            # payload (the full-width idx + b compare ran through two CARRY4s into ``first``).
            # The low-bits sum and the negation are written as gates, not ``+``/``-``: yosys would
            # map those onto a CARRY4 chain (still two of them behind ``first``), while a function
            # of a few bits fits in two LUT levels.
            idx = a[shift:page_bits]
            nb = page_bits - shift
            lb = (self._mb - 1).bit_length()
            lo = idx[:lb]
            hi_ones = idx[lb:nb].all() if lb < nb else 1
            # lo + b > 2**lb: a ripple sum of lo and b's low bits. b's bit lb is set only when
            # b == 2**lb (its low bits zero, no carry), so the sum's bit lb is carry | b[lb] and it
            # is above 2**lb when that bit and any lower one are set.
            carry, sum_bits = Const(0, 1), []
            for i in range(lb):
                sum_bits.append(lo[i] ^ b[i] ^ carry)
                carry = (lo[i] & b[i]) | ((lo[i] | b[i]) & carry)
            top = carry | (b[lb] if lb < len(b) else 0)
            low_any = Cat(*sum_bits).any() if lb else Const(0, 1)
            crosses = hi_ones & top & low_any
            # When crossing, the beats to the page end are 2**lb - idx_lo (idx_lo >= 1 then): lo's
            # two's complement in lb bits, bit i = lo[i] ^ (any lower bit of lo).
            room = Signal(lb + 1)
            if lb:
                m.d.comb += room.eq(Cat(*[lo[i] ^ lo[:i].any() for i in range(lb)]))
            return Mux(crosses, room, b), crosses

        leaving = Signal()                          # the held request's last part goes out this cycle
        # Taking the next request in the cycle the held one leaves keeps one request per cycle.
        m.d.comb += up.req.ready.eq(~hv | leaving)
        take = up.req.valid & up.req.ready
        send = down.req.valid & down.req.ready
        # The parts FIFO's write is registered (``send`` and ``more`` a cycle later), so the
        # handshake (hv, ok, room, down.req.ready) does not run on into the FIFO's level and
        # pointer adders. ``pending`` counts the FIFO's entries (it adds ``w_en``, a register);
        # ``room`` also counts the flag in that register and this cycle's ``send`` (one LUT):
        # ``room`` is a register of its own, not the FIFO's level compare, so down.req.valid
        # (into the AXI master's register slice) is one LUT. A response cannot pass the FIFO
        # before its flag is in: up.resp.valid waits on parts.r_rdy.
        pending = Signal(range(self._depth + 1))
        room = Signal(init=1)
        w_en, w_more = Signal(), Signal()
        m.d.sync += [w_en.eq(send), w_more.eq(more),
                     pending.eq(pending + w_en - parts.r_en),
                     room.eq(Mux(send, below_next(pending, w_en, parts.r_en, self._depth - 1),
                                 below_next(pending, w_en, parts.r_en, self._depth)))]
        m.d.comb += [down.req.valid.eq(hv & ok & room), down.req.p.addr.eq(addr),
                     down.req.p.beats.eq(first), parts.w_en.eq(w_en), parts.w_data.eq(w_more),
                     leaving.eq(send & ~more),
                     Assert(~w_en | parts.w_rdy, "PageSplitter: the parts FIFO overflowed")]
        with m.If(take):
            f, mo = split(up.req.p.addr, up.req.p.beats)
            m.d.sync += [hv.eq(1), ok.eq(1), addr.eq(up.req.p.addr), beats.eq(up.req.p.beats),
                         first.eq(f), more.eq(mo)]
        with m.Elif(send):
            with m.If(more):
                # The rest starts on a page boundary; its split is computed in the next cycle from
                # these registers (one bubble per split request: splits are rare, a guard).
                m.d.sync += [addr.eq(addr + (first << shift)), beats.eq(beats - first), ok.eq(0)]
            with m.Else():
                m.d.sync += hv.eq(0)
        with m.Elif(hv & ~ok):
            # The rest of a split request starts on a page boundary and has fewer beats than a
            # page holds (max_burst * data_bytes <= BOUNDARY_BYTES, a port parameter check), so it
            # is one part: no split computation here.
            m.d.sync += [ok.eq(1), first.eq(beats), more.eq(0)]

        m.d.comb += [up.resp.valid.eq(down.resp.valid & parts.r_rdy), up.resp.p.data.eq(down.resp.p.data),
                     up.resp.p.last.eq(down.resp.p.last & ~parts.r_data),
                     down.resp.ready.eq(up.resp.ready & parts.r_rdy),
                     parts.r_en.eq(down.resp.valid & down.resp.ready & down.resp.p.last)]
        return m
