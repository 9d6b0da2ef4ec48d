"""Streaming integer softmax for attention rows and router rows, sharing one exp datapath.

Bit-exact with ``reference/golden.py``: ``attention_weights`` and ``attention_recip`` in attention mode,
``router_probs`` in router mode. Both modes use the same base-2 exponent ``softmax_exp``::

    t = ((max(row) - s) * c_mult) >> c_shift
    e16 = exp2_lut[t & 255] >> (t >> 8)     or 0 when t >> 8 >= EXP_ZERO_INT

Each row takes three passes, and consecutive rows overlap:

1. **Max pass.** Score beats stream in and are written to a circular *score buffer*, while the row
   maximum is reduced across lanes and beats.
2. **Exp pass.** The row is read back. The unit computes e16 per lane and writes it to a circular
   *exp buffer*, while it accumulates the row sum: ``l = sum(e8)`` for attention, ``sum(e16)`` for the
   router. The sum then goes through one sequential :class:`~m3vit_hw.lib.divider.Divider`:
   ``floor(out_mult * 2**AV_RECIP_BITS / l)`` (attention) or ``floor(2**ROUTER_RECIP_BITS / sum)``
   (router).
3. **Output pass.** The exp row is read back and emitted. Attention emits
   ``e8 = min(255, round_shift(e16, 7))``; the router emits ``p = round_shift(e16 * R, 16)``.

The buffers are circular FIFOs of beats, sized for a row of ``max_length`` plus the lag of the pass that
reads them. The max pass of row i+1 therefore runs while the exp and output passes of rows i, i-1, ...
are still in progress.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int
from ..numerics import SHIFT_BITS
from ..lib.credit_fifo import CreditFIFO
from ..lib.divider import PIPELINED_FIFO_LATENCY, Divider
from .counts import below_next, thermometer_step

__all__ = ["SoftmaxMode", "SoftmaxUnit", "ROWS_BITS", "OUT_BITS", "RECIP_BITS", "MAX_LENGTH"]

#: Width of the per-command row count.
ROWS_BITS = 16
#: Output lanes carry e8 (<= 255) or a Q0.ROUTER_P_FRAC probability (<= 2**ROUTER_P_FRAC inclusive).
OUT_BITS = numerics.COMBINE_WEIGHT_BITS
#: Largest supported ``max_length`` (the sums and buffers scale with it).
MAX_LENGTH = 1 << 16

_E8_MAX = (1 << numerics.ATTN_P_BITS) - 1
_E16_ONE = 1 << numerics.EXP_LUT_BITS                 # e16 of the row maximum
# The row sum's lower bound: the row maximum alone contributes 255 (e8) or 2**15 (e16).
# Quotient widths follow from these bounds.
_ATTN_RECIP_MAX = (((1 << numerics.AV_OUT_MULT_BITS) - 1) << numerics.AV_RECIP_BITS) // _E8_MAX
_ROUTER_RECIP_MAX = (1 << numerics.ROUTER_RECIP_BITS) // _E16_ONE
#: Width of the per-row divider quotient ``o.payload.recip``. The attention multiplier needs 25 bits:
#: ``(2**16 - 1) * 2**16 // 255`` is just above ``2**24``.
RECIP_BITS = max(_ATTN_RECIP_MAX, _ROUTER_RECIP_MAX).bit_length()
# Both dividends, out_mult * 2**AV_RECIP_BITS and 2**ROUTER_RECIP_BITS, end in at least _DIV_SHIFT zero
# bits: the divider takes only the bits above them (Divider's dividend_shift), so its pipeline holds no
# constant dividend bits (yosys removed them one stage per opt iteration, a long pass of the device build).
_DIV_SHIFT = min(numerics.AV_RECIP_BITS, numerics.ROUTER_RECIP_BITS)
_DIVIDEND_BITS = max(numerics.AV_OUT_MULT_BITS + numerics.AV_RECIP_BITS,
                     numerics.ROUTER_RECIP_BITS + 1) - _DIV_SHIFT

# Slack, in beats, between a pass's reader and writer, beyond the row itself:
# score buffer: the exp pass's first read of a row comes 4 cycles (plus the max tree's extra stages,
# added where the depth is computed) after the row's last write, and a write needs a free slot, so a
# row needs 5 slots beyond its own; 3 more are margin (one of them the slot the score count's
# one-cycle lag keeps in hand).
_SCORE_SLACK = 8
# exp buffer: the exp pass reserves a slot when it reads a beat. The slot is freed when the output
# pass reads it, 8 cycles plus the lane-sum tree stages plus 3 plus the divider latency after the
# row's last reservation (the tree stages and the 3 are added where the depth is computed; the exp
# shift's second stage and the sum register add a cycle each, the sum queue, a CreditFIFO, saves
# one). A reservation needs a free slot, so a row needs 9 slots beyond its own and the divider
# latency; 2 more are margin.
_EXP_SLACK = 11
#: Low chunk of the exp distance for the c_mult product: 26 unsigned bits fit the DSP48E2's 27-bit
#: signed multiplier input.
_D_CHUNK = 26
# Rows that may wait between passes: row descriptors (max pass -> exp pass) and row sums
# (exp pass -> divider). Short rows (the router's E experts) need several in flight: about as many
# as the cycles from a row's exp-pass start to its divider issue.
_QUEUE_DEPTH = 8


class SoftmaxMode(enum.Enum, shape=1):
    """What a command's rows are."""
    #: Score rows -> unnormalised e8 weights, the row sum l and the AV multiplier.
    ATTENTION = 0
    #: Gate-logit rows -> Q0.15 probabilities.
    ROUTER = 1


def _incr(ptr, depth):
    return Mux(ptr == depth - 1, 0, ptr + 1)


class SoftmaxUnit(wiring.Component):
    """Row softmax for attention scores and router logits, ``lanes`` elements per beat.

    Parameters
    ----------
    lanes : int
        Elements per beat on ``i`` and ``o``, >= 1.
    max_length : int
        Longest row, in [1, 65536]: the token capacity for attention rows, and at least the expert
        count for router rows. It sizes the buffers.
    div_bits_per_cycle : int or None
        Quotient bits per cycle of an iterative per-row divider, in [1, 8] (values above 1 lengthen
        the critical path beyond 300 MHz). ``None`` (the default) uses the pipelined divider: one
        compare-subtract per register stage and a new row every cycle.

    Interface attributes
    --------------------
    cmd : In(stream.Signature(StructLayout({...})))
        Commands, each covering ``rows`` consecutive rows, with fields:

        * ``mode`` (:class:`SoftmaxMode`): attention or router;
        * ``length`` (``unsigned``): elements per row, in [1, max_length]. A larger value is clamped
          to ``max_length`` (a row that does not fit in the score buffer would deadlock). Length 0 is
          not allowed.
        * ``rows`` (``unsigned(ROWS_BITS)``): number of rows (0 makes the command a no-op);
        * ``c_mult`` (``unsigned(SOFTMAX_MULT_BITS)``) and ``c_shift`` (``unsigned(SHIFT_BITS)``): the
          exponent scale of ``softmax_exp``;
        * ``out_mult`` (``unsigned(AV_OUT_MULT_BITS)``): the AV numerator of ``attention_recip``
          (ignored for router rows).

        A command is accepted as soon as the previous one has taken its last input beat.
    i : In(stream.Signature(ArrayLayout(signed(ACC_BITS), lanes)))
        Row elements. A row of ``length`` elements is ``ceil(length / lanes)`` beats. Lane ``j`` of
        beat ``b`` is element ``b * lanes + j``. The lanes past the end of the row, in its last beat,
        are ignored.
    o : Out(stream.Signature(StructLayout({...})))
        Results, beat for beat in the order of ``i``, with fields:

        * ``data`` (``ArrayLayout(unsigned(OUT_BITS), lanes)``): e8 weights (attention) or Q0.15
          probabilities (router). Lanes past the end of the row read 0.
        * ``last`` (1 bit): set on a row's last beat.
        * ``row_sum`` (``unsigned``): on the last beat, ``l = sum(e8)`` (attention) or ``sum(e16)``
          (router); otherwise 0.
        * ``recip`` (``unsigned(RECIP_BITS)``): on the last beat,
          ``attention_recip(l, out_mult)`` (attention) or ``R = floor(2**31 / sum(e16))`` (router);
          otherwise 0.

    Throughput
    ----------
    One beat per cycle in and out, sustained across rows and commands, for rows of at least
    :attr:`min_row_beats` beats (the divider period). There is no per-row bubble in any pass. A row's
    last beat may be partial, so the element rate is ``length / ceil(length / lanes)`` per cycle.
    Shorter rows, such as router rows of E = 16 experts, run at one row per ``min_row_beats`` cycles.
    From the last input beat of a row to its first output beat, the latency is
    :meth:`row_latency` cycles when nothing stalls: ``ceil(length / lanes) + 19`` plus the lane max
    tree stages, the lane-sum tree stages and the divider latency.

    Raises
    ------
    TypeError, ValueError
        On a parameter outside the ranges above.
    """

    def __init__(self, lanes, max_length, *, div_bits_per_cycle=None):
        check_int("lanes", lanes, 1)
        check_int("max_length", max_length, 1, MAX_LENGTH)
        if div_bits_per_cycle is not None:
            if not isinstance(div_bits_per_cycle, int) or isinstance(div_bits_per_cycle, bool):
                raise TypeError("div_bits_per_cycle must be an integer or None, "
                                f"not {div_bits_per_cycle!r}")
            if not 1 <= div_bits_per_cycle <= 8:
                raise ValueError(f"div_bits_per_cycle must be in [1, 8], not {div_bits_per_cycle}")
        self._lanes = lanes
        self._max_length = max_length
        self._max_beats = -(-max_length // lanes)
        # Default: the pipelined divider (one compare-subtract per register stage, a new row every
        # cycle), which keeps every path within 300 MHz. An explicit k uses the iterative divider.
        self._pipelined = div_bits_per_cycle is None
        self._k = 1 if self._pipelined else div_bits_per_cycle
        self._sum_bits = (_E16_ONE * max_length).bit_length()
        # The lane max tree: one compare level per register stage (at least one stage).
        self._max_stages = max(1, (lanes - 1).bit_length())
        self._s_depth = self._max_beats + _SCORE_SLACK + self._max_stages - 1
        # The lane-sum tree: four operands per register stage (at least one stage).
        self._tree_stages = max(1, -(-(lanes - 1).bit_length() // 2))
        self._e_depth = self._max_beats + self._div_latency(self._k) + _EXP_SLACK + self._tree_stages + 3

        super().__init__({
            "cmd": In(stream.Signature(data.StructLayout({
                "mode": SoftmaxMode,
                "length": unsigned(max_length.bit_length()),
                "rows": unsigned(ROWS_BITS),
                "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS),
                "c_shift": unsigned(SHIFT_BITS),
                "out_mult": unsigned(numerics.AV_OUT_MULT_BITS),
            }))),
            "i": In(stream.Signature(data.ArrayLayout(signed(numerics.ACC_BITS), lanes))),
            "o": Out(stream.Signature(data.StructLayout({
                "data": data.ArrayLayout(unsigned(OUT_BITS), lanes),
                "last": unsigned(1),
                "row_sum": unsigned(self._sum_bits),
                "recip": unsigned(RECIP_BITS),
            }))),
        })

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build the unit for an accelerator config: ``lanes = config.softmax_lanes`` and
        ``max_length = max(config.token_capacity, config.model.experts)``."""
        return cls(lanes=config.softmax_lanes,
                   max_length=max(config.token_capacity, config.model.experts), **kwargs)

    def _div_latency(self, k):
        # Mirrors Divider.latency without building one (the pipelined divider adds 2 cycles of
        # output FIFO).
        return -(-RECIP_BITS // k) + 1 + (PIPELINED_FIFO_LATENCY if self._pipelined else 0)

    def _div_period(self, k):
        # Mirrors Divider.period (1 pipelined, else its latency). With the pipelined divider the
        # passes' per-row handoff is the limit instead: a one-beat row takes up to 2 cycles.
        return 2 if self._pipelined else self._div_latency(k)

    lanes = property(lambda self: self._lanes)
    max_length = property(lambda self: self._max_length)
    div_bits_per_cycle = property(lambda self: self._k)
    sum_bits = property(lambda self: self._sum_bits, doc="Width of ``o.payload.row_sum``.")
    score_buffer_depth = property(lambda self: self._s_depth, doc="Score buffer depth in beats.")
    exp_buffer_depth = property(lambda self: self._e_depth, doc="Exp buffer depth in beats.")

    @property
    def min_row_beats(self):
        """Shortest row, in beats, that still runs at one beat per cycle (the iterative divider's
        period; 2 with the pipelined divider)."""
        return self._div_period(self._k)

    def row_latency(self, length):
        """Cycles from the last input beat of a row of ``length`` elements to its first output beat,
        when nothing stalls."""
        # 3 cycles (plus the max tree's extra stages) for the max to reach the exp pass and 1 to its
        # first read, then the row's reads.
        # Then 10 cycles through the exp pipeline, the lane-sum tree stages and the sum register into
        # the sum queue, 1 cycle into the divider (the queue's output register), the divider itself, and 4 cycles
        # from the output pass's first read to its output FIFO, then the FIFO.
        return (-(-length // self._lanes) + 18 + self._max_stages + self._tree_stages
                + self._div_latency(self._k) + CreditFIFO.LATENCY)

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        len_shape = unsigned(self._max_length.bit_length())
        sum_shape = unsigned(self._sum_bits)
        score = signed(numerics.ACC_BITS)
        e16_shape = unsigned(numerics.EXP_OUT_BITS)
        lane_idx = range(L)

        # Row parameters that travel from the max pass to the exp pass.
        desc_layout = data.StructLayout({
            "max": score, "mode": SoftmaxMode, "length": len_shape,
            "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS), "c_shift": unsigned(SHIFT_BITS),
            "out_mult": unsigned(numerics.AV_OUT_MULT_BITS),
        })
        # ... and from the exp pass to the divider and the output pass.
        sum_layout = data.StructLayout({
            "sum": sum_shape, "mode": SoftmaxMode, "length": len_shape,
            "out_mult": unsigned(numerics.AV_OUT_MULT_BITS),
        })
        side_layout = data.StructLayout({"sum": sum_shape, "mode": SoftmaxMode, "length": len_shape})

        m.submodules.scores = scores = Memory(shape=data.ArrayLayout(score, L), depth=self._s_depth, init=[])
        s_w, s_r = scores.write_port(), scores.read_port()
        m.submodules.exps = exps = Memory(shape=data.ArrayLayout(e16_shape, L), depth=self._e_depth, init=[])
        x_w, x_r = exps.write_port(), exps.read_port()
        # A CreditFIFO used as a plain queue (rows1 reserves its room, so its credits go unused): its
        # "not empty" is the output register's valid, where a SyncFIFO's is a compare on its level, in
        # front of the exp pass's load decision and the level's own adder (over 300 MHz in the whole
        # top). Same latency as the SyncFIFO (1 cycle).
        m.submodules.desc_fifo = desc_fifo = CreditFIFO(desc_layout, _QUEUE_DEPTH)
        # A CreditFIFO as a plain queue too (rows2 reserves its room): its output is a register, so
        # the divider's first compare-subtract starts at a flip-flop, and its read side is a flag and
        # two pointers, where a SyncFIFOBuffered's read enable reached its inner level's adder (over
        # 300 MHz in the whole top). One cycle from a row's sum to the divider (the buffered FIFO
        # took two).
        m.submodules.sum_fifo = sum_fifo = CreditFIFO(sum_layout, _QUEUE_DEPTH)
        # Every row the divider can hold (one iterative, up to its latency pipelined) plus one waiting
        # at its output.
        side_depth = 2 if not self._pipelined else self._div_latency(self._k) + 1
        # A CreditFIFO: its output (and "not empty") are registers, so the output pass's load decision
        # starts at flip-flops; its room (a register too) replaces a FIFO level compare.
        m.submodules.side_fifo = side_fifo = CreditFIFO(side_layout, side_depth)
        m.submodules.div = div = Divider(_DIVIDEND_BITS, self._sum_bits, RECIP_BITS, bits_per_cycle=self._k,
                                         pipelined=self._pipelined, dividend_shift=_DIV_SHIFT)

        def lane_mask(left):
            # Lane j of a beat holds an element of the row iff j < elements left in the row.
            return Cat(*(left > j for j in lane_idx))

        # ---- pass 1: command, input, max ----------------------------------------------------------
        cur = Signal(self.cmd.payload.shape())          # the active command
        cmd_active = Signal()
        rows_left = Signal(ROWS_BITS)
        left1 = Signal(len_shape)                       # elements of the current row not yet accepted
        first1 = Signal(init=1)                         # the next accepted beat starts a row
        s_count = Signal(range(self._s_depth + 1))
        s_wr, s_rd = Signal(range(self._s_depth)), Signal(range(self._s_depth))
        # Rows started in pass 1 whose descriptor is not yet popped, as a thermometer code (bit i:
        # more than i rows); its room flag is a bit of it (rowops.counts.thermometer_step).
        rows1 = Signal(_QUEUE_DEPTH)

        # Per-command constants, registered at the command's accept (from its payload): the clamped
        # row length, whether a row is a single beat, and the lane mask of a row's last beat (the
        # other beats are full). Per-beat flags a cycle ahead: "the next beat is the row's last"
        # and "the command is on its last row". So no compare on a count sits in front of the
        # input handshake.
        p_len = self.cmd.payload.length
        p_len_c = Mux(p_len > self._max_length, self._max_length, p_len)
        row_len = cur.length                           # loaded clamped
        one_beat = Signal()
        tail_mask = Signal(L)
        last1 = Signal()                               # the next accepted beat ends its row
        rows_one = Signal()                            # rows_left == 1
        left_now = Mux(first1, row_len, left1)
        last_beat = last1
        # Room flags a cycle ahead (set from the counts' next values where the counts are updated).
        s_room = Signal(init=1)
        rows1_room = ~rows1[_QUEUE_DEPTH - 1]
        in_ok = cmd_active & s_room & (~first1 | rows1_room)
        in_go = Signal()
        m.d.comb += [self.i.ready.eq(in_ok), in_go.eq(self.i.valid & in_ok)]
        cmd_done = in_go & last_beat & rows_one
        m.d.comb += self.cmd.ready.eq(~cmd_active | cmd_done)
        # The clamp selects constants instead of feeding the arithmetic: the tail mask of an
        # in-range length depends on its low bits only (for a power-of-two L).
        too_long = p_len > self._max_length
        max_tail = (self._max_length - 1) % L
        if L & (L - 1) == 0:
            # Each mask bit a LUT of the length's low bits, then one select on the clamp (the
            # compare's carry chain runs in parallel): a select of the index before the compares
            # mapped to 4 levels behind the score path's length register in the whole top.
            low = (p_len - 1)[:max(1, (L - 1).bit_length())] if L > 1 else Const(0, 1)
            p_tail_mask = Mux(too_long, Cat(*(Const(max_tail >= j, 1) for j in lane_idx)),
                              Cat(*(low >= j for j in lane_idx)))
        else:
            tail_idx = (p_len_c - 1) % L
            p_tail_mask = Cat(*(tail_idx >= j for j in lane_idx))
        p_one_beat = Mux(too_long, self._max_length <= L, p_len <= L)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [cur.eq(self.cmd.payload), cur.length.eq(p_len_c),
                         rows_left.eq(self.cmd.payload.rows), rows_one.eq(self.cmd.payload.rows == 1),
                         cmd_active.eq(self.cmd.payload.rows != 0),
                         one_beat.eq(p_one_beat), last1.eq(p_one_beat),
                         tail_mask.eq(p_tail_mask)]
        with m.Elif(cmd_done):
            m.d.sync += cmd_active.eq(0)
        with m.If(in_go):
            m.d.sync += [
                left1.eq(left_now - L), first1.eq(last_beat),
                s_wr.eq(_incr(s_wr, self._s_depth)),
            ]
            with m.If(~(self.cmd.valid & self.cmd.ready)):
                # The next beat ends its row: a new row of one beat, or two beats left now.
                m.d.sync += last1.eq(Mux(last_beat, one_beat, left_now <= 2 * L))
            with m.If(last_beat & ~rows_one):
                m.d.sync += [rows_left.eq(rows_left - 1), rows_one.eq(rows_left == 2)]
        m.d.comb += [s_w.addr.eq(s_wr), s_w.data.eq(self.i.payload), s_w.en.eq(in_go)]

        # Two stages: register the beat, reduce it across lanes; then fold into the running max.
        mv1, mlast1, mfirst1 = Signal(), Signal(), Signal()
        mx1 = Signal.like(self.i.payload)
        mdesc1 = Signal(desc_layout)
        mv2, mlast2, mfirst2 = Signal(), Signal(), Signal()
        bmax2 = Signal(score)
        mdesc2 = Signal(desc_layout)
        run_max = Signal(score)
        m.d.sync += [
            mv1.eq(in_go), mlast1.eq(last_beat), mfirst1.eq(first1),
            mdesc1.mode.eq(cur.mode), mdesc1.length.eq(row_len), mdesc1.c_mult.eq(cur.c_mult),
            mdesc1.c_shift.eq(cur.c_shift), mdesc1.out_mult.eq(cur.out_mult),
        ]
        # Pairwise max tree, one registered level per stage (a 32-bit compare and a select each).
        lo = -(1 << (numerics.ACC_BITS - 1))
        # Lanes past the row's end enter the tree as the smallest score (masked into the input
        # register, so the tree's first compare starts at a flip-flop).
        for j in lane_idx:
            m.d.sync += mx1[j].eq(Mux(~last_beat | tail_mask[j], self.i.payload[j], lo))
        level = [mx1[j] for j in lane_idx]
        tv, tlast, tfirst, tdesc = mv1, mlast1, mfirst1, mdesc1
        for t in range(self._max_stages - 1):
            nxt = []
            for a, b in zip(level[0::2], level[1::2]):
                node = Signal(score, name=f"max{t}_{len(nxt)}")
                m.d.sync += node.eq(Mux(b > a, b, a))
                nxt.append(node)
            for a in level[len(level) & ~1:]:
                node = Signal(score, name=f"max{t}_{len(nxt)}")
                m.d.sync += node.eq(a)
                nxt.append(node)
            nv, nlast, nfirst = Signal(name=f"mt{t}v"), Signal(name=f"mt{t}last"), Signal(name=f"mt{t}first")
            ndesc = Signal(desc_layout, name=f"mt{t}desc")
            m.d.sync += [nv.eq(tv), nlast.eq(tlast), nfirst.eq(tfirst), ndesc.eq(tdesc)]
            level, tv, tlast, tfirst, tdesc = nxt, nv, nlast, nfirst, ndesc
        # The last level (one compare) is registered into bmax2.
        while len(level) > 1:
            a, b = level[0], level[1]
            level = [Mux(b > a, b, a)] + level[2:]
        bmax = level[0]
        m.d.sync += [mv2.eq(tv), mlast2.eq(tlast), mfirst2.eq(tfirst), bmax2.eq(bmax),
                     mdesc2.eq(tdesc)]
        new_max = Mux(mfirst2 | (bmax2 > run_max), bmax2, run_max)
        with m.If(mv2):
            m.d.sync += run_max.eq(new_max)
        desc_in = Signal(desc_layout)
        m.d.comb += [
            desc_in.eq(mdesc2), desc_in.max.eq(new_max),
            desc_fifo.w_data.eq(desc_in), desc_fifo.w_en.eq(mv2 & mlast2),   # room is reserved by rows1
            desc_fifo.take.eq(mv2 & mlast2),
        ]

        # ---- pass 2: exp and row sum --------------------------------------------------------------
        d2 = Signal(desc_layout)
        active2 = Signal()
        left2 = Signal(len_shape)
        x_count = Signal(range(self._e_depth + 1))      # exp-buffer slots reserved or filled
        x_wr, x_rd = Signal(range(self._e_depth)), Signal(range(self._e_depth))
        rows2 = Signal(_QUEUE_DEPTH)                   # rows started in pass 2, sum not yet divided (thermometer)

        x_room = Signal(init=1)
        rows2_room = ~rows2[_QUEUE_DEPTH - 1]
        issue2 = active2 & x_room
        # "The next beat is the row's last" as a register (as last3 below): no compare on left2 in
        # front of the load decision and the row counters.
        last2 = Signal()
        issue2_last = issue2 & last2
        load2 = (~active2 | issue2_last) & desc_fifo.o.valid & rows2_room
        desc_out = desc_fifo.o.payload
        m.d.comb += desc_fifo.o.ready.eq((~active2 | issue2_last) & rows2_room)
        with m.If(load2):
            m.d.sync += [d2.eq(desc_out), left2.eq(desc_out.length), last2.eq(desc_out.length <= L),
                         active2.eq(1)]
        with m.Elif(issue2_last):
            m.d.sync += active2.eq(0)
        with m.If(issue2):
            m.d.sync += [s_rd.eq(_incr(s_rd, self._s_depth))]
            with m.If(~load2):
                m.d.sync += [left2.eq(left2 - L), last2.eq(left2 <= 2 * L)]
        m.d.comb += [s_r.addr.eq(s_rd), s_r.en.eq(1)]

        # Stage c1: scores arrive; distance to the row max (>= 0, < 2**32).
        c1v, c1last = Signal(), Signal()
        c1mask = Signal(L)
        c1d = Signal(desc_layout)
        m.d.sync += [c1v.eq(issue2), c1last.eq(last2), c1mask.eq(lane_mask(left2)), c1d.eq(d2)]
        # Stage c2: d = max - s.
        c2v, c2last = Signal(), Signal()
        c2mask = Signal(L)
        c2d = Signal(desc_layout)
        dist = Signal(data.ArrayLayout(unsigned(numerics.ACC_BITS), L))
        m.d.sync += [c2v.eq(c1v), c2last.eq(c1last), c2mask.eq(c1mask), c2d.eq(c1d)]
        for j in lane_idx:
            m.d.sync += dist[j].eq((c1d.max - s_r.data[j])[:numerics.ACC_BITS])
        # Stage c3a: partial products of P = d * c_mult, one registered DSP48E2 each (d split into a
        # low chunk of 26 bits and the rest); stage c3: their sum, the log2 distance before the
        # shift (48 bits).
        c3av, c3alast = Signal(), Signal()
        c3amask = Signal(L)
        c3ad = Signal(desc_layout)
        m.d.sync += [c3av.eq(c2v), c3alast.eq(c2last), c3amask.eq(c2mask), c3ad.eq(c2d)]
        pp_lo = [Signal(unsigned(_D_CHUNK + numerics.SOFTMAX_MULT_BITS), name=f"pp_lo{j}") for j in lane_idx]
        pp_hi = [Signal(unsigned(numerics.ACC_BITS - _D_CHUNK + numerics.SOFTMAX_MULT_BITS), name=f"pp_hi{j}")
                 for j in lane_idx]
        for j in lane_idx:
            m.d.sync += [pp_lo[j].eq(dist[j][:_D_CHUNK] * c2d.c_mult),
                         pp_hi[j].eq(dist[j][_D_CHUNK:] * c2d.c_mult)]
        c3v, c3last = Signal(), Signal()
        c3mask = Signal(L)
        c3d = Signal(desc_layout)
        prod = Signal(data.ArrayLayout(unsigned(numerics.ACC_BITS + numerics.SOFTMAX_MULT_BITS), L))
        m.d.sync += [c3v.eq(c3av), c3last.eq(c3alast), c3mask.eq(c3amask), c3d.eq(c3ad)]
        for j in lane_idx:
            m.d.sync += prod[j].eq(pp_lo[j] + (pp_hi[j] << _D_CHUNK))
        # The bits of P at or above c_shift + EXP_FRAC_BITS + int_bits (those that make the exponent
        # shift everything out), as a mask registered beside P: the "shifted out completely" test
        # is then an AND-OR over P, not a barrel shift followed by an OR.
        int_bits = (numerics.EXP_ZERO_INT - 1).bit_length()
        p_width = numerics.ACC_BITS + numerics.SOFTMAX_MULT_BITS
        big_mask = Signal(p_width)
        m.d.sync += big_mask.eq(Cat(*(c3ad.c_shift <= b - numerics.EXP_FRAC_BITS - int_bits
                                      if b >= numerics.EXP_FRAC_BITS + int_bits else Const(0, 1)
                                      for b in range(p_width))))
        # Stages c3c and c3b: t = P >> c_shift (a floor shift), in two steps of three select bits
        # each: c3c shifts by the multiple of 8 (c_shift[3:]) and keeps the 19 bits that the fine
        # shift can reach, and computes the "shifted out completely" flag; c3b shifts by c_shift[:3]
        # and registers t's fraction and integer part. One 64:1 select per bit in one cycle mapped
        # to 5 LUT levels in the whole top (over 300 MHz); the barrel shift and the exp ROM's logic
        # are in different cycles.
        coarse_shift, fine_bits = 3, 3
        keep = numerics.EXP_FRAC_BITS + int_bits + (1 << fine_bits) - 1
        c3cv, c3clast = Signal(), Signal()
        c3cmask = Signal(L)
        c3cd = Signal(desc_layout)
        coarse = [Signal(keep, name=f"t_coarse{j}") for j in lane_idx]
        t_big = [Signal(name=f"t_big{j}") for j in lane_idx]
        m.d.sync += [c3cv.eq(c3v), c3clast.eq(c3last), c3cmask.eq(c3mask), c3cd.eq(c3d)]
        hi = c3d.c_shift[fine_bits:]
        assert len(c3d.c_shift) == fine_bits + coarse_shift
        for j in lane_idx:
            m.d.sync += [coarse[j].eq((prod[j] >> (hi << fine_bits))[:keep]),
                         t_big[j].eq((prod[j] & big_mask).any())]
        c3bv, c3blast = Signal(), Signal()
        c3bmask = Signal(L)
        c3bd = Signal(desc_layout)
        t_frac = [Signal(numerics.EXP_FRAC_BITS, name=f"t_frac{j}") for j in lane_idx]
        t_int = [Signal(int_bits, name=f"t_int{j}") for j in lane_idx]
        t_big_b = [Signal(name=f"t_big_b{j}") for j in lane_idx]
        m.d.sync += [c3bv.eq(c3cv), c3blast.eq(c3clast), c3bmask.eq(c3cmask), c3bd.eq(c3cd)]
        for j in lane_idx:
            t = coarse[j] >> c3cd.c_shift[:fine_bits]
            m.d.sync += [t_frac[j].eq(t[:numerics.EXP_FRAC_BITS]),
                         t_int[j].eq(t[numerics.EXP_FRAC_BITS:numerics.EXP_FRAC_BITS + int_bits]),
                         t_big_b[j].eq(t_big[j])]
        # Stage c4: the ROM is read with the fraction; the integer part and the "shifted out
        # completely" flag wait one cycle for the ROM data.
        # One single-port ROM per lane (what a synthesizer builds from one many-port ROM anyway; the
        # WebAssembly yosys's memory mapper crashes on a 16-read-port ROM).
        exp_init = [int(v) for v in numerics.exp2_lut()]
        c4v, c4last = Signal(), Signal()
        c4mode = Signal(SoftmaxMode)
        c4zero = Signal(L)
        c4int = Signal(data.ArrayLayout(unsigned(4), L))
        c4sum = Signal(sum_layout)
        rom = []
        for j in lane_idx:
            lut = Memory(shape=e16_shape, depth=1 << numerics.EXP_FRAC_BITS, init=exp_init)
            m.submodules[f"exp_rom{j}"] = lut
            port = lut.read_port()
            rom.append(port)
            m.d.comb += [port.addr.eq(t_frac[j]), port.en.eq(1)]
            m.d.sync += [
                c4int[j].eq(t_int[j]),
                # i >= EXP_ZERO_INT (= 16): every ROM bit is shifted out. Padding lanes are 0 too.
                c4zero[j].eq(t_big_b[j] | ~c3bmask[j]),
            ]
        m.d.sync += [c4v.eq(c3bv), c4last.eq(c3blast), c4mode.eq(c3bd.mode),
                     c4sum.mode.eq(c3bd.mode), c4sum.length.eq(c3bd.length),
                     c4sum.out_mult.eq(c3bd.out_mult)]
        # Stage c5: e16 = lut[f] >> i, registered (the ROM output gets a register before any logic),
        # then written to the exp buffer.
        c5v, c5last, c5mode = Signal(), Signal(), Signal(SoftmaxMode)
        c5sum = Signal(sum_layout)
        e16 = [Signal(e16_shape, name=f"e16_{j}") for j in lane_idx]
        m.d.sync += [c5v.eq(c4v), c5last.eq(c4last), c5mode.eq(c4mode), c5sum.eq(c4sum)]
        for j in lane_idx:
            m.d.sync += e16[j].eq(Mux(c4zero[j], 0, rom[j].data >> c4int[j]))
        m.d.comb += [x_w.addr.eq(x_wr), x_w.en.eq(c5v)]
        for j in lane_idx:
            m.d.comb += x_w.data[j].eq(e16[j])
        with m.If(c5v):
            m.d.sync += x_wr.eq(_incr(x_wr, self._e_depth))
        # Stage c6: each lane's share of the row sum (e8 for attention, e16 for the router).
        c6v, c6last = Signal(), Signal()
        c6sum = Signal(sum_layout)
        share = [Signal(e16_shape, name=f"share{j}") for j in lane_idx]
        m.d.sync += [c6v.eq(c5v), c6last.eq(c5last), c6sum.eq(c5sum)]
        for j, e in zip(lane_idx, e16):
            e8 = Mux(e >= _E16_ONE - (1 << 6), _E8_MAX, (e + (1 << 6)) >> 7)
            m.d.sync += share[j].eq(Mux(c5mode == SoftmaxMode.ATTENTION, e8, e))
        # Then a registered adder tree, four operands (two adder levels) per stage.
        level, tv, tlast, tsum = share, c6v, c6last, c6sum
        for t in range(self._tree_stages):
            nxt = []
            for g in range(0, len(level), 4):
                part = Signal(sum_shape, name=f"part{t}_{g // 4}")
                group = level[g:g + 4]
                m.d.sync += part.eq(sum(group[1:], group[0]))
                nxt.append(part)
            nv, nlast, nsum = Signal(name=f"t{t}v"), Signal(name=f"t{t}last"), Signal(sum_layout, name=f"t{t}sum")
            m.d.sync += [nv.eq(tv), nlast.eq(tlast), nsum.eq(tsum)]
            level, tv, tlast, tsum = nxt, nv, nlast, nsum
        # Accumulate; the first beat of a row restarts the sum.
        acc = Signal(sum_shape)
        afirst = Signal(init=1)
        total = Mux(afirst, 0, acc) + level[0]
        with m.If(tv):
            m.d.sync += [acc.eq(total), afirst.eq(tlast)]
        # The row's sum is registered before the queue: the queue's output register takes its
        # input straight from w_data when empty, and the accumulator's adder in front of that mux
        # left too little margin.
        sum_in = Signal(sum_layout)
        sum_wv = Signal()
        m.d.comb += [sum_in.eq(tsum), sum_in.sum.eq(total)]
        sum_wd = Signal(sum_layout)
        m.d.sync += [sum_wv.eq(tv & tlast), sum_wd.eq(sum_in)]
        m.d.comb += [
            sum_fifo.w_data.eq(sum_wd), sum_fifo.w_en.eq(sum_wv),     # room is reserved by rows2
            sum_fifo.take.eq(sum_wv),
        ]

        # ---- divider ------------------------------------------------------------------------------
        sum_out = sum_fifo.o.payload
        div_go = Signal()
        m.d.comb += [
            div.i.valid.eq(sum_fifo.o.valid & side_fifo.room),
            div.i.payload.dividend.eq(Mux(sum_out.mode == SoftmaxMode.ATTENTION,            # << _DIV_SHIFT
                                          sum_out.out_mult << (numerics.AV_RECIP_BITS - _DIV_SHIFT),
                                          1 << (numerics.ROUTER_RECIP_BITS - _DIV_SHIFT))),
            div.i.payload.divisor.eq(sum_out.sum),
            div_go.eq(div.i.valid & div.i.ready),
            sum_fifo.o.ready.eq(side_fifo.room & div.i.ready),
            side_fifo.w_en.eq(div_go),
            side_fifo.take.eq(div_go),
        ]
        side_in = Signal(side_layout)
        m.d.comb += [side_in.sum.eq(sum_out.sum), side_in.mode.eq(sum_out.mode),
                     side_in.length.eq(sum_out.length), side_fifo.w_data.eq(side_in)]

        # ---- pass 3: output ----------------------------------------------------------------------
        side_out = side_fifo.o.payload
        active3 = Signal()
        left3 = Signal(len_shape)
        mode3 = Signal(SoftmaxMode)
        sum3 = Signal(sum_shape)
        recip3 = Signal(RECIP_BITS)
        # The output stages (q1, q2, q3) have no enable: they end in a credit-counted FIFO, so a
        # beat is issued only while the FIFO has room for every beat in flight, and o.ready reaches
        # nothing but the FIFO's read side (no ready chain into the divider's FIFO).
        m.submodules.out_fifo = out_fifo = CreditFIFO(self.o.payload.shape(), 4 + CreditFIFO.LATENCY + 1)
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))
        adv = 1
        issue3 = active3 & out_fifo.room
        m.d.comb += out_fifo.take.eq(issue3)
        # "The next beat is the row's last" as a register, so the output pass's load decision (and the
        # divider FIFO's read enable behind it) has no compare in its path.
        last3 = Signal()
        issue3_last = issue3 & last3
        # A row's sum exists only after all its e16 beats were written: issuing needs no level check.
        load3 = (~active3 | issue3_last) & div.o.valid & side_fifo.o.valid
        m.d.comb += [div.o.ready.eq(load3), side_fifo.o.ready.eq(load3)]
        with m.If(load3):
            m.d.sync += [active3.eq(1), left3.eq(side_out.length), last3.eq(side_out.length <= L),
                         mode3.eq(side_out.mode),
                         sum3.eq(side_out.sum), recip3.eq(div.o.payload.quotient)]
        with m.Elif(issue3_last):
            m.d.sync += active3.eq(0)
        with m.If(issue3):
            m.d.sync += x_rd.eq(_incr(x_rd, self._e_depth))
            with m.If(~load3):
                m.d.sync += [left3.eq(left3 - L), last3.eq(left3 <= 2 * L)]
        m.d.comb += [x_r.addr.eq(x_rd), x_r.en.eq(1)]
        # The score count takes the input handshake a cycle late (in_go_r, a register): in_go ends at
        # the input's valid, which comes from outside, and its adder and room flag behind it missed
        # 300 MHz in the whole top. The true level is then at most one more than the count, so the
        # room flag keeps that slot in hand (one of the score buffer's margin slots). A row is read
        # back only cycles after its last write was counted, so the count never runs below zero.
        in_go_r = Signal()
        m.d.sync += [
            in_go_r.eq(in_go),
            s_count.eq(s_count + in_go_r - issue2),
            x_count.eq(x_count + issue2 - issue3),
        ]
        for flag, count, inc, dec, limit in ((s_room, s_count, in_go_r, issue2, self._s_depth - 1),
                                             (x_room, x_count, issue2, issue3, self._e_depth)):
            m.d.sync += flag.eq(below_next(count, inc, dec, limit))
        thermometer_step(m, rows1, in_go & first1, load2)
        thermometer_step(m, rows2, load2, div_go)

        # Stage q1: the row's parameters, aligned with the e16 beat that the buffer read returns.
        # Stages q1..q3 (four registers with q1b) have no enable, as above.
        q1v, q1last = Signal(), Signal()
        q1mask = Signal(L)
        q1mode = Signal(SoftmaxMode)
        q1sum = Signal(sum_shape)
        q1recip = Signal(RECIP_BITS)
        with m.If(adv):
            m.d.sync += [q1v.eq(issue3), q1last.eq(last3), q1mask.eq(lane_mask(left3)),
                         q1mode.eq(mode3), q1sum.eq(sum3), q1recip.eq(recip3)]
        # Stage q1b: the e16 beat registered (the buffer's read data feeds no logic or DSP directly).
        q1bv, q1blast = Signal(), Signal()
        q1bmask = Signal(L)
        q1bmode = Signal(SoftmaxMode)
        q1bsum = Signal(sum_shape)
        q1brecip = Signal(RECIP_BITS)
        q1be = [Signal(e16_shape, name=f"q1be{j}", reset_less=True) for j in lane_idx]
        m.d.sync += [q1bv.eq(q1v), q1blast.eq(q1last), q1bmask.eq(q1mask),
                     q1bmode.eq(q1mode), q1bsum.eq(q1sum), q1brecip.eq(q1recip)]
        for j in lane_idx:
            m.d.sync += q1be[j].eq(x_r.data[j])
        # Stage q2: e8 and the router product e16 * R (<= 2**31 because e16 <= sum), each in its own
        # register (the product straight from a DSP48E2 with its input and output registers); the
        # mode selects between them in q3.
        q2v, q2last = Signal(), Signal()
        q2mask = Signal(L)
        q2mode = Signal(SoftmaxMode)
        q2sum = Signal(sum_shape)
        q2recip = Signal(RECIP_BITS)
        q2e8 = [Signal(unsigned(numerics.ATTN_P_BITS), name=f"q2e8_{j}", reset_less=True) for j in lane_idx]
        q2prod = [Signal(unsigned(numerics.ROUTER_RECIP_BITS + 1), name=f"q2prod{j}", reset_less=True)
                  for j in lane_idx]
        m.d.sync += [q2v.eq(q1bv), q2last.eq(q1blast), q2mask.eq(q1bmask),
                     q2mode.eq(q1bmode), q2sum.eq(q1bsum), q2recip.eq(q1brecip)]
        for j in lane_idx:
            e = q1be[j]
            m.d.sync += [q2e8[j].eq(Mux(e >= _E16_ONE - (1 << 6), _E8_MAX, (e + (1 << 6)) >> 7)),
                         q2prod[j].eq(e * q1brecip[:_ROUTER_RECIP_MAX.bit_length()])]
        # Stage q3: the output register. The router probability is round_shift(e16 * R, 16).
        p_shift = numerics.ROUTER_RECIP_BITS - numerics.ROUTER_P_FRAC
        q3v = Signal()
        q3 = Signal(self.o.payload.shape())
        with m.If(adv):
            m.d.sync += [
                q3v.eq(q2v),
                q3.last.eq(q2last),
                q3.row_sum.eq(Mux(q2last, q2sum, 0)),
                q3.recip.eq(Mux(q2last, q2recip, 0)),
            ]
            for j in lane_idx:
                prob = ((q2prod[j] >> (p_shift - 1)) + 1) >> 1
                val = Mux(q2mode == SoftmaxMode.ATTENTION, q2e8[j], prob)
                m.d.sync += q3.data[j].eq(Mux(q2mask[j], val, 0))
        m.d.comb += [out_fifo.w_data.eq(q3), out_fifo.w_en.eq(q3v)]
        return m
