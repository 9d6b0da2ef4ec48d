"""Streaming integer LayerNorm: int16 residual rows in, int8 rows out.

Bit-exact with ``reference/golden.py::layernorm``. Each row takes two passes over the data, with a
per-row reciprocal between them:

1. **Statistics pass.** Beats stream in at one beat per cycle. Each is written to a circular row buffer
   while the row sums ``S1 = sum(x)`` and ``S2 = sum(x*x)`` accumulate.
2. **Per-row reciprocal.** At the row's end, ``var_n = D*S2 - S1**2 + eps_int`` goes through a sequential
   :class:`~m3vit_hw.lib.isqrt.ISqrt`, and then ``inv = floor(2**LN_INV_BITS / max(1, root))`` goes through a
   sequential :class:`~m3vit_hw.lib.divider.Divider`. Each engine handles one row at a time, and the two
   work on consecutive rows in parallel.
3. **Normalize pass.** The row is read back from the buffer and, per lane, the unit computes
   ``z = round_shift((D*x - S1) * inv, LN_INV_BITS - LN_Z_FRAC)`` and
   ``y = sat8(round_shift(z * gamma_mult[c] + beta_int[c], shift))``.

The row buffer is a circular FIFO of beats, not a pair of fixed halves. The statistics pass of the next
rows keeps writing while earlier rows wait for their reciprocal and are normalized. The buffer is sized
so that this lag (one row plus the reciprocal latency) never fills it. See :class:`LayerNormUnit` for
the resulting throughput condition.
"""

import math

from amaranth import Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int
from ..numerics import SHIFT_BITS
from ..lib.credit_fifo import CreditFIFO
from ..lib.divider import PIPELINED_FIFO_LATENCY, Divider
from ..lib.isqrt import ISqrt
from ..lib.skid import SkidBuffer
from .counts import below_next, thermometer_step

__all__ = ["LayerNormUnit", "MAX_DIM"]

#: Register stages of the normalize pass, from the buffer read to the output register.
_NORM_STAGES = 13
#: Low chunk of the reciprocal for the a * inv partial products: 17 unsigned bits fit the DSP48E2's
#: 18-bit signed multiplier input.
_INV_CHUNK = 17
#: Low chunk of S2 in D*S2: an unsigned operand that fits the DSP48E2's 27-bit signed port.
_DS2_CHUNK = 26

# The output shift is numerics.SHIFT_BITS wide; gamma_mult, beta_int and eps_int widths are
# numerics.LN_GAMMA_BITS, LN_BETA_BITS and LN_EPS_BITS.
#: Largest supported row length. The golden model's int64 intermediates (D*S2 and (D*x - S1) * inv)
#: stay exact up to D = 2**15; this leaves a margin.
MAX_DIM = 1 << 14

# Beats a row's input runs ahead of its first normalize read, beyond the row itself, the ISqrt and
# Divider latencies and the statistics pass's tree stages and var_n's third stage (added where the
# depth is computed): 6 cycles from the last input beat to the ISqrt operand (statistics 3, var_n 2,
# var_n's output FIFO 1) and 1 from the reciprocal to the first read. The buffer needs one more slot
# than that lag, and 2 more as margin.
_STATS_OVERHEAD = 10


def _signed_for(bound):
    """Signed shape holding every value in [-bound, bound]."""
    return Shape.cast(range(-bound, bound + 1))


class LayerNormUnit(wiring.Component):
    """Integer LayerNorm over rows of ``dim`` int16 values, ``lanes`` values per beat.

    Parameters
    ----------
    dim : int
        Row length D, in [1, :data:`MAX_DIM`], a multiple of ``lanes``.
    lanes : int
        Values per beat on ``i`` and ``o`` (and channels per parameter write), >= 1.
    recip_bits_per_cycle : int or None
        Bits per cycle for iterative per-row ISqrt and Divider engines, in [1, 8] (values above 1
        lengthen the critical path beyond 300 MHz). ``None`` (the default) uses the pipelined engines:
        one compare-subtract per register stage and a new row every cycle.

    Interface attributes
    --------------------
    i : In(stream.Signature(ArrayLayout(signed(16), lanes)))
        Residual values. Rows are ``dim // lanes`` consecutive beats. Lane ``j`` of beat ``b`` is
        channel ``b * lanes + j``. There is no row delimiter: the unit counts beats.
    o : Out(stream.Signature(ArrayLayout(signed(8), lanes)))
        The normalized values, beat for beat in the same order as ``i``.
    param : In(stream.Signature(StructLayout({...})))
        Parameter writes, with fields ``addr`` (``range(dim // lanes)``), ``gamma``
        (``ArrayLayout(signed(LN_GAMMA_BITS), lanes)``), ``beta`` (``ArrayLayout(signed(LN_BETA_BITS),
        lanes)``), ``eps`` (``unsigned(LN_EPS_BITS)``) and ``shift`` (``unsigned(SHIFT_BITS)``, at most
        ``SHIFT_MAX``). Each write stores ``gamma_mult``/``beta_int`` for channels
        ``addr*lanes .. addr*lanes + lanes - 1`` (``addr < dim // lanes``). It also loads the per-layer
        ``eps_int`` and ``shift``, so every write of one layer carries that layer's values. ``param.ready``
        is high only while :attr:`busy` is low, which means the unit is drained. A write therefore
        applies to exactly the rows whose first beat transfers after it (or in the same cycle: the
        input's skid buffer takes a beat while the unit is idle). If ``param.valid`` and
        ``i.valid`` are both high while the unit is idle, the write goes first.
    busy : Out(1)
        High while any row is in flight: its first beat has been accepted on ``i``, and its last beat
        has not yet transferred on ``o``.

    Throughput
    ----------
    Let ``R = dim // lanes``. The unit accepts one beat per cycle and emits one beat per cycle,
    sustained over any number of rows, provided that ``R >=`` :attr:`min_row_beats`, the period of the
    slower of the two per-row engines. The statistics pass of later rows overlaps the reciprocal and
    normalize pass of earlier rows. The row buffer holds :attr:`buffer_depth` ``= R +``
    :attr:`recip_latency` ``+ 10`` beats plus the statistics tree stages: the lag between a row's input and its first read back,
    plus a margin of 2. For shorter rows the unit sustains one row per ``min_row_beats`` cycles.
    The latency from the last input beat of a row to its first output beat is ``recip_latency + 23``
    cycles plus the statistics pass's tree stages, when nothing stalls (:attr:`row_latency`; one of
    them is the input skid buffer).

    Raises
    ------
    TypeError, ValueError
        On a parameter outside the ranges above. The message names the parameter and the value.
    """

    def __init__(self, dim, lanes, *, recip_bits_per_cycle=None):
        check_int("dim", dim, 1)
        check_int("lanes", lanes, 1)
        if dim > MAX_DIM:
            raise ValueError(f"dim must be in [1, {MAX_DIM}], not {dim}")
        if dim % lanes:
            raise ValueError(f"dim must be a multiple of lanes={lanes}, not {dim}")
        if recip_bits_per_cycle is not None:
            if not isinstance(recip_bits_per_cycle, int) or isinstance(recip_bits_per_cycle, bool):
                raise TypeError("recip_bits_per_cycle must be an integer or None, "
                                f"not {recip_bits_per_cycle!r}")
            if not 1 <= recip_bits_per_cycle <= 8:
                raise ValueError(f"recip_bits_per_cycle must be in [1, 8], not {recip_bits_per_cycle}")

        self._dim = dim
        self._lanes = lanes
        self._beats = dim // lanes
        self._eps_bits = numerics.LN_EPS_BITS
        # The ISqrt operand is exactly as wide as var_n can be (a wider one only adds pipeline stages
        # and constant bits). D*S2 - S1**2 = D**2 * (population variance): with k values at one end of
        # the int16 range and D - k at the other it is k*(D-k)*65535**2, largest at k = D // 2; eps_int
        # adds at most 2**LN_EPS_BITS - 1. The var_n stages compute modulo 2**sqrt_width, which is
        # exact because the true var_n fits.
        span = (1 << numerics.RES_BITS) - 1
        var_max = (dim * dim // 4) * span * span + (1 << self._eps_bits) - 1
        self._sqrt_width = var_max.bit_length()
        self._root_width = (self._sqrt_width + 1) // 2

        # Default: pipelined engines (one compare-subtract per register stage, a new row every cycle),
        # which keep every path within 300 MHz. An explicit k uses the smaller iterative engines.
        self._pipelined = recip_bits_per_cycle is None
        self._k = 1 if self._pipelined else recip_bits_per_cycle

        self._recip_latency = sum(self._engine_latencies(self._k))
        # The statistics pass's lane-sum tree: two operands per register stage (one adder of up to
        # ~44 bits for S2 per cycle; two chained adders of that width miss 300 MHz), at least one.
        self._stat_tree_stages = max(1, (lanes - 1).bit_length())
        self._depth = self._beats + self._recip_latency + _STATS_OVERHEAD + self._stat_tree_stages + 1

        super().__init__({
            "i": In(stream.Signature(data.ArrayLayout(signed(numerics.RES_BITS), lanes))),
            "o": Out(stream.Signature(data.ArrayLayout(signed(numerics.ACT_BITS), lanes))),
            "param": In(stream.Signature(data.StructLayout({
                "addr": range(self._beats),
                "gamma": data.ArrayLayout(signed(numerics.LN_GAMMA_BITS), lanes),
                "beta": data.ArrayLayout(signed(numerics.LN_BETA_BITS), lanes),
                "eps": unsigned(self._eps_bits),
                "shift": unsigned(SHIFT_BITS),
            }))),
            "busy": Out(1),
        })

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build the unit for an accelerator config (reads ``config.model.dim``, ``config.ln_lanes``)."""
        return cls(dim=config.model.dim, lanes=config.ln_lanes, **kwargs)

    def _engine_latencies(self, k):
        # Mirrors ISqrt.latency and Divider.latency without building the engines (the pipelined
        # engines add PIPELINED_FIFO_LATENCY cycles of output FIFO).
        extra = PIPELINED_FIFO_LATENCY if self._pipelined else 0
        return (-(-self._root_width // k) + 1 + extra, -(-(numerics.LN_INV_BITS + 1) // k) + 1 + extra)

    def _engine_periods(self, k):
        # Mirrors ISqrt.period and Divider.period: 1 pipelined, else their latencies.
        return (1, 1) if self._pipelined else self._engine_latencies(k)

    dim = property(lambda self: self._dim)
    lanes = property(lambda self: self._lanes)
    row_beats = property(lambda self: self._beats, doc="Beats per row, ``dim // lanes``.")
    eps_bits = property(lambda self: self._eps_bits, doc="Width of ``eps_int`` (unsigned).")
    recip_bits_per_cycle = property(lambda self: self._k)
    recip_pipelined = property(lambda self: self._pipelined,
                               doc="Whether the ISqrt and Divider are the pipelined engines (the default).")
    buffer_depth = property(lambda self: self._depth, doc="Row buffer depth in beats.")
    recip_latency = property(lambda self: self._recip_latency,
                             doc="ISqrt + Divider latency in cycles.")

    @property
    def row_latency(self):
        """Cycles from the transfer of a row's last input beat to its first output beat, unstalled."""
        # 1 cycle in the input skid buffer, then
        # 7 cycles to the ISqrt operand (statistics 3, var_n 3, its output FIFO 1) plus the statistics
        # pass's square and
        # tree stages beyond the first, 1 to the first read, then the normalize pipeline and its
        # output FIFO.
        return (SkidBuffer.LATENCY + self._recip_latency + 7 + CreditFIFO.LATENCY + self._stat_tree_stages
                + _NORM_STAGES + CreditFIFO.LATENCY)

    @property
    def min_row_beats(self):
        """Smallest ``dim // lanes`` at which the unit sustains one beat per cycle."""
        return max(self._engine_periods(self._k))

    def elaborate(self, platform):
        m = Module()
        D, L, R = self._dim, self._lanes, self._beats
        k = self._k

        s1_shape = _signed_for(D << 15)                 # S1 = sum of D int16 values
        s2_shape = unsigned((D << 30).bit_length())    # S2 <= D * 2**30
        # |D*x - S1| <= (D - 1) * 65535 < D * 65535.
        a_shape = _signed_for(D * 65535)
        inv_width = numerics.LN_INV_BITS + 1                 # inv = 2**32 // den, den >= 1
        # Bound on P = (D*x - S1) * inv, which lets the product be kept narrow. The deviations a_c sum
        # to zero and sum(a_c**2) = D*V, with V = D*S2 - S1**2, so |a_c| <= sqrt((D-1)*V). When V >= 1,
        # den >= isqrt(V) > sqrt(V) - 1, so sqrt(V) < 2*den. Together with inv <= 2**32/den this gives
        # |P| < 2*sqrt(D-1) * 2**32. When V = 0, every a_c = 0. This holds for every eps_int >= 0.
        p_bound = (2 * (math.isqrt(max(D - 1, 0)) + 1)) << numerics.LN_INV_BITS
        p_shape = _signed_for(p_bound)
        z_shift = numerics.LN_INV_BITS - numerics.LN_Z_FRAC
        z_shape = _signed_for((p_bound >> z_shift) + 1)
        m_shape = _signed_for(((p_bound >> z_shift) + 1) * (1 << (numerics.LN_GAMMA_BITS - 1))
                              + (1 << (numerics.LN_BETA_BITS - 1)))

        # ---- storage ----------------------------------------------------------------------------
        m.submodules.rowbuf = rowbuf = Memory(shape=data.ArrayLayout(signed(numerics.RES_BITS), L),
                                              depth=self._depth, init=[])
        buf_w = rowbuf.write_port()
        buf_r = rowbuf.read_port()
        param_layout = data.StructLayout({
            "gamma": data.ArrayLayout(signed(numerics.LN_GAMMA_BITS), L),
            "beta": data.ArrayLayout(signed(numerics.LN_BETA_BITS), L),
        })
        m.submodules.params = params = Memory(shape=param_layout, depth=R, init=[])
        par_w = params.write_port()
        par_r = params.read_port()
        eps = Signal(self._eps_bits)
        shift = Signal(SHIFT_BITS)

        # ---- flow control / bookkeeping ---------------------------------------------------------
        count = Signal(range(self._depth + 1))          # beats written, not yet read back (a cycle late)
        room = Signal(init=1)                           # see below (rowops.counts)
        wr_ptr = Signal(range(self._depth))
        rd_ptr = Signal(range(self._depth))
        in_beat = Signal(range(R))
        in_flight = Signal(range(self._depth + 4))      # rows accepted and not yet fully emitted
        # The row events are registered before the count (the input handshake would otherwise
        # feed its adder); busy also covers a first beat whose event is still in its register, and
        # stays high one cycle longer after a row's last beat (harmless: it only gates parameters).
        first_go_r = Signal()
        last_go_r = Signal()
        # in_flight != 0 as a register (from the count's next value), so busy, and through the
        # parameter handshake i.ready, is one LUT of flip-flops.
        in_flight_nz = Signal()
        # The input goes through a skid buffer: i.ready is its flip-flop, so the producer's logic
        # (the norm stage's reader and the residual buffer's read port behind it) no longer waits
        # for the room, result-FIFO and parameter terms below, which missed 300 MHz in the whole
        # top. A beat held there counts as in flight (busy), so a parameter write still applies to
        # exactly the rows whose first beat transfers after it; the write and a beat may transfer
        # in the same cycle (the beat then reaches the statistics pass a cycle later, after the write).
        m.submodules.in_skid = in_skid = SkidBuffer(self.i.payload.shape())
        wiring.connect(m, wiring.flipped(self.i), in_skid.i)
        ii = in_skid.o
        m.d.comb += self.busy.eq(in_flight_nz | first_go_r | ii.valid)

        param_go = self.param.valid & ~self.busy
        m.d.comb += self.param.ready.eq(~self.busy)
        with m.If(param_go):
            m.d.sync += [eps.eq(self.param.payload.eps), shift.eq(self.param.payload.shift)]
        m.d.comb += [
            par_w.addr.eq(self.param.payload.addr),
            par_w.data.gamma.eq(self.param.payload.gamma),
            par_w.data.beta.eq(self.param.payload.beta),
            par_w.en.eq(param_go),
        ]

        # ---- statistics pass --------------------------------------------------------------------
        # Stages without enable: register the beat, square, reduce across lanes (sum and sum of
        # squares), accumulate. A row's sums go into a credit-counted FIFO (res_fifo), and a row's last
        # beat is accepted only while that FIFO has room for every row in flight, so the pass never
        # stalls: no stall net fans out to its registers, and i.ready is a LUT of registers (the
        # previous stall, from the var_n stage's ready through the result register, missed 300 MHz in
        # the whole top).
        sv1, slast1 = Signal(), Signal()
        sx1 = Signal.like(ii.payload)
        sv2, slast2 = Signal(), Signal()
        b1 = Signal(s1_shape)
        b2 = Signal(s2_shape)
        acc1 = Signal(s1_shape)
        acc2 = Signal(s2_shape)
        res_layout = data.StructLayout({"s1": s1_shape, "s2": s2_shape})
        # From a row's last input beat to its sums at the FIFO's write port: the input register, the
        # squares, then the tree stages (the last of which is b1/b2).
        stat_latency = 2 + self._stat_tree_stages
        m.submodules.res_fifo = res_fifo = CreditFIFO(res_layout, stat_latency + CreditFIFO.LATENCY + 1)
        res_valid = res_fifo.o.valid
        res_s1 = res_fifo.o.payload.s1
        res_s2 = res_fifo.o.payload.s2
        res_take = Signal()
        # "in_beat is the row's last beat" as a register.
        in_last = Signal(init=R == 1)

        in_go = Signal()
        m.d.comb += [
            # No parameter term: a write happens only while the skid buffer is empty (busy).
            ii.ready.eq(room & (~in_last | res_fifo.room)),
            in_go.eq(ii.valid & ii.ready),
            buf_w.addr.eq(wr_ptr),
            buf_w.data.eq(ii.payload),
            # The write enable is the room flag (a register), not in_go: the handshake logic (stall,
            # room, parameter writes) in front of the block RAM's write enable missed 300 MHz. With
            # room the slot at wr_ptr is free, so writing it while no beat transfers is harmless:
            # nothing reads it, and wr_ptr only advances with in_go, whose write is the one kept.
            buf_w.en.eq(room),
        ]
        with m.If(in_go):
            m.d.sync += [
                wr_ptr.eq(Mux(wr_ptr == self._depth - 1, 0, wr_ptr + 1)),
                in_beat.eq(Mux(in_last, 0, in_beat + 1)),
                in_last.eq(Mux(in_last, R == 1, in_beat == R - 2)),
            ]
        m.d.comb += res_fifo.take.eq(in_go & in_last)
        m.d.sync += [sv1.eq(in_go), slast1.eq(in_last), sx1.eq(ii.payload)]
        # Squares in their own stage (one registered DSP48E2 each), then registered binary adder
        # trees for the lane sums: one register level per adder level.
        sq = [Signal(unsigned(2 * numerics.RES_BITS), name=f"sq{j}", reset_less=True) for j in range(L)]
        xr = [Signal(signed(numerics.RES_BITS), name=f"sxr{j}", reset_less=True) for j in range(L)]
        svq, slastq = Signal(), Signal()
        m.d.sync += [svq.eq(sv1), slastq.eq(slast1)]
        for j in range(L):
            m.d.sync += [sq[j].eq(sx1[j] * sx1[j]), xr[j].eq(sx1[j])]
        l1, l2, tv, tl = xr, sq, svq, slastq
        for t in range(self._stat_tree_stages):
            if t == self._stat_tree_stages - 1:
                n1, n2, nv, nl = [b1], [b2], sv2, slast2
            else:
                n1 = [Signal(s1_shape, name=f"ts1_{t}_{g}") for g in range(-(-len(l1) // 2))]
                n2 = [Signal(s2_shape, name=f"ts2_{t}_{g}") for g in range(-(-len(l2) // 2))]
                nv, nl = Signal(name=f"tsv{t}"), Signal(name=f"tslast{t}")
            for g in range(len(n1)):
                grp1, grp2 = l1[2 * g:2 * g + 2], l2[2 * g:2 * g + 2]
                m.d.sync += [n1[g].eq(sum(grp1[1:], grp1[0])), n2[g].eq(sum(grp2[1:], grp2[0]))]
            m.d.sync += [nv.eq(tv), nl.eq(tl)]
            l1, l2, tv, tl = n1, n2, nv, nl
        res_w = Signal(res_layout)
        m.d.comb += [res_w.s1.eq(acc1 + b1), res_w.s2.eq(acc2 + b2),
                     res_fifo.w_data.eq(res_w), res_fifo.w_en.eq(sv2 & slast2)]
        with m.If(sv2):
            with m.If(slast2):
                m.d.sync += [acc1.eq(0), acc2.eq(0)]
            with m.Else():
                m.d.sync += [acc1.eq(acc1 + b1), acc2.eq(acc2 + b2)]

        # ---- var_n, then isqrt -> divide -------------------------------------------------------
        # S1 waits in a FIFO for its row's reciprocal. The FIFO holds more rows than can be in the
        # var_n/isqrt/divide chain at once, so it never throttles the chain.
        # A queue of distributed RAM with two pointers and its count as a thermometer code
        # (rowops.counts): "full" is a flip-flop, and the write's handshake reaches no adder (a
        # SyncFIFO's level adder behind it missed 300 MHz in the whole top). Same behaviour as a
        # SyncFIFO: r_data is the head, combinational from the RAM.
        s1_depth = 8
        m.submodules.s1_fifo = s1_mem = Memory(shape=s1_shape, depth=s1_depth, init=[])
        s1_wp, s1_rp = s1_mem.write_port(), s1_mem.read_port(domain="comb")
        s1_wptr, s1_rptr = Signal(range(s1_depth)), Signal(range(s1_depth))
        s1_therm = Signal(s1_depth)
        s1_w_rdy = ~s1_therm[s1_depth - 1]
        s1_w_en, s1_r_en = Signal(), Signal()
        m.d.comb += [s1_wp.addr.eq(s1_wptr), s1_wp.en.eq(s1_w_en), s1_rp.addr.eq(s1_rptr)]
        with m.If(s1_w_en):
            m.d.sync += s1_wptr.eq(s1_wptr + 1)
        with m.If(s1_r_en):
            m.d.sync += s1_rptr.eq(s1_rptr + 1)
        thermometer_step(m, s1_therm, s1_w_en, s1_r_en)
        m.submodules.isqrt = isq = ISqrt(self._sqrt_width, bits_per_cycle=k, pipelined=self._pipelined)
        # The dividend 2**LN_INV_BITS is a single one bit above LN_INV_BITS zero bits: the divider
        # takes it as dividend_shift, so its pipeline holds no constant dividend bits (yosys removed
        # them one stage per opt iteration, the longest pass of the device build).
        m.submodules.div = div = Divider(1, self._root_width, inv_width, bits_per_cycle=k,
                                         pipelined=self._pipelined, dividend_shift=numerics.LN_INV_BITS)

        # var_n takes three stages: the wide products (D*S2, and S1**2 as two DSP partial products),
        # their sums (+ eps, and the partial products), then the subtraction. The stages have no
        # enable; they end in a credit-counted FIFO (vfifo) in front of the ISqrt, so a row's sums
        # leave res_fifo only while vfifo has room for every row in flight: the ISqrt's ready reaches
        # only vfifo's read side, not res_fifo's and s1_fifo's counts (that stall chain missed
        # 300 MHz in the whole top). One cycle more to the ISqrt.
        va_valid, vp_valid, vb_valid = Signal(), Signal(), Signal()
        # Narrow S1 (small D) needs no split: one product.
        cut = _INV_CHUNK if s1_shape.width > _INV_CHUNK else s1_shape.width
        # D*S2 as two registered partial products (S2 is wider than a DSP48E2 operand): D * the low
        # _DS2_CHUNK bits and D * the rest, summed (with eps) in the next stage.
        ds2_cut = min(_DS2_CHUNK, s2_shape.width)
        va_ds2_lo = Signal(unsigned(ds2_cut + D.bit_length()), reset_less=True)
        va_ds2_hi = Signal(unsigned(max(1, s2_shape.width - ds2_cut + D.bit_length())), reset_less=True)
        va_pp_lo = Signal(signed(s1_shape.width + cut), reset_less=True)
        va_pp_hi = Signal(signed(max(1, 2 * s1_shape.width - cut + 1)), reset_less=True)
        va_eps = Signal.like(eps, reset_less=True)
        vp_ds2 = Signal(unsigned(self._sqrt_width), reset_less=True)
        vp_sq = Signal(unsigned(2 * s1_shape.width), reset_less=True)
        vb = Signal(self._sqrt_width, reset_less=True)
        m.submodules.var_fifo = vfifo = CreditFIFO(unsigned(self._sqrt_width), 3 + CreditFIFO.LATENCY + 1)
        m.d.comb += [
            res_fifo.o.ready.eq(s1_w_rdy & vfifo.room),
            res_take.eq(res_valid & s1_w_rdy & vfifo.room),
            s1_w_en.eq(res_take),
            s1_wp.data.eq(res_s1),
            vfifo.take.eq(res_take),
            vfifo.w_en.eq(vb_valid),
            vfifo.w_data.eq(vb),
        ]
        m.d.sync += [
            va_valid.eq(res_take),
            va_ds2_lo.eq(res_s2[:ds2_cut] * D),
            va_ds2_hi.eq(res_s2[ds2_cut:] * D if ds2_cut < s2_shape.width else 0),
            va_eps.eq(eps),
            va_pp_lo.eq(res_s1 * (res_s1[:cut] if cut < s1_shape.width else res_s1)),
            va_pp_hi.eq(res_s1 * res_s1[cut:].as_signed() if cut < s1_shape.width else 0),
            vp_valid.eq(va_valid),
            vp_ds2.eq(va_ds2_lo + (va_ds2_hi << ds2_cut) + va_eps),
            vp_sq.eq(va_pp_lo + (va_pp_hi << cut)),
            vb_valid.eq(vp_valid),
            # >= 0 mathematically (Cauchy-Schwarz); the true value fits in sqrt_width bits.
            vb.eq(vp_ds2 - vp_sq),
        ]
        root = isq.o.payload.root
        m.d.comb += [
            isq.i.valid.eq(vfifo.o.valid),
            isq.i.payload.eq(vfifo.o.payload),
            vfifo.o.ready.eq(isq.i.ready),
            div.i.valid.eq(isq.o.valid),
            div.i.payload.dividend.eq(1),                          # << LN_INV_BITS
            div.i.payload.divisor.eq(Mux(root == 0, 1, root)),     # den = max(1, isqrt(var_n))
            isq.o.ready.eq(div.i.ready),
        ]

        # ---- normalize pass ---------------------------------------------------------------------
        # A pipeline of _NORM_STAGES stages without enable, ending in a credit-counted FIFO: a beat
        # is issued only while the FIFO has room for every beat in flight, so o.ready reaches only
        # the FIFO's read side (no ready chain into the divider's FIFO, no enable on the stages).
        out_layout = data.StructLayout({"data": self.o.payload.shape(), "last": 1})
        m.submodules.out_fifo = out_fifo = CreditFIFO(out_layout, _NORM_STAGES + CreditFIFO.LATENCY + 1)
        m.d.comb += [self.o.valid.eq(out_fifo.o.valid), self.o.payload.eq(out_fifo.o.payload.data),
                     out_fifo.o.ready.eq(self.o.ready)]
        out_v = Signal()
        out_w = Signal(out_layout)
        m.d.comb += [out_fifo.w_en.eq(out_v), out_fifo.w_data.eq(out_w)]
        adv = 1

        row_active = Signal()
        out_beat = Signal(range(R))
        cur_s1 = Signal(s1_shape)
        cur_inv = Signal(inv_width)
        issue = row_active & out_fifo.room
        m.d.comb += out_fifo.take.eq(issue)
        # "out_beat is the row's last beat" as a register (no compare in front of the load decision
        # and the divider's output FIFO behind it).
        out_last = Signal(init=R == 1)
        issue_last = issue & out_last
        # A row's reciprocal only exists once all of its beats have been written, so issuing never
        # has to check the buffer level.
        # A row's S1 entered s1_fifo when its var_n did, long before its reciprocal leaves the
        # divider, so a divider result always finds its S1 (no FIFO level compare in the load path).
        load = (~row_active | issue_last) & div.o.valid
        m.d.comb += [div.o.ready.eq(load), s1_r_en.eq(load)]
        with m.If(load):
            m.d.sync += [cur_s1.eq(s1_rp.data), cur_inv.eq(div.o.payload.quotient),
                         row_active.eq(1)]
        with m.Elif(issue_last):
            m.d.sync += row_active.eq(0)
        with m.If(issue):
            m.d.sync += [
                out_beat.eq(Mux(out_last, 0, out_beat + 1)),
                out_last.eq(Mux(out_last, R == 1, out_beat == R - 2)),
                rd_ptr.eq(Mux(rd_ptr == self._depth - 1, 0, rd_ptr + 1)),
            ]
        m.d.comb += [
            buf_r.addr.eq(rd_ptr), buf_r.en.eq(1),
            par_r.addr.eq(out_beat), par_r.en.eq(1),
        ]
        # The count runs one cycle behind (from registered events: the input handshake feeds no
        # adder), so the room flag keeps one slot in hand: count is the true level of the previous
        # cycle, which can have grown by at most one since (the depth's margin covers the slot).
        in_go_r, issue_r = Signal(), Signal()
        m.d.sync += [in_go_r.eq(in_go), issue_r.eq(issue), count.eq(count + in_go_r - issue_r),
                     room.eq(below_next(count, in_go_r, issue_r, self._depth - 1))]

        # Stages: (1) buffer/param read, (2) read data registered, (3) D*x, (4) a = D*x - S1,
        # (5) a * inv as two registered DSP partial products, (6) their sum P, (7) z = round_shift(P,
        # 22), (8) z * gamma, (9) + beta, (10, 11) the output rounding shift's barrel shift (by the
        # multiple of 8, then by 0-7: one 64:1 select per bit mapped to 5 LUT levels in the whole
        # top), (12) its + 1, (13) saturation into the output register. One register level per arithmetic step keeps every path within 300 MHz.
        n_st = _NORM_STAGES
        vs = [Signal(name=f"nv{k}") for k in range(1, n_st)]
        lasts = [Signal(name=f"nlast{k}") for k in range(1, n_st)]
        # par[5] (gamma's multiply) and par[6] (beta's add), and the last inv_d, stay on reset: a
        # longer reset-less chain becomes a shift register (SRL) in yosys, and an SRL's slow
        # clock-to-out in front of a DSP48E2 cannot be absorbed as its input register.
        par = [Signal(param_layout, name=f"par{k}", reset_less=k not in (7, 8))
               for k in range(2, 10)]  # par[0] = stage 2
        s1_1 = Signal(s1_shape, reset_less=True)
        s1_d = [Signal(s1_shape, name=f"s1_{k}", reset_less=True) for k in (2, 3)]
        inv_d = [Signal(inv_width, name=f"inv_{k}", reset_less=k < 4) for k in (1, 2, 3, 4)]
        lo, hi = numerics.int_range(numerics.ACT_BITS)
        cut = _INV_CHUNK
        with m.If(adv):
            m.d.sync += [vs[0].eq(issue), lasts[0].eq(out_last), s1_1.eq(cur_s1), inv_d[0].eq(cur_inv),
                         s1_d[0].eq(s1_1), s1_d[1].eq(s1_d[0]), par[0].eq(par_r.data)]
            for k in range(1, len(inv_d)):
                m.d.sync += inv_d[k].eq(inv_d[k - 1])
            for k in range(1, n_st - 1):
                m.d.sync += [vs[k].eq(vs[k - 1]), lasts[k].eq(lasts[k - 1])]
            m.d.sync += [out_v.eq(vs[-1]), out_w.last.eq(lasts[-1])]
            for k in range(1, len(par)):
                m.d.sync += par[k].eq(par[k - 1])
            for j in range(L):
                def reg(shape, name):
                    return Signal(shape, name=f"{name}{j}", reset_less=True)
                # The buffer's read data is registered first, then D*x in a DSP, then - S1.
                x2 = reg(signed(numerics.RES_BITS), "x2_")
                xd3 = reg(a_shape, "xd3_")
                a2 = reg(a_shape, "a4_")
                m.d.sync += [x2.eq(buf_r.data[j]), xd3.eq(x2 * D), a2.eq(xd3 - s1_d[1])]
                inv_2 = inv_d[3]
                pp_lo, pp_hi = reg(signed(a_shape.width + cut), "pp_lo"), reg(
                    signed(a_shape.width + inv_width - cut), "pp_hi")
                m.d.sync += [pp_lo.eq(a2 * inv_2[:cut]), pp_hi.eq(a2 * inv_2[cut:])]
                p4 = reg(p_shape, "p4_")
                m.d.sync += p4.eq((pp_lo + (pp_hi << cut))[:p_shape.width].as_signed())   # |P| < p_bound
                # round_shift(P, 22) = ((P >> 21) + 1) >> 1: round half up with no wide constant.
                z5 = reg(z_shape, "z5_")
                m.d.sync += z5.eq((((p4 >> (z_shift - 1)) + 1) >> 1)[:z_shape.width].as_signed())
                zg6 = reg(m_shape, "zg6_")
                m.d.sync += zg6.eq(z5 * par[5].gamma[j])
                m7 = reg(m_shape, "m7_")
                m.d.sync += m7.eq(zg6 + par[6].beta[j])
                # round_shift(m, s) = ((2m >> s) + 1) >> 1 for every s in [0, SHIFT_MAX] (s = 0 gives
                # m); shifts past the width give 0 or -1 before the + 1, hence 0, as the golden
                # model does.
                # Arithmetic shifts compose: (x >> 8a) >> b == x >> (8a + b).
                t8a = reg(signed(m_shape.width + 1), "t8a_")
                m.d.sync += t8a.eq(Cat(Const(0, 1), m7).as_signed() >> (shift[3:] << 3))
                t8 = reg(signed(m_shape.width + 1), "t8_")
                m.d.sync += t8.eq(t8a >> shift[:3])
                u9 = reg(signed(m_shape.width + 1), "u9_")
                # Whether the rounded value fits int8, from t8 beside the + 1 (not from u9 after it:
                # a wide all-zeros/all-ones test of u9 in front of the output mux missed 300 MHz in
                # the whole top). (t8 + 1) >> 1 is in [lo, hi] iff t8 is in [2*lo - 1, 2*hi].
                fits9 = reg(unsigned(1), "fits9_")
                m.d.sync += [u9.eq(t8 + 1), fits9.eq((t8 >= 2 * lo - 1) & (t8 <= 2 * hi))]
                rs = u9 >> 1
                # When it does not fit, the sign of u9 is the sign of the saturation.
                m.d.sync += out_w.data[j].eq(Mux(fits9, rs[:numerics.ACT_BITS].as_signed(),
                                                 Mux(u9[-1], lo, hi)))

        out_last_go = self.o.valid & self.o.ready & out_fifo.o.payload.last
        in_first_go = in_go & (in_beat == 0)
        m.d.sync += [first_go_r.eq(in_first_go), last_go_r.eq(out_last_go),
                     in_flight.eq(in_flight + first_go_r - last_go_r),
                     in_flight_nz.eq(Mux(first_go_r & ~last_go_r, 1,
                                         Mux(last_go_r & ~first_go_r, in_flight != 1, in_flight != 0)))]
        return m
