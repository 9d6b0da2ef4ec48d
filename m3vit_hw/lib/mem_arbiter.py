"""Read-port arbiter: several external-memory read masters share one :class:`ReadPortSignature`.

The MoE layer has two streamers (expert weights and their column parameters) behind one external
memory port; later units (program, image loaders) can join the same way.

Contract
--------
* Each master sees a complete :class:`~m3vit_hw.lib.mem_port.ReadPortSignature` port with the memory's
  contract (in-order responses, ``beats`` beats per request, ``last`` on the final one).
* Requests are granted round-robin among the masters with ``req.valid`` high. The grant is a
  register that moves only after a transfer or while its master has no request, so the downstream
  ``req`` stream obeys the stream rules (its payload never changes while ``valid`` is high without a
  transfer) even when another master raises ``valid`` meanwhile. A request that finds the grant on
  an idle master waits one cycle for it; a granted master's next request, or another master's
  after a transfer, goes out in the following cycle (one request per cycle).
* The memory answers in request order, so the arbiter keeps a FIFO of the master index of every
  accepted request (``depth`` entries) and routes response beats to the FIFO head until its ``last``
  beat. When ``depth`` requests are outstanding, no further request is forwarded.
* ``resp.ready`` towards the memory is the head master's ``resp.ready``; it never depends on any
  ``req.ready``.

Latency: with ``register`` (the default) every master's request goes through a
:class:`~m3vit_hw.lib.skid.SkidBuffer` and so does the granted request towards the memory: no
combinational path runs from one master's request logic through the round-robin pick into another
master's ``req.ready`` or into the memory side, at two cycles of request latency (three when the
grant first has to move to the requesting master) and full throughput.
The response stream passes through one more skid buffer (one cycle per beat of latency, full
throughput), so a master's ``resp.ready`` does not reach the memory side either, and then through
one skid buffer per master (one more cycle): a master's ``resp.valid`` and ``resp.payload`` are
flip-flops (its response logic does not start behind the routing decode) and its ``resp.ready``
ends at its own skid buffer (not at the routing FIFO's read and the shared response register's
enables). Without ``register`` requests and responses pass combinationally.

The routing FIFO's head is copied into two registers, the master now receiving (``cur``) and the
next one; the FIFO is read whenever the second is empty (a decision of flip-flops) and a routed last
beat moves the second (or the FIFO's head) into ``cur``. So a response beat's routing (each master's
``resp.valid``, hence a client's buffer write enable) is decided from registers, and the response
handshake ends at those registers instead of running into the FIFO's pointer and level logic. The
FIFO is written a cycle after a request's acceptance (from registers, so the round-robin offer does
not run into its write logic either), and a request's first beat can be routed two cycles after
that; with ``register`` the memory-side skid buffer, the memory's own latency (at least one cycle)
and the response skid buffer hide all three. Requests are gated by ``room``, a register (requests
whose last beat is not yet routed, plus the pending write, a cycle ahead, against ``depth``), so a
master's ``req.ready`` decodes the grant and two flip-flops.
"""

from amaranth.hdl import Assert, Cat, Module, Mux, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from .fifo_head import FifoHead
from .skid import SkidBuffer
from .mem_port import DEFAULT_ADDR_WIDTH, DEFAULT_DATA_BYTES, DEFAULT_MAX_BURST, ReadPortSignature
from ..checks import check_int as _check_int

__all__ = ["ReadArbiter", "DEFAULT_DEPTH"]


#: Outstanding requests remembered by default (the master index of each, to route the in-order
#: responses); eight covers the ZCU104 HP port's latency at 16-beat bursts.
DEFAULT_DEPTH = 8

class ReadArbiter(wiring.Component):
    """Round-robin arbiter of ``masters`` read masters onto one external-memory read port.

    Parameters
    ----------
    masters : int
        Number of read masters, in [1, 16].
    addr_width, data_bytes, max_burst : int
        The port's parameters (see :class:`~m3vit_hw.lib.mem_port.ReadPortSignature`); the same on every
        side.
    depth : int
        Requests that may be outstanding at the memory (the routing FIFO's depth), in [1, 256].
    register : bool
        Skid buffers on every master's request and on the memory request (see the module docstring).

    Interface attributes
    --------------------
    masters : ``In(ReadPortSignature(...)).array(masters)``
        One port per master; connect each master's ``Out(ReadPortSignature)`` to one of them.
    mem : ``Out(ReadPortSignature(...))``
        To the memory (or the AXI bridge).
    busy : ``Out(1)``
        Some request is outstanding.

    Raises
    ------
    TypeError, ValueError
        On a parameter outside the ranges above (the message names it).
    """

    def __init__(self, masters, *, addr_width=DEFAULT_ADDR_WIDTH, data_bytes=DEFAULT_DATA_BYTES,
                 max_burst=DEFAULT_MAX_BURST, depth=DEFAULT_DEPTH, register=True):
        _check_int("masters", masters, 1, 16)
        if not isinstance(register, bool):
            raise TypeError(f"register must be a bool, not {register!r}")
        self._register = register
        _check_int("depth", depth, 1, 256)
        sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        self._n = masters
        self._depth = depth
        self._port = sig
        super().__init__({
            "masters": In(sig).array(masters),
            "mem": Out(sig),
            "busy": Out(1),
        })

    @property
    def port_signature(self):
        """The :class:`ReadPortSignature` shared by every side."""
        return self._port

    @property
    def depth(self):
        return self._depth

    def elaborate(self, platform):
        m = Module()
        n = self._n
        idx_bits = max(1, (n - 1).bit_length())
        # Its head is copied into two registers (a FifoHead: ``cur``, the master now receiving, and one
        # behind it), see the module docstring; ``room`` (below) admits at most ``depth`` requests whose last
        # beat has not been routed, so the FIFO's own w_rdy never binds.
        m.submodules.route = route = fifo.SyncFIFO(width=idx_bits, depth=self._depth)

        if self._register:
            # Responses too: the head master's resp.ready ends at this skid buffer instead of
            # running out to the memory side (the AXI bridge's FIFOs).
            rsk = m.submodules.resp_skid = SkidBuffer(self.mem.resp.payload.shape())
            wiring.connect(m, wiring.flipped(self.mem.resp), rsk.i)
            resp = rsk.o
        else:
            resp = self.mem.resp
        if self._register:
            reqs = []
            for i in range(n):
                sk = m.submodules[f"req_skid{i}"] = SkidBuffer(self.mem.req.payload.shape())
                wiring.connect(m, wiring.flipped(self.masters[i].req), sk.i)
                reqs.append(sk.o)
            out = m.submodules.mem_skid = SkidBuffer(self.mem.req.payload.shape())
            wiring.connect(m, out.o, wiring.flipped(self.mem.req))
            req = out.i
        else:
            reqs = [self.masters[i].req for i in range(n)]
            req = self.mem.req
        valids = [r.valid for r in reqs]

        # The grant is a register: ``grant`` names the master whose request is offered. It moves on
        # after a transfer, or while its master has no request and another has, to the round-robin
        # pick (the master after ``grant`` has the highest priority; the current one the lowest, so
        # a lone master keeps the grant and streams one request per cycle). The offer, the payload
        # multiplexer and every master's ready then decode a flip-flop, and the pick only feeds the
        # grant register. The grant's master keeps its request valid until the transfer (stream
        # rules), so the offer never changes under a valid request.
        grant = Signal(range(n), init=n - 1)
        pick = Signal(range(n))
        # One priority encoder per value of ``grant`` (a case, not 64 chained conditions: the
        # chained form mapped to 14 LUT levels).
        with m.Switch(grant):
            for i in range(n):
                with m.Case(i):
                    for offset in reversed(range(n)):
                        # Later assignments win, so iterate from lowest to highest priority.
                        cand = (i + 1 + offset) % n
                        with m.If(valids[cand]):
                            m.d.comb += pick.eq(cand)

        # The routing FIFO is written a cycle after the transfer, from registers (``pend``, the
        # granted index): the round-robin offer then ends at flip-flops instead of running on into
        # the FIFO's write and level logic (see the module docstring for why the delay is hidden).
        # ``outstanding`` counts the FIFO's entries; ``room`` (a register) is ``outstanding + pend``
        # after this cycle below ``depth``: the count's next value plus the transfer, compared with
        # constants (no adder behind the transfer).
        outstanding = Signal(range(self._depth + 2))
        pend = Signal()
        pend_idx = Signal(idx_bits)
        room = Signal(init=1)
        offered = Signal()
        with m.Switch(grant):
            for i in range(n):
                with m.Case(i):
                    m.d.comb += [
                        offered.eq(valids[i]),
                        req.payload.eq(reqs[i].payload),
                        reqs[i].ready.eq(req.ready & room),
                    ]
        m.d.comb += req.valid.eq(offered & room)
        transfer = req.valid & req.ready
        m.d.sync += [pend.eq(transfer), pend_idx.eq(grant)]
        m.d.comb += [route.w_en.eq(pend), route.w_data.eq(pend_idx),
                     Assert(~pend | route.w_rdy, "ReadArbiter: the routing FIFO overflowed")]
        # A routed last beat counts a cycle late (``pop_q``): conservative for ``room``, and the
        # response handshake stays out of the count's adder.
        pop_q = Signal()
        dec = pop_q
        d = self._depth
        # After this cycle: entries = outstanding + pend - dec, pending = transfer.
        base = Mux(pend & ~dec, outstanding < d - 1, Mux(dec & ~pend, outstanding < d + 1,
                                                           outstanding < d))
        base_t = Mux(pend & ~dec, outstanding < d - 2, Mux(dec & ~pend, outstanding < d,
                                                             outstanding < d - 1))
        m.d.sync += [
            outstanding.eq(outstanding + pend - dec),
            room.eq(Mux(transfer, base_t, base)),
        ]
        with m.If((transfer | ~offered) & Cat(valids).any()):
            m.d.sync += grant.eq(pick)

        # Responses go to the master whose request is oldest (through its own skid buffer with
        # ``register``).
        # The routing FIFO's head in registers (FifoHead): the response handshake ends at them.
        rh = FifoHead(m, route, name="route")
        cur, cur_v = rh.cur, rh.cur_v
        head = cur
        outs = []
        for i in range(n):
            if self._register:
                osk = m.submodules[f"resp_skid{i}"] = SkidBuffer(self.mem.resp.payload.shape())
                wiring.connect(m, osk.o, wiring.flipped(self.masters[i].resp))
                mp = osk.i
                outs.append(osk.o.valid)
            else:
                mp = self.masters[i].resp
            m.d.comb += [
                mp.valid.eq(resp.valid & cur_v & (head == i)),
                mp.payload.eq(resp.payload),
            ]
            outs_ready = mp.ready
            with m.If(head == i):
                m.d.comb += resp.ready.eq(cur_v & outs_ready)
        pop = resp.valid & resp.ready & resp.payload.last
        m.d.sync += pop_q.eq(pop)
        rh.advance(m, pop)
        m.d.comb += [
            # Outstanding at the memory, or still waiting in a skid buffer.
            self.busy.eq((outstanding != 0) | pend
                         | (Cat(r.valid for r in reqs).any() if self._register else 0)
                         | (resp.valid if self._register else 0)
                         | (out.o.valid if self._register else 0)
                         | (Cat(*outs).any() if outs else 0)),
        ]
        return m
