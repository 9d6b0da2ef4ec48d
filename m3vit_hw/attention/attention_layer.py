"""``AttentionLayer``: the attention sub-layer ``x <- x + proj(attn(h))`` on the shared GEMM engine.

Bit-exact with ``reference.golden_model``: ``x + linear(attention(h, qa, heads, q_tile), qa.proj)``, with
``h`` the int8 LN1 output (given in the activation buffer, as :class:`~m3vit_hw.moe.moe_layer.MoELayer`
takes its ``h``) and ``x`` the int16 residual stream. One :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine`
runs every GEMM:

========  ======  ==================================================================================
GEMM      mode    operands and destination (:class:`~m3vit_hw.attention.attn_layout.BufferMap`)
========  ======  ==================================================================================
QKV_i     ACT8    ``m = T, k = D``, head i's padded Q|K columns (``n = 2*hw*C``) then its V columns
                  (``n = hw*C``), from the weight buffer; A = ``h``; out to the QKV region
QKᵀ_ij    RAW     ``m = rows_j, k = hd, n = T``; A = Q rows of query tile j, B = K (transposed,
                  from the activation buffer); out on the engine's stream into the score path
AV_ij     ATTN8   ``m = rows_j, k = T, n = hd``; A = the tile's e8 slot (uint8), B = V (activation
                  buffer), the per-row reciprocal from the row table; out to head i's context columns
proj      RESADD  ``m = T, k = heads*hw*C, n = D``; A = the context, B from the weight buffer; added
                  into the residual buffer
========  ======  ==================================================================================

Query tiles (``config.q_tile`` rows) follow ``attention_head_tiled``: a ``q_tile x T`` score tile
exists on chip, never ``T x T``. The :class:`~m3vit_hw.attention.score_path.ScorePath` turns a tile's
tile-interleaved RAW scores into rows for the streamed softmax and writes e8 and the reciprocals.

Schedule and overlap
--------------------
Per head the sequencer issues ``QKV_i, QKᵀ_0, QKᵀ_1, AV_0, QKᵀ_2, AV_1, ..., AV_{n-1}``: a QKᵀ may run
at most two tiles ahead of the AVs (two reorder and e8 slots), and ``AV_j`` waits for tile j's softmax.
So the softmax of tile j runs while the engine computes ``QKᵀ_{j+1}`` (and ``AV_{j-1}``). Each head's
QKV is two weight tiles (or more), Q|K and V: once a head's last QKᵀ is issued, the next head's first
Q|K tile (weights already prefetched into the other buffer half) is issued while the last AV waits for
its softmax tile (it writes only Q and K, which no unfinished command reads), so the last softmax of a
head overlaps that GEMM; the V tile follows the last AV.
Commands that read what an earlier command wrote carry ``sync``: each head's first QKᵀ (Q, K) and
the projection's first tile (the context).

Weights: the :func:`~m3vit_hw.attention.attn_layout.plan_attention` tiles stream in order through two
:class:`~m3vit_hw.moe.weight_streamer.WeightStreamer` instances into the ping-pong weight and
parameter buffers; a tile's halves are released when its GEMM is done.

Use
---
Place the :func:`~m3vit_hw.attention.attn_layout.pack_attention` image in external memory; load ``h``
and ``x`` through ``load`` (while idle); send ``start``
(:func:`~m3vit_hw.attention.attn_layout.start_fields`); wait for ``done``; read ``x`` back.

Counters (reset by ``start``, valid after ``done``)
---------------------------------------------------
``cycles`` (start .. done), ``compute_cycles`` (PE-array operand beats), ``phase_cycles[k]`` for
:class:`Phase` ``k`` (cycles in which the oldest unfinished engine command is of that phase),
``engine_idle_cycles`` (no command in the engine), ``attn_cycles`` / ``attn_compute_cycles`` (cycles,
and PE beats, in which the oldest unfinished command is a QKᵀ or an AV, or no command is in the
engine while a head's QKᵀ/AV sequence is being issued),
``softmax_cycles`` (a query tile is in the score path), ``overlap_cycles`` (score path busy while
the PE array computes) and ``weight_bytes`` (bytes the streamers wrote into the weight and parameter
buffers: the whole image once per sub-layer).
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int as _check_int
from ..config import AcceleratorConfig
from ..gemm.epilogue import EpilogueMode
from ..gemm.gemm_engine import GemmCommand, GemmEngine, RowEntryLayout
from ..lib.mem_arbiter import ReadArbiter
from ..lib.mem_port import DEFAULT_ADDR_WIDTH, DEFAULT_DATA_BYTES, DEFAULT_MAX_BURST, ReadPortSignature
from ..moe.expert_layout import PARAM_LANE_BYTES
from ..moe.weight_buffer import WeightBuffer
from ..moe.weight_streamer import WeightStreamer
from ..rowops.softmax import SHIFT_BITS
from .attn_layout import buffer_map, plan_attention
from .score_path import ScorePath, mem_addr_width

__all__ = ["AttentionLayer", "AttnStartLayout", "AttnLoadLayout", "AttnLoadTarget", "Phase"]


class Phase(enum.Enum, shape=2):
    """The kind of an engine command (the counters' phases)."""
    QKV = 0
    QK = 1
    AV = 2
    PROJ = 3


class AttnLoadTarget(enum.Enum, shape=1):
    """Where a ``load`` beat goes: ``H`` (activation word ``addr``: ``h`` row t word w at
    ``t * row_words + w``, low 8 bits of each lane) or ``X`` (residual word ``addr``)."""
    H = 0
    X = 1


class AttnLoadLayout(data.StructLayout):
    """A ``load`` beat: ``target``, ``addr``, ``data`` (pe_cols int16 lanes)."""

    def __init__(self, config):
        super().__init__({
            "target": AttnLoadTarget,
            "addr": unsigned(max(config.act_addr_bits, config.res_addr_bits)),
            "data": data.ArrayLayout(signed(numerics.RES_BITS), config.pe_cols),
        })


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


class AttentionLayer(wiring.Component):
    """The attention sub-layer: GEMM engine, score path, buffers, streamers and sequencer.

    Parameters
    ----------
    config : AcceleratorConfig
    mem_addr_width, mem_data_bytes, mem_max_burst : int
        The external-memory read port.
    counter_width : int
        Width of the counters, in [16, 64].

    Interface attributes
    --------------------
    start : In(stream.Signature(AttnStartLayout(config, mem_addr_width)))
        Accepted when idle.
    done : Out(1)
        Pulses when the projection's last result is in the residual buffer.
    busy : Out(1)
    mem : Out(ReadPortSignature(...))
        Weights and column parameters.
    load : In(stream.Signature(AttnLoadLayout(config)))
        Preloads ``h`` and ``x``; ready while idle.
    rd_addr : In(stream.Signature(unsigned(res_addr_bits)))
    rd_data : Out(stream.Signature(ArrayLayout(signed(16), pe_cols)))
        Residual read-back, one word per address, in order; ready while idle.
    cycles, compute_cycles, engine_idle_cycles, attn_cycles, attn_compute_cycles, softmax_cycles,
    overlap_cycles, weight_bytes : Out(counter_width)
    phase_cycles : Out(ArrayLayout(counter_width, 4))
        Indexed by :class:`Phase`. See the module docstring.

    Raises
    ------
    TypeError, ValueError
        On a bad parameter or a config whose buffers cannot hold the sub-layer.
    """

    def __init__(self, config, *, mem_addr_width=DEFAULT_ADDR_WIDTH, mem_data_bytes=DEFAULT_DATA_BYTES,
                 mem_max_burst=DEFAULT_MAX_BURST, counter_width=32):
        try:
            if not isinstance(config, AcceleratorConfig):
                raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
            _check_int("counter_width", counter_width, 16, 64)
            ReadPortSignature.check_parameters(addr_width=mem_addr_width, data_bytes=mem_data_bytes,
                                               max_burst=mem_max_burst)
            self._bmap = buffer_map(config)
            self._layout = plan_attention(config, data_bytes=mem_data_bytes)
            if self._layout.image_bytes >= 1 << mem_addr_width:
                raise ValueError(f"mem_addr_width={mem_addr_width} cannot address the "
                                 f"{self._layout.image_bytes}-byte attention image")
            self.arbiter = ReadArbiter(2, addr_width=mem_addr_width, data_bytes=mem_data_bytes,
                                       max_burst=mem_max_burst)
        except (TypeError, ValueError):
            self._MustUse__silence = True
            raise
        self._config = config
        self._aw = mem_addr_width
        self._cw = counter_width
        self._db = mem_data_bytes
        lay, bm = self._layout, self._bmap
        C = config.pe_cols
        port = dict(addr_width=mem_addr_width, data_bytes=mem_data_bytes, max_burst=mem_max_burst)
        self.engine = GemmEngine(config)
        self.rowtab_depth = 1 << config.rowtab_addr_bits
        self.score = ScorePath(config, bm, rowtab_depth=self.rowtab_depth)
        self.wbuf = WeightBuffer(lay.weight_half_bytes, C * numerics.WEIGHT_BITS // 8,
                                 write_bytes=mem_data_bytes)
        self.pbuf = WeightBuffer(lay.param_half_bytes, lay.param_word_bytes, write_bytes=mem_data_bytes)
        self.wstream = WeightStreamer(lay.weight_half_bytes, **port)
        self.pstream = WeightStreamer(lay.param_half_bytes, **port)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The buffers, owned here (exposed for testbenches): the main activation bank (h, context,
        #: Q|K|V), the e8 bank, the score reorder buffer, the row table and the residual buffer.
        self.act_buffer = memory.Memory(shape=word8, depth=bm.main_words, init=[])
        self.e8_buffer = memory.Memory(shape=word8, depth=bm.e8_words, init=[])
        self.score_buffer = memory.Memory(shape=data.ArrayLayout(signed(numerics.ACC_BITS), C),
                                          depth=bm.score_buffer_words, init=[])
        self.row_table = memory.Memory(shape=RowEntryLayout(config), depth=self.rowtab_depth, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        cw = counter_width
        super().__init__({
            "start": In(stream.Signature(AttnStartLayout(config, mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(**port)),
            "load": In(stream.Signature(AttnLoadLayout(config))),
            "rd_addr": In(stream.Signature(unsigned(config.res_addr_bits))),
            "rd_data": Out(stream.Signature(word16)),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "engine_idle_cycles": Out(cw),
            "attn_cycles": Out(cw),
            "attn_compute_cycles": Out(cw),
            "softmax_cycles": Out(cw),
            "overlap_cycles": Out(cw),
            "weight_bytes": Out(cw),
            "phase_cycles": Out(data.ArrayLayout(cw, 4)),
        })

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        """The :class:`~m3vit_hw.attention.attn_layout.AttnLayout` expected in external memory."""
        return self._layout

    @property
    def buffer_map(self):
        return self._bmap

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
        eng, sp = self.engine, self.score
        for name in ("engine", "score", "wbuf", "pbuf", "wstream", "pstream", "arbiter"):
            m.submodules[name] = getattr(self, name)

        # ---- external memory ---------------------------------------------------------------------
        wiring.connect(m, self.wstream.mem, self.arbiter.masters[0])
        wiring.connect(m, self.pstream.mem, self.arbiter.masters[1])
        wiring.connect(m, self.arbiter.mem, wiring.flipped(self.mem))
        wiring.connect(m, self.wstream.buf, self.wbuf.write)
        wiring.connect(m, self.pstream.buf, self.pbuf.write)

        # ---- buffers -----------------------------------------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.e8 = e8 = self.e8_buffer
        m.submodules.scores = sbuf = self.score_buffer
        m.submodules.rowtab = rtab = self.row_table
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, sp.sbuf_wr, sbuf.write_port())
        wiring.connect(m, sp.sbuf_rd, sbuf.read_port())
        wiring.connect(m, sp.e8_wr, e8.write_port())
        wiring.connect(m, sp.rt_wr, rtab.write_port())
        wiring.connect(m, eng.rowtab_rd, rtab.read_port())
        wiring.connect(m, eng.res_rd, res.read_port())
        main_aw = mem_addr_width(bm.main_words)
        e8_aw = mem_addr_width(bm.e8_words)

        # A operand: the main bank below e8_base, the e8 bank above (the select follows the read's
        # one-cycle latency and holds while the port is disabled, like the data).
        a_main, a_e8 = act.read_port(), e8.read_port()
        a_sel = Signal()
        a_is_e8 = eng.a_rd.addr >= bm.e8_base
        m.d.comb += [
            a_main.addr.eq(eng.a_rd.addr[:main_aw]), a_main.en.eq(eng.a_rd.en),
            a_e8.addr.eq(eng.a_rd.addr[:e8_aw]), a_e8.en.eq(eng.a_rd.en),
            eng.a_rd.data.eq(Mux(a_sel, a_e8.data.as_value(), a_main.data.as_value())),
        ]
        with m.If(eng.a_rd.en):
            m.d.sync += a_sel.eq(a_is_e8)
        # B operand: the weight buffer, or (address MSB set) the main activation bank (K, V).
        b_main = act.read_port()
        b_sel = Signal()
        msb = cfg.b_addr_bits - 1
        wr, pr = self.wbuf.read, self.pbuf.read
        m.d.comb += [
            b_main.addr.eq(eng.b_rd.addr[:main_aw]), b_main.en.eq(eng.b_rd.en),
            wr.addr.eq(eng.b_rd.addr), wr.en.eq(eng.b_rd.en),
            eng.b_rd.data.eq(Mux(b_sel, b_main.data.as_value(), wr.data)),
            pr.addr.eq(eng.colp_rd.addr), pr.en.eq(eng.colp_rd.en),
        ]
        with m.If(eng.b_rd.en):
            m.d.sync += b_sel.eq(eng.b_rd.addr[msb])
        lane = PARAM_LANE_BYTES * 8
        for c in range(C):
            m.d.comb += [
                eng.colp_rd.data[c].bias.eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS]),
                eng.colp_rd.data[c].mult.eq(pr.data[c * lane + 32:c * lane + 32 + numerics.MULT_BITS]),
            ]
        wiring.connect(m, eng.o, sp.i)

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
        wcmd, pcmd = self.wstream.cmd, self.pstream.cmd
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
        m.d.comb += [head_phase.eq(infl.r_data), infl.r_en.eq(eng.done)]
        weight_done = eng.done & ((head_phase == Phase.QKV) | (head_phase == Phase.PROJ))
        m.d.comb += sp.slot_release.eq(eng.done & (head_phase == Phase.AV))
        held = Signal()
        m.d.comb += [wr.tile.ready.eq(weight_done), pr.tile.ready.eq(weight_done)]

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
        g = self.engine.cmd
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
        tile_ready = wr.tile.valid & pr.tile.valid & ~held & ~weight_done

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
                with m.If(~infl.r_rdy & ~eng.busy):
                    m.d.sync += running.eq(0)
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(running)

        # ---- load and read-back (while idle) -----------------------------------------------------
        act_w = act.write_port(granularity=1)
        res_w = res.write_port(granularity=1)
        ld = self.load
        m.d.comb += ld.ready.eq(~running)
        ld_go = ld.valid & ld.ready
        with m.If(running):
            m.d.comb += [
                act_w.addr.eq(eng.act_wr.addr[:main_aw]), act_w.data.eq(eng.act_wr.data),
                act_w.en.eq(eng.act_wr.en),
                res_w.addr.eq(eng.res_wr.addr), res_w.data.eq(eng.res_wr.data), res_w.en.eq(eng.res_wr.en),
            ]
        with m.Else():
            m.d.comb += [
                act_w.addr.eq(ld.payload.addr[:main_aw]),
                act_w.en.eq(Mux(ld_go & (ld.payload.target == AttnLoadTarget.H), (1 << C) - 1, 0)),
                res_w.addr.eq(ld.payload.addr), res_w.data.eq(ld.payload.data),
                res_w.en.eq(Mux(ld_go & (ld.payload.target == AttnLoadTarget.X), (1 << C) - 1, 0)),
            ]
            for c in range(C):
                m.d.comb += act_w.data[c].eq(ld.payload.data[c][:numerics.ACT_BITS])
        rb = res.read_port()
        rq, rd = self.rd_addr, self.rd_data
        m.d.comb += [
            rq.ready.eq(~running & (~rd.valid | rd.ready)),
            rb.addr.eq(rq.payload), rb.en.eq(rq.valid & rq.ready),
            rd.payload.eq(rb.data),
        ]
        with m.If(rq.valid & rq.ready):
            m.d.sync += rd.valid.eq(1)
        with m.Elif(rd.ready):
            m.d.sync += rd.valid.eq(0)

        # ---- counters ----------------------------------------------------------------------------
        pe = eng.pe_active
        # The attention window: the oldest unfinished command is a QKᵀ or an AV, or the engine is empty
        # while a head's attention is being sequenced (it waits for a softmax tile).
        attn = Mux(infl.r_rdy, (head_phase == Phase.QK) | (head_phase == Phase.AV), in_attn)
        counters = [
            (self.cycles, 1), (self.compute_cycles, pe), (self.engine_idle_cycles, ~infl.r_rdy),
            (self.attn_cycles, attn), (self.attn_compute_cycles, attn & pe),
            (self.softmax_cycles, sp.busy), (self.overlap_cycles, sp.busy & pe),
            (self.weight_bytes, Mux(self.wstream.buf.en, self._db, 0) + Mux(self.pstream.buf.en, self._db, 0)),
        ] + [(self.phase_cycles[k.value], infl.r_rdy & (head_phase == k)) for k in Phase]
        for ctr, inc in counters:
            with m.If(start):
                m.d.sync += ctr.eq(0)
            with m.Elif(running):
                m.d.sync += ctr.eq(ctr + inc)
        return m
