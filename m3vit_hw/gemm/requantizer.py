"""Requantizer: the first GEMM epilogue stage, ``golden.requantize`` on one output row chunk per cycle.

For each of ``lanes`` elements::

    y = sat_b(round_shift((acc + bias) * mult, shift))      b = 8 or 16
    y = acc                                                  in raw mode

with ``acc``, ``bias`` int32, ``mult`` unsigned below ``2**MULT_BITS`` and ``shift`` in
``[0, SHIFT_MAX]``, exactly as ``reference/golden.py::requantize`` (round half up, arithmetic shift,
saturation). Per-column and per-row multipliers are the same operation with different ``mult``
vectors, so the caller chooses (see :class:`~m3vit_hw.gemm.epilogue.Epilogue`).
"""

from amaranth.hdl import Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int

__all__ = ["Requantizer", "RequantInLayout", "RequantOutLayout", "check_lanes", "check_meta", "sat_expr"]


def check_lanes(lanes):
    """Validate a lane count (shared by the epilogue stages)."""
    check_int("lanes", lanes, 1, 256)


def check_meta(meta):
    """Validate a side-data shape (shared by the epilogue stages)."""
    try:
        Shape.cast(meta)
    except TypeError:
        raise TypeError(f"meta must be a shape-like object, not {meta!r}") from None


class RequantInLayout(data.StructLayout):
    """Input beat of :class:`Requantizer`.

    Fields
    ------
    acc : ArrayLayout(signed(ACC_BITS), lanes)
    bias : ArrayLayout(signed(BIAS_BITS), lanes)
    mult : ArrayLayout(unsigned(MULT_BITS), lanes)
    shift : range(SHIFT_MAX + 1)
    out16 : 1
        Saturate to ``RES_BITS`` (16) instead of ``ACT_BITS`` (8).
    raw : 1
        Pass ``acc`` through unchanged (bias, mult, shift ignored).
    meta : meta
        Carried through unchanged.
    """

    def __init__(self, lanes, meta):
        super().__init__({
            "acc": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "bias": data.ArrayLayout(signed(numerics.BIAS_BITS), lanes),
            "mult": data.ArrayLayout(unsigned(numerics.MULT_BITS), lanes),
            "shift": range(numerics.SHIFT_MAX + 1),
            "out16": 1,
            "raw": 1,
            "meta": meta,
        })


class RequantOutLayout(data.StructLayout):
    """Output beat of :class:`Requantizer`: ``data`` (int32 lanes; int8/int16 values unless raw)
    and the input's ``meta``."""

    def __init__(self, lanes, meta):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "meta": meta,
        })


def sat_expr(value, bits):
    """Clamp ``value`` to the signed ``bits``-wide range (an Amaranth expression)."""
    lo, hi = numerics.int_range(bits)
    return Mux(value < lo, lo, Mux(value > hi, hi, value))


class Requantizer(wiring.Component):
    """``lanes``-wide requantization pipeline (``golden.requantize``).

    Parameters
    ----------
    lanes : int
        Elements per beat, in ``[1, 256]``.
    meta : shape-like
        Side data carried with each beat (default: none).

    Interface attributes
    --------------------
    i : In(stream.Signature(RequantInLayout(lanes, meta)))
    o : Out(stream.Signature(RequantOutLayout(lanes, meta)))
        One output beat per input beat, in order. ``o.valid`` never waits on ``o.ready``;
        ``i.ready`` is ``o.ready`` or an empty stage ahead (it depends combinationally on ``o.ready``).
    busy : Out(1)
        A beat is inside the pipeline.

    Latency and throughput
    ----------------------
    3 cycles (bias add | multiply | round, shift and saturate: one register stage per arithmetic
    step, so each maps onto a DSP48E2 pipeline), one beat per cycle.
    """

    #: Pipeline depth in cycles.
    LATENCY = 3

    def __init__(self, lanes, meta=unsigned(0)):
        check_lanes(lanes)
        check_meta(meta)
        self._lanes = lanes
        self._meta = meta
        super().__init__({
            "i": In(stream.Signature(RequantInLayout(lanes, meta))),
            "o": Out(stream.Signature(RequantOutLayout(lanes, meta))),
            "busy": Out(1),
        })

    @property
    def lanes(self):
        return self._lanes

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        # (acc + bias) needs ACC_BITS + 1 bits; times an unsigned MULT_BITS multiplier it needs
        # ACC_BITS + 1 + MULT_BITS bits (57): no intermediate can wrap.
        sum_shape = signed(numerics.ACC_BITS + 1)
        prod_shape = signed(numerics.ACC_BITS + 1 + numerics.MULT_BITS)

        v = [Signal(name=f"v{s}") for s in range(3)]
        meta = [Signal(self._meta, name=f"meta{s}") for s in range(3)]
        shift = [Signal(range(numerics.SHIFT_MAX + 1), name=f"shift{s}") for s in range(2)]
        out16 = [Signal(name=f"out16_{s}") for s in range(2)]
        raw = [Signal(name=f"raw{s}") for s in range(2)]
        s_sum = [Signal(sum_shape, name=f"sum{j}") for j in range(L)]
        s_mult = [Signal(unsigned(numerics.MULT_BITS), name=f"mult{j}") for j in range(L)]
        s_prod = [Signal(prod_shape, name=f"prod{j}") for j in range(L)]
        s_out = [Signal(signed(numerics.ACC_BITS), name=f"out{j}") for j in range(L)]

        adv = ~v[2] | self.o.ready
        m.d.comb += self.i.ready.eq(adv)
        p = self.i.payload
        with m.If(adv):
            m.d.sync += [
                v[0].eq(self.i.valid), v[1].eq(v[0]), v[2].eq(v[1]),
                meta[0].eq(p.meta), meta[1].eq(meta[0]), meta[2].eq(meta[1]),
                shift[0].eq(Mux(p.raw, 0, p.shift)), shift[1].eq(shift[0]),
                out16[0].eq(p.out16), out16[1].eq(out16[0]),
                raw[0].eq(p.raw), raw[1].eq(raw[0]),
            ]
            for j in range(L):
                # Raw mode runs the same datapath as (acc + 0) * 1 >> 0 and skips saturation.
                m.d.sync += [
                    s_sum[j].eq(p.acc[j] + Mux(p.raw, 0, p.bias[j])),
                    s_mult[j].eq(Mux(p.raw, 1, p.mult[j])),
                    s_prod[j].eq(s_sum[j] * s_mult[j]),
                ]
                # Round half up: add 2**(shift-1) (0 for shift 0), then an arithmetic shift.
                half = (Const(1, 1) << shift[1])[1:]
                rounded = (s_prod[j] + half) >> shift[1]
                sat = Mux(out16[1], sat_expr(rounded, numerics.RES_BITS), sat_expr(rounded, numerics.ACT_BITS))
                m.d.sync += s_out[j].eq(Mux(raw[1], s_prod[j], sat))

        m.d.comb += [
            self.o.valid.eq(v[2]),
            self.o.payload.meta.eq(meta[2]),
            self.busy.eq(v[0] | v[1] | v[2]),
        ]
        for j in range(L):
            m.d.comb += self.o.payload.data[j].eq(s_out[j])
        return m
