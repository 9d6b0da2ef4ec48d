"""Residual-update epilogue stage: read-modify-write of int16 residual rows.

Per beat (one ``lanes``-wide chunk of an output row, already requantized to the residual scale):

========  ===========================================================================================
op        new residual value (``golden`` function)
========  ===========================================================================================
PASS      no memory access; the beat passes through
WRITE     ``x`` (a branch written straight into the residual buffer, e.g. a fresh stream)
ADD       ``residual_add(res, x)`` = ``sat16(res + x)``
COMBINE   ``moe_combine(res, x, weight)`` = ``sat16(res + round_shift(x * weight, ROUTER_P_FRAC))``
========  ===========================================================================================

``res`` is read from the residual buffer at ``addr`` and the result written back to the same word,
only in the lanes set in ``mask``. Beats are applied in order, and a beat that reads a word an earlier
beat still has in flight waits until that write has landed, so repeated addresses (the same token twice
in a scatter list) accumulate exactly like the sequential golden model.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int
from ..lib.credit_fifo import CreditFIFO
from .requantizer import check_lanes, check_meta

__all__ = ["ResidualStage", "ResOp", "ResidualInLayout", "ResidualOutLayout"]


class ResOp(enum.Enum, shape=2):
    """What :class:`ResidualStage` does with a beat."""
    PASS = 0
    WRITE = 1
    ADD = 2
    COMBINE = 3


class ResidualInLayout(data.StructLayout):
    """Input beat of :class:`ResidualStage`.

    Fields
    ------
    data : ArrayLayout(signed(ACC_BITS), lanes)
        The branch value ``x`` (int16 range for WRITE/ADD/COMBINE).
    op : ResOp
    weight : unsigned(COMBINE_WEIGHT_BITS)
        Combine weight (COMBINE only), Q0.15.
    addr : unsigned(addr_width)
        Residual-buffer word.
    mask : unsigned(lanes)
        Lanes to write (bit ``j`` = lane ``j``).
    meta : meta
    """

    def __init__(self, lanes, addr_width, meta):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "op": ResOp,
            "weight": unsigned(numerics.COMBINE_WEIGHT_BITS),
            "addr": unsigned(addr_width),
            "mask": unsigned(lanes),
            "meta": meta,
        })


class ResidualOutLayout(data.StructLayout):
    """Output beat of :class:`ResidualStage`: ``data`` (the value written, or the input for PASS),
    ``addr``, ``mask`` and ``meta`` of the input."""

    def __init__(self, lanes, addr_width, meta):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "addr": unsigned(addr_width),
            "mask": unsigned(lanes),
            "meta": meta,
        })


class ResidualStage(wiring.Component):
    """``lanes``-wide residual read-modify-write (``golden.residual_add`` / ``golden.moe_combine``).

    Parameters
    ----------
    lanes : int
        Elements per beat (and per residual-buffer word), in ``[1, 256]``.
    addr_width : int
        Address bits of the residual buffer, in ``[1, 32]``.
    meta : shape-like
        Side data carried with each beat (default: none).

    Interface attributes
    --------------------
    i : In(stream.Signature(ResidualInLayout(lanes, addr_width, meta)))
    o : Out(stream.Signature(ResidualOutLayout(lanes, addr_width, meta)))
        One output beat per input beat, in order; ``o.valid`` never waits on ``o.ready``.
    rd : In(memory.ReadPort.Signature(addr_width=addr_width, shape=ArrayLayout(signed(16), lanes)))
        Residual-buffer read port (synchronous, 1-cycle latency, need not be transparent).
    wr : In(memory.WritePort.Signature(addr_width=addr_width, shape=ArrayLayout(signed(16), lanes),
        granularity=1))
        Residual-buffer write port with one enable bit per lane.
    busy : Out(1)

    Latency and throughput
    ----------------------
    :attr:`LATENCY` (7) cycles, one beat per cycle: three stages ahead of the read (operand
    registers | ``x * weight`` in a DSP48E2 | rounding shift), then read issued | read data
    registered | add, saturate and write, then the output FIFO (1). A read-modify-write beat whose
    address matches a write still in flight waits (at most 3 cycles) for that write to land.
    ``i.ready`` comes from registers (the hazard flag and the output FIFO's credits), with no path
    from ``o.ready``.
    """

    LATENCY = 6 + CreditFIFO.LATENCY

    def __init__(self, lanes, addr_width, meta=unsigned(0)):
        check_lanes(lanes)
        check_meta(meta)
        check_int("addr_width", addr_width, 1, 32)
        self._lanes = lanes
        self._addr_width = addr_width
        self._meta = meta
        word = data.ArrayLayout(signed(numerics.RES_BITS), lanes)
        super().__init__({
            "i": In(stream.Signature(ResidualInLayout(lanes, addr_width, meta))),
            "o": Out(stream.Signature(ResidualOutLayout(lanes, addr_width, meta))),
            "rd": In(memory.ReadPort.Signature(addr_width=addr_width, shape=word)),
            "wr": In(memory.WritePort.Signature(addr_width=addr_width, shape=word, granularity=1)),
            "busy": Out(1),
        })

    @property
    def lanes(self):
        return self._lanes

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        layout = ResidualInLayout(L, self._addr_width, self._meta)
        out_layout = ResidualOutLayout(L, self._addr_width, self._meta)
        x_shape = signed(numerics.RES_BITS)
        # round_shift(x * weight, ROUTER_P_FRAC) of an int16 x and a Q0.15 weight <= 1.0 fits 17 bits.
        scaled_shape = signed(numerics.RES_BITS + 1)

        # Ahead of the read: p1 (operands), p2 (product), p3 (scaled). Then s1 (read issued),
        # s2 (read data registered), s3 (result, written and offered downstream).
        pv = [Signal(name=f"pv{k}") for k in (1, 2, 3)]
        # pb3 (the read head) is kept on reset so that the synthesizer leaves it a flip-flop: a
        # reset-less pb1 -> pb2 -> pb3 chain becomes a shift register whose slow clock-to-out
        # would start the hazard compare.
        pb = [Signal(layout, name=f"pb{k}", reset_less=k < 3) for k in (1, 2, 3)]
        prod = [Signal(signed(numerics.RES_BITS + numerics.COMBINE_WEIGHT_BITS + 1), name=f"prod{j}", reset_less=True)
                for j in range(L)]
        scaled = [Signal(scaled_shape, name=f"scaled{j}", reset_less=True) for j in range(L)]
        sv = [Signal(name=f"v{k}") for k in (1, 2, 3)]
        sb = [Signal(layout, name=f"b{k}", reset_less=True) for k in (1, 2)]
        s_scaled = [[Signal(scaled_shape, name=f"scaled{k}_{j}", reset_less=True) for j in range(L)]
                    for k in (1,)]
        s_add = [Signal(scaled_shape, name=f"add{j}", reset_less=True) for j in range(L)]
        lo16, hi16 = numerics.int_range(numerics.RES_BITS)
        s_res = [Signal(x_shape, name=f"res{j}", reset_less=True) for j in range(L)]
        # Kept on reset: its sink field steers o.ready, and a reset-less sb1 -> sb2 -> b3 chain would
        # become a shift register with a slow clock-to-out.
        b3 = Signal(out_layout)
        op3 = Signal(ResOp)

        def writes(valid, op):
            return valid & (op != ResOp.PASS)

        head = pb[2]

        def reads_op(op):
            return (op == ResOp.ADD) | (op == ResOp.COMBINE)

        def pending(valid, op, addr, at):
            return writes(valid, op) & (addr == at)

        # The back stages (s1..s3) have no enable: they feed a credit-counted output FIFO, so a
        # beat is taken only while the FIFO has room for every beat in flight, and o.ready reaches
        # nothing but the FIFO's read side.
        m.submodules.out_fifo = out_fifo = CreditFIFO(out_layout, self.LATENCY + 1)
        # The buffer port need not be transparent, so a read must not be issued while a write to
        # the same word is pending in any later stage. `hazard` says so for the head (pb3) against
        # s1, s2 and s3. It is a register, decided a cycle ahead for both ways the stages can move,
        # so the front stages' enable (`go`, several thousand loads) comes straight from a flip-flop.
        hazard = Signal()
        go = ~hazard                       # the front three stages and the read advance
        take = self.i.valid & go & out_fifo.room
        # go: pb2 -> head, head -> s1, s1 -> s2, s2 -> s3.
        h_go = pv[1] & reads_op(pb[1].op) & (pending(pv[2], head.op, head.addr, pb[1].addr) |
                                             pending(sv[0], sb[0].op, sb[0].addr, pb[1].addr) |
                                             pending(sv[1], sb[1].op, sb[1].addr, pb[1].addr))
        # The head waits: s1 gets a bubble, s1 -> s2, s2 -> s3.
        h_wait = pv[2] & reads_op(head.op) & (pending(sv[0], sb[0].op, sb[0].addr, head.addr) |
                                              pending(sv[1], sb[1].op, sb[1].addr, head.addr))
        m.d.sync += hazard.eq(Mux(go, h_go, h_wait))
        m.d.comb += [
            self.i.ready.eq(go & out_fifo.room),
            out_fifo.take.eq(take),
            self.rd.addr.eq(head.addr),
            self.rd.en.eq(go),
        ]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))

        with m.If(go):
            m.d.sync += [
                pv[0].eq(take), pb[0].eq(self.i.payload),
                pv[1].eq(pv[0]), pb[1].eq(pb[0]),
                pv[2].eq(pv[1]), pb[2].eq(pb[1]),
            ]
            for j in range(L):
                # x is int16 for COMBINE (the contract), so x * weight is one DSP48E2 product.
                m.d.sync += [
                    prod[j].eq(pb[0].data[j][:numerics.RES_BITS].as_signed() * pb[0].weight),
                    scaled[j].eq((prod[j] + (1 << (numerics.ROUTER_P_FRAC - 1))) >> numerics.ROUTER_P_FRAC),
                ]
        m.d.sync += [
            sv[0].eq(pv[2] & go), sb[0].eq(head),
            sv[1].eq(sv[0]), sb[1].eq(sb[0]),
            sv[2].eq(sv[1]), op3.eq(sb[1].op),
            b3.addr.eq(sb[1].addr), b3.mask.eq(sb[1].mask), b3.meta.eq(sb[1].meta),
        ]
        for j in range(L):
            # The addend of the final add is chosen a stage early (x for ADD, the scaled product
            # for COMBINE), so the last stage is one 18-bit add and a 3-bit saturation test.
            m.d.sync += [
                s_scaled[0][j].eq(scaled[j]),
                s_add[j].eq(Mux(sb[0].op == ResOp.COMBINE, s_scaled[0][j],
                                sb[0].data[j][:numerics.RES_BITS].as_signed())),
                # The read data of s1 is registered before the add (a registered memory output).
                s_res[j].eq(self.rd.data[j]),
            ]
            total = s_res[j] + s_add[j]
            fits = (total[numerics.RES_BITS - 1:] == 0) | (total[numerics.RES_BITS - 1:] == 0b111)
            sat = Mux(fits, total[:numerics.RES_BITS].as_signed(), Mux(total[-1], lo16, hi16))
            reads = (sb[1].op == ResOp.ADD) | (sb[1].op == ResOp.COMBINE)
            m.d.sync += b3.data[j].eq(Mux(reads, sat, sb[1].data[j]))

        m.d.comb += [
            self.wr.addr.eq(b3.addr),
            self.wr.en.eq(Mux(writes(sv[2], op3), b3.mask, 0)),
        ]
        for j in range(L):
            m.d.comb += self.wr.data[j].eq(b3.data[j])

        m.d.comb += [
            out_fifo.w_en.eq(sv[2]),
            out_fifo.w_data.eq(b3),
            self.busy.eq(out_fifo.busy),
        ]
        return m
