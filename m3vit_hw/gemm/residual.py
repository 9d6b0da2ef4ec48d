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
from .requantizer import check_lanes, check_meta, sat_expr

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
    2 cycles (read, then compute-and-write), one beat per cycle. A read-modify-write beat whose
    address matches a beat in either stage waits (at most 2 cycles) for that write to land.
    """

    LATENCY = 2

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

        # Stage 1 holds the beat while its residual word is read; stage 2 holds the new value while
        # it is written (and offered downstream).
        v1, v2 = Signal(), Signal()
        b1 = Signal(layout)
        b2 = Signal(ResidualOutLayout(L, self._addr_width, self._meta))
        op2 = Signal(ResOp)

        def writes(valid, op):
            return valid & (op != ResOp.PASS)

        adv = ~v2 | self.o.ready
        inp = self.i.payload
        reads = (inp.op == ResOp.ADD) | (inp.op == ResOp.COMBINE)
        # The buffer port need not be transparent, so a read must not be issued while a write to
        # the same word is pending in either stage.
        hazard = reads & ((writes(v1, b1.op) & (b1.addr == inp.addr)) |
                          (writes(v2, op2) & (b2.addr == inp.addr)))
        take = adv & ~hazard
        m.d.comb += [
            self.i.ready.eq(take),
            self.rd.addr.eq(inp.addr),
            self.rd.en.eq(take),
        ]

        with m.If(adv):
            m.d.sync += v1.eq(self.i.valid & ~hazard)
            with m.If(take):
                m.d.sync += b1.eq(inp)
            m.d.sync += [
                v2.eq(v1),
                op2.eq(b1.op),
                b2.addr.eq(b1.addr),
                b2.mask.eq(b1.mask),
                b2.meta.eq(b1.meta),
            ]
            for j in range(L):
                x = b1.data[j]
                res = self.rd.data[j]
                # x is int16 and weight <= 2**15, so x * weight fits 32 bits before the rounding shift.
                scaled = (x * b1.weight + (1 << (numerics.ROUTER_P_FRAC - 1))) >> numerics.ROUTER_P_FRAC
                with m.Switch(b1.op):
                    with m.Case(ResOp.ADD):
                        m.d.sync += b2.data[j].eq(sat_expr(res + x, numerics.RES_BITS))
                    with m.Case(ResOp.COMBINE):
                        m.d.sync += b2.data[j].eq(sat_expr(res + scaled, numerics.RES_BITS))
                    with m.Default():
                        m.d.sync += b2.data[j].eq(x)

        # Rewriting the same value while the beat waits in stage 2 is harmless.
        m.d.comb += [
            self.wr.addr.eq(b2.addr),
            self.wr.en.eq(Mux(writes(v2, op2), b2.mask, 0)),
        ]
        for j in range(L):
            m.d.comb += self.wr.data[j].eq(b2.data[j])

        m.d.comb += [
            self.o.valid.eq(v2),
            self.o.payload.eq(b2),
            self.busy.eq(v1 | v2),
        ]
        return m
