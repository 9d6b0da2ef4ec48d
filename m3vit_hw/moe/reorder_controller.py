"""The MoE reordering controller: expert queues -> row table, then fetch and compute sequencers.

This is the paper's *computation reordering* in hardware. After the router has sent every token to
:class:`~m3vit_hw.moe.expert_queues.ExpertQueues`, the queues walk out active expert by active expert. The
controller

1. **captures** the walk: entries into the *row table* (``token_capacity * top_k`` entries of
   ``(token, Q0.15 weight)``, the GemmEngine's row-table format; the table belongs to the datapath and
   is written through ``rt_wr``) and headers into a small *active
   list* of ``(expert, offset, count)`` (at most ``min(E, T*k)`` entries, O(E) metadata);
2. runs a **fetch sequencer** over ``(active experts ascending) x (static tile plan)``: for each tile a
   command to the weight streamer (the tile's panels) and one to the parameter streamer (its column
   parameters). A streamer takes a command only when its previous one is committed and fills a half
   only when it is FREE, so expert *e+1*'s first tile streams into the free half while the engine
   computes from the other. Idle experts have no list entry and are never fetched;
3. runs a **compute sequencer** over the same sequence: once both halves of a tile are FULL (and the
   expert's row-table entries are captured) it issues the tile's GemmEngine command, and releases both
   halves as soon as the engine no longer reads them (see *Releasing a tile* below).

Before the experts, the same two sequencers run the layer's gate: the task's gate record is a short
sequence of *gate chunks* (``layout.gate_tiles``: N-chunks of whole panels that each fit one half, like
expert tiles, so the weight buffer does not grow with E). Each chunk's RAW GEMM (``M = T, K = D,
N = chunk.n``) streams its logits into the :class:`~m3vit_hw.moe.router.Router`, which adds the chunk's
task-bias words and assembles every token's full logit row; a chunk's halves are released when both
the engine and the router are done with them (the router reads the bias words from the parameter
half: ``gate_phase``), while the next chunk has been streaming into the other half.

GEMM commands
-------------
With ``C = pe_cols``, ``rw = ceil(D / C)`` words per activation/residual row and ``hw = ceil(h / C)``:

=========  =====  ==============================================================================
command    mode   operands and destination
=========  =====  ==============================================================================
gate chunk RAW    ``m = T, k = D, n = chunk.n``; A = ``h`` rows (base 0, pitch ``rw``); out on the
                  stream (the router knows the chunk plan and places the columns)
fc1 tile   GELU8  ``m = count, k = D, n = tile.n``; A gathered from ``h`` by the row table
                  (``rowtab_base = offset``); out to the hidden region ``hidden_base + row * hw
                  + tile.n0 / C``
fc2 tile   COMB.  ``m = count, k = h, n = tile.n``; A = hidden rows (pitch ``hw``, uint8 GELU codes:
                  ``a_unsigned``); scattered to
                  residual row ``token`` with the row's Q0.15 weight; ``sync`` on the expert's
                  first fc2 tile (it reads what fc1 wrote)
=========  =====  ==============================================================================

B is always read from word 0 of the reader's current weight half (panels, ``b_tile_stride = K``) and
column parameters from word 0 of the current parameter half. Experts run in ascending order, which is
what ``reference.golden_model.moe_layer`` does (it defines the result when the residual saturates).

Releasing a tile
----------------
The weight buffer's reader addresses its *current* half, so the next tile's command may only start
loading after the release. Waiting for the engine's ``done`` would serialize the engine (fill, last
block, drain: about 20 cycles per tile on 4x4 PEs). Instead the controller counts the PE array's
operand beats (``pe_beat``; a command takes ``ceil(m / pe_rows) * ceil(n / C) * k`` of them, in order)
and releases the halves when the array has *started the command's last block*: the engine reads
every block (A, B and the tile's column parameters) into its staging registers before the array
consumes it, so from then on the command touches neither half. The next command then loads while this
one finishes, and consecutive tiles overlap in the engine like any back-to-back commands. The expert's
first fc2 tile carries ``sync`` (it reads the hidden rows fc1 writes), so the engine itself holds it
until fc1 has drained; that one boundary per expert keeps its fill-and-drain cost. The layer's
``done`` waits for the last command's ``done``.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.epilogue import EpilogueMode
from .expert_layout import MoELayout, plan_moe
from ..gemm.gemm_engine import GemmCommand, RowEntryLayout, check_command
from .router import RouterCommandLayout
from ..numerics import SHIFT_BITS
from ..rowops.softmax import OUT_BITS
from .topk import expert_id_width
from ..weights.weight_buffer import TileInfoLayout
from ..weights.weight_streamer import StreamerCommandLayout

__all__ = ["ReorderController", "LayerStartLayout", "QueueBeatLayout", "GATE_TAG"]

#: Streamer tag of the gate's pieces (expert tiles are tagged ``1 + tile index``); the MoE layer uses
#: it to count gate and expert bytes separately.
GATE_TAG = 0


def _last_block(k, c):
    """Reduction steps in the last block of a K-long reduction (blocks of ``c`` steps)."""
    return k - c * ((k - 1) // c)


class LayerStartLayout(data.StructLayout):
    """The command that starts one MoE layer.

    Fields
    ------
    task : unsigned
        Task id in ``[0, tasks)``: selects the gate record at ``gate_base + task * gate_stride``.
    tokens : range(token_capacity + 1)
        T, in ``[1, token_capacity]``.
    gate_base, expert_base : unsigned(config.mem_addr_width)
        External byte addresses of the layer's gate region and expert region
        (:class:`~m3vit_hw.moe.expert_layout.MoELayout`); multiples of the memory beat.
    c_mult, c_shift : the router softmax's exponent scale for this task's gate.
    fc1_shift, fc2_shift : range(SHIFT_MAX + 1)
        Requantization shifts of the experts' fc1 and fc2 (one per layer, shared by all experts).
    router_fetch, router_addr : 1, unsigned(config.mem_addr_width)
        If ``router_fetch``: ``c_mult`` and ``c_shift`` are ignored and the task's router record
        (:func:`~m3vit_hw.moe.expert_layout.pack_router_record`) is read from ``router_addr + task *
        ROUTER_RECORD_BYTES`` (a multiple of ``min(16, mem beat)``) by the
        :class:`~m3vit_hw.moe.moe_sequencer.MoESequencer` (the controller ignores these fields).
    lut_fetch, lut_addr : 1, unsigned(config.mem_addr_width)
        If ``lut_fetch``: the sequencer reads the experts' 256-byte GELU table from ``lut_addr`` (a
        multiple of the memory beat) into the engine before the first expert GEMM; otherwise the
        table already in the engine is used (the standalone MoELayer loads it through ``load``).
        Zero (the default of a start that does not set them) fetches nothing.
    top_k : range(model.top_k + 1)
        The layer's k (run-time shape), at most the config's; 0 = the config's ``model.top_k``.
    plan_fetch, plan_addr, expert_stride : 1, unsigned(mem_addr_width), unsigned(mem_addr_width)
        Run-time expert shape: if ``plan_fetch``, the expert tile plan is the table at ``plan_addr``
        (:func:`~m3vit_hw.moe.expert_layout.pack_plan`, beat aligned; fetched by the sequencer into
        the controller's plan memory) and expert ``e``'s tiles start at ``expert_base + e *
        expert_stride``; otherwise the elaborated plan (``plan_moe(config)``) and its stride.
    """

    def __init__(self, config):
        tasks = config.model.num_tasks
        addr_width = config.mem_addr_width
        super().__init__({
            "task": unsigned(max(1, (tasks - 1).bit_length())),
            "tokens": range(config.token_capacity + 1),
            "gate_base": unsigned(addr_width),
            "expert_base": unsigned(addr_width),
            "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS),
            "c_shift": unsigned(SHIFT_BITS),
            "fc1_shift": range(numerics.SHIFT_MAX + 1),
            "fc2_shift": range(numerics.SHIFT_MAX + 1),
            "router_fetch": unsigned(1),
            "router_addr": unsigned(addr_width),
            "lut_fetch": unsigned(1),
            "lut_addr": unsigned(addr_width),
            "top_k": range(config.model.top_k + 1),
            "plan_fetch": unsigned(1),
            "plan_addr": unsigned(addr_width),
            "expert_stride": unsigned(addr_width),
        })


class QueueBeatLayout(data.StructLayout):
    """A beat of the :class:`~m3vit_hw.moe.expert_queues.ExpertQueues` walk (its ``o`` layout)."""

    def __init__(self, config):
        cap = config.token_capacity
        super().__init__({
            "header": unsigned(1),
            "expert": unsigned(expert_id_width(config.model.experts)),
            "count": range(cap + 1),
            "token": unsigned(config.token_bits),
            "weight": unsigned(OUT_BITS),
            "last": unsigned(1),
        })


class ReorderController(wiring.Component):
    """Captures the expert queues and sequences weight fetch and GEMM compute for one MoE layer.

    Parameters
    ----------
    config : AcceleratorConfig
    layout : MoELayout
        The tile plan and memory layout (:func:`~m3vit_hw.moe.expert_layout.plan_moe` of ``config``).
        External addresses are ``config.mem_addr_width`` bits, tile tags ``config.tile_tag_width``.

    Interface attributes
    --------------------
    start : ``In(stream.Signature(LayerStartLayout(config)))``
        Accepted when the controller is idle.
    q : ``In(stream.Signature(QueueBeatLayout(config)))``
        The ExpertQueues walk; always ready while a layer runs.
    router_cmd : ``Out(stream.Signature(RouterCommandLayout(config)))``
    router_drained : ``In(1)``
        The router no longer reads the current gate chunk's bias words (every beat the engine has
        emitted has been biased).
    wcmd, pcmd : ``Out(stream.Signature(StreamerCommandLayout(addr_width, addr_width, tag_width)))``
        Commands of the weight and parameter streamers (one piece each per tile).
    wtile, ptile : ``In(stream.Signature(TileInfoLayout(half_bytes, tag_width)))``
        The reader side's ``tile`` streams of the weight and parameter buffers: ``valid`` = the
        current half is FULL; a transfer releases it.
    gemm : ``Out(stream.Signature(GemmCommand(config)))``
        GemmEngine commands.
    gemm_done : ``In(1)``
        The engine's ``done`` pulse.
    pe_beat : ``In(1)``
        The engine's PE array accepted an operand beat (one reduction step of one output tile) this
        cycle. Commands consume ``ceil(m / pe_rows) * ceil(n / C) * k`` beats, in command order; the
        controller counts them to release a tile's halves early (see the module docstring).
    rt_wr : ``In(memory.WritePort.Signature(addr_width=rowtab_addr_bits, shape=RowEntryLayout(config)))``
        Writes the captured queue walk into the datapath's row table (entry ``offset + i`` of an active
        expert = its ``i``-th token and Q0.15 weight); the engine reads the same table (``rowtab_rd``).
        The controller owns no row table: the shared datapath has one, which attention's score path
        also writes.
    gate_phase : ``Out(1)``
        The gate tile is resident: the parameter buffer's read port belongs to the router.
    plan_wr : ``Out(memory.WritePort.Signature(addr_width=plan_addr_bits, shape=tile_layout))``
        Writes the run-time expert plan (entry ``i`` = tile ``i``), used when the start sets
        ``plan_fetch``.
    plan_ready : ``In(1)``
        The run-time plan is written (ignored without ``plan_fetch``): the first expert tile's fetch
        waits for it.
    done : ``Out(1)``
        Pulses when the layer's last GEMM has finished.
    busy : ``Out(1)``
        From ``start`` until ``done``.
    active_experts : ``Out(range(E + 1))``
        Active experts of the current (or last) layer, as captured so far.

    Raises
    ------
    TypeError, ValueError
        If ``layout`` was not planned for ``config`` (every size was checked by the config).
    """

    def __init__(self, config, layout):
        self._check(config, layout)
        addr_width = config.mem_addr_width
        tag_width = config.tile_tag_width
        self._config = config
        self._layout = layout
        self._aw = addr_width
        self._tw = tag_width
        E = config.model.experts
        scmd = StreamerCommandLayout(addr_width, addr_width, tag_width)
        C = config.pe_cols
        #: One tile of the expert plan as the sequencers read it (the elaborated plan's ROM, or the
        #: run-time plan memory written through ``plan_wr``).
        self.tile_layout = data.StructLayout({
            "w_off": unsigned(addr_width), "w_len": unsigned(addr_width),
            "p_off": unsigned(addr_width), "p_len": unsigned(addr_width),
            "fc2": 1, "first_fc2": 1, "last": 1,
            "n": range(config.largest_n + 1), "n0w": range(-(-config.largest_n // C) + 1),
            "nk": range(self._max_nk(config, layout) + 1), "w_last": range(C + 1),
            "k": range(max(config.model.dim, config.model.expert_hidden) + 1),
        })
        #: Entries of the run-time plan memory: the elaborated plan's tile count (a smaller expert
        #: hidden width never needs more tiles, see ``plan_moe``).
        self.plan_entries = len(layout.tiles)
        self.plan_addr_bits = max(1, (self.plan_entries - 1).bit_length())
        super().__init__({
            "start": In(stream.Signature(LayerStartLayout(config))),
            "q": In(stream.Signature(QueueBeatLayout(config))),
            "router_cmd": Out(stream.Signature(RouterCommandLayout(config))),
            "router_drained": In(1),
            "wcmd": Out(stream.Signature(scmd)),
            "pcmd": Out(stream.Signature(scmd)),
            "wtile": In(stream.Signature(TileInfoLayout(layout.weight_half_bytes, tag_width))),
            "ptile": In(stream.Signature(TileInfoLayout(layout.param_half_bytes, tag_width))),
            "gemm": Out(stream.Signature(GemmCommand(config))),
            "gemm_done": In(1),
            "pe_beat": In(1),
            "rt_wr": In(memory.WritePort.Signature(addr_width=config.rowtab_addr_bits,
                                                    shape=RowEntryLayout(config))),
            "gate_phase": Out(1),
            "plan_wr": Out(memory.WritePort.Signature(addr_width=self.plan_addr_bits,
                                                     shape=self.tile_layout)),
            "plan_ready": In(1),
            "done": Out(1),
            "busy": Out(1),
            "active_experts": Out(range(E + 1)),
        })

    @staticmethod
    def _check(config, layout):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if not isinstance(layout, MoELayout):
            raise TypeError(f"layout must be a MoELayout, not {layout!r}")
        # Every size (address and tag widths, the activation buffer's h rows and hidden region) was
        # checked by the config's validation; only the pairing of layout and config is left.
        if layout != plan_moe(config):
            raise ValueError("layout must be planned for config (plan_moe(config)): its D, h, E, "
                             "pe_cols, task count, buffer halves or memory beat differ")
        # The GEMM commands this controller builds, at their largest (every token on one expert), go
        # through the engine's command check: the config's sizes guarantee they fit, and this turns any
        # drift between the plan and the engine's fields into an error here instead of a truncation.
        m = config.model
        C, T = config.pe_cols, config.token_capacity
        rw, hw, hb = config.row_words, config.moe_hidden_words, config.moe_hidden_base
        cmds = [dict(m=T, k=t.k, n=t.n, a_stride=rw, b_tile_stride=t.k, b_k_stride=1)
                for t in layout.gate_tiles]
        for t in layout.tiles:
            if t.kind == "fc1":
                cmds.append(dict(m=T, k=t.k, n=t.n, a_stride=rw, b_tile_stride=t.k, b_k_stride=1,
                                 dst_base=hb + t.n0 // C, dst_stride=hw, gather=1))
            else:
                cmds.append(dict(m=T, k=t.k, n=t.n, a_base=hb, a_stride=hw, b_tile_stride=t.k,
                                 b_k_stride=1, dst_base=t.n0 // C, dst_stride=rw, scatter=1, a_unsigned=1))
        for cmd in cmds:
            check_command(config, cmd)

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        return self._layout

    @property
    def row_words(self):
        """Words per ``h`` row (activation buffer, base 0) and per residual row (residual buffer)."""
        return self._config.row_words

    @property
    def hidden_base(self):
        """Activation-buffer word of the hidden region (``config.moe_hidden_base``)."""
        return self._config.moe_hidden_base

    @property
    def hidden_words(self):
        """Words per hidden row (``config.moe_hidden_words``)."""
        return self._config.moe_hidden_words

    # ---- elaboration -----------------------------------------------------------------------------

    def _tile_rom(self, m, index, name, tiles=None):
        """Combinational lookup of a static tile plan (the expert's, or ``tiles``: the gate's chunks):
        ``index`` -> the tile's fields."""
        lay = self._layout
        tiles = lay.tiles if tiles is None else tiles
        C = self._config.pe_cols
        t = Signal(self.tile_layout, name=name)
        first_fc2 = next((tl.index for tl in tiles if tl.kind == "fc2"), None)
        with m.Switch(index):
            for tl in tiles:
                with m.Case(tl.index):
                    m.d.comb += [
                        t.w_off.eq(tl.w_offset), t.w_len.eq(tl.w_bytes),
                        t.p_off.eq(tl.p_offset), t.p_len.eq(tl.p_bytes),
                        t.fc2.eq(tl.kind == "fc2"), t.first_fc2.eq(tl.index == first_fc2),
                        t.last.eq(tl.index == len(tiles) - 1),
                        t.n.eq(tl.n), t.n0w.eq(tl.n0 // C),
                        t.nk.eq(-(-tl.n // C) * tl.k), t.w_last.eq(_last_block(tl.k, C)),
                        t.k.eq(tl.k),
                    ]
        return t

    @staticmethod
    def _max_nk(config, layout):
        """Most PE beats of one row tile of any command: ``ceil(n / C) * K``, for the elaborated plan
        and for any run-time plan (a tile's panels hold ``ceil(n / C) * K`` words of one weight half)."""
        C = config.pe_cols
        half_words = config.weight_buffer_half_bytes // config.act_word_bytes
        return max([-(-t.n // C) * t.k for t in layout.tiles + layout.gate_tiles] + [half_words])

    def elaborate(self, platform):
        m = Module()
        cfg, lay = self._config, self._layout
        mdl = cfg.model
        D, E = mdl.dim, mdl.experts
        cap = cfg.token_capacity
        entries = cfg.rowtab_entries
        n_tiles = len(lay.tiles)
        list_depth = min(E, entries)
        aw = self._aw

        # ---- storage -------------------------------------------------------------------------------
        rt_w = self.rt_wr
        list_layout = data.StructLayout({
            "expert": unsigned(expert_id_width(E)), "offset": range(entries + 1), "count": range(cap + 1),
            # offset + count, added at capture (from registers) for the compute sequencer's LOAD.
            "end": range(entries + 1)})
        m.submodules.active = lst = memory.Memory(shape=list_layout, depth=max(2, list_depth), init=[])
        lst_w = lst.write_port()
        lst_f = lst.read_port()           # fetch sequencer
        lst_c = lst.read_port()           # compute sequencer
        m.d.comb += [lst_f.en.eq(0), lst_c.en.eq(0)]

        # ---- the layer's parameters ------------------------------------------------------------------
        busy = Signal()
        par = Signal(LayerStartLayout(cfg))
        gate_addr = Signal(aw)
        m.d.comb += [self.start.ready.eq(~busy), self.busy.eq(busy)]
        start = self.start.valid & self.start.ready
        with m.If(start):
            m.d.sync += [
                par.eq(self.start.p),
                par.tokens.eq(Mux(self.start.p.tokens == 0, 1, self.start.p.tokens)),
                gate_addr.eq(self.start.p.gate_base + self.start.p.task * lay.gate_stride),
                busy.eq(1),
            ]

        # ---- capture: the queue walk into the row table and the active list ----------------------
        wptr = Signal(range(entries + 1))
        n_hdr = Signal(range(list_depth + 1))
        walk_done = Signal()
        m.d.comb += [self.q.ready.eq(busy), self.active_experts.eq(n_hdr)]
        q = self.q.p
        q_go = self.q.valid & self.q.ready
        m.d.comb += [
            lst_w.addr.eq(n_hdr), lst_w.data.expert.eq(q.expert), lst_w.data.offset.eq(wptr),
            lst_w.data.count.eq(q.count), lst_w.data.end.eq(wptr + q.count), lst_w.en.eq(q_go & q.header),
            rt_w.addr.eq(wptr), rt_w.data.token.eq(q.token), rt_w.data.scale.eq(q.weight),
            rt_w.en.eq(q_go & ~q.header),
        ]
        with m.If(q_go):
            with m.If(q.header):
                m.d.sync += n_hdr.eq(n_hdr + 1)
            with m.Else():
                m.d.sync += wptr.eq(wptr + 1)
                with m.If(q.last):
                    m.d.sync += walk_done.eq(1)
        with m.If(start):
            m.d.sync += [wptr.eq(0), n_hdr.eq(0), walk_done.eq(0)]

        # ---- expert base table ----------------------------------------------------------------------
        # Expert e's tiles start at expert_base + e * stride. The product is not formed when the fetch
        # sequencer loads an active-list entry (a memory read into a multiplier into an adder in one
        # cycle): after the start, one entry per cycle, base[e + 1] = base[e] + stride fills an E-entry
        # table (E cycles, long before the first queue header: the gate GEMM runs first), and LOAD
        # reads it with the list entry's expert id.
        m.submodules.bases = bases = memory.Memory(shape=unsigned(aw), depth=max(2, E), init=[])
        bt_w = bases.write_port()
        bt_r = bases.read_port(domain="comb")
        bt_acc = Signal(aw)
        bt_stride = Signal(aw)
        bt_n = Signal(range(max(2, E)))
        bt_fill = Signal()
        m.d.comb += [bt_w.addr.eq(bt_n), bt_w.data.eq(bt_acc), bt_w.en.eq(bt_fill)]
        with m.If(bt_fill):
            m.d.sync += [bt_acc.eq(bt_acc + bt_stride), bt_n.eq(bt_n + 1)]
            with m.If(bt_n == E - 1):
                m.d.sync += bt_fill.eq(0)
        with m.If(start):
            m.d.sync += [
                bt_acc.eq(self.start.p.expert_base),
                bt_stride.eq(Mux(self.start.p.plan_fetch, self.start.p.expert_stride, lay.expert_stride)),
                bt_n.eq(0), bt_fill.eq(1),
            ]

        # ---- fetch sequencer -----------------------------------------------------------------------
        f_tile = Signal(range(max(2, n_tiles)))
        f_idx = Signal(range(list_depth + 1))
        # The port's address is the index in every state (it matters only with ``en``), so the
        # index compare with the header count gates the enable alone, not an address mux.
        m.d.comb += lst_f.addr.eq(f_idx)
        f_base = Signal(aw)
        # The run-time plan (plan_fetch): a small memory with asynchronous reads, so a plan-table tile
        # is looked up in the same cycle as an elaborated-plan (ROM) tile.
        m.submodules.plan = plan = memory.Memory(shape=self.tile_layout, depth=max(2, self.plan_entries),
                                                 init=[])
        wiring.connect(m, wiring.flipped(self.plan_wr), plan.write_port())

        def lookup(index, name):
            rom = self._tile_rom(m, index, name + "_rom")
            rd = plan.read_port(domain="comb")
            t = Signal(self.tile_layout, name=name)
            m.d.comb += [rd.addr.eq(index), t.eq(Mux(par.plan_fetch, rd.data, rom))]
            return t

        # The current tile's plan entry in a register (``ftr`` = tile ``f_tile``), loaded with the index:
        # the command addresses add two registers.
        f_look = Signal.like(f_tile)
        ft = lookup(f_look, "f_tile")
        ftr = Signal(self.tile_layout)
        f_gate = Signal(range(max(2, len(lay.gate_tiles))))
        fg = self._tile_rom(m, f_gate, "f_gate_rom", lay.gate_tiles)
        w_sent = Signal()
        p_sent = Signal()
        w_now = w_sent | (self.wcmd.valid & self.wcmd.ready)
        p_now = p_sent | (self.pcmd.valid & self.pcmd.ready)
        both_sent = w_now & p_now

        with m.FSM(name="fetch"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += f_gate.eq(0)
                    m.next = "GATE"
            with m.State("GATE"):
                # The task's gate chunks, in order (every piece tagged GATE_TAG).
                m.d.comb += [
                    self.wcmd.valid.eq(~w_sent),
                    self.wcmd.p.addr.eq(gate_addr + fg.w_off), self.wcmd.p.length.eq(fg.w_len),
                    self.wcmd.p.tag.eq(GATE_TAG),
                    self.pcmd.valid.eq(~p_sent),
                    self.pcmd.p.addr.eq(gate_addr + fg.p_off),
                    self.pcmd.p.length.eq(fg.p_len), self.pcmd.p.tag.eq(GATE_TAG),
                ]
                with m.If(both_sent):
                    m.d.sync += [w_sent.eq(0), p_sent.eq(0), f_gate.eq(f_gate + 1)]
                    with m.If(fg.last):
                        m.d.sync += f_idx.eq(0)
                        m.next = "NEXT"
                with m.Else():
                    m.d.sync += [w_sent.eq(w_now), p_sent.eq(p_now)]
            with m.State("NEXT"):
                with m.If((f_idx < n_hdr) & (self.plan_ready | ~par.plan_fetch) & ~bt_fill):
                    m.d.comb += lst_f.en.eq(1)
                    m.next = "LOAD"
                with m.Elif(walk_done):
                    m.next = "IDLE"
            with m.State("LOAD"):
                # Expert e's tiles start at expert_base + e * expert_stride (the base table).
                m.d.comb += [bt_r.addr.eq(lst_f.data.expert), f_look.eq(0)]
                m.d.sync += [f_base.eq(bt_r.data), f_tile.eq(0), ftr.eq(ft)]
                m.next = "TILE"
            with m.State("TILE"):
                m.d.comb += [
                    self.wcmd.valid.eq(~w_sent),
                    self.wcmd.p.addr.eq(f_base + ftr.w_off), self.wcmd.p.length.eq(ftr.w_len),
                    self.wcmd.p.tag.eq(f_tile + 1),
                    self.pcmd.valid.eq(~p_sent),
                    self.pcmd.p.addr.eq(f_base + ftr.p_off), self.pcmd.p.length.eq(ftr.p_len),
                    self.pcmd.p.tag.eq(f_tile + 1),
                    f_look.eq(f_tile + 1),
                ]
                with m.If(both_sent):
                    m.d.sync += [w_sent.eq(0), p_sent.eq(0), f_tile.eq(f_tile + 1), ftr.eq(ft)]
                    with m.If(ftr.last):
                        m.d.sync += f_idx.eq(f_idx + 1)
                        m.next = "NEXT"
                with m.Else():
                    m.d.sync += [w_sent.eq(w_now), p_sent.eq(p_now)]

        # ---- compute sequencer ---------------------------------------------------------------------
        c_tile = Signal(range(max(2, n_tiles)))
        c_idx = Signal(range(list_depth + 1))
        m.d.comb += lst_c.addr.eq(c_idx)                # as lst_f's
        c_off = Signal(range(entries + 1))
        c_cnt = Signal(range(cap + 1))
        c_end = Signal(range(entries + 1))
        # The expert's row-table entries are all captured (or the walk is done): set at LOAD from the
        # list entry, then kept from registers (a cycle late is safe: wptr and walk_done only grow),
        # so the command's valid does not wait for the capture pointer's compare.
        captured = Signal()
        m.d.sync += captured.eq(walk_done | (wptr >= c_end))
        # The current tile's plan entry in a register (``ctr`` = tile ``c_tile``), loaded with the
        # index, so the command fields and the release compare read registers.
        c_look = Signal.like(c_tile)
        ct = lookup(c_look, "c_tile")
        ctr = Signal(self.tile_layout)
        c_gate = Signal(range(max(2, len(lay.gate_tiles))))
        cg = self._tile_rom(m, c_gate, "c_gate_rom", lay.gate_tiles)
        eng_done = Signal()
        R = cfg.pe_rows
        # PE beats still owed by issued commands, and commands whose done has not pulsed yet.
        max_beats = -(-cap // R) * self._max_nk(cfg, lay)
        owed = Signal(range(2 * max_beats + 1))
        inflight = Signal(range(4))
        r_sent = Signal()
        g_sent = Signal()
        r_now = r_sent | (self.router_cmd.valid & self.router_cmd.ready)
        g_now = g_sent | (self.gemm.valid & self.gemm.ready)
        halves_full = self.wtile.valid & self.ptile.valid
        issued = self.gemm.valid & self.gemm.ready
        with m.If(issued):
            m.d.sync += eng_done.eq(0)
        with m.Elif(self.gemm_done):
            m.d.sync += eng_done.eq(1)
        # A command's PE beats, ceil(m / R) * ceil(n / C) * K, join ``owed`` three cycles after the
        # issue, through registered stages (row tiles, the multiplier's operands, its product): the
        # operands hold from the issue until the release. The release test may run again 5 cycles
        # after the issue (the add, then one cycle for its registered compares, below); the engine's
        # first beat of the command comes no sooner than its loader latency (5 cycles) after the
        # issue, so the release never waits for it. ``expert_phase`` selects the operands: the gate
        # chunks' (T rows) until the last chunk is released, then the expert's.
        expert_phase = Signal()
        tok_rows = Signal(range(-(-cap // R) + 1))
        c_rows = Signal(range(-(-cap // R) + 1))
        mul_a = Signal.like(c_rows)
        mul_b = Signal.like(ctr.nk)
        prod = Signal(range(max_beats + 1))
        pend = Signal(4)
        m.d.sync += [
            tok_rows.eq((par.tokens + R - 1) // R),
            c_rows.eq((c_cnt + R - 1) // R),
            mul_a.eq(Mux(expert_phase, c_rows, tok_rows)),
            mul_b.eq(Mux(expert_phase, ctr.nk, cg.nk)),
            prod.eq(mul_a * mul_b),
            pend.eq(Cat(issued, pend[:3])),
        ]
        # owed <- owed - pe_beat (+ prod when it lands): one adder with a selected addend.
        addend = Signal(signed(len(owed) + 1))
        m.d.comb += addend.eq(Mux(pend[2], prod, 0) - self.pe_beat)
        m.d.sync += [
            owed.eq(owed + addend),
            inflight.eq(inflight + issued - self.gemm_done),
        ]
        # The release test owed - pe_beat < w_last from compares registered a cycle earlier: with no
        # product landing in the last cycle, owed = owed' - pe_beat' (primes: last cycle's values), so
        # the test is owed' < w_last + pe_beat' + pe_beat, and pe_beat' + pe_beat selects one of three
        # registered compares (w_last holds from the issue until the release). The release is
        # blocked until the issue's product is in owed' (pend), which the engine's loader latency
        # hides; pe_beat (the engine's event) then reaches the release through one multiplexer.
        pb1 = Signal()
        owed_lt = [Signal(name=f"owed_lt{i}") for i in range(3)]
        m.d.sync += [pb1.eq(self.pe_beat)] + [f.eq(owed < ctr.w_last + i) for i, f in enumerate(owed_lt)]
        # pend == 0 as a flip-flop of its own (next pend is Cat(issued, pend[:3])), so the release is
        # one LUT of pe_beat and registers (pe_beat arrives through the encoder's owner gate).
        pend_zero = Signal(init=1)
        m.d.sync += pend_zero.eq(~issued & (pend[:3] == 0))
        last_started = Mux(self.pe_beat, Mux(pb1, owed_lt[2], owed_lt[1]),
                           Mux(pb1, owed_lt[1], owed_lt[0])) & pend_zero

        rw, hw, hb = self.row_words, self.hidden_words, self.hidden_base
        g = self.gemm.p
        m.d.comb += [
            self.router_cmd.p.tokens.eq(par.tokens),
            self.router_cmd.p.c_mult.eq(par.c_mult),
            self.router_cmd.p.c_shift.eq(par.c_shift),
            g.b_base.eq(0), g.b_k_stride.eq(1), g.colp_base.eq(0),
        ]
        release = Signal()
        m.d.comb += [self.wtile.ready.eq(release), self.ptile.ready.eq(release)]

        with m.FSM(name="compute"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [c_gate.eq(0), expert_phase.eq(0)]
                    m.next = "GATE_WAIT"
            with m.State("GATE_WAIT"):
                m.d.comb += self.gate_phase.eq(1)
                with m.If(halves_full):
                    m.next = "GATE_ISSUE"
            with m.State("GATE_ISSUE"):
                # The router's command goes with the first chunk only (one per layer).
                first_chunk = c_gate == 0
                m.d.comb += [
                    self.gate_phase.eq(1),
                    self.router_cmd.valid.eq(first_chunk & ~r_sent),
                    self.gemm.valid.eq(~g_sent),
                    g.m.eq(par.tokens), g.k.eq(D), g.n.eq(cg.n),
                    g.a_base.eq(0), g.a_stride.eq(rw),
                    g.b_tile_stride.eq(D),
                    g.dst_base.eq(0), g.dst_stride.eq(0),
                    g.mode.eq(EpilogueMode.RAW),
                ]
                with m.If((r_now | ~first_chunk) & g_now):
                    m.d.sync += [r_sent.eq(0), g_sent.eq(0)]
                    m.next = "GATE_RUN"
                with m.Else():
                    m.d.sync += [r_sent.eq(r_now), g_sent.eq(g_now)]
            with m.State("GATE_RUN"):
                # The router adds the chunk's bias words as its beats arrive: the halves are released
                # once the engine has emitted the chunk's last beat and the router has taken it in.
                m.d.comb += self.gate_phase.eq(1)
                with m.If(eng_done & self.router_drained):
                    m.d.comb += release.eq(1)
                    m.d.sync += [c_idx.eq(0), c_gate.eq(c_gate + 1)]
                    with m.If(cg.last):
                        m.d.sync += expert_phase.eq(1)
                        m.next = "NEXT"
                    with m.Else():
                        m.next = "GATE_WAIT"
            with m.State("NEXT"):
                with m.If(c_idx < n_hdr):
                    m.d.comb += lst_c.en.eq(1)
                    m.next = "LOAD"
                with m.Elif(walk_done):
                    m.next = "DRAIN"
            with m.State("LOAD"):
                m.d.comb += c_look.eq(0)
                m.d.sync += [c_off.eq(lst_c.data.offset), c_cnt.eq(lst_c.data.count),
                             c_end.eq(lst_c.data.end), captured.eq(walk_done | (wptr >= lst_c.data.end)),
                             c_tile.eq(0), ctr.eq(ct)]
                m.next = "ISSUE"
            with m.State("ISSUE"):
                # Valid once both halves are FULL and the expert's row-table entries are all captured
                # (the engine gathers them); neither condition can drop again before the transfer.
                m.d.comb += [
                    self.gemm.valid.eq(halves_full & captured),
                    g.m.eq(c_cnt), g.n.eq(ctr.n), g.rowtab_base.eq(c_off),
                ]
                with m.If(ctr.fc2):
                    m.d.comb += [
                        g.k.eq(ctr.k), g.a_base.eq(hb), g.a_stride.eq(hw), g.b_tile_stride.eq(ctr.k),
                        g.dst_base.eq(ctr.n0w), g.dst_stride.eq(rw),
                        g.shift.eq(par.fc2_shift), g.mode.eq(EpilogueMode.COMBINE),
                        g.scatter.eq(1), g.sync.eq(ctr.first_fc2),
                        # h4toh reads the uint8 GELU codes (numerics.GELU_CODE_BITS).
                        g.a_unsigned.eq(1),
                    ]
                with m.Else():
                    m.d.comb += [
                        g.k.eq(ctr.k), g.a_base.eq(0), g.a_stride.eq(rw), g.b_tile_stride.eq(ctr.k),
                        g.dst_base.eq(hb + ctr.n0w), g.dst_stride.eq(hw),
                        g.shift.eq(par.fc1_shift), g.mode.eq(EpilogueMode.GELU8),
                        g.gather.eq(1),
                    ]
                with m.If(self.gemm.valid & self.gemm.ready):
                    m.next = "RUN"
            with m.State("RUN"):
                # Release as soon as the PE array has started the command's last block: every block
                # is read into the engine's staging registers before the array consumes it, so the
                # command reads nothing more from either half. The next tile's command can then
                # start loading (from the other half) while this one finishes and drains.
                m.d.comb += c_look.eq(c_tile + 1)
                with m.If(last_started):
                    m.d.comb += release.eq(1)
                    m.d.sync += [c_tile.eq(c_tile + 1), ctr.eq(ct)]
                    with m.If(ctr.last):
                        m.d.sync += c_idx.eq(c_idx + 1)
                        m.next = "NEXT"
                    with m.Else():
                        m.next = "ISSUE"
            with m.State("DRAIN"):
                # The last commands' results are written when their done pulses.
                with m.If((inflight == 0) | ((inflight == 1) & self.gemm_done)):
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += self.done.eq(1)
                m.d.sync += busy.eq(0)
                m.next = "IDLE"
        return m
