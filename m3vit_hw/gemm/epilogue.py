"""GEMM epilogue: what happens to each finished output row chunk of the PE array.

The epilogue is a pipeline with one stage per concern, each a component of its own file:

1. :class:`~m3vit_hw.gemm.requantizer.Requantizer` (``golden.requantize``): bias add and requantization
   with a per-column multiplier, or the per-row multiplier of the AV product
   (``golden.attention_normalize``), or a raw int32 bypass;
2. :class:`~m3vit_hw.gemm.gelu.GeluStage` (``golden.gelu``): optional 256-entry table;
3. :class:`~m3vit_hw.gemm.residual.ResidualStage` (``golden.residual_add``, ``golden.moe_combine``):
   read-modify-write of the int16 residual row at the (possibly scattered) destination;
4. the sink: int8 results are written to the activation buffer, raw results leave on the ``o`` stream.

A beat is one ``lanes``-wide chunk of one output row. The buffers' words hold ``word_lanes`` elements
(PE columns); with ``lanes < word_lanes`` (``config.epi_lanes``) a word is ``word_lanes / lanes`` beats,
numbered by the beat's ``sub`` field: beat ``sub`` covers the word's lanes ``sub*lanes ..
sub*lanes+lanes-1``. The epilogue's DSP48E2s and registers then scale with ``lanes``, not with the PE
array; writes put the beat's lanes in place with the lane write enables, a residual read selects the
beat's lanes of the word, and RAW beats are collected back into whole words on ``o``. The GEMM
command's :class:`EpilogueMode` says which stages act:

=========  ==========================================================  ========================
mode       result (``golden``)                                         destination
=========  ==========================================================  ========================
RAW        ``acc`` (int32: attention scores, router logits)            ``o`` stream
ACT8       ``requantize(acc, bias, mult, shift, 8)``                   activation buffer
GELU8      ``gelu(requantize(acc, bias, mult, shift, 8), lut)``        activation buffer
ATTN8      ``attention_normalize(acc, row_scale, shift)``              activation buffer
RES16      ``requantize(acc, bias, mult, shift, 16)``                  residual buffer (write)
RESADD     ``residual_add(res, requantize(..., 16))``                  residual buffer (RMW)
COMBINE    ``moe_combine(res, requantize(..., 16), row_scale)``        residual buffer (RMW)
=========  ==========================================================  ========================

For ATTN8, ``shift`` is the golden ``out_shift``; the epilogue adds ``AV_RECIP_BITS`` (so
``shift <= SHIFT_MAX - AV_RECIP_BITS``) and uses ``row_scale`` (the row's reciprocal) as the multiplier
of every lane, with no bias. For COMBINE, ``row_scale`` is the row's Q0.15 combine weight.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int
from ..lib.skid import SkidBuffer
from .gelu import GeluStage
from .requantizer import Requantizer, check_lanes
from .residual import ResidualStage, ResOp

__all__ = ["Epilogue", "EpilogueMode", "EpilogueInLayout", "StreamOutLayout", "LATENCY"]


class EpilogueMode(enum.Enum, shape=3):
    """What the epilogue computes for a GEMM (see the module docstring)."""
    RAW = 0
    ACT8 = 1
    GELU8 = 2
    ATTN8 = 3
    RES16 = 4
    RESADD = 5
    COMBINE = 6


class _Sink(enum.Enum, shape=2):
    NONE = 0
    ACT = 1
    STREAM = 2


#: Cycles from an accepted input beat to its write / output beat (no stalls): the three stages and
#: the skid buffer in front of the sink (requantizer -> GELU -> residual -> skid -> sink).
LATENCY = Requantizer.LATENCY + GeluStage.LATENCY + ResidualStage.LATENCY + SkidBuffer.LATENCY


class EpilogueInLayout(data.StructLayout):
    """One output row chunk entering the epilogue.

    Fields
    ------
    acc : ArrayLayout(signed(ACC_BITS), lanes)
    bias : ArrayLayout(signed(BIAS_BITS), lanes)
        Per-column bias (ignored by RAW and ATTN8).
    mult : ArrayLayout(unsigned(MULT_BITS), lanes)
        Per-column multiplier (ignored by RAW and ATTN8).
    row_scale : unsigned(MULT_BITS)
        ATTN8: the row's reciprocal multiplier; COMBINE: the row's Q0.15 combine weight.
    shift : range(SHIFT_MAX + 1)
        Requantization shift (ATTN8: ``out_shift``).
    mode : EpilogueMode
    addr : unsigned(addr_width)
        Destination word (activation or residual buffer), or the index passed on ``o``.
    mask : unsigned(lanes)
        Valid lanes (bit ``j`` = lane ``j``); only these are written.
    last : 1
        Last beat of the GEMM: ``done`` pulses when it has been written.
    sub : range(beats)
        Only with ``beats > 1``: which ``lanes``-wide part of the destination word this beat is.
    """

    def __init__(self, lanes, addr_width, beats=1):
        fields = {
            "acc": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "bias": data.ArrayLayout(signed(numerics.BIAS_BITS), lanes),
            "mult": data.ArrayLayout(unsigned(numerics.MULT_BITS), lanes),
            "row_scale": unsigned(numerics.MULT_BITS),
            "shift": range(numerics.SHIFT_MAX + 1),
            "mode": EpilogueMode,
            "addr": unsigned(addr_width),
            "mask": unsigned(lanes),
            "last": 1,
        }
        if beats > 1:
            fields["sub"] = range(beats)
        super().__init__(fields)


class StreamOutLayout(data.StructLayout):
    """A RAW result beat on the ``o`` stream: ``data`` (int32 lanes), ``addr`` (the destination
    word the command's addressing gives this chunk), ``mask`` (valid lanes), ``last`` (of the GEMM)."""

    def __init__(self, lanes, addr_width):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "addr": unsigned(addr_width),
            "mask": unsigned(lanes),
            "last": 1,
        })


class Epilogue(wiring.Component):
    """The GEMM epilogue pipeline (requantize, GELU, residual update, sink).

    Parameters
    ----------
    lanes : int
        Elements per beat, in ``[1, 256]``.
    act_addr_width : int
        Address bits of the activation buffer (int8 words of ``word_lanes`` elements).
    res_addr_width : int
        Address bits of the residual buffer (int16 words of ``word_lanes`` elements).
    word_lanes : int or None
        Elements per buffer word (PE columns), a multiple of ``lanes``; default ``lanes``.

    Interface attributes
    --------------------
    i : In(stream.Signature(EpilogueInLayout(lanes, max(act_addr_width, res_addr_width), beats)))
        (``beats = word_lanes / lanes``.)
        Row chunks. ``i.ready`` is a register (the requantizer's credit count); it drops when the
        pipeline backs up behind ``o`` (only RAW beats wait for ``o.ready``) or behind a residual
        read-modify-write that waits for an earlier write to the same word.
    o : Out(stream.Signature(StreamOutLayout(word_lanes, addr_width)))
        RAW results, in order, one beat per word: with ``beats > 1`` the word's beats (``sub`` 0 to
        ``beats - 1``, consecutive on ``i``) are collected into one.
    act_wr : In(memory.WritePort.Signature(act_addr_width, ArrayLayout(signed(8), word_lanes), granularity=1))
        Activation-buffer write port (ACT8, GELU8, ATTN8).
    res_rd, res_wr : residual-buffer ports, see :class:`~m3vit_hw.gemm.residual.ResidualStage`.
    gelu_lut : Out(memory.WritePort.Signature(8, signed(8)))
        GELU table write port, see :class:`~m3vit_hw.gemm.gelu.GeluStage`.
    done : Out(1)
        Pulses for one cycle when the ``last`` beat has been written (or transferred on ``o``).
    busy : Out(1)
        A beat is inside the epilogue.

    Latency and throughput
    ----------------------
    :data:`LATENCY` (19) cycles from input to write, one beat per cycle. No combinational path runs
    from ``o.ready`` further than the sink's skid buffer: the requantizer and the residual stage
    (credit-counted output FIFOs) and GELU (a skid buffer) take ``i.ready`` from registers, and a
    skid buffer after the residual stage cuts the rest of the ready chain.
    """

    def __init__(self, lanes, act_addr_width, res_addr_width, word_lanes=None):
        check_lanes(lanes)
        check_int("act_addr_width", act_addr_width, 1, 32)
        check_int("res_addr_width", res_addr_width, 1, 32)
        if word_lanes is None:
            word_lanes = lanes
        check_int("word_lanes", word_lanes, lanes, 256)
        if word_lanes % lanes:
            raise ValueError(f"word_lanes must be a multiple of lanes={lanes}, not {word_lanes}")
        self._lanes = lanes
        self._word_lanes = word_lanes
        self._beats = word_lanes // lanes
        self._act_aw = act_addr_width
        self._res_aw = res_addr_width
        self._aw = max(act_addr_width, res_addr_width)
        W = word_lanes
        super().__init__({
            "i": In(stream.Signature(EpilogueInLayout(lanes, self._aw, self._beats))),
            "o": Out(stream.Signature(StreamOutLayout(W, self._aw))),
            "act_wr": In(memory.WritePort.Signature(
                addr_width=act_addr_width, shape=data.ArrayLayout(signed(numerics.ACT_BITS), W),
                granularity=1)),
            "res_rd": In(memory.ReadPort.Signature(
                addr_width=res_addr_width, shape=data.ArrayLayout(signed(numerics.RES_BITS), W))),
            "res_wr": In(memory.WritePort.Signature(
                addr_width=res_addr_width, shape=data.ArrayLayout(signed(numerics.RES_BITS), W),
                granularity=1)),
            "gelu_lut": Out(memory.WritePort.Signature(addr_width=numerics.ACT_BITS, shape=signed(numerics.ACT_BITS))),
            "done": Out(1),
            "busy": Out(1),
        })

    @property
    def lanes(self):
        return self._lanes

    @property
    def word_lanes(self):
        return self._word_lanes

    @property
    def beats(self):
        """Beats per buffer word (``word_lanes / lanes``)."""
        return self._beats

    @property
    def addr_width(self):
        return self._aw

    def elaborate(self, platform):
        m = Module()
        L, W, S = self._lanes, self._word_lanes, self._beats
        # With several beats per word the stages carry a beat address {word, sub}: the residual
        # stage's hazard check then compares beats, and beats of one word never wait on each other
        # (they write disjoint lanes).
        sb = (S - 1).bit_length()
        aw = self._aw + sb

        after_res = data.StructLayout({"sink": _Sink, "last": 1})
        after_gelu = data.StructLayout({
            "op": ResOp, "weight": unsigned(numerics.COMBINE_WEIGHT_BITS), "addr": unsigned(aw),
            "mask": unsigned(L), "rest": after_res})
        after_rq = data.StructLayout({"gelu": 1, "rest": after_gelu})

        m.submodules.requant = rq = Requantizer(L, after_rq)
        m.submodules.gelu = ge = GeluStage(L, after_gelu)
        # The residual stage carries the full destination address (activation-buffer addresses
        # pass through it too); only its memory ports are narrowed to the residual buffer.
        m.submodules.residual = rs = ResidualStage(L, aw, after_res)

        # Mode decode. One shared datapath; the mode only steers operands and destinations.
        p = self.i.payload
        mode = p.mode
        is_attn = mode == EpilogueMode.ATTN8
        is_res = (mode == EpilogueMode.RES16) | (mode == EpilogueMode.RESADD) | (mode == EpilogueMode.COMBINE)
        attn_shift = p.shift + numerics.AV_RECIP_BITS
        m.d.comb += [
            rq.i.valid.eq(self.i.valid),
            self.i.ready.eq(rq.i.ready),
            rq.i.payload.raw.eq(mode == EpilogueMode.RAW),
            rq.i.payload.out16.eq(is_res),
            rq.i.payload.shift.eq(Mux(is_attn, Mux(attn_shift > numerics.SHIFT_MAX, numerics.SHIFT_MAX, attn_shift),
                                      p.shift)),
            rq.i.payload.meta.gelu.eq(mode == EpilogueMode.GELU8),
            rq.i.payload.meta.rest.weight.eq(p.row_scale[:numerics.COMBINE_WEIGHT_BITS]),
            rq.i.payload.meta.rest.addr.eq(p.addr if S == 1 else Cat(p.sub[:sb], p.addr)),
            rq.i.payload.meta.rest.mask.eq(p.mask),
            rq.i.payload.meta.rest.rest.last.eq(p.last),
        ]
        for j in range(L):
            m.d.comb += [
                rq.i.payload.acc[j].eq(p.acc[j]),
                rq.i.payload.bias[j].eq(Mux(is_attn, 0, p.bias[j])),
                rq.i.payload.mult[j].eq(Mux(is_attn, p.row_scale, p.mult[j])),
            ]
        with m.Switch(mode):
            with m.Case(EpilogueMode.RES16):
                m.d.comb += rq.i.payload.meta.rest.op.eq(ResOp.WRITE)
            with m.Case(EpilogueMode.RESADD):
                m.d.comb += rq.i.payload.meta.rest.op.eq(ResOp.ADD)
            with m.Case(EpilogueMode.COMBINE):
                m.d.comb += rq.i.payload.meta.rest.op.eq(ResOp.COMBINE)
            with m.Default():
                m.d.comb += rq.i.payload.meta.rest.op.eq(ResOp.PASS)
        with m.Switch(mode):
            with m.Case(EpilogueMode.RAW):
                m.d.comb += rq.i.payload.meta.rest.rest.sink.eq(_Sink.STREAM)
            with m.Case(EpilogueMode.ACT8, EpilogueMode.GELU8, EpilogueMode.ATTN8):
                m.d.comb += rq.i.payload.meta.rest.rest.sink.eq(_Sink.ACT)
            with m.Default():
                m.d.comb += rq.i.payload.meta.rest.rest.sink.eq(_Sink.NONE)

        # Requantizer -> GELU -> residual: the stage controls peel off the side data. The
        # requantizer's output (its credit FIFO's output register) feeds GELU's table lookup, and
        # GELU's i.ready is a register.
        m.d.comb += [
            ge.i.valid.eq(rq.o.valid),
            rq.o.ready.eq(ge.i.ready),
            ge.i.payload.data.eq(rq.o.payload.data),
            ge.i.payload.enable.eq(rq.o.payload.meta.gelu),
            ge.i.payload.meta.eq(rq.o.payload.meta.rest),
        ]
        wiring.connect(m, ge.lut, wiring.flipped(self.gelu_lut))

        # GELU -> residual (whose i.ready comes from registers: its hazard flag and credits).
        gm = ge.o.payload.meta
        m.d.comb += [
            rs.i.valid.eq(ge.o.valid),
            ge.o.ready.eq(rs.i.ready),
            rs.i.payload.data.eq(ge.o.payload.data),
            rs.i.payload.op.eq(gm.op),
            rs.i.payload.weight.eq(gm.weight),
            rs.i.payload.addr.eq(gm.addr),
            rs.i.payload.mask.eq(gm.mask),
            rs.i.payload.meta.eq(gm.rest),
        ]
        m.d.comb += [
            self.res_rd.addr.eq(rs.rd.addr[sb:][:self._res_aw]),
            self.res_rd.en.eq(rs.rd.en),
            self.res_wr.addr.eq(rs.wr.addr[sb:][:self._res_aw]),
        ]
        if S == 1:
            m.d.comb += [rs.rd.data.eq(self.res_rd.data), self.res_wr.en.eq(rs.wr.en),
                         self.res_wr.data.eq(rs.wr.data)]
        else:
            # The read data belongs to the beat whose read was issued last (the port holds its data
            # while en is low, and so does rd_sub).
            rd_sub = Signal(range(S))
            with m.If(rs.rd.en):
                m.d.sync += rd_sub.eq(rs.rd.addr[:sb])
            with m.Switch(rd_sub):
                for k in range(S):
                    with m.Case(k):
                        m.d.comb += [rs.rd.data[j].eq(self.res_rd.data[k * L + j]) for j in range(L)]
            self._place(m, self.res_wr, rs.wr.addr[:sb], rs.wr.en, rs.wr.data)

        # Residual -> skid -> sink: the consumer's o.ready ends at the skid buffer.
        m.submodules.sink_skid = ss = SkidBuffer(rs.o.payload.shape())
        wiring.connect(m, rs.o, ss.i)

        # Sink. Memory writes never stall; only RAW beats wait for the consumer of `o`.
        out = ss.o.payload
        sink = out.meta.sink
        to_stream = sink == _Sink.STREAM
        word_addr = out.addr[sb:]
        m.d.comb += [
            self.o.payload.addr.eq(word_addr),
            self.o.payload.last.eq(out.meta.last),
            self.act_wr.addr.eq(word_addr[:self._act_aw]),
            self.done.eq(ss.o.valid & ss.o.ready & out.meta.last),
            self.busy.eq(rq.busy | ge.busy | rs.busy | ss.o.valid),
        ]
        act8 = data.ArrayLayout(signed(numerics.ACT_BITS), L)
        act_data = Signal(act8)
        for j in range(L):
            m.d.comb += act_data[j].eq(out.data[j][:numerics.ACT_BITS])
        act_en = Mux(ss.o.valid & (sink == _Sink.ACT), out.mask, 0)
        if S == 1:
            m.d.comb += [
                ss.o.ready.eq(~to_stream | self.o.ready),
                self.o.valid.eq(ss.o.valid & to_stream),
                self.o.payload.data.eq(out.data),
                self.o.payload.mask.eq(out.mask),
                self.act_wr.en.eq(act_en),
                self.act_wr.data.eq(act_data),
            ]
        else:
            sub = out.addr[:sb]
            self._place(m, self.act_wr, sub, act_en, act_data)
            # RAW: the word's first S-1 beats wait in a collector; the last one completes the word
            # and waits on o.ready. Beats of a word are consecutive (the engine drains one PE row
            # as its S beats before the next), so one collector suffices.
            word_end = sub == S - 1
            coll = [Signal(data.ArrayLayout(signed(numerics.ACC_BITS), L), name=f"coll{k}",
                           reset_less=True) for k in range(S - 1)]
            coll_mask = [Signal(L, name=f"coll_mask{k}", reset_less=True) for k in range(S - 1)]
            with m.If(ss.o.valid & to_stream & ~word_end):
                with m.Switch(sub):
                    for k in range(S - 1):
                        with m.Case(k):
                            m.d.sync += [coll[k].eq(out.data), coll_mask[k].eq(out.mask)]
            m.d.comb += [
                ss.o.ready.eq(~to_stream | ~word_end | self.o.ready),
                self.o.valid.eq(ss.o.valid & to_stream & word_end),
                self.o.payload.data.eq(Cat(*coll, out.data)),
                self.o.payload.mask.eq(Cat(*coll_mask, out.mask)),
            ]
        return m

    def _place(self, m, port, sub, en, value):
        """Write one beat's ``lanes`` into beat ``sub`` of a ``word_lanes`` word: the data is the
        beat repeated across the word (wiring only), the lane enables select its part."""
        L, S = self._lanes, self._beats
        m.d.comb += port.data.eq(Cat(*([value] * S)))
        with m.Switch(sub):
            for k in range(S):
                with m.Case(k):
                    m.d.comb += port.en.eq(en << (k * L))
