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
per cycle, through a row multiplexer and two registers, while the next tile accumulates.

No stall inside the array (credits)
-----------------------------------
The datapath registers have no enable: operand, product and accumulator registers load every cycle
(an idle cycle multiplies by a zeroed operand, adding nothing), and no ``stall`` net fans out to the
accumulators. Instead the shadow bank is a credit taken at the input: a ``last`` beat is accepted only
while the shadow bank is empty and no other ``last`` beat is in flight, so it can always load when
the tile's final sums arrive. Every other beat is always accepted.

DSP packing (``pack = 2``)
--------------------------
Two int8 MACs per DSP48E2 with a shared operand (the Xilinx WP486 technique): PE columns ``2q`` and
``2q + 1`` share ``a[i]``, and one multiplier computes ``a * (b[2q] * 2**S + b[2q+1])`` with
``S = numerics.PE_PACK_SHIFT`` = 16 (the packed operand fits 25 bits: the DSP48E2's 27-bit port, and
the DSP48E1's too). The packed operand is built once per column pair and broadcast down the column.
The 48-bit accumulator (the DSP's P register) then holds ``H * 2**S + L`` exactly (modulo
``2**48``), with ``H``, ``L`` the two columns' sums. ``L`` outgrows its 16-bit field after a few
beats, so a small fabric tracker per multiplier extends it every cycle: one product changes ``L`` by
less than ``2**(S-1)``, so the field wraps exactly when its top bit flips against the product's sign
(known from the operands' signs), and a 16-bit wrap count takes the carry (+1) or borrow (-1): the
*spill* of the low field, ``L = wrap * 2**S + (P mod 2**S)``. No separate
sign correction is needed in the DSP: when the tile's rows are drained, ``H = (P >> S) - (L >> S)``
(the exact correction for the low field's sign and wraps), computed on the output row only.
So the accumulator never restarts mid-tile and any K is exact (K = 1,201, W2's AV product, and
beyond) as long as both sums fit int32, which the config guarantees as before.

Numerics: ``a`` is an 8-bit pattern read as int8 or, with ``a_unsigned``, as uint8 (attention
weights e8); either way it is a 9-bit signed operand, so ``a * b`` is a 9x8-bit signed product that fits
17 bits, accumulated in ``ACC_BITS`` = 32 bits. The caller guarantees that K cannot overflow the
accumulator (:class:`~m3vit_hw.config.AcceleratorConfig` checks it for the model); overflow wraps.
"""

from amaranth.hdl import Array, Assert, Cat, Module, Mux, Signal, signed, unsigned
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
        PE columns (output columns per tile), in ``[1, 256]``; even when ``pack`` is 2.
    pack : int
        int8 MACs per multiplier (DSP48E2): 1, or 2 (shared-operand packing, see the module
        docstring). The interface and the results are the same either way.
    drain_interval : int
        Fewest cycles between two output rows: 1, or 2 for a consumer that takes a row at most every
        other cycle anyway (the GEMM engine when a row leaves as two or more epilogue beats). With 2
        the shadow bank moves a row into the row register only when that is empty, so ``o.ready``
        reaches only the output stage and not the shadow bank's counters or the row move, which
        enables about ``cols * ACC_BITS`` row-register flip-flops (a path through two such nets
        missed 300 MHz in the W1 top). Same latency; results and their order are the same.

    Interface attributes
    --------------------
    i : In(stream.Signature(OperandLayout(rows, cols)))
        Operand beats. A tile is the beats from one with ``first`` to the next with ``last`` (a
        one-beat tile has both). ``ready`` is low only while the payload is a ``last`` beat and the
        shadow bank is not free (it holds rows of a previous tile, or another ``last`` beat is in
        flight); it depends on ``i.payload.last`` and registers, not on ``i.valid`` or ``o.ready``.
    o : Out(stream.Signature(ResultLayout(rows, cols)))
        Finished rows, ``rows_valid`` of them per tile, in tile order and row order, each exactly
        once. ``valid`` and the payload come from a register; ``valid`` does not wait on ``ready``.
    busy : Out(1)
        A beat or a result is anywhere in the array.
    credit : Out(1)
        The shadow-bank credit, a flip-flop: a ``last`` beat is accepted in this cycle exactly when it
        is high (``i.ready = ~i.payload.last | credit``). A feeder that decides its next step a cycle
        ahead uses it instead of ``i.ready``.

    Latency and throughput
    ----------------------
    One beat per cycle. The first row of a tile is offered :attr:`latency` cycles after its ``last``
    beat is accepted: 4 with ``pack`` 1 (operand register, product register, accumulator, row
    register: row 0 bypasses the shadow bank when the row register is free), 6 with ``pack`` 2
    (shadow bank and an output register that corrects the high column). Rows leave at most one per
    ``drain_interval`` cycles. With ``o`` always ready, a tile never waits if it has at least
    ``drain_interval * rows_valid + 4`` beats of the previous tile's; otherwise its ``last`` beat
    waits until the previous tile's rows have left the shadow bank.

    Raises
    ------
    TypeError, ValueError
        If ``rows`` or ``cols`` is not an integer in ``[1, 256]``, ``pack`` or ``drain_interval``
        not 1 or 2, or ``cols`` odd with ``pack`` 2.
    """


    def __init__(self, rows, cols, pack=1, drain_interval=1):
        check_int("rows", rows, 1, 256)
        check_int("cols", cols, 1, 256)
        check_int("pack", pack, 1, 2)
        check_int("drain_interval", drain_interval, 1, 2)
        if pack == 2 and cols % 2:
            raise ValueError(f"cols must be even with pack=2 (two columns share a DSP), not {cols}")
        self._rows = rows
        self._cols = cols
        self._pack = pack
        self._drain_interval = drain_interval
        super().__init__({
            "i": In(stream.Signature(OperandLayout(rows, cols))),
            "o": Out(stream.Signature(ResultLayout(rows, cols))),
            "busy": Out(1),
            "credit": Out(1),
        })

    @property
    def rows(self):
        return self._rows

    @property
    def cols(self):
        return self._cols

    @property
    def pack(self):
        return self._pack

    @classmethod
    def from_config(cls, config):
        """The array of an ``AcceleratorConfig``, as the GEMM engine drains it: ``pe_rows x pe_cols``,
        ``pe_pack``, and ``drain_interval`` 2 when a row leaves as two or more epilogue beats
        (``config.epi_beats``), so the array drains no slower than the epilogue takes rows."""
        return cls(config.pe_rows, config.pe_cols, config.pe_pack, drain_interval=min(config.epi_beats, 2))

    @property
    def drain_interval(self):
        return self._drain_interval

    @property
    def latency(self):
        """Cycles from accepting a tile's ``last`` beat to offering its first row (4, or 6 with
        ``pack`` 2) when ``o`` is ready."""
        return 4 if self._pack == 1 else 6

    @property
    def multipliers(self):
        """Multipliers (DSP48E2s) of the array: ``rows * cols / pack``."""
        return self._rows * self._cols // self._pack

    def elaborate(self, platform):
        m = Module()
        R, C, K2 = self._rows, self._cols, self._pack
        Q = C // K2                                  # multipliers per row
        S = numerics.PE_PACK_SHIFT
        acc_bits = numerics.ACC_BITS
        a_shape = signed(numerics.ACT_BITS + 1)
        if K2 == 1:
            b_shape = signed(numerics.WEIGHT_BITS)
            # 9 x 8 signed product: |p| <= 255 * 128 fits 17 bits.
            prod_shape = signed(numerics.ACT_BITS + 1 + numerics.WEIGHT_BITS)
            p_shape = signed(acc_bits)
        else:
            # b_hi * 2**S + b_lo spans [-2**(W+S-1) - 2**(W-1), ...]: one bit more than b_hi * 2**S.
            b_shape = signed(numerics.WEIGHT_BITS + S + 1)
            prod_shape = signed(numerics.ACT_BITS + 1 + numerics.WEIGHT_BITS + S + 1)
            # The DSP48E2's P register; H needs bits S .. S + ACC_BITS of it (modulo 2**48 is exact).
            p_shape = signed(48)
            assert S + acc_bits <= 48

        # ---- control: valid/first/last travel with the beat; they keep their reset ------------
        p_valid, m_valid, u_valid = Signal(), Signal(), Signal()
        p_first, m_first, u_first = Signal(), Signal(), Signal()
        p_last, m_last, u_last = Signal(), Signal(), Signal()
        p_rows = Signal(range(R + 1))
        m_rows = Signal(range(R + 1))
        u_rows = Signal(range(R + 1))

        # ---- datapath: reset-less, no enable ------------------------------------------------
        # Stage P: operand registers (the DSP A/B registers). The 8-bit A pattern is widened here
        # to a 9-bit signed value so the multiplier never needs to know the format; B (packed in
        # pairs when K2 == 2) is zeroed on idle cycles, so idle products add nothing.
        p_a = [Signal(a_shape, name=f"p_a{i}", reset_less=True) for i in range(R)]
        p_b = [Signal(b_shape, name=f"p_b{q}", reset_less=True) for q in range(Q)]
        # Stage M: product registers (the DSP M register).
        m_p = [[Signal(prod_shape, name=f"m_p{i}_{q}", reset_less=True) for q in range(Q)]
               for i in range(R)]
        # Accumulators (the DSP P register).
        acc = [[Signal(p_shape, name=f"acc{i}_{q}", reset_less=True) for q in range(Q)]
               for i in range(R)]
        # K2 == 2: the low column's sum L = wrap * 2**S + (P's low field), tracked in stage U: the
        # wrap count (L >> S) and the low field's top bit of the previous cycle.
        wrap = [[Signal(signed(acc_bits - S), name=f"wrap{i}_{q}", reset_less=True) for q in range(Q)]
                for i in range(R)] if K2 == 2 else None
        top = [[Signal(name=f"top{i}_{q}", reset_less=True) for q in range(Q)]
               for i in range(R)] if K2 == 2 else None
        # The sign of each low-column product, as the sign of its operands, kept per row and per
        # column pair (not per multiplier) along the P, M and U stages.
        m_aneg = [Signal(name=f"m_aneg{i}", reset_less=True) for i in range(R)]
        # The U copies keep their reset so the chains stay flip-flops, not shift registers (SRLs)
        # with a slow clock-to-out (docs/timing.md).
        u_aneg = [Signal(name=f"u_aneg{i}") for i in range(R)]
        p_bneg = [Signal(name=f"p_bneg{q}", reset_less=True) for q in range(Q)]
        m_bneg = [Signal(name=f"m_bneg{q}", reset_less=True) for q in range(Q)]
        u_bneg = [Signal(name=f"u_bneg{q}") for q in range(Q)]
        # Shadow bank: per multiplier, the high word (P >> S, or the whole sum when K2 == 1) and L.
        sh_hi = [[Signal(signed(acc_bits), name=f"sh{i}_{q}", reset_less=True) for q in range(Q)]
                 for i in range(R)]
        sh_lo = [[Signal(signed(acc_bits), name=f"shl{i}_{q}", reset_less=True) for q in range(Q)]
                 for i in range(R)] if K2 == 2 else None
        sh_left = Signal(range(R + 1))
        sh_row = Signal(range(R))
        # Output register.
        o_valid = Signal()
        o_last = Signal()
        o_row = Signal(range(R))
        o_acc = [Signal(signed(acc_bits), name=f"o_acc{j}", reset_less=True) for j in range(C)]

        # ---- input: the shadow-bank credit -------------------------------------------------
        # A last beat needs an empty shadow bank and no other last beat in flight; it then finds the
        # bank empty when it arrives, because nothing else loads it. The credit is a flip-flop of its
        # own, computed a cycle ahead from the next values of sh_left and the last flags (set below),
        # so ready is one gate of the payload's last flag and a register: the loader's advance chain
        # and the engine's beat counters never see the tile-last pipeline.
        credit = Signal(init=1)
        m.d.comb += [self.i.ready.eq(~self.i.payload.last | credit), self.credit.eq(credit)]
        take = self.i.valid & self.i.ready
        pl = self.i.payload
        m.d.sync += [
            p_valid.eq(take),
            p_first.eq(pl.first & take),
            p_last.eq(pl.last & take),
            p_rows.eq(pl.rows_valid),
            m_valid.eq(p_valid), m_first.eq(p_first), m_last.eq(p_last), m_rows.eq(p_rows),
            u_valid.eq(m_valid), u_first.eq(m_first), u_last.eq(m_last), u_rows.eq(m_rows),
        ]
        for i in range(R):
            a = pl.a[i]
            m.d.sync += p_a[i].eq(Mux(pl.a_unsigned, a.as_unsigned(), a.as_signed()))
        for q in range(Q):
            if K2 == 1:
                packed = pl.b[q]
            else:
                # The pre-adder of WP486, once per column pair: b_hi * 2**S + b_lo.
                packed = (pl.b[2 * q] << S) + pl.b[2 * q + 1]
            m.d.sync += p_b[q].eq(Mux(take, packed, 0))
            if K2 == 2:
                m.d.sync += [p_bneg[q].eq(pl.b[2 * q + 1][-1]), m_bneg[q].eq(p_bneg[q]),
                             u_bneg[q].eq(m_bneg[q])]
        if K2 == 2:
            for i in range(R):
                m.d.sync += [m_aneg[i].eq(p_a[i][-1]), u_aneg[i].eq(m_aneg[i])]

        # ---- M and P: multiply, accumulate (no enable: idle products are 0) ------------------
        for i in range(R):
            for q in range(Q):
                m.d.sync += m_p[i][q].eq(p_a[i] * p_b[q])
                m.d.sync += acc[i][q].eq(Mux(m_first, 0, acc[i][q]) + m_p[i][q])

        # ---- U: extend the low field (K2 == 2); load the shadow bank from the P registers -----
        for i in range(R):
            for q in range(Q):
                p = acc[i][q]
                if K2 == 1:
                    with m.If(u_last):
                        m.d.sync += sh_hi[i][q].eq(p)
                    continue
                # One product d changes L by |d| < 2**(S-1), so the low field wraps exactly when its
                # top bit flips against the direction of d: 1 -> 0 with d >= 0 is a carry out (+1),
                # 0 -> 1 with d < 0 a borrow (-1). d's sign is its operands' sign: when d = 0 the
                # field does not move, so a zero operand's sign does not matter.
                neg = u_aneg[i] ^ u_bneg[q]
                cur = p[S - 1]
                prev = top[i][q] & ~u_first
                carry = ~neg & prev & ~cur
                borrow = neg & ~prev & cur
                new_wrap = Signal(signed(acc_bits - S), name=f"wn{i}_{q}")
                # One adder: the step (-1, 0, +1) as a single operand (carry and borrow exclude
                # each other), so the tracker is one short carry chain behind one LUT level.
                step = Mux(borrow, -1, carry)
                m.d.comb += new_wrap.eq(Mux(u_first, 0, wrap[i][q]) + step)
                m.d.sync += [wrap[i][q].eq(new_wrap), top[i][q].eq(cur)]
                with m.If(u_last):
                    m.d.sync += [sh_hi[i][q].eq(p[S:S + acc_bits]), sh_lo[i][q].eq(Cat(p[:S], new_wrap))]
        with m.If(u_last):
            m.d.sync += [sh_left.eq(u_rows), sh_row.eq(0)]

        # ---- drain: shadow row sh_row -> row register (-> output register, pack 2) ------------
        # A row multiplexer rather than a shift register: the shadow registers then only load (an
        # enable, no multiplexer in front of each of them), and the R:1 multiplexer per output bit
        # costs about R/3 LUTs instead of R. It gets a cycle of its own; pack 2's decode another.
        d_valid = Signal()
        d_last = Signal()
        d_row = Signal(range(R))
        d_hi = [Signal(signed(acc_bits), name=f"d_hi{q}", reset_less=True) for q in range(Q)]
        d_lo = [Signal(signed(acc_bits), name=f"d_lo{q}", reset_less=True) for q in range(Q)]
        if K2 == 1:
            adv_d = ~d_valid | self.o.ready
        else:
            adv_o = ~o_valid | self.o.ready
            adv_d = ~d_valid | adv_o
        # The row register takes the next shadow row when it is free: as it empties (interval 1),
        # or once it is empty (interval 2: flip-flops only, no o.ready).
        d_free = adv_d if self._drain_interval == 1 else ~d_valid
        # sh_nz is sh_left != 0 as a register (set with sh_left): the row move, which enables every
        # row register, is then one LUT of flip-flops and the output ready.
        sh_nz = Signal()
        m.d.comb += Assert(sh_nz == (sh_left != 0), "PEArray: sh_nz register out of step with sh_left")
        with m.If(u_last):
            m.d.sync += sh_nz.eq(u_rows != 0)
        move = sh_nz & d_free
        with m.If(move):
            m.d.sync += [d_valid.eq(1), d_row.eq(sh_row), d_last.eq(sh_left == 1),
                         sh_left.eq(sh_left - 1), sh_row.eq(sh_row + 1), sh_nz.eq(sh_left != 1)]
            for q in range(Q):
                m.d.sync += d_hi[q].eq(Array(sh_hi[i][q] for i in range(R))[sh_row])
                if K2 == 2:
                    m.d.sync += d_lo[q].eq(Array(sh_lo[i][q] for i in range(R))[sh_row])
        with m.Elif(adv_d):
            m.d.sync += d_valid.eq(0)
        if K2 == 1:
            # Bypass: a tile's row 0 goes from the P registers straight to the row register when that
            # is free, a cycle earlier than through the shadow bank (the shadow bank is empty then:
            # the credit). Not for pack 2, where row 0 would need the tracker's adder first.
            with m.If(u_last & d_free):
                m.d.sync += [d_valid.eq(1), d_row.eq(0), d_last.eq(u_rows == 1),
                             sh_left.eq(u_rows - 1), sh_row.eq(1), sh_nz.eq(u_rows > 1)]
                m.d.sync += [d_hi[q].eq(acc[0][q]) for q in range(Q)]
            m.d.comb += [o_valid.eq(d_valid), o_row.eq(d_row), o_last.eq(d_last)]
            m.d.comb += [o_acc[q].eq(d_hi[q]) for q in range(Q)]
        else:
            with m.If(adv_o):
                m.d.sync += [o_valid.eq(d_valid), o_row.eq(d_row), o_last.eq(d_last)]
                for q in range(Q):
                    # H = (P >> S) - (L >> S): the low sum's sign and wraps taken out of the high one.
                    lo = d_lo[q]
                    m.d.sync += [o_acc[2 * q].eq(d_hi[q] - lo[S:].as_signed()), o_acc[2 * q + 1].eq(lo)]

        m.d.comb += [
            self.o.valid.eq(o_valid),
            self.o.payload.row.eq(o_row),
            self.o.payload.last.eq(o_last),
        ]
        for j in range(C):
            m.d.comb += self.o.payload.acc[j].eq(o_acc[j])
        m.d.comb += self.busy.eq(p_valid | m_valid | u_valid | sh_nz | d_valid | o_valid)

        # The credit of the next cycle: (sh_left == 0) & ~p_last & ~m_last & ~u_last as they will be.
        # sh_left loads u_rows (>= 1) on u_last, except through pack 1's row-0 bypass (u_rows - 1);
        # otherwise it counts down by one per move.
        if K2 == 1:
            sh_zero_next = Mux(u_last, d_free & (u_rows == 1), ~sh_nz | ((sh_left == 1) & move))
        else:
            sh_zero_next = ~u_last & (~sh_nz | ((sh_left == 1) & move))
        m.d.sync += credit.eq(sh_zero_next & ~(take & pl.last) & ~p_last & ~m_last)
        # In simulation: the register equals the credit computed from the current state.
        m.d.comb += Assert(credit == ((sh_left == 0) & ~p_last & ~m_last & ~u_last),
                           "PEArray: credit register out of step with the shadow bank")
        return m
