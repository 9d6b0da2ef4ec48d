"""``AttnSequencer``: the attention sub-layer's control, a client of the shared datapath.

It owns the :class:`~m3vit_hw.attention.score_path.ScorePath` (reorder, streamed softmax, e8 and
reciprocal writer), the score path's private score reorder buffer, and all of the control: start, the
fetch sequencer (weight and parameter streamer commands in tile-plan order), the compute sequencer (the
engine commands, their schedule and overlap; see :mod:`m3vit_hw.attention.attention_layer`) and the
counters. It owns no engine, no activation, e8, residual or row-table buffer, no streamer and no
weight buffer: those are the datapath's, reached through

* ``client`` (:class:`~m3vit_hw.dense.client.GemmClientSignature`): engine commands and done/busy,
  streamer commands, the ping-pong buffers' tile handshake (``tile_valid``/``release``; both halves are
  released when a QKV or projection command is done); the GELU table port is never written;
* ``o``: the engine's result stream (the RAW scores of the QKᵀ commands; no other command of
  attention emits on it);
* ``e8_wr``: the e8 bank's write port (the engine reads the bank as A addresses ``>= e8_base``);
* ``rt_wr``: the datapath's row table's write port (the AV reciprocals; the engine reads them).

:class:`~m3vit_hw.attention.attention_layer.AttentionLayer` is the standalone wrapper (datapath pieces
plus this client); its docstring has the wiring.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..dense.client import GemmClientSignature
from ..gemm.epilogue import EpilogueMode, StreamOutLayout
from ..gemm.gemm_engine import RowEntryLayout
from ..rowops.softmax import SHIFT_BITS
from .attn_layout import AttnLayout, BufferMap
from .score_path import ScorePath, mem_addr_width

__all__ = ["AttnSequencer", "AttnStartLayout", "Phase"]


class Phase(enum.Enum, shape=2):
    """The kind of an engine command (the counters' phases)."""
    QKV = 0
    QK = 1
    AV = 2
    PROJ = 3


class AttnStartLayout(data.StructLayout):
    """The command that starts one attention sub-layer.

    Fields
    ------
    tokens : T in ``[1, token_capacity]``.
    base : external byte address of the :func:`pack_attention` image (a multiple of the memory beat).
    c_mult, c_shift, out_mult, out_shift : the attention softmax and AV epilogue constants.
    qkv_shift, proj_shift : the QKV and projection requantization shifts.
    """

    def __init__(self, config, addr_width):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "base": unsigned(addr_width),
            "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS),
            "c_shift": unsigned(SHIFT_BITS),
            "out_mult": unsigned(numerics.AV_OUT_MULT_BITS),
            "out_shift": range(numerics.SHIFT_MAX - numerics.AV_RECIP_BITS + 1),
            "qkv_shift": range(numerics.SHIFT_MAX + 1),
            "proj_shift": range(numerics.SHIFT_MAX + 1),
        })


def _ceil_div_const(value, c):
    """``ceil(value / c)`` for a constant ``c`` (a shift when ``c`` is a power of two)."""
    if c & (c - 1) == 0:
        return (value + c - 1) >> (c.bit_length() - 1)
    return (value + c - 1) // c


class AttnSequencer(wiring.Component):
    """The attention sub-layer's sequencer: a client of an engine, a weight path, an e8 bank and a row
    table it does not own.

    Parameters
    ----------
    config : AcceleratorConfig
        Sizes (token capacity, ``q_tile``, PE array, address widths) and ``counter_width``.
    layout : AttnLayout
        The tile plan (:func:`~m3vit_hw.attention.attn_layout.plan_attention` of ``config``).
    bmap : BufferMap
        Where the operands live (:func:`~m3vit_hw.attention.attn_layout.buffer_map` of ``config``).

    Interface attributes
    --------------------
    start : In(stream.Signature(AttnStartLayout(config, config.mem_addr_width)))
        Accepted when idle (``~busy``).
    done : Out(1)
        Pulses when the projection's last command is done (its results are in the residual buffer)
        and the engine is idle.
    busy : Out(1)
        From the accepted ``start`` to ``done``.
    client : Out(GemmClientSignature(config))
    o : In(stream.Signature(StreamOutLayout(pe_cols, dst_addr_bits)))
        The engine's result stream (the QKᵀ RAW scores); ready follows the score path.
    e8_wr : In(memory.WritePort.Signature(addr_width=ceil_log2(bmap.e8_words), shape=ArrayLayout(signed(8), pe_cols)))
        Driven by the sequencer (the write port's members are inputs of the memory): the e8 bank, word
        ``a`` = engine A address ``bmap.e8_base + a``. Whole-word writes (``en`` is one bit).
    rt_wr : In(memory.WritePort.Signature(addr_width=config.rowtab_addr_bits, shape=RowEntryLayout(config)))
        Driven by the sequencer: the row table (entries ``0 .. 2 * bmap.q_pad - 1``).
    cycles, compute_cycles, engine_idle_cycles, attn_cycles, attn_compute_cycles, softmax_cycles,
    overlap_cycles : Out(counter_width)
    phase_cycles : Out(ArrayLayout(counter_width, 4))
        See :mod:`m3vit_hw.attention.attention_layer` (reset by ``start``, valid after ``done``).

    Attributes
    ----------
    score : ScorePath
    score_buffer : amaranth.lib.memory.Memory
        The private score reorder buffer (``bmap.score_buffer_words`` int32 words of ``pe_cols``).
    """

    def __init__(self, config, layout, bmap):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if not isinstance(layout, AttnLayout):
            raise TypeError(f"layout must be an AttnLayout, not {layout!r}")
        if not isinstance(bmap, BufferMap):
            raise TypeError(f"bmap must be a BufferMap, not {bmap!r}")
        self._config, self._layout, self._bmap = config, layout, bmap
        self._aw = config.mem_addr_width
        C = config.pe_cols
        self.rowtab_depth = 1 << config.rowtab_addr_bits
        self.score = ScorePath(config, bmap, rowtab_depth=self.rowtab_depth)
        self.score_buffer = memory.Memory(shape=data.ArrayLayout(signed(numerics.ACC_BITS), C),
                                          depth=bmap.score_buffer_words, init=[])
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(AttnStartLayout(config, config.mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "client": Out(GemmClientSignature(config)),
            "o": In(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "e8_wr": In(memory.WritePort.Signature(addr_width=mem_addr_width(bmap.e8_words), shape=word8)),
            "rt_wr": In(memory.WritePort.Signature(addr_width=config.rowtab_addr_bits,
                                                   shape=RowEntryLayout(config))),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "engine_idle_cycles": Out(cw),
            "attn_cycles": Out(cw),
            "attn_compute_cycles": Out(cw),
            "softmax_cycles": Out(cw),
            "overlap_cycles": Out(cw),
            "phase_cycles": Out(data.ArrayLayout(cw, 4)),
        })

    def _tile_rom(self, m, index, name):
        """Combinational lookup of the static tile plan."""
        cfg, lay = self._config, self._layout
        C = cfg.pe_cols
        t = Signal(data.StructLayout({
            "w_off": unsigned(self._aw), "w_len": unsigned(self._aw),
            "p_off": unsigned(self._aw), "p_len": unsigned(self._aw),
            "proj": 1, "first_proj": 1, "last": 1, "last_of_head": 1, "qk_part": 1,
            "n": range(cfg.largest_n + 1), "n0w": range(-(-cfg.largest_n // C) + 1),
        }), name=name)
        first_proj = next(tl.index for tl in lay.tiles if tl.kind == "proj")
        with m.Switch(index):
            for tl in lay.tiles:
                with m.Case(tl.index):
                    m.d.comb += [
                        t.w_off.eq(tl.w_offset), t.w_len.eq(tl.w_bytes),
                        t.p_off.eq(tl.p_offset), t.p_len.eq(tl.p_bytes),
                        t.proj.eq(tl.kind == "proj"), t.first_proj.eq(tl.index == first_proj),
                        t.last.eq(tl.index == len(lay.tiles) - 1), t.last_of_head.eq(tl.last_of_head),
                        t.qk_part.eq(tl.part == "qk"),
                        t.n.eq(tl.n), t.n0w.eq(tl.n0 // C),
                    ]
        return t

    def elaborate(self, platform):
        m = Module()
        cfg, lay, bm = self._config, self._layout, self._bmap
        C = cfg.pe_cols
        D, hd = cfg.model.dim, cfg.model.head_dim
        ntl = len(lay.tiles)
        cl = self.client
        m.submodules.score = sp = self.score
        m.submodules.scores = sbuf = self.score_buffer
        wiring.connect(m, sp.sbuf_wr, sbuf.write_port())
        wiring.connect(m, sp.sbuf_rd, sbuf.read_port())
        wiring.connect(m, sp.e8_wr, wiring.flipped(self.e8_wr))
        wiring.connect(m, sp.rt_wr, wiring.flipped(self.rt_wr))
        wiring.connect(m, wiring.flipped(self.o), sp.i)
        msb = cfg.b_addr_bits - 1

        # ---- start and parameters ----------------------------------------------------------------
        prm = Signal(AttnStartLayout(cfg, self._aw))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += self.start.ready.eq(~running)
        ntiles = Signal(range(cfg.token_capacity + 1))     # query tiles per head
        beats = Signal(range(bm.score_words + 1))
        with m.If(start):
            p = self.start.payload
            m.d.sync += [prm.eq(p), running.eq(1),
                         ntiles.eq(_ceil_div_const(p.tokens, bm.q_tile)),
                         beats.eq(_ceil_div_const(p.tokens, C))]
        T = prm.tokens
        m.d.comb += [
            sp.params.tokens.eq(T), sp.params.beats.eq(beats), sp.params.c_mult.eq(prm.c_mult),
            sp.params.c_shift.eq(prm.c_shift), sp.params.out_mult.eq(prm.out_mult),
        ]

        # ---- fetch sequencer: every tile's panels and parameter words, in plan order -------------
        fw = Signal(range(ntl + 1))
        fp = Signal(range(ntl + 1))
        tw_ = self._tile_rom(m, fw, "fetch_w_tile")
        tp_ = self._tile_rom(m, fp, "fetch_p_tile")
        wcmd, pcmd = cl.wcmd, cl.pcmd
        m.d.comb += [
            wcmd.valid.eq(running & (fw < ntl)),
            wcmd.payload.addr.eq(prm.base + tw_.w_off), wcmd.payload.length.eq(tw_.w_len),
            wcmd.payload.tag.eq(fw),
            pcmd.valid.eq(running & (fp < ntl)),
            pcmd.payload.addr.eq(prm.base + tp_.p_off), pcmd.payload.length.eq(tp_.p_len),
            pcmd.payload.tag.eq(fp),
        ]
        with m.If(start):
            m.d.sync += [fw.eq(0), fp.eq(0)]
        with m.Else():
            with m.If(wcmd.valid & wcmd.ready):
                m.d.sync += fw.eq(fw + 1)
            with m.If(pcmd.valid & pcmd.ready):
                m.d.sync += fp.eq(fp + 1)

        # ---- in-flight engine commands (their phases, in order) ---------------------------------
        m.submodules.inflight = infl = fifo.SyncFIFO(width=2, depth=8)
        head_phase = Signal(Phase)
        m.d.comb += [head_phase.eq(infl.r_data), infl.r_en.eq(cl.gemm_done)]
        weight_done = cl.gemm_done & ((head_phase == Phase.QKV) | (head_phase == Phase.PROJ))
        m.d.comb += sp.slot_release.eq(cl.gemm_done & (head_phase == Phase.AV))
        held = Signal()
        m.d.comb += cl.release.eq(weight_done)

        # ---- compute sequencer -------------------------------------------------------------------
        ti = Signal(range(ntl + 1))
        tc = self._tile_rom(m, ti, "compute_tile")
        qk_next = Signal(range(cfg.token_capacity + 1))
        av_next = Signal(range(cfg.token_capacity + 1))
        sm_done = Signal(range(cfg.token_capacity + 1))
        qk_slot, av_slot = Signal(), Signal()
        qk_rows_left = Signal(range(cfg.token_capacity + 1))   # T - r0 of the next QKᵀ tile
        av_rows_left = Signal(range(cfg.token_capacity + 1))
        qk_a = Signal(cfg.act_addr_bits)                       # Q rows of the next QKᵀ tile
        av_dst = Signal(cfg.dst_addr_bits)                     # context rows of the next AV tile
        head_off = Signal(cfg.dst_addr_bits)                   # head * hw
        g = cl.gemm
        gp = g.payload
        push = g.valid & g.ready
        m.d.comb += [infl.w_en.eq(push)]
        q_tile = bm.q_tile
        in_attn = Signal()
        act_flag = 1 << msb
        with m.If(sp.tile_done):
            m.d.sync += sm_done.eq(sm_done + 1)
        with m.If(weight_done):
            m.d.sync += held.eq(0)

        def tile_command():
            """Drive the engine command (and its phase) of weight tile ``tc`` (QKV or proj)."""
            m.d.comb += [
                gp.m.eq(T), gp.n.eq(tc.n), gp.a_unsigned.eq(0), gp.b_trans.eq(0),
                gp.b_base.eq(0), gp.b_k_stride.eq(1), gp.colp_base.eq(0),
            ]
            with m.If(tc.proj):
                m.d.comb += [
                    gp.k.eq(lay.proj_k), gp.a_base.eq(bm.ctx_base), gp.a_stride.eq(bm.ctx_pitch),
                    gp.b_tile_stride.eq(lay.proj_k), gp.dst_base.eq(tc.n0w),
                    gp.dst_stride.eq(bm.row_words), gp.shift.eq(prm.proj_shift),
                    gp.mode.eq(EpilogueMode.RESADD), gp.sync.eq(tc.first_proj),
                    infl.w_data.eq(Phase.PROJ),
                ]
            with m.Else():
                m.d.comb += [
                    gp.k.eq(D), gp.a_base.eq(0), gp.a_stride.eq(bm.row_words),
                    gp.b_tile_stride.eq(D), gp.dst_base.eq(bm.qkv_base + tc.n0w),
                    gp.dst_stride.eq(bm.qkv_pitch), gp.shift.eq(prm.qkv_shift),
                    gp.mode.eq(EpilogueMode.ACT8), infl.w_data.eq(Phase.QKV),
                ]

        # The next head's first Q|K tile may be issued early, while the head's last AV waits for its
        # softmax tile (it writes only Q and K, which no unfinished command of the head reads).
        early = Signal()
        tile_ready = cl.tile_valid & ~held & ~weight_done

        with m.FSM(name="seq"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [ti.eq(0), held.eq(0), head_off.eq(0)]
                    m.next = "WAIT_TILE"
            with m.State("WAIT_TILE"):
                with m.If(tile_ready):
                    m.next = "ISSUE_TILE"
            with m.State("ISSUE_TILE"):
                m.d.comb += g.valid.eq(infl.w_rdy)
                tile_command()
                with m.If(push):
                    m.d.sync += held.eq(1)
                    with m.If(tc.last):
                        m.next = "WAIT_DONE"
                    with m.Elif(tc.last_of_head):
                        # From here on ``ti`` is the next tile (a candidate for the early issue).
                        m.d.sync += [ti.eq(ti + 1), early.eq(0), qk_next.eq(0), av_next.eq(0), sm_done.eq(0),
                                     qk_rows_left.eq(T), av_rows_left.eq(T),
                                     qk_a.eq(bm.qkv_base), av_dst.eq(bm.ctx_base + head_off)]
                        m.next = "ATTN"
                    with m.Else():
                        m.d.sync += ti.eq(ti + 1)
                        m.next = "WAIT_TILE"
            with m.State("ATTN"):
                m.d.comb += in_attn.eq(1)
                can_qk = (qk_next < ntiles) & (qk_next <= av_next + 1) & sp.tiles.ready
                can_av = (av_next < qk_next) & (sm_done > av_next)
                qk_rows = Mux(qk_rows_left > q_tile, q_tile, qk_rows_left)
                av_rows = Mux(av_rows_left > q_tile, q_tile, av_rows_left)
                can_early = (qk_next == ntiles) & ~early & tc.qk_part & tile_ready
                m.d.comb += [g.valid.eq(infl.w_rdy & (can_qk | can_av | can_early)), gp.colp_base.eq(0)]
                with m.If(~can_qk & ~can_av & can_early):
                    tile_command()
                    with m.If(push):
                        m.d.sync += [held.eq(1), early.eq(1), ti.eq(ti + 1)]
                with m.Elif(can_qk):
                    m.d.comb += [
                        gp.m.eq(qk_rows), gp.k.eq(hd), gp.n.eq(T),
                        gp.a_base.eq(qk_a), gp.a_stride.eq(bm.qkv_pitch),
                        gp.b_base.eq(act_flag | (bm.qkv_base + bm.hw)), gp.b_trans.eq(1),
                        gp.b_k_stride.eq(bm.qkv_pitch), gp.b_tile_stride.eq(C * bm.qkv_pitch),
                        gp.dst_base.eq(Mux(qk_slot, bm.score_slot, 0)), gp.dst_stride.eq(bm.score_words),
                        gp.mode.eq(EpilogueMode.RAW), gp.sync.eq(qk_next == 0),
                        infl.w_data.eq(Phase.QK),
                        sp.tiles.valid.eq(push), sp.tiles.payload.eq(qk_rows),
                    ]
                    with m.If(push):
                        m.d.sync += [qk_next.eq(qk_next + 1), qk_slot.eq(~qk_slot),
                                     qk_rows_left.eq(qk_rows_left - qk_rows),
                                     qk_a.eq(qk_a + q_tile * bm.qkv_pitch)]
                with m.Else():
                    m.d.comb += [
                        gp.m.eq(av_rows), gp.k.eq(T), gp.n.eq(hd),
                        gp.a_base.eq(bm.e8_base + Mux(av_slot, bm.e8_slot, 0)),
                        gp.a_stride.eq(bm.score_words), gp.a_unsigned.eq(1),
                        gp.b_base.eq(act_flag | (bm.qkv_base + 2 * bm.hw)),
                        gp.b_k_stride.eq(bm.qkv_pitch), gp.b_tile_stride.eq(1),
                        gp.rowtab_base.eq(Mux(av_slot, bm.q_pad, 0)),
                        gp.dst_base.eq(av_dst), gp.dst_stride.eq(bm.ctx_pitch),
                        gp.shift.eq(prm.out_shift), gp.mode.eq(EpilogueMode.ATTN8),
                        infl.w_data.eq(Phase.AV),
                    ]
                    with m.If(push):
                        m.d.sync += [av_next.eq(av_next + 1), av_slot.eq(~av_slot),
                                     av_rows_left.eq(av_rows_left - av_rows),
                                     av_dst.eq(av_dst + q_tile * bm.ctx_pitch)]
                with m.If(av_next == ntiles):
                    m.d.sync += head_off.eq(head_off + bm.hw)
                    m.next = "WAIT_TILE"
            with m.State("WAIT_DONE"):
                with m.If(~infl.r_rdy & ~cl.gemm_busy):
                    m.d.sync += running.eq(0)
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(running)

        # ---- counters ----------------------------------------------------------------------------
        pe = cl.pe_active
        # The attention window: the oldest unfinished command is a QKᵀ or an AV, or the engine is empty
        # while a head's attention is being sequenced (it waits for a softmax tile).
        attn = Mux(infl.r_rdy, (head_phase == Phase.QK) | (head_phase == Phase.AV), in_attn)
        counters = [
            (self.cycles, 1), (self.compute_cycles, pe), (self.engine_idle_cycles, ~infl.r_rdy),
            (self.attn_cycles, attn), (self.attn_compute_cycles, attn & pe),
            (self.softmax_cycles, sp.busy), (self.overlap_cycles, sp.busy & pe),
        ] + [(self.phase_cycles[k.value], infl.r_rdy & (head_phase == k)) for k in Phase]
        for ctr, inc in counters:
            with m.If(start):
                m.d.sync += ctr.eq(0)
            with m.Elif(running):
                m.d.sync += ctr.eq(ctr + inc)
        return m
