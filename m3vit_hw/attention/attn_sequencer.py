"""``AttnSequencer``: the attention sub-layer's control, a client of the shared datapath.

It owns the :class:`~m3vit_hw.attention.score_path.ScorePath` (reorder, streamed softmax, e8 and
reciprocal writer), the score path's private score reorder buffer, and all of the control: start, the
fetch sequencer (weight and parameter streamer commands in tile-plan order), the compute sequencer (the
engine commands, their schedule and overlap; see :mod:`m3vit_hw.attention.attention_layer`) and the
counters. It owns no engine, no activation, e8, residual or row-table buffer, no streamer and no
weight buffer: those are the datapath's, reached through

* ``client`` (:class:`~m3vit_hw.weights.client.GemmClientSignature`): engine commands and done/busy,
  streamer commands, the ping-pong buffers' tile handshake (``tile_valid``/``release``; both halves are
  released when a QKV or projection command is done); the GELU table port is never written;
* ``o``: the engine's result stream (the RAW scores of the QKᵀ commands; no other command of
  attention emits on it);
* ``e8_wr``: the e8 bank's write port (the engine reads the bank as A addresses ``>= e8_base``);
* ``rt_wr``: the datapath's row table's write port (the AV reciprocals; the engine reads them).

:class:`~m3vit_hw.attention.attention_layer.AttentionLayer` is the standalone wrapper (datapath pieces
plus this client); its docstring has the wiring.
"""

from amaranth.hdl import Array, Assert, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..weights.client import GemmClientSignature
from ..gemm.epilogue import EpilogueMode, StreamOutLayout
from ..gemm.gemm_engine import RowEntryLayout
from ..rowops.counts import ShiftQueue, below_next
from ..rowops.softmax import SHIFT_BITS
from .attn_layout import AttnLayout, BufferMap, plan_attention
from .score_path import ScorePath, mem_addr_width

__all__ = ["AttnSequencer", "AttnStartLayout", "AttnShapeLayout", "Phase"]


class Phase(enum.Enum, shape=2):
    """The kind of an engine command (the counters' phases)."""
    QKV = 0
    QK = 1
    AV = 2
    PROJ = 3


class AttnShapeLayout(data.StructLayout):
    """The run-time model shape of one attention sub-layer (:meth:`AttnLayout.shape_fields`).

    Fields
    ------
    dim, heads, head_dim : D, the head count and ``D / heads``. ``dim == 0`` selects the design's own
        model (``config.model``; every other field is then ignored), so a start without a shape runs
        the elaborated model.
    qk, v, proj : the balanced split of each part's panels into tiles: ``panels`` (panels of the
        smaller chunk), ``extra`` (the first ``extra`` chunks have one panel more), ``chunks``.

    The widths hold every shape :func:`~m3vit_hw.attention.attn_layout.plan_attention` accepts for
    ``config``: ``dim <= row_words * pe_cols``, ``head_dim <= attn_head_words * pe_cols``, ``heads *
    head_words <= model.heads * attn_head_words``.
    """

    def __init__(self, config):
        C, hw, rw = config.pe_cols, config.attn_head_words, config.row_words
        ctx = config.model.heads * hw

        def chunks(most):
            return data.StructLayout({"panels": range(most + 1), "extra": range(most + 1),
                                      "chunks": range(most + 1)})
        super().__init__({
            "dim": range(rw * C + 1),
            "heads": range(ctx + 1),
            "head_dim": range(hw * C + 1),
            "qk": chunks(2 * hw),
            "v": chunks(hw),
            "proj": chunks(rw),
        })


class AttnStartLayout(data.StructLayout):
    """The command that starts one attention sub-layer.

    Fields
    ------
    tokens : T in ``[1, token_capacity]``.
    base : external byte address of the :func:`pack_attention` image (a multiple of the memory beat).
    dims : :class:`AttnShapeLayout`, the run-time model shape (all zero: the design's model).
    c_mult, c_shift, out_mult, out_shift : the attention softmax and AV epilogue constants.
    qkv_shift, proj_shift : the QKV and projection requantization shifts.
    """

    def __init__(self, config, addr_width):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "base": unsigned(addr_width),
            "dims": AttnShapeLayout(config),
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


def _round_up_const(value, c):
    """``value`` rounded up to a multiple of the constant ``c``."""
    return _ceil_div_const(value, c) * c if c & (c - 1) else _ceil_div_const(value, c) << (c.bit_length() - 1)


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

    def _part_table(self, m, sh, dv):
        """Per-part tile constants of the run-time plan, as registers (they hold while a layer runs):
        for each part (0: Q|K, 1: V, 2: projection) ``panels`` (the smaller chunk's), ``extra``
        (and ``extra_nz``: extra != 0), ``nch_m1`` (chunks - 1), the weight and parameter lengths of a small and a big chunk
        (``wl_s``, ``wl_b``, ``pl_s``, ``pl_b``, beat-padded), a tile's whole step (``st_s``,
        ``st_b``) and its columns (``n_s``, ``n_b``: the small and big chunk's ``N``, so the "big"
        flag selects instead of adding: W2's top missed 300 MHz on that add). The walkers then
        select, compare and add once per tile (no multiply, round-up and three-operand add between
        their registers). Valid after the start: part 0 after 3 cycles,
        part 1 after 3, part 2 after 4; the walkers' copies one cycle later (``plan_wait``)."""
        cfg, lay = self._config, self._layout
        C, db, aw = cfg.pe_cols, cfg.mem_data_bytes, self._aw
        most = max(2 * self._bmap.hw, cfg.row_words)
        layout = data.StructLayout({
            "panels": range(most + 1), "extra": range(most + 1), "extra_m1": range(-1, most + 1),
            "extra_nz": 1, "nch_m1": range(most + 1),
            "wl_s": unsigned(aw), "wl_b": unsigned(aw), "pl_s": unsigned(aw), "pl_b": unsigned(aw),
            "st_s": unsigned(aw), "st_b": unsigned(aw),
            "n_s": range(cfg.largest_n + 1), "n_b": range(cfg.largest_n + 1),
        })
        table = []
        for code, pname, small_el, k in ((0, "qk", dv.qk_small, sh.dim), (1, "v", dv.v_small, sh.dim),
                                        (2, "proj", dv.proj_small, dv.proj_k)):
            e = Signal(layout, name=f"part{code}_consts")
            spec = sh[pname]
            m.d.sync += [
                e.panels.eq(spec.panels), e.extra.eq(spec.extra), e.extra_m1.eq(spec.extra - 1),
                e.extra_nz.eq(spec.extra != 0),
                e.nch_m1.eq(spec.chunks - 1),
                e.wl_s.eq(_round_up_const(small_el * C, db)),
                e.wl_b.eq(_round_up_const((small_el + k) * C, db)),
                e.pl_s.eq(_round_up_const(spec.panels * lay.param_word_bytes, db)),
                e.pl_b.eq(_round_up_const((spec.panels + 1) * lay.param_word_bytes, db)),
                e.st_s.eq(e.wl_s + e.pl_s), e.st_b.eq(e.wl_b + e.pl_b),
                e.n_s.eq(spec.panels * C), e.n_b.eq((spec.panels + 1) * C),
            ]
            table.append(e)
        return table

    def _walker(self, m, name, sh, dv, table, heads_m1, advance, base=0):
        """A walk over the run-time tile plan: registers (part, head, chunk, first panel, byte
        offset, tile index) and the current tile's descriptor, combinational from them and the
        per-part ``table`` (:meth:`_part_table`). ``advance`` steps to the next tile; ``reset``
        (comb, driven by the caller) returns to the first. The plan: per head its Q|K chunks then its
        V chunks, then the projection's chunks; each tile ``[weights][parameters]``, beat-padded,
        back to back (:func:`~m3vit_hw.attention.attn_layout.plan_attention`). The byte offset starts
        at ``base`` (sampled with ``reset``), so the tile's ``w_off`` is the absolute address."""
        cfg = self._config
        C, aw = cfg.pe_cols, self._aw
        bm = self._bmap
        most = max(2 * bm.hw, cfg.row_words)
        part = Signal(2, name=f"{name}_part")             # 0: Q|K, 1: V, 2: projection
        head = Signal(range(bm.ctx_pitch * cfg.attn_head_pack + 1), name=f"{name}_head")
        chunk = Signal(range(most + 1), name=f"{name}_chunk")
        first = Signal(range(most + 1), name=f"{name}_first")
        off = Signal(aw, name=f"{name}_off")
        idx = Signal(cfg.tile_tag_width, name=f"{name}_idx")
        ended = Signal(name=f"{name}_ended")
        reset = Signal(name=f"{name}_reset")
        t = Signal(data.StructLayout({
            "w_off": unsigned(aw), "w_len": unsigned(aw), "p_off": unsigned(aw), "p_len": unsigned(aw),
            "proj": 1, "first_proj": 1, "last": 1, "last_of_head": 1, "qk_part": 1, "first_tile": 1,
            "ended": 1, "tag": unsigned(cfg.tile_tag_width),
            "n": range(cfg.largest_n + 1), "n0w": range(-(-cfg.largest_n // C) + 1),
            "first_w": range(most + 1),
        }), name=name)
        # The current part's constants in a register of the walker's own, loaded with the part at a
        # part change and otherwise refreshed from the table (so it follows the table while the
        # table settles after a start, one cycle behind): no part-indexed mux before the compares.
        e = Signal.like(table[0], name=f"{name}_part_consts")
        part_change = Signal(name=f"{name}_part_change")
        chunk_step = Signal(name=f"{name}_chunk_step")
        # "This chunk has a panel more" (chunk < extra) as a register: set for the next chunk at an
        # advance (chunk 0 of the next part: its extra != 0; else chunk + 1 < extra), refreshed
        # otherwise.
        big = Signal(name=f"{name}_big")
        # The candidates are selected from registers only (the current part's and the next part's
        # constants, "the next chunk is big" for each case), and ``advance`` picks between them in
        # the last mux: ``advance`` comes from a handshake (the fetch commands' ready, the compute
        # sequencer's decision behind the client's gated tile and done inputs), and the part-indexed
        # selects behind it missed 300 MHz in the whole top. ``head_last`` (head == heads_m1) is a
        # register: the head changes only when part 1 ends, and part 1 comes back an advance later.
        head_last = Signal(name=f"{name}_head_last")
        m.d.sync += head_last.eq(head == heads_m1)
        cur = Signal.like(e, name=f"{name}_cur_consts")
        nxt = Signal.like(e, name=f"{name}_next_consts")
        m.d.comb += [cur.eq(Mux(part == 0, table[0], Mux(part == 1, table[1], table[2]))),
                     nxt.eq(Mux(part == 0, table[1], Mux((part == 1) & ~head_last, table[0], table[2])))]
        with m.If(part_change):
            m.d.sync += [e.eq(nxt), big.eq(nxt.extra_nz)]
        with m.Elif(chunk_step):
            m.d.sync += big.eq(chunk < e.extra_m1)
        with m.Else():
            m.d.sync += [e.eq(cur), big.eq(chunk < e.extra)]
        panels = e.panels + big
        last_chunk = chunk == e.nch_m1
        is_proj = part == 2
        w_len = Mux(big, e.wl_b, e.wl_s)
        p_len = Mux(big, e.pl_b, e.pl_s)
        m.d.comb += [
            t.w_off.eq(off), t.w_len.eq(w_len), t.p_off.eq(off + w_len), t.p_len.eq(p_len),
            t.proj.eq(is_proj), t.first_proj.eq(is_proj & (chunk == 0)), t.last.eq(is_proj & last_chunk),
            t.last_of_head.eq((part == 1) & last_chunk), t.qk_part.eq(part == 0),
            t.first_tile.eq((part == 0) & (head == 0) & (chunk == 0)), t.ended.eq(ended), t.tag.eq(idx),
            t.n.eq(Mux(is_proj & last_chunk, sh.dim - first * C, Mux(big, e.n_b, e.n_s))),
            t.n0w.eq(Mux(part == 1, dv.v_n0w, 0) + first), t.first_w.eq(first),
        ]
        # ``advance`` and ``reset`` never coincide (a walker advances only while the layer runs, and a
        # start is accepted only when it does not), so the part-constant register's selects do not
        # wait for the reset (the start's handshake).
        m.d.comb += [part_change.eq(advance & last_chunk), chunk_step.eq(advance & ~last_chunk)]
        with m.If(reset):
            m.d.sync += [part.eq(0), head.eq(0), chunk.eq(0), first.eq(0), off.eq(base), idx.eq(0),
                         ended.eq(0)]
        with m.Elif(advance):
            m.d.sync += [off.eq(off + Mux(big, e.st_b, e.st_s)), idx.eq(idx + 1)]
            with m.If(last_chunk):
                m.d.sync += [chunk.eq(0), first.eq(0)]
                with m.Switch(part):
                    with m.Case(0):
                        m.d.sync += part.eq(1)
                    with m.Case(1):
                        with m.If(head == heads_m1):
                            m.d.sync += part.eq(2)
                        with m.Else():
                            m.d.sync += [part.eq(0), head.eq(head + 1)]
                    with m.Default():
                        m.d.sync += ended.eq(1)
            with m.Else():
                m.d.sync += [chunk.eq(chunk + 1), first.eq(first + panels)]
        return t, reset

    def elaborate(self, platform):
        m = Module()
        cfg, bm = self._config, self._bmap
        C = cfg.pe_cols
        aw = self._aw
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
        prm = Signal(AttnStartLayout(cfg, aw))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += self.start.ready.eq(~running)
        ntiles = Signal(range(cfg.token_capacity + 1))     # query tiles per head
        beats = Signal(range(bm.score_words + 1))
        # The run-time shape: the start's, or (dim == 0) the design's own model.
        shape_layout = AttnShapeLayout(cfg)
        own_fields = plan_attention(cfg).shape_fields()
        own = shape_layout.const(own_fields)
        p = self.start.payload
        shape_in = Signal(shape_layout)
        m.d.comb += shape_in.eq(Mux(p.dims.dim == 0, own.as_value(), p.dims.as_value()))
        sh = prm.dims
        # Derived sizes, registered, then the per-part tile constants (_part_table) and the walkers'
        # copies. The first tiles' fetch waits 4 cycles for part 0's constants (``first_ok``;
        # qk_small comes from the registered shape, a cycle later); everything else settles within 6 cycles
        # (``plan_ready`` gates it), long
        # before the first tile's data can arrive (the streamer takes its next command only after
        # that tile's last beat).
        pk = cfg.attn_head_pack          # heads per context word (a power of two)
        dv = Signal(data.StructLayout({
            "hw": range(bm.hw + 1), "ctx": range(bm.ctx_pitch + 1), "qkvp": range(3 * bm.hw + 1),
            "hd": range(bm.hw * C + 1), "proj_k": range(bm.ctx_pitch * C + 1),
            "qk_small": unsigned(aw), "v_small": unsigned(aw), "proj_small": unsigned(aw),
            "v_n0w": range(2 * bm.hw + 1),
            "b_k": unsigned(cfg.b_addr_bits), "b_v": unsigned(cfg.b_addr_bits),
            "b_tile_qk": unsigned(cfg.b_addr_bits),
            "qk_step": unsigned(cfg.act_addr_bits), "av_step": unsigned(cfg.dst_addr_bits),
        }), name="derived")
        # Cycles from the start until every derived value and part constant is valid (_part_table).
        plan_wait = Signal(range(7))
        plan_ready = Signal(init=1)        # plan_wait == 0, registered (it gates the command decision)
        # The countdown's compares as decodes of its three bits (matches), not `<=`: yosys maps a
        # compare onto a carry chain, which sat in front of the weight command's valid register.
        m.d.sync += plan_ready.eq(~start & plan_wait.matches(0, 1))
        first_ok = plan_wait.matches(0, 1, 2)   # part 0's constants (the first tiles' fetch) are valid
        with m.If(start):
            m.d.sync += [prm.eq(p), prm.dims.eq(shape_in), running.eq(1), plan_wait.eq(6),
                         ntiles.eq(_ceil_div_const(p.tokens, bm.q_tile)),
                         beats.eq(_ceil_div_const(p.tokens, C))]
        with m.Else():
            with m.If(~plan_ready):
                m.d.sync += plan_wait.eq(plan_wait - 1)
            # Stage 1 (from the registered shape) and stage 2 (from stage 1); both hold while running.
            m.d.sync += [
                dv.hw.eq(_ceil_div_const(sh.head_dim, C)), dv.hd.eq(sh.head_dim),
                # From the registered shape, like v_small: a multiply straight from the
                # instruction payload was the whole top's worst path (an unregistered DSP behind
                # the default select); it costs the first fetch one cycle (plan_wait 6, not 5).
                dv.qk_small.eq(sh.qk.panels * sh.dim), dv.v_small.eq(sh.v.panels * sh.dim),
                dv.ctx.eq((sh.heads >> (pk.bit_length() - 1)) * dv.hw), dv.qkvp.eq(3 * dv.hw),
                dv.v_n0w.eq(2 * dv.hw),
                dv.proj_k.eq(dv.ctx * C), dv.proj_small.eq(sh.proj.panels * dv.ctx * C),
                dv.b_k.eq((1 << msb) | (bm.qkv_base + dv.hw)),
                dv.b_v.eq((1 << msb) | (bm.qkv_base + 2 * dv.hw)),
                dv.b_tile_qk.eq(C * dv.qkvp),
                dv.qk_step.eq(bm.q_tile * dv.qkvp), dv.av_step.eq(bm.q_tile * dv.ctx),
            ]
        T = prm.tokens
        D = sh.dim
        m.d.comb += [
            sp.params.tokens.eq(T), sp.params.beats.eq(beats), sp.params.c_mult.eq(prm.c_mult),
            sp.params.c_shift.eq(prm.c_shift), sp.params.out_mult.eq(prm.out_mult),
        ]

        # ---- fetch sequencer: every tile's panels and parameter words, in plan order -------------
        wcmd, pcmd = cl.wcmd, cl.pcmd
        table = self._part_table(m, sh, dv)
        heads_m1 = Signal.like(sh.heads)                     # registered (held while running)
        m.d.sync += heads_m1.eq(sh.heads - 1)
        # The fetch walkers count absolute addresses (they start at the image base), so the weight
        # command's address is the walker's register. The parameter command's (``off + w_len``) is
        # registered too (``p_addr``), valid the cycle after the walker moves (``p_fresh``); that
        # costs the first parameter fetch one cycle (``first_ok_d``), none after.
        tw_, w_reset = self._walker(m, "fetch_w_tile", sh, dv, table, heads_m1, wcmd.valid & wcmd.ready,
                                    base=p.base)
        tp_, p_reset = self._walker(m, "fetch_p_tile", sh, dv, table, heads_m1, pcmd.valid & pcmd.ready,
                                    base=p.base)
        p_addr = Signal(aw)
        m.d.sync += p_addr.eq(tp_.p_off)
        # Both commands' valid are registers, computed a cycle ahead from the walkers' registers and
        # the plan's countdown, so neither the ready nor the walker's advance (its part-constant
        # selects, a wide fan-out) sits behind a decode of ``running``, the walker's flags and the
        # plan. The values they take are exactly the former combinational ones:
        #   wcmd: running & ~ended & (plan_ready | first_tile & first_ok);
        #   pcmd: the same with first_ok one cycle later (first_ok_d) and never in the cycle after a
        #         transfer or a start (the registered p_addr is then stale).
        # In the cycle after a start both are 0 (plan_wait is 6). Without a start the next cycle's
        # plan_ready is ``plan_wait <= 1`` and its first_ok ``plan_wait' <= 2``. ``running`` holds
        # until the done, after the last tile's fetch (the walkers have ended by then). After a
        # weight command's transfer the walker is past the first tile, and it has ended iff the
        # command was the last (``t.last``).
        w_valid, p_valid = Signal(), Signal()
        w_xfer = w_valid & wcmd.ready
        p_xfer = p_valid & pcmd.ready
        plan_wait_n = Mux(plan_ready, plan_wait, plan_wait - 1)
        plan_ready_n = plan_wait.matches(0, 1)
        # plan_wait_n <= 2 without the decrement: plan_wait >= 1 whenever plan_ready is low (it is
        # the registered plan_wait <= 1 of the countdown that stops at 0).
        first_ok_n = Mux(plan_ready, plan_wait.matches(0, 1, 2), plan_wait.matches(0, 1, 2, 3))
        m.d.comb += Assert(first_ok_n == (plan_wait_n <= 2),
                           "AttnSequencer: the countdown's next first_ok disagrees with plan_wait")
        first_ok_d = Signal()
        m.d.sync += first_ok_d.eq(first_ok & ~start)
        m.d.sync += [
            w_valid.eq(~start & running & Mux(w_xfer, ~tw_.last & plan_ready_n,
                                              ~tw_.ended & (plan_ready_n | (tw_.first_tile & first_ok_n)))),
            p_valid.eq(~start & running & ~p_xfer & ~tp_.ended
                       & (plan_ready_n | (tp_.first_tile & first_ok))),
        ]
        m.d.comb += [
            wcmd.valid.eq(w_valid),
            wcmd.payload.addr.eq(tw_.w_off), wcmd.payload.length.eq(tw_.w_len),
            wcmd.payload.tag.eq(tw_.tag),
            pcmd.valid.eq(p_valid),
            pcmd.payload.addr.eq(p_addr), pcmd.payload.length.eq(tp_.p_len),
            pcmd.payload.tag.eq(tp_.tag),
            w_reset.eq(start), p_reset.eq(start),
        ]

        # ---- in-flight engine commands (their phases, in order) ---------------------------------
        # A ShiftQueue (flip-flops, thermometer count): its enables come from the client's gated
        # handshakes (``sent``, ``gemm_done``), and an adder behind them missed 300 MHz in the top.
        m.submodules.inflight = infl = ShiftQueue(Phase, 8)
        head_phase = Signal(Phase)
        infl_any = Signal()
        m.d.comb += [head_phase.eq(infl.r_data), infl.r_en.eq(cl.gemm_done), infl_any.eq(infl.r_rdy)]
        weight_done = cl.gemm_done & ((head_phase == Phase.QKV) | (head_phase == Phase.PROJ))
        m.d.comb += sp.slot_release.eq(cl.gemm_done & (head_phase == Phase.AV))
        held = Signal()
        m.d.comb += cl.release.eq(weight_done)

        # ---- compute sequencer -------------------------------------------------------------------
        # The engine command goes out of a register (``g_full``, payload, phase, tile rows): the
        # sequencer decides (``push``) only while the register is empty, and the in-flight queue and
        # the score path's tile FIFO take the command at its transfer. So the decision's wide AND
        # (state, flags, the client's tile and done inputs) ends in the sequencer's own registers, and
        # neither the engine's ready nor the decision sits in front of those queues' counts. Room in
        # both queues is checked at the decision; only pops happen until the transfer. Commands leave
        # at most every other cycle (each is a GEMM of many cycles).
        g = cl.gemm
        gp = Signal.like(g.payload, name="gemm_next")
        g_valid = Signal()                  # the sequencer has a command for the register
        g_full = Signal()
        g_phase, g_phase_next = Signal(Phase), Signal(Phase)
        g_qk, g_qk_next = Signal(), Signal()       # a QKᵀ command: its rows go to the score path
        g_rows, g_rows_next = Signal.like(self.score.tiles.payload), Signal.like(self.score.tiles.payload)
        sent = g.valid & g.ready
        push = g_valid & ~g_full
        m.d.comb += [g.valid.eq(g_full), infl.w_data.eq(g_phase),
                     sp.tiles.valid.eq(sent & g_qk), sp.tiles.payload.eq(g_rows)]
        with m.If(push):
            m.d.sync += [g_full.eq(1), g.payload.eq(gp), g_phase.eq(g_phase_next), g_qk.eq(g_qk_next),
                         g_rows.eq(g_rows_next)]
        with m.Elif(sent):
            m.d.sync += g_full.eq(0)
        advance = Signal()
        tc, c_reset = self._walker(m, "compute_tile", sh, dv, table, heads_m1, advance)
        m.d.comb += c_reset.eq(start)
        qk_next = Signal(range(cfg.token_capacity + 1))
        av_next = Signal(range(cfg.token_capacity + 1))
        qk_slot, av_slot = Signal(), Signal()
        qk_rows_left = Signal(range(cfg.token_capacity + 1))   # T - r0 of the next QKᵀ tile
        av_rows_left = Signal(range(cfg.token_capacity + 1))
        qk_a = Signal(cfg.act_addr_bits)                       # Q rows of the next QKᵀ tile
        av_dst = Signal(cfg.dst_addr_bits)                     # context rows of the next AV tile
        head_off = Signal(cfg.dst_addr_bits)                   # (head / pk) * hw
        # Packed heads (attention.attn_layout): step t of a group of pk heads writes lanes
        # 0 .. (pk - t) * head_dim - 1 of the group's context word (its own lanes on top); av_n is
        # that N, registered from the step (it changes at a head's end, long before the next AV).
        av_n = Signal(range(bm.hw * C + 1))
        if pk > 1:
            pstep = Signal(range(pk))
            m.d.sync += av_n.eq(Array([dv.hd * (pk - t) for t in range(pk)])[pstep])
        else:
            m.d.comb += av_n.eq(dv.hd)
        m.d.comb += [infl.w_en.eq(sent)]
        q_tile = bm.q_tile
        # The next tiles' row counts, min(rows left, q_tile), as registers refreshed every cycle: a
        # count changes only at its push, and the next push comes two cycles later at the earliest
        # (the command register empties in between; the first after the layer's last QKV tile
        # too), so the subtraction behind the push starts at a flip-flop, not at a compare and a
        # select (over 300 MHz in the standalone sequencer).
        qk_rows = Signal(range(q_tile + 1))
        av_rows = Signal(range(q_tile + 1))
        m.d.sync += [qk_rows.eq(Mux(qk_rows_left > q_tile, q_tile, qk_rows_left)),
                     av_rows.eq(Mux(av_rows_left > q_tile, q_tile, av_rows_left))]
        in_attn = Signal()                 # the FSM is in ATTN (set and cleared with its transitions)
        # The attention window's issue conditions as registers a cycle ahead (rowops.counts): instead
        # of comparing the tile counters with each other and with ntiles in front of the command's
        # valid, differences and remaining counts with their flags.
        ntiles_m1 = Signal.like(ntiles)
        m.d.sync += ntiles_m1.eq(ntiles - 1)
        qk_push, av_push = Signal(), Signal()
        qk_more = Signal()                    # qk_next < ntiles
        av_more = Signal()                    # av_next < ntiles
        # Both differences stay within 0..2 (a QK tile is issued only while qk - av <= 1, a softmax
        # tile finishes only for an issued QK tile): two bits, a LUT-only update.
        qa_diff = Signal(range(4))                           # qk_next - av_next
        qa_nz, qa_le1 = Signal(), Signal(init=1)
        sa_diff = Signal(range(4))                           # softmax tiles done - av_next
        sa_nz = Signal()
        # Held at their values for a head's start whenever the FSM is not in ATTN (in_attn, a
        # register), not loaded at the entry (a decode of the state, the push and the tile's flags:
        # W2's top missed 300 MHz on it): no QKᵀ, AV or softmax tile of a head moves them outside
        # ATTN (its last AV needs every softmax tile done, and ATTN ends a cycle after it).
        with m.If(~in_attn):
            m.d.sync += [qk_more.eq(ntiles != 0), av_more.eq(ntiles != 0), qa_diff.eq(0), qa_nz.eq(0),
                         qa_le1.eq(1), sa_diff.eq(0), sa_nz.eq(0)]
        with m.Else():
            with m.If(qk_push):
                m.d.sync += qk_more.eq(qk_next < ntiles_m1)
            with m.If(av_push):
                m.d.sync += av_more.eq(av_next < ntiles_m1)
            m.d.sync += [
                qa_diff.eq(qa_diff + qk_push - av_push),
                qa_nz.eq(~below_next(qa_diff, qk_push, av_push, 1)),
                qa_le1.eq(below_next(qa_diff, qk_push, av_push, 2)),
                sa_diff.eq(sa_diff + sp.tile_done - av_push),
                sa_nz.eq(~below_next(sa_diff, sp.tile_done, av_push, 1)),
            ]
        with m.If(weight_done):
            m.d.sync += held.eq(0)

        # The compute walker's descriptor fields that the weight tile's command needs, registered a
        # cycle after the walker moves: the walker moves only at a decision, and the next decision
        # comes two cycles later at the earliest (the command register empties in between).
        tcr = Signal(data.StructLayout({"n": len(tc.n), "n0w": len(tc.n0w), "dst_qkv": cfg.dst_addr_bits,
                                        "proj": 1, "first_proj": 1, "qk_part": 1}), name="compute_tile_r")
        # dst_qkv = qkv_base + n0w with n0w = (v_n0w if V else 0) + first: one adder on a selected
        # register (qkv_v, held while the layer runs; valid a cycle after v_n0w, within plan_wait).
        qkv_v = Signal(cfg.dst_addr_bits)
        m.d.sync += qkv_v.eq(bm.qkv_base + dv.v_n0w)
        tc_v = Signal()
        m.d.comb += tc_v.eq(~tc.qk_part & ~tc.proj)
        m.d.sync += [tcr.n.eq(tc.n), tcr.n0w.eq(tc.n0w),
                     tcr.dst_qkv.eq(Mux(tc_v, qkv_v, bm.qkv_base) + tc.first_w),
                     tcr.proj.eq(tc.proj), tcr.first_proj.eq(tc.first_proj), tcr.qk_part.eq(tc.qk_part)]

        def tile_command():
            """Drive the engine command (and its phase) of weight tile ``tc`` (QKV or proj)."""
            m.d.comb += [
                gp.m.eq(T), gp.n.eq(tcr.n), gp.a_unsigned.eq(0), gp.b_trans.eq(0),
                gp.b_base.eq(0), gp.b_k_stride.eq(1), gp.colp_base.eq(0),
            ]
            with m.If(tcr.proj):
                m.d.comb += [
                    gp.k.eq(dv.proj_k), gp.a_base.eq(bm.ctx_base), gp.a_stride.eq(dv.ctx),
                    gp.b_tile_stride.eq(dv.proj_k), gp.dst_base.eq(tcr.n0w),
                    gp.dst_stride.eq(bm.row_words), gp.shift.eq(prm.proj_shift),
                    gp.mode.eq(EpilogueMode.RESADD), gp.sync.eq(tcr.first_proj),
                    g_phase_next.eq(Phase.PROJ),
                ]
            with m.Else():
                m.d.comb += [
                    gp.k.eq(D), gp.a_base.eq(0), gp.a_stride.eq(bm.row_words),
                    gp.b_tile_stride.eq(D), gp.dst_base.eq(tcr.dst_qkv),
                    gp.dst_stride.eq(dv.qkvp), gp.shift.eq(prm.qkv_shift),
                    gp.mode.eq(EpilogueMode.ACT8), g_phase_next.eq(Phase.QKV),
                ]

        # The next head's first Q|K tile may be issued early, while the head's last AV waits for its
        # softmax tile (it writes only Q and K, which no unfinished command of the head reads).
        early = Signal()
        # "A weight tile is ready for a command": combinational for WAIT_TILE (it only moves the
        # state register, and a cycle there is a cycle on every layer's weight-tile hand-off), and
        # as a register a cycle behind the client's tile and done inputs for the early issue: they
        # come through the encoder's owner gate, and the early decision, the walker's advance and
        # its part-constant selects behind them missed 300 MHz in the whole top. The register holds
        # until the next cycle: the tile stays valid until its release (weight_done, which clears
        # it here), and a tile command issued in the cycle (tile_push, which sets held) clears it
        # too; a start clears it (plan_ready is low after a start).
        tile_ready = cl.tile_valid & ~held & ~weight_done & plan_ready
        tile_ready_r = Signal()
        tile_push = Signal()
        m.d.sync += tile_ready_r.eq(tile_ready & ~tile_push & ~start)

        attn_state = Signal()              # the FSM's ATTN state, decoded (only for the Assert below)
        with m.FSM(name="seq"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [held.eq(0), head_off.eq(0)]
                    if pk > 1:
                        m.d.sync += pstep.eq(0)
                    m.next = "WAIT_TILE"
            with m.State("WAIT_TILE"):
                with m.If(tile_ready):
                    m.next = "ISSUE_TILE"
            with m.State("ISSUE_TILE"):
                m.d.comb += g_valid.eq(infl.w_rdy)
                tile_command()
                m.d.comb += tile_push.eq(push)
                with m.If(push):
                    m.d.sync += held.eq(1)
                    with m.If(tc.last):
                        m.next = "WAIT_DONE"
                    with m.Elif(tc.last_of_head):
                        # From here on the walker is at the next tile (a candidate for the early issue).
                        m.d.comb += advance.eq(1)
                        m.d.sync += in_attn.eq(1)
                        m.next = "ATTN"
                    with m.Else():
                        m.d.comb += advance.eq(1)
                        m.next = "WAIT_TILE"
            with m.State("ATTN"):
                m.d.comb += attn_state.eq(1)
                can_qk = qk_more & qa_le1 & sp.tiles.ready
                can_av = qa_nz & sa_nz
                can_early = ~qk_more & ~early & tcr.qk_part & tile_ready_r
                m.d.comb += [g_valid.eq(infl.w_rdy & (can_qk | can_av | can_early)), gp.colp_base.eq(0)]
                # Priority QKᵀ, AV, then the early tile. Each branch's push is written from its own
                # conditions (``push`` restricted to the branch), so the QKᵀ and AV counters' enables
                # do not wait for ``can_early``: it holds the client's tile and done inputs, which
                # arrive through the encoder's owner gate (over 300 MHz in the whole top when every
                # update sat behind it).
                free = infl.w_rdy & ~g_full
                with m.If(can_qk):
                    m.d.comb += [
                        gp.m.eq(qk_rows), gp.k.eq(dv.hd), gp.n.eq(T),
                        gp.a_base.eq(qk_a), gp.a_stride.eq(dv.qkvp),
                        gp.b_base.eq(dv.b_k), gp.b_trans.eq(1),
                        gp.b_k_stride.eq(dv.qkvp), gp.b_tile_stride.eq(dv.b_tile_qk),
                        gp.dst_base.eq(Mux(qk_slot, bm.score_slot, 0)), gp.dst_stride.eq(bm.score_words),
                        gp.mode.eq(EpilogueMode.RAW), gp.sync.eq(qk_next == 0),
                        g_phase_next.eq(Phase.QK), g_qk_next.eq(1), g_rows_next.eq(qk_rows),
                    ]
                with m.Elif(can_av):
                    m.d.comb += [
                        gp.m.eq(av_rows), gp.k.eq(T), gp.n.eq(av_n),
                        gp.a_base.eq(bm.e8_base + Mux(av_slot, bm.e8_slot, 0)),
                        gp.a_stride.eq(bm.score_words), gp.a_unsigned.eq(1),
                        gp.b_base.eq(dv.b_v),
                        gp.b_k_stride.eq(dv.qkvp), gp.b_tile_stride.eq(1),
                        gp.rowtab_base.eq(Mux(av_slot, bm.q_pad, 0)),
                        gp.dst_base.eq(av_dst), gp.dst_stride.eq(dv.ctx),
                        gp.shift.eq(prm.out_shift), gp.mode.eq(EpilogueMode.ATTN8),
                        g_phase_next.eq(Phase.AV),
                    ]
                with m.Else():
                    tile_command()
                    with m.If(free & can_early):
                        m.d.comb += [advance.eq(1), tile_push.eq(1)]
                        m.d.sync += [held.eq(1), early.eq(1)]
                with m.If(~av_more):
                    m.d.sync += in_attn.eq(0)
                    if pk > 1:
                        m.d.sync += pstep.eq(pstep + 1)
                        with m.If(pstep == pk - 1):
                            m.d.sync += head_off.eq(head_off + dv.hw)
                    else:
                        m.d.sync += head_off.eq(head_off + dv.hw)
                    m.next = "WAIT_TILE"
            with m.State("WAIT_DONE"):
                with m.If(~g_full & ~infl_any & ~cl.gemm_busy):
                    m.d.sync += running.eq(0)
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(running)
        # The head's tile counters and addresses, like the window's flags above: held at their start
        # values outside ATTN, so ATTN opens with them (no load behind the entry decode; W1's and W2's
        # tops missed 300 MHz on it). The QKᵀ and AV pushes move them: ATTN's branches, gated by
        # in_attn (a flip-flop, high exactly in ATTN) rather than by the state decode, which abc
        # shared with the command payload's multiplexers (W2's top: 3.34 ns). head_off changes at
        # ATTN's end.
        # (Checked at the clock edge: a combinational check sees the state decode a delta cycle late.)
        m.d.sync += Assert(in_attn == attn_state, "AttentionSequencer: in_attn is out of step with the ATTN state")
        m.d.comb += [qk_push.eq(in_attn & can_qk & free), av_push.eq(in_attn & ~can_qk & can_av & free)]
        with m.If(qk_push):
            m.d.sync += [qk_next.eq(qk_next + 1), qk_slot.eq(~qk_slot), qk_rows_left.eq(qk_rows_left - qk_rows),
                         qk_a.eq(qk_a + dv.qk_step)]
        with m.If(av_push):
            m.d.sync += [av_next.eq(av_next + 1), av_slot.eq(~av_slot), av_rows_left.eq(av_rows_left - av_rows),
                         av_dst.eq(av_dst + dv.av_step)]
        with m.If(~in_attn):
            m.d.sync += [early.eq(0), qk_next.eq(0), av_next.eq(0), qk_rows_left.eq(T), av_rows_left.eq(T),
                         qk_a.eq(bm.qkv_base), av_dst.eq(bm.ctx_base + head_off)]

        # ---- counters ----------------------------------------------------------------------------
        pe = cl.pe_active
        # The attention window: the oldest unfinished command is a QKᵀ or an AV, or the engine is empty
        # while a head's attention is being sequenced (it waits for a softmax tile).
        attn = Mux(infl_any, (head_phase == Phase.QK) | (head_phase == Phase.AV), in_attn)
        counters = [
            (self.compute_cycles, pe), (self.engine_idle_cycles, ~infl_any),
            (self.attn_cycles, attn), (self.attn_compute_cycles, attn & pe),
            (self.softmax_cycles, sp.busy), (self.overlap_cycles, sp.busy & pe),
        ] + [(self.phase_cycles[k.value], infl_any & (head_phase == k)) for k in Phase]
        # Every increment is registered (counted a cycle late): the PE activity arrives through the
        # encoder's owner gate, and the counters' 32-bit adders behind it and the phase decode were
        # the sequencer's longest paths from that gate. The totals are the same but for the two ends
        # of the window (the increments at the start count, those at the done do not; the engine is
        # idle at both).
        with m.If(start):
            m.d.sync += self.cycles.eq(0)
        with m.Elif(running):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        for i, (ctr, inc) in enumerate(counters):
            inc_r = Signal(name=f"counter_inc{i}")
            m.d.sync += inc_r.eq(inc)
            with m.If(start):
                m.d.sync += ctr.eq(0)
            with m.Elif(running):
                m.d.sync += ctr.eq(ctr + inc_r)
        return m
