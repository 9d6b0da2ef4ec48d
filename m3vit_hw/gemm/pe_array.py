"""The PE array: ``rows x cols`` int8 MACs with int32 accumulators, output-stationary.

Dataflow
--------
Output-stationary with broadcast operands: PE ``(i, j)`` owns output element ``C[i, j]`` of the current
tile and, each cycle, adds ``a[i] * b[j]``, where ``a`` is one *column* of the A tile (one element per
row, all at the same ``k``) and ``b`` one *row* of the B tile. After ``K`` beats every PE holds its
complete sum.

Why output-stationary for :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine`:

* The epilogue needs *complete* int32 sums: bias add and requantization are per output column, the
  AV normalisation and the MoE combine are per output row, and scatter writes whole output rows. An
  output-stationary array finishes a ``rows x cols`` tile in place, with no partial-sum traffic, for
  any ``K`` (weight- or input-stationary arrays would spill and re-read partial sums whenever
  ``K > rows``).
* ``K`` is free: it is just the number of beats, so K tails need no padding and the largest K of the
  model (the AV product over all tokens) costs nothing extra.
* Gather fits naturally: the ``rows`` A values of a beat may come from ``rows`` unrelated tokens.
* The unsigned-A flag (AV product) applies to the streamed operand, per beat.

Finished tiles move in one cycle into a *shadow bank* (one register per PE) that drains one output row
per cycle while the next tile accumulates, so the MACs only wait when a tile is shorter than its
drain (``K <= rows_valid``).

Numerics: ``a`` is an 8-bit pattern read as int8 or, with ``a_unsigned``, as uint8 (attention
weights e8); either way it is a 9-bit signed operand, so ``a * b`` is a 9x8-bit signed product (one
DSP48E2) that fits 17 bits, accumulated in ``ACC_BITS`` = 32 bits. The caller guarantees that K cannot
overflow the accumulator (:class:`~m3vit_hw.config.AcceleratorConfig` checks it for the model);
overflow wraps.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int

__all__ = ["PEArray", "OperandLayout", "ResultLayout"]


class OperandLayout(data.StructLayout):
    """One beat of operands for :class:`PEArray`.

    Fields
    ------
    a : ArrayLayout(unsigned(ACT_BITS), rows)
        One column of the A tile: element ``i`` feeds PE row ``i``. Raw 8-bit patterns, read as int8,
        or as uint8 when ``a_unsigned`` is set.
    b : ArrayLayout(signed(WEIGHT_BITS), cols)
        One row of the B tile: element ``j`` feeds PE column ``j``.
    a_unsigned : 1
        Zero-extend ``a`` instead of sign-extending it.
    first : 1
        First beat of a tile: the accumulators restart from this beat's product.
    last : 1
        Last beat of a tile: the finished sums move to the shadow bank.
    rows_valid : range(rows + 1)
        Sampled with ``last``: how many result rows (``1 .. rows``, from row 0) to drain.
    """

    def __init__(self, rows, cols):
        super().__init__({
            "a": data.ArrayLayout(unsigned(numerics.ACT_BITS), rows),
            "b": data.ArrayLayout(signed(numerics.WEIGHT_BITS), cols),
            "a_unsigned": 1,
            "first": 1,
            "last": 1,
            "rows_valid": range(rows + 1),
        })


class ResultLayout(data.StructLayout):
    """One drained row of a finished tile.

    Fields
    ------
    acc : ArrayLayout(signed(ACC_BITS), cols)
        The row's sums, column ``j`` in element ``j``.
    row : range(rows)
        Row index within the tile (0, 1, ... in order).
    last : 1
        This is the tile's last drained row (``row == rows_valid - 1``).
    """

    def __init__(self, rows, cols):
        super().__init__({
            "acc": data.ArrayLayout(signed(numerics.ACC_BITS), cols),
            "row": range(rows),
            "last": 1,
        })


class PEArray(wiring.Component):
    """``rows x cols`` output-stationary int8 MAC array with a shadow result bank.

    Parameters
    ----------
    rows : int
        PE rows (output rows per tile), in ``[1, 256]``.
    cols : int
        PE columns (output columns per tile), in ``[1, 256]``.

    Interface attributes
    --------------------
    i : In(stream.Signature(OperandLayout(rows, cols)))
        Operand beats. A tile is the beats from one with ``first`` to the next with ``last`` (a
        one-beat tile has both). ``ready`` is low only while a ``last`` beat waits for the shadow
        bank (the previous tile has not drained yet); it does not depend on ``i.valid`` or ``o.ready``
        in the same cycle.
    o : Out(stream.Signature(ResultLayout(rows, cols)))
        Finished rows, ``rows_valid`` of them per tile, in tile order and row order, each exactly
        once. ``valid`` does not wait on ``ready``.
    busy : Out(1)
        A beat or a result is anywhere in the array.

    Latency and throughput
    ----------------------
    One beat per cycle. The first row of a tile is offered 3 cycles after its ``last`` beat is
    accepted (operand register, product register, accumulate). A tile of ``K`` beats never stalls the
    array if ``K > rows_valid`` of the previous tile and ``o`` is always ready; otherwise ``i.ready``
    drops until the shadow bank is free.

    Raises
    ------
    TypeError, ValueError
        If ``rows`` or ``cols`` is not an integer in ``[1, 256]``.
    """

    def __init__(self, rows, cols):
        check_int("rows", rows, 1, 256)
        check_int("cols", cols, 1, 256)
        self._rows = rows
        self._cols = cols
        super().__init__({
            "i": In(stream.Signature(OperandLayout(rows, cols))),
            "o": Out(stream.Signature(ResultLayout(rows, cols))),
            "busy": Out(1),
        })

    @property
    def rows(self):
        return self._rows

    @property
    def cols(self):
        return self._cols

    def elaborate(self, platform):
        m = Module()
        R, C = self._rows, self._cols
        acc_shape = signed(numerics.ACC_BITS)
        # 9 x 8 signed product: |p| <= 255 * 128 fits 17 bits.
        prod_shape = signed(numerics.ACT_BITS + 1 + numerics.WEIGHT_BITS)

        # Stage P: operand registers (the DSP48E2 A/B registers). The 8-bit A pattern is widened
        # here to a 9-bit signed value so the multiplier never needs to know the format.
        p_valid = Signal()
        p_first = Signal()
        p_last = Signal()
        p_rows = Signal(range(R + 1))
        p_a = [Signal(signed(numerics.ACT_BITS + 1), name=f"p_a{i}") for i in range(R)]
        p_b = [Signal(signed(numerics.WEIGHT_BITS), name=f"p_b{j}") for j in range(C)]

        # Stage M: product registers (the DSP M register).
        m_valid = Signal()
        m_first = Signal()
        m_last = Signal()
        m_rows = Signal(range(R + 1))
        m_p = [[Signal(prod_shape, name=f"m_p{i}_{j}") for j in range(C)] for i in range(R)]

        # Accumulators (the DSP P register) and the shadow bank.
        acc = [[Signal(acc_shape, name=f"acc{i}_{j}") for j in range(C)] for i in range(R)]
        shadow = [[Signal(acc_shape, name=f"sh{i}_{j}") for j in range(C)] for i in range(R)]
        drain_left = Signal(range(R + 1))
        drain_row = Signal(range(R))

        # The only stall: a finished tile whose shadow bank is still draining. Computed from
        # registers only, so i.ready has no combinational path from o.ready.
        stall = m_valid & m_last & (drain_left != 0)
        adv = ~stall
        m.d.comb += self.i.ready.eq(adv)

        with m.If(adv):
            take = self.i.valid
            m.d.sync += [
                p_valid.eq(take),
                p_first.eq(self.i.payload.first),
                p_last.eq(self.i.payload.last & take),
                p_rows.eq(self.i.payload.rows_valid),
            ]
            with m.If(take):
                for i in range(R):
                    a = self.i.payload.a[i]
                    m.d.sync += p_a[i].eq(Mux(self.i.payload.a_unsigned, a.as_unsigned(), a.as_signed()))
                for j in range(C):
                    m.d.sync += p_b[j].eq(self.i.payload.b[j])

            m.d.sync += [
                m_valid.eq(p_valid),
                m_first.eq(p_first),
                m_last.eq(p_last & p_valid),
                m_rows.eq(p_rows),
            ]
            with m.If(p_valid):
                for i in range(R):
                    for j in range(C):
                        m.d.sync += m_p[i][j].eq(p_a[i] * p_b[j])

            with m.If(m_valid):
                for i in range(R):
                    for j in range(C):
                        total = Mux(m_first, 0, acc[i][j]) + m_p[i][j]
                        m.d.sync += acc[i][j].eq(total)
                        with m.If(m_last):
                            m.d.sync += shadow[i][j].eq(total)
                with m.If(m_last):
                    m.d.sync += [drain_left.eq(m_rows), drain_row.eq(0)]

        # Drain: the shadow bank is a shift register along rows, so the output is always row 0 and
        # no wide row multiplexer is needed.
        m.d.comb += [
            self.o.valid.eq(drain_left != 0),
            self.o.payload.row.eq(drain_row),
            self.o.payload.last.eq(drain_left == 1),
        ]
        for j in range(C):
            m.d.comb += self.o.payload.acc[j].eq(shadow[0][j])
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [drain_left.eq(drain_left - 1), drain_row.eq(drain_row + 1)]
            for i in range(R - 1):
                for j in range(C):
                    m.d.sync += shadow[i][j].eq(shadow[i + 1][j])

        m.d.comb += self.busy.eq(p_valid | m_valid | (drain_left != 0))
        return m
