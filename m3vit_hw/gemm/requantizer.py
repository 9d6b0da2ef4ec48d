"""Requantizer: the first GEMM epilogue stage, ``golden.requantize`` on one output row chunk per cycle.

For each of ``lanes`` elements::

    y = sat_b(round_shift((acc + bias) * mult, shift))      b = 8 or 16
    y = acc                                                  in raw mode

with ``acc``, ``bias`` int32, ``mult`` unsigned below ``2**MULT_BITS`` and ``shift`` in
``[0, SHIFT_MAX]``, exactly as ``reference/golden.py::requantize`` (round half up, arithmetic shift,
saturation). Per-column and per-row multipliers are the same operation with different ``mult``
vectors, so the caller chooses (see :class:`~m3vit_hw.gemm.epilogue.Epilogue`).
"""

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int
from ..lib.credit_fifo import CreditFIFO

__all__ = ["Requantizer", "RequantInLayout", "RequantOutLayout", "check_lanes", "check_meta", "sat_expr"]


#: Datapath register stages (the output FIFO adds its own latency).
_STAGES = 8

#: Operand chunk widths of the wide product: unsigned chunks that fit the DSP48E2's signed 27 x 18
#: multiplier with their sign bit to spare.
_A_CHUNK = 26
_B_CHUNK = 17


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
        ``i.ready`` is a register (credits for the output FIFO), with no combinational path from
        ``o.ready``.
    busy : Out(1)
        A beat is inside the pipeline.

    Latency and throughput
    ----------------------
    :attr:`LATENCY` (10) cycles, one beat per cycle: an input register, 8 datapath stages, then 1
    through the output FIFO. The stages, each sized for 300 MHz on an UltraScale+ -2 (at most about
    5 LUT levels or one short carry chain between registers):

    in. the input registered, with the raw-mode operand select (bias 0, multiplier 1) applied, so the
       33-bit add starts at flip-flops rather than behind the caller's decode of the payload;
    0. ``acc + bias`` (33-bit add);
    1. the 33 x 24 product as partial products of 26 x 17 unsigned bits (signed top chunk), one
       registered DSP48E2 each (their operands and products are plain registers, so a packer puts them
       in the DSP's A/B and M/P registers);
    2. each operand chunk's partial products summed into one row (one adder each);
    3. the rows summed into the 57-bit product (one adder);
    4. twice the product shifted right by the multiple of 4 in ``shift`` (a 16:1 multiplexer, two
       LUT levels);
    5. shifted by the rest of ``shift`` (0..3, one LUT level in front of the 59-bit carry chain),
       plus the rounding carry ``shift != 0``: the round
       half up ``(x + 2**(shift-1)) >> shift`` is ``((2x >> shift) + 1) >> 1`` for ``shift > 0``,
       exactly, and the final ``>> 1`` is wiring;
    6. the low 32 bits and the "fits in 8 / 16 bits" flags (carry-chain compares);
    7. saturation and raw-mode select.

    The datapath never stalls: its registers have no enable. Input is taken only while the output
    FIFO has room for every beat in flight (a credit count), so ``i.ready`` is a register and does
    not depend on ``o.ready``.
    """

    #: Pipeline depth in cycles.
    LATENCY = 1 + _STAGES + CreditFIFO.LATENCY

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
        S = _STAGES
        # (acc + bias) needs ACC_BITS + 1 bits; times an unsigned MULT_BITS multiplier it needs
        # ACC_BITS + 1 + MULT_BITS bits (57): no intermediate can wrap.
        sum_bits = numerics.ACC_BITS + 1
        prod_shape = signed(sum_bits + numerics.MULT_BITS)
        # Operand chunks sized for the DSP48E2's 27 x 18 signed multiplier: unsigned chunks of 26 and
        # 17 bits (one sign bit spare), the top chunk of the sum keeps the sign.
        a_cuts = list(range(0, sum_bits, _A_CHUNK))
        b_cuts = list(range(0, numerics.MULT_BITS, _B_CHUNK))

        # Control: one valid bit and the per-beat fields, moved along with the datapath.
        v = [Signal(name=f"v{s}") for s in range(S)]
        meta = [Signal(self._meta, name=f"meta{s}", reset_less=True) for s in range(S)]
        # shift3 keeps its reset: it starts stage 4's barrel shift, and a reset-less chain
        # shift1 .. shift3 would become a shift register (SRL) with a slow clock-to-out.
        shift = [Signal(range(numerics.SHIFT_MAX + 1), name=f"shift{s}", reset_less=s != 3) for s in range(5)]
        # out16 and raw fan out to every output bit: kept on reset so they stay flip-flops rather
        # than a shift register with a slow clock-to-out.
        out16 = [Signal(name=f"out16_{s}") for s in range(S - 1)]
        raw = [Signal(name=f"raw{s}") for s in range(S - 1)]

        rnd = Signal(reset_less=True)

        # The datapath never stalls (no enable on its registers): every beat is counted in on input
        # and out on output, and input is accepted only while the output FIFO has room for all beats
        # in flight. So i.ready comes from registers only, with no path from o.ready.
        depth = self.LATENCY + 1                    # every beat in flight, plus one: one beat per cycle
        m.submodules.out_fifo = out_fifo = CreditFIFO(RequantOutLayout(L, self._meta), depth)
        out_word = Signal(RequantOutLayout(L, self._meta))
        take = self.i.valid & out_fifo.room
        m.d.comb += [self.i.ready.eq(out_fifo.room), out_fifo.take.eq(take)]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))
        adv = 1
        # The input register: the payload with the raw-mode operands selected, and the take.
        p_in = self.i.payload
        p = Signal.like(p_in, reset_less=True)
        take_r = Signal()
        m.d.sync += [p.eq(p_in), take_r.eq(take)]
        for j in range(L):
            m.d.sync += [p.bias[j].eq(Mux(p_in.raw, 0, p_in.bias[j])),
                         p.mult[j].eq(Mux(p_in.raw, 1, p_in.mult[j]))]
        lo8, hi8 = numerics.int_range(numerics.ACT_BITS)
        lo16, hi16 = numerics.int_range(numerics.RES_BITS)
        with m.If(adv):
            m.d.sync += [v[0].eq(take_r), meta[0].eq(p.meta), out16[0].eq(p.out16), raw[0].eq(p.raw),
                         shift[0].eq(Mux(p.raw, 0, p.shift))]
            for s in range(1, S):
                m.d.sync += [v[s].eq(v[s - 1]), meta[s].eq(meta[s - 1])]
            for s in range(1, S - 1):
                m.d.sync += [out16[s].eq(out16[s - 1]), raw[s].eq(raw[s - 1])]
            for s in range(1, 5):
                m.d.sync += shift[s].eq(shift[s - 1])
            # The rounding's carry-in (shift != 0), decoded once for the lanes in stage 4.
            m.d.sync += rnd.eq(shift[3] != 0)
            for j in range(L):
                def reg(shape, name):
                    return Signal(shape, name=f"{name}{j}", reset_less=True)
                # 0: bias add; raw mode runs the same datapath as (acc + 0) * 1 >> 0 and skips saturation.
                s_sum = reg(signed(sum_bits), "sum")
                s_mult = reg(unsigned(numerics.MULT_BITS), "mult")
                m.d.sync += [s_sum.eq(p.acc[j] + p.bias[j]), s_mult.eq(p.mult[j])]
                # 1: partial products, one DSP48E2 each.
                rows = []
                for ia, a0 in enumerate(a_cuts):
                    top = ia == len(a_cuts) - 1
                    a = s_sum[a0:a0 + _A_CHUNK]
                    a = a.as_signed() if top else a
                    row = []
                    for ib, b0 in enumerate(b_cuts):
                        pp_expr = a * s_mult[b0:b0 + _B_CHUNK]
                        pp = reg(pp_expr.shape(), f"pp{ia}_{ib}_")
                        m.d.sync += pp.eq(pp_expr)
                        row.append((b0, pp))
                    rows.append((a0, row))
                # 2: each row's partial products into one value; 3: the rows into the product.
                row_sums = []
                for ia, (a0, row) in enumerate(rows):
                    expr = sum((pp << b0 for b0, pp in row[1:]), row[0][1])
                    rs = reg(expr.shape(), f"row{ia}_")
                    m.d.sync += rs.eq(expr)
                    row_sums.append((a0, rs))
                # Not reset-less on purpose: the low product bits pass pp -> row -> prod unchanged, and
                # a reset-less chain of three becomes a shift register (SRL) whose slow clock-to-out
                # (~1 ns) would start the 64-bit rounding adder.
                s_prod = Signal(prod_shape, name=f"prod{j}")
                m.d.sync += s_prod.eq(sum((rs << a0 for a0, rs in row_sums[1:]), row_sums[0][1]))
                # 4 and 5: round half up and shift, (x + 2**(s-1)) >> s, computed exactly as
                # ((2x >> s) + [s != 0]) >> 1 (floor((floor(x / 2**(s-1)) + 1) / 2) = floor((x + 2**(s-1))
                # / 2**s)), so no wide constant is added and the 0..63 barrel shift is split in two:
                # 4: 2x shifted by the multiple of 4 in s; 5: by the rest, then the carry-in; the final
                # >> 1 is wiring.
                v_shape = signed(prod_shape.width + 1)
                s_v = reg(v_shape, "v")
                m.d.sync += s_v.eq((s_prod << 1) >> Cat(Const(0, 2), shift[3][2:]))
                s_w = reg(signed(v_shape.width + 1), "w")
                m.d.sync += s_w.eq((s_v >> shift[4][:2]) + rnd)
                s_y = s_w[1:].as_signed()
                # 6: low bits and range flags (the upper bits all equal the sign).
                s_lo = reg(signed(numerics.ACC_BITS), "lo")
                fits8, fits16, neg = reg(1, "fits8_"), reg(1, "fits16_"), reg(1, "neg")
                # The range flags as two carry-chain compares each rather than all-equal trees over
                # the ~50 upper bits (6 LUT levels).
                m.d.sync += [s_lo.eq(s_y), neg.eq(s_y[-1]),
                             fits8.eq((s_y >= lo8) & (s_y <= hi8)),
                             fits16.eq((s_y >= lo16) & (s_y <= hi16))]
                # 7: saturate (raw mode passes the 32 bits: (acc + 0) * 1 >> 0 == acc).
                sat8 = Mux(fits8, s_lo[:numerics.ACT_BITS].as_signed(), Mux(neg, lo8, hi8))
                sat16 = Mux(fits16, s_lo[:numerics.RES_BITS].as_signed(), Mux(neg, lo16, hi16))
                s_out = reg(signed(numerics.ACC_BITS), "out")
                m.d.sync += s_out.eq(Mux(raw[S - 2], s_lo, Mux(out16[S - 2], sat16, sat8)))
                m.d.comb += out_word.data[j].eq(s_out)

        m.d.comb += [
            out_word.meta.eq(meta[S - 1]),
            out_fifo.w_data.eq(out_word),
            out_fifo.w_en.eq(v[S - 1]),
            self.busy.eq(out_fifo.busy),
        ]
        return m
