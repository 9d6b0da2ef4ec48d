"""``DenseLayer``: the dense MLP sub-layer ``x <- x + fc2(GELU(fc1(h)))`` on the shared GEMM engine.

Bit-exact with ``reference.golden_model.dense_mlp``, with ``h`` the int8 LN2 output (in the activation
buffer, as :class:`~m3vit_hw.attention.AttentionLayer` and :class:`~m3vit_hw.moe.moe_layer.MoELayer`
take it) and ``x`` the int16 residual stream. One :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` runs
every GEMM; the operands live where :func:`~m3vit_hw.dense.dense_layout.dense_buffer_map` puts them:

======  ======  ==================================================================================
GEMM    mode    operands and destination (per token tile ``j``: rows ``t0 .. t0 + rows - 1``)
======  ======  ==================================================================================
fc1     GELU8   ``m = rows, k = D, n = tile.n``; A = ``h`` rows ``t0..`` (pitch ``row_words``), B from
                the weight buffer; out to the hidden slot ``hid_base + r * hw + tile.n0 / C``
fc2     RESADD  ``m = rows, k = hidden, n = tile.n``; A = the hidden slot (pitch ``hw``, uint8 GELU
                codes: ``a_unsigned``); added into
                residual rows ``t0..``; the token tile's first fc2 command carries ``sync``
======  ======  ==================================================================================

Token tiling
------------
The hidden matrix ``T x hidden`` never exists on chip: one hidden slot of ``token_tile`` rows
(:class:`~m3vit_hw.dense.dense_layout.DenseBufferMap`) is reused by every token tile, and the tile plan
(fc1 tiles, then fc2 tiles; :func:`~m3vit_hw.dense.dense_layout.plan_dense`) streams once per token
tile. Reusing the slot is safe because the sequencer keeps one command in the engine at a time (the next
is issued after the previous one's ``done``), so the next token tile's fc1 writes the slot only after
the previous fc2 has read it; the ``sync`` on each token tile's first fc2 states the fc1 -> fc2
dependency for any later overlap.

Weights: the plan's tiles stream in order, ``ceil(T / token_tile)`` times, through two
:class:`~m3vit_hw.weights.weight_streamer.WeightStreamer` instances into the ping-pong weight and parameter
buffers; a tile's halves are released when its command is done (one command in the engine at a time:
each weight tile pays the engine's fill and drain, about ``max(pe_rows, C) + 20`` cycles).

Structure
---------
:class:`DenseSequencer` holds all of the control (start, the fetch and compute sequencers, the
counters) and talks to the engine, the streamers and the ping-pong buffers only through a
:class:`~m3vit_hw.weights.client.GemmClientSignature`; :class:`DenseLayer` is the standalone wrapper that
owns the engine, the buffers, the streamers and the memory arbiter, as the encoder's shared datapath
will.

Use
---
Place the :func:`~m3vit_hw.dense.dense_layout.pack_dense` image (GELU table, weights, parameters) in
external memory; load ``h`` and ``x`` through ``load`` (while idle); send ``start``
(:func:`~m3vit_hw.dense.dense_layout.start_fields`); wait for ``done``; read ``x`` back.

Counters (reset by ``start``, valid after ``done``)
---------------------------------------------------
``cycles`` (start .. done), ``compute_cycles`` (PE-array operand beats), ``phase_cycles[k]`` (cycles
with a :class:`DensePhase` ``k`` command in the engine) and ``wait_cycles`` (no command in the engine:
waiting for a weight tile).
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.host_access import connect_host_writes, connect_read_back
from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.epilogue import EpilogueMode
from ..gemm.gemm_engine import GemmEngine
from ..lib.mem_port import ReadPortSignature
from ..weights.client import GemmClientSignature, connect_client, connect_weight_reads
from .patch_loader import BurstRequester
from .dense_layout import dense_buffer_map, plan_dense
from ..weights.weight_path import WeightPath

__all__ = ["DenseLayer", "DenseSequencer", "DenseStartLayout", "DenseLoadLayout", "DenseLoadTarget", "DensePhase"]


class DensePhase(enum.Enum, shape=1):
    """The kind of an engine command (the counters' phases)."""
    FC1 = 0
    FC2 = 1


class DenseLoadTarget(enum.Enum, shape=1):
    """Where a ``load`` beat goes: ``H`` (activation word ``addr``, low 8 bits of each lane) or ``X``
    (residual word ``addr``). (The GELU table comes from the parameter image.)"""
    H = 0
    X = 1


class DenseLoadLayout(data.StructLayout):
    """A ``load`` beat: ``target``, ``addr``, ``data`` (pe_cols int16 lanes)."""

    def __init__(self, config):
        super().__init__({
            "target": DenseLoadTarget,
            "addr": unsigned(max(config.act_addr_bits, config.res_addr_bits)),
            "data": data.ArrayLayout(signed(numerics.RES_BITS), config.pe_cols),
        })


class DenseStartLayout(data.StructLayout):
    """The command that starts one dense MLP: ``tokens`` in ``[1, token_capacity]``, ``base`` (external
    byte address of the :func:`pack_dense` image, a multiple of the memory beat), and the fc1 and fc2
    requantization shifts."""

    def __init__(self, config, addr_width):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "base": unsigned(addr_width),
            "fc1_shift": range(numerics.SHIFT_MAX + 1),
            "fc2_shift": range(numerics.SHIFT_MAX + 1),
        })


class DenseLayer(wiring.Component):
    """The dense MLP sub-layer: GEMM engine, buffers, streamers and sequencer.

    Parameters
    ----------
    config : AcceleratorConfig
    hidden : int or None
        The hidden width (default ``config.model.mlp_hidden``), in ``[1, min(largest_n, largest_k)]``.
    token_tile : int or None
        Rows of the hidden slot (default: as many as the activation buffer leaves room for).

    The external-memory port (``config.mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``), the
    arbiter depth, the tile tag width and the counter width come from ``config``.

    Interface attributes
    --------------------
    start : In(stream.Signature(DenseStartLayout(config, config.mem_addr_width)))
        Accepted when idle.
    done : Out(1)
        Pulses when the last fc2 result is in the residual buffer.
    busy : Out(1)
    mem : Out(ReadPortSignature(...))
        GELU table, weights and column parameters.
    load : In(stream.Signature(DenseLoadLayout(config)))
        Preloads ``h`` and ``x``; ready while idle.
    rd_addr : In(stream.Signature(unsigned(res_addr_bits)))
    rd_data : Out(stream.Signature(ArrayLayout(signed(16), pe_cols)))
        Residual read-back, one word per address, in order; ready while idle.
    cycles, compute_cycles, wait_cycles : Out(counter_width)
    phase_cycles : Out(ArrayLayout(counter_width, 2))
        Indexed by :class:`DensePhase`.

    Raises
    ------
    TypeError, ValueError
        On a bad ``hidden`` or ``token_tile`` (a config that validates holds the default dense MLP),
        or a ``mem_addr_width`` too narrow for the image.
    """

    def __init__(self, config, *, hidden=None, token_tile=None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # The config's act_buffer_needs include the dense MLP of model.mlp_hidden; only a different
        # ``hidden`` or ``token_tile`` (arguments) or the image size can be refused here, before any
        # sub-unit is built.
        self._layout = plan_dense(config, hidden=hidden)
        self._bmap = dense_buffer_map(config, hidden=self._layout.hidden, token_tile=token_tile)
        if self._layout.image_bytes >= 1 << config.mem_addr_width:
            raise ValueError(f"mem_addr_width={config.mem_addr_width} cannot address the "
                             f"{self._layout.image_bytes}-byte dense MLP image")
        self._config = config
        self._aw = config.mem_addr_width
        lay, bm = self._layout, self._bmap
        C = config.pe_cols
        db = config.mem_data_bytes
        port = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self.engine = GemmEngine(config)
        self.weights = WeightPath(config, weight_half_bytes=lay.weight_half_bytes,
                                  param_half_bytes=lay.param_half_bytes, param_word_bytes=lay.param_word_bytes,
                                  readers=1)
        for name in ("arbiter", "wbuf", "pbuf", "wstream", "pstream"):
            setattr(self, name, getattr(self.weights, name))
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The buffers, owned here (exposed for testbenches and for the shared datapath to take over).
        self.act_buffer = memory.Memory(shape=word8, depth=config.act_buffer_words, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        self.sequencer = DenseSequencer(config, lay, bm)
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(DenseStartLayout(config, config.mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(**port)),
            "load": In(stream.Signature(DenseLoadLayout(config))),
            "rd_addr": In(stream.Signature(unsigned(config.res_addr_bits))),
            "rd_data": Out(stream.Signature(word16)),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "wait_cycles": Out(cw),
            "phase_cycles": Out(data.ArrayLayout(cw, 2)),
        })

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        """The :class:`~m3vit_hw.dense.dense_layout.DenseLayout` expected in external memory."""
        return self._layout

    @property
    def buffer_map(self):
        return self._bmap

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        C = cfg.pe_cols
        eng, seq = self.engine, self.sequencer
        for name in ("engine", "sequencer"):
            m.submodules[name] = getattr(self, name)

        # ---- external memory: the weight path and the GELU table reader --------------------------
        self.weights.add_to(m, self.mem)
        wiring.connect(m, seq.lut_mem, self.weights.readers[0])

        # ---- buffers -----------------------------------------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, eng.a_rd, act.read_port())
        wiring.connect(m, eng.res_rd, res.read_port())
        connect_weight_reads(m, eng, self.wbuf, self.pbuf, C)
        # The row table is unused (no gather/scatter, no per-row scale); the engine's read gets zeros.
        m.d.comb += eng.o.ready.eq(1)

        # ---- sequencer ---------------------------------------------------------------------------
        connect_client(m, seq.client, eng, self.wstream, self.pstream, self.wbuf, self.pbuf)
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        m.d.comb += [self.done.eq(seq.done), self.busy.eq(seq.busy)]
        running = seq.busy
        for name in ("cycles", "compute_cycles", "wait_cycles"):
            m.d.comb += getattr(self, name).eq(getattr(seq, name))
        m.d.comb += self.phase_cycles.eq(seq.phase_cycles)

        # ---- load and read-back (while idle) -----------------------------------------------------
        ld = self.load
        # One write port per buffer: the engine's while a layer runs, the host's load while idle.
        connect_host_writes(m, act.write_port(granularity=1), res.write_port(granularity=1),
                            eng.act_wr, eng.res_wr, ld, busy=running, h=DenseLoadTarget.H, x=DenseLoadTarget.X,
                            act_bits=numerics.ACT_BITS)
        connect_read_back(m, res.read_port(), self.rd_addr, self.rd_data, idle=~running)

        return m


class DenseSequencer(wiring.Component):
    """The dense MLP's sequencer alone: it drives an engine, two streamers and the ping-pong buffers
    through a :class:`~m3vit_hw.weights.client.GemmClientSignature` and owns nothing else.

    Parameters
    ----------
    config : AcceleratorConfig
    layout : DenseLayout
    buffer_map : DenseBufferMap

    The external-memory port of ``lut_mem`` (weights go through the client's streamers) and the
    counter width come from ``config``.

    Interface attributes
    --------------------
    start : In(stream.Signature(DenseStartLayout(config, config.mem_addr_width)))
    done, busy : Out(1)
    client : Out(GemmClientSignature(config))
    lut_mem : Out(ReadPortSignature(mem_addr_width, mem_data_bytes, mem_max_burst))
        Reads the layer's GELU table (the image's first ``lut_bytes``) into ``client.gelu_lut`` after
        ``start``; the first GEMM waits for it.
    cycles, compute_cycles, wait_cycles : Out(counter_width)
    phase_cycles : Out(ArrayLayout(counter_width, 2))
    """

    def __init__(self, config, layout, buffer_map):
        addr_width, data_bytes = config.mem_addr_width, config.mem_data_bytes
        self._config, self._layout, self._bmap, self._aw = config, layout, buffer_map, addr_width
        self._db = data_bytes
        port = dict(addr_width=addr_width, data_bytes=data_bytes, max_burst=config.mem_max_burst)
        self.lut_reader = BurstRequester(**port, max_beats=layout.lut_bytes // data_bytes)
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(DenseStartLayout(config, addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "client": Out(GemmClientSignature(config)),
            "lut_mem": Out(ReadPortSignature(**port)),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "wait_cycles": Out(cw),
            "phase_cycles": Out(data.ArrayLayout(cw, 2)),
        })

    def _tile_rom(self, m, index, name):
        """Combinational lookup of the static tile plan."""
        cfg, lay = self._config, self._layout
        C = cfg.pe_cols
        t = Signal(data.StructLayout({
            "w_off": unsigned(self._aw), "w_len": unsigned(self._aw),
            "p_off": unsigned(self._aw), "p_len": unsigned(self._aw),
            "fc2": 1, "first_fc2": 1, "last": 1,
            "n": range(cfg.largest_n + 1), "n0w": range(-(-cfg.largest_n // C) + 1),
        }), name=name)
        with m.Switch(index):
            for tl in lay.tiles:
                with m.Case(tl.index):
                    m.d.comb += [
                        t.w_off.eq(tl.w_offset), t.w_len.eq(tl.w_bytes),
                        t.p_off.eq(tl.p_offset), t.p_len.eq(tl.p_bytes),
                        t.fc2.eq(tl.kind == "fc2"), t.first_fc2.eq(tl.first_fc2),
                        t.last.eq(tl.index == len(lay.tiles) - 1),
                        t.n.eq(tl.n), t.n0w.eq(tl.n0 // C),
                    ]
        return t

    def elaborate(self, platform):
        m = Module()
        cfg, lay, bm = self._config, self._layout, self._bmap
        C = cfg.pe_cols
        D = cfg.model.dim
        ntl = len(lay.tiles)
        tt = bm.token_tile
        cl = self.client

        # ---- start and parameters ----------------------------------------------------------------
        prm = Signal(DenseStartLayout(cfg, self._aw))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += self.start.ready.eq(~running)
        with m.If(start):
            m.d.sync += [prm.eq(self.start.payload), running.eq(1)]
        T = prm.tokens

        # ---- GELU table: the image's first bytes, one entry per cycle into the engine ------------
        db = self._db
        m.submodules.lut_reader = lr = self.lut_reader
        wiring.connect(m, lr.req, wiring.flipped(self.lut_mem.req))
        lut_issued = Signal()
        lut_idx = Signal(range((1 << numerics.ACT_BITS) + 1))
        lut_byte = Signal(range(db))
        lut_done = Signal()
        m.d.comb += [lr.cmd.valid.eq(running & ~lut_issued), lr.cmd.payload.addr.eq(prm.base),
                     lr.cmd.payload.beats.eq(lay.lut_bytes // db)]
        lresp = self.lut_mem.resp
        last_byte = lut_byte == db - 1
        m.d.comb += [
            cl.gelu_lut.addr.eq(lut_idx), cl.gelu_lut.en.eq(lresp.valid & (lut_idx < 1 << numerics.ACT_BITS)),
            lresp.ready.eq(last_byte),
        ]
        with m.Switch(lut_byte):
            for k in range(db):
                with m.Case(k):
                    m.d.comb += cl.gelu_lut.data.eq(lresp.payload.data[8 * k:8 * k + 8])
        with m.If(start):
            m.d.sync += [lut_issued.eq(0), lut_idx.eq(0), lut_byte.eq(0), lut_done.eq(0)]
        with m.Else():
            with m.If(lr.cmd.valid & lr.cmd.ready):
                m.d.sync += lut_issued.eq(1)
            with m.If(lresp.valid):
                m.d.sync += [lut_byte.eq(Mux(last_byte, 0, lut_byte + 1)), lut_idx.eq(lut_idx + 1)]
                with m.If(lut_idx == (1 << numerics.ACT_BITS) - 1):
                    m.d.sync += lut_done.eq(1)

        # ---- fetch sequencer: the tile plan once per token tile ----------------------------------
        tok_w = range(cfg.token_capacity + 1)
        fw, fp = Signal(range(ntl)), Signal(range(ntl))
        fw_left, fp_left = Signal(tok_w), Signal(tok_w)       # tokens still to fetch the plan for
        tw_ = self._tile_rom(m, fw, "fetch_w_tile")
        tp_ = self._tile_rom(m, fp, "fetch_p_tile")
        wcmd, pcmd = cl.wcmd, cl.pcmd
        m.d.comb += [
            wcmd.valid.eq(running & (fw_left != 0)),
            wcmd.payload.addr.eq(prm.base + tw_.w_off), wcmd.payload.length.eq(tw_.w_len),
            wcmd.payload.tag.eq(fw),
            pcmd.valid.eq(running & (fp_left != 0)),
            pcmd.payload.addr.eq(prm.base + tp_.p_off), pcmd.payload.length.eq(tp_.p_len),
            pcmd.payload.tag.eq(fp),
        ]
        for idx, left, cmd_ in ((fw, fw_left, wcmd), (fp, fp_left, pcmd)):
            with m.If(start):
                m.d.sync += [idx.eq(0), left.eq(self.start.payload.tokens)]
            with m.Elif(cmd_.valid & cmd_.ready):
                with m.If(idx == ntl - 1):
                    m.d.sync += [idx.eq(0), left.eq(Mux(left > tt, left - tt, 0))]
                with m.Else():
                    m.d.sync += idx.eq(idx + 1)

        # ---- compute sequencer -------------------------------------------------------------------
        ti = Signal(range(ntl))
        tc = self._tile_rom(m, ti, "compute_tile")
        rows_left = Signal(tok_w)                 # T - t0 of the current token tile
        rows = Signal(range(tt + 1))
        m.d.comb += rows.eq(Mux(rows_left > tt, tt, rows_left))
        h_base = Signal(cfg.act_addr_bits)        # t0 * row_words
        r_base = Signal(cfg.dst_addr_bits)        # t0 * row_words in the residual buffer
        inflight = Signal()                       # one command in the engine
        phase = Signal(DensePhase)
        g = cl.gemm
        gp = g.payload
        push = g.valid & g.ready
        # Every command reads a weight tile: its halves are released when it is done.
        m.d.comb += cl.release.eq(cl.gemm_done)
        with m.If(cl.gemm_done):
            m.d.sync += inflight.eq(0)

        with m.FSM(name="seq"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [ti.eq(0), rows_left.eq(self.start.payload.tokens), h_base.eq(0),
                                 r_base.eq(0)]
                    m.next = "WAIT_TILE"
            with m.State("WAIT_TILE"):
                # While the release is in flight, ``tile.valid`` still shows the released half.
                with m.If(cl.tile_valid & ~inflight & lut_done):
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                m.d.comb += [
                    g.valid.eq(1),
                    gp.m.eq(rows), gp.n.eq(tc.n), gp.b_base.eq(0), gp.b_k_stride.eq(1),
                    gp.colp_base.eq(0),
                ]
                with m.If(tc.fc2):
                    m.d.comb += [
                        gp.k.eq(lay.hidden), gp.a_base.eq(bm.hid_base), gp.a_stride.eq(bm.hw),
                        gp.b_tile_stride.eq(lay.hidden), gp.dst_base.eq(r_base + tc.n0w),
                        gp.dst_stride.eq(bm.row_words), gp.shift.eq(prm.fc2_shift),
                        gp.mode.eq(EpilogueMode.RESADD), gp.sync.eq(tc.first_fc2),
                        # The hidden slot holds uint8 GELU codes (numerics.GELU_CODE_BITS).
                        gp.a_unsigned.eq(1),
                    ]
                with m.Else():
                    m.d.comb += [
                        gp.k.eq(D), gp.a_base.eq(h_base), gp.a_stride.eq(bm.row_words),
                        gp.b_tile_stride.eq(D), gp.dst_base.eq(bm.hid_base + tc.n0w),
                        gp.dst_stride.eq(bm.hw), gp.shift.eq(prm.fc1_shift),
                        gp.mode.eq(EpilogueMode.GELU8),
                    ]
                with m.If(push):
                    m.d.sync += [inflight.eq(1), phase.eq(Mux(tc.fc2, DensePhase.FC2, DensePhase.FC1))]
                    with m.If(~tc.last):
                        m.d.sync += ti.eq(ti + 1)
                        m.next = "WAIT_TILE"
                    with m.Elif(rows_left > tt):
                        m.d.sync += [ti.eq(0), rows_left.eq(rows_left - tt),
                                     h_base.eq(h_base + tt * bm.row_words),
                                     r_base.eq(r_base + tt * bm.row_words)]
                        m.next = "WAIT_TILE"
                    with m.Else():
                        m.next = "WAIT_DONE"
            with m.State("WAIT_DONE"):
                with m.If(~inflight & ~cl.gemm_busy):
                    m.d.sync += running.eq(0)
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(running)

        # ---- counters ----------------------------------------------------------------------------
        counters = [
            (self.cycles, 1), (self.compute_cycles, cl.pe_active), (self.wait_cycles, ~inflight),
            (self.phase_cycles[0], inflight & (phase == DensePhase.FC1)),
            (self.phase_cycles[1], inflight & (phase == DensePhase.FC2)),
        ]
        for ctr, inc in counters:
            with m.If(start):
                m.d.sync += ctr.eq(0)
            with m.Elif(running):
                m.d.sync += ctr.eq(ctr + inc)
        return m
