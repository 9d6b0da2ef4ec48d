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
:class:`~m3vit_hw.weights.weight_streamer.WeightStreamer` instances into the ping-pong weight and
parameter buffers; a tile's halves are released when its GEMM is done.

Structure
---------
:class:`~m3vit_hw.attention.attn_sequencer.AttnSequencer` holds all of the control, the score path and
the score path's private score buffer, and talks to the rest through its client ports (``client``,
``o``, ``e8_wr``, ``rt_wr``). :class:`AttentionLayer` is the standalone wrapper: the datapath pieces
(GEMM engine, a :class:`~m3vit_hw.weights.weight_path.WeightPath`, the activation main bank, the e8 bank,
the row table and the residual buffer, the ``load``/read-back ports) plus one ``AttnSequencer``, wired as
the encoder's shared datapath wires it; :func:`connect_operand_reads` is the engine's operand wiring
(the e8 bank above ``e8_base`` on the A side, the activation bank under the B address MSB).

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
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.host_access import connect_host_writes, connect_read_back
from .. import numerics
from ..config import AcceleratorConfig
from ..weights.client import connect_client
from ..weights.weight_path import WeightPath
from ..gemm.gemm_engine import GemmEngine, RowEntryLayout
from ..lib.mem_port import ReadPortSignature
from ..moe.expert_layout import PARAM_LANE_BYTES
from .attn_layout import buffer_map, plan_attention
from .attn_sequencer import AttnSequencer, AttnStartLayout, Phase
from .score_path import mem_addr_width

__all__ = ["AttentionLayer", "AttnStartLayout", "AttnLoadLayout", "AttnLoadTarget", "Phase",
           "connect_operand_reads", "connect_qkv_copy"]


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


def connect_qkv_copy(m, config, qkv, act_w):
    """Mirror the activation writes of ``act_w`` (the main bank's write port, ``granularity=1``) that
    fall in the Q|K|V region into ``qkv``, the region's copy (``buffer_map(config).qkv_words`` deep).

    The region starts at a multiple of its power-of-two range, so the hit is a compare of the high
    address bits with a constant and the copy's address is the low bits. Writes of other layers that
    land in the region's range (MoE hidden rows, ...) are copied too, harmlessly: attention reads K
    and V only after its own QKV GEMM wrote them.
    """
    bm = buffer_map(config)
    bits = bm.qkv_bits
    qw = qkv.write_port(granularity=1)
    hit = act_w.addr[bits:] == (bm.qkv_base >> bits)
    m.d.comb += [qw.addr.eq(act_w.addr[:bits]), qw.data.eq(act_w.data),
                 qw.en.eq(Mux(hit, act_w.en, 0))]


def connect_operand_reads(m, engine, config, *, act, qkv, e8, wbuf, pbuf, e8_enable=None):
    """Wire the engine's operand reads as attention needs them (the datapath's operand wiring).

    * A (``engine.a_rd``): the activation main bank ``act`` below ``config.attn_e8_base``, the e8 bank
      ``e8`` from there on (addressed by the low bits: ``attn_e8_base`` is a multiple of the bank's
      power-of-two range). The select is registered with the read (one-cycle latency) and holds while
      the port is disabled, as the data does.
    * B (``engine.b_rd``): the weight buffer's current half, or (address MSB, bit ``b_addr_bits - 1``,
      set: K and V) ``qkv``, the copy of the Q|K|V region (:func:`connect_qkv_copy`), at the address's
      low ``qkv_bits``: B reads nothing else of the activation buffer, so the main bank keeps one
      read port.
    * Column parameters (``engine.colp_rd``): the parameter buffer's current half, lanes unpacked.

    Adds one read port to each of ``act``, ``qkv`` and ``e8`` (``amaranth.lib.memory.Memory``); ``wbuf`` and
    ``pbuf`` are :class:`~m3vit_hw.weights.weight_buffer.WeightBuffer` instances. ``e8_enable`` (a 1-bit
    value, default always) gates the e8 select: a shared datapath whose other clients address the main
    bank above ``attn_e8_base`` passes "attention is the active client".
    """
    C = config.pe_cols
    main_aw = mem_addr_width(act.depth)
    e8_aw = mem_addr_width(e8.depth)
    a_main, a_e8 = act.read_port(), e8.read_port()
    a_sel = Signal()
    a_is_e8 = engine.a_rd.addr >= config.attn_e8_base
    if e8_enable is not None:
        a_is_e8 = a_is_e8 & e8_enable
    m.d.comb += [
        a_main.addr.eq(engine.a_rd.addr[:main_aw]), a_main.en.eq(engine.a_rd.en),
        a_e8.addr.eq(engine.a_rd.addr[:e8_aw]), a_e8.en.eq(engine.a_rd.en),
        engine.a_rd.data.eq(Mux(a_sel, a_e8.data.as_value(), a_main.data.as_value())),
    ]
    with m.If(engine.a_rd.en):
        m.d.sync += a_sel.eq(a_is_e8)
    b_main = qkv.read_port()
    b_sel = Signal()
    msb = config.b_addr_bits - 1
    wr, pr = wbuf.read, pbuf.read
    m.d.comb += [
        b_main.addr.eq(engine.b_rd.addr[:buffer_map(config).qkv_bits]), b_main.en.eq(engine.b_rd.en),
        wr.addr.eq(engine.b_rd.addr), wr.en.eq(engine.b_rd.en),
        engine.b_rd.data.eq(Mux(b_sel, b_main.data.as_value(), wr.data)),
        pr.addr.eq(engine.colp_rd.addr), pr.en.eq(engine.colp_rd.en),
    ]
    with m.If(engine.b_rd.en):
        m.d.sync += b_sel.eq(engine.b_rd.addr[msb])
    lane = PARAM_LANE_BYTES * 8
    for c in range(C):
        m.d.comb += [
            engine.colp_rd.data[c].bias.eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS]),
            engine.colp_rd.data[c].mult.eq(pr.data[c * lane + 32:c * lane + 32 + numerics.MULT_BITS]),
        ]


class AttentionLayer(wiring.Component):
    """The attention sub-layer: datapath pieces (GEMM engine, weight path, buffers) + one
    :class:`~m3vit_hw.attention.attn_sequencer.AttnSequencer`.

    Parameters
    ----------
    config : AcceleratorConfig
        Every size: the model, PE array, buffers (the attention buffer map), the external-memory port
        (``mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``), ``arbiter_depth``,
        ``tile_tag_width`` and ``counter_width``.

    Interface attributes
    --------------------
    start : In(stream.Signature(AttnStartLayout(config, config.mem_addr_width)))
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
        Indexed by :class:`Phase`. See the module docstring. ``weight_bytes`` is counted here (the
        streamers' buffer writes while the sequencer is busy); the others are the sequencer's.

    Attributes
    ----------
    engine, sequencer, arbiter, wbuf, pbuf, wstream, pstream
        The sub-units (``weights`` is the :class:`~m3vit_hw.weights.weight_path.WeightPath` of the last
        five).
    score, score_buffer
        The sequencer's score path and private score buffer.
    act_buffer, e8_buffer, row_table, res_buffer
        The datapath buffers (``amaranth.lib.memory.Memory``), exposed for testbenches.

    Raises
    ------
    TypeError, ValueError
        If ``config`` is not an :class:`AcceleratorConfig`, or ``mem_addr_width`` cannot address the
        attention image.
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # Every size was checked when the config was built (its act_buffer_needs, rowtab_needs and
        # dst_addr_bits include this layer's buffer map), so nothing below refuses a validated config.
        self._bmap = buffer_map(config)
        self._layout = plan_attention(config)
        # The one check the config cannot make without this layer's tile plan (the image size).
        if self._layout.image_bytes >= 1 << config.mem_addr_width:
            raise ValueError(f"mem_addr_width={config.mem_addr_width} cannot address the "
                             f"{self._layout.image_bytes}-byte attention image")
        self._config = config
        lay, bm = self._layout, self._bmap
        C = config.pe_cols
        port = dict(addr_width=config.mem_addr_width, data_bytes=config.mem_data_bytes,
                    max_burst=config.mem_max_burst)
        self.engine = GemmEngine(config)
        self.weights = WeightPath(config, weight_half_bytes=lay.weight_half_bytes,
                                  param_half_bytes=lay.param_half_bytes, param_word_bytes=lay.param_word_bytes)
        for name in ("arbiter", "wbuf", "pbuf", "wstream", "pstream"):
            setattr(self, name, getattr(self.weights, name))
        self.sequencer = AttnSequencer(config, lay, bm)
        self.score = self.sequencer.score
        self.score_buffer = self.sequencer.score_buffer
        self.rowtab_depth = 1 << config.rowtab_addr_bits
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The datapath buffers, owned here (exposed for testbenches): the main activation bank (h,
        #: context, Q|K|V), the e8 bank, the row table and the residual buffer.
        self.act_buffer = memory.Memory(shape=word8, depth=bm.main_words, init=[])
        self.qkv_buffer = memory.Memory(shape=word8, depth=bm.qkv_words, init=[])
        self.e8_buffer = memory.Memory(shape=word8, depth=bm.e8_words, init=[])
        self.row_table = memory.Memory(shape=RowEntryLayout(config), depth=self.rowtab_depth, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(AttnStartLayout(config, config.mem_addr_width))),
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

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        eng, seq, wp = self.engine, self.sequencer, self.weights
        m.submodules.engine = eng
        m.submodules.sequencer = seq

        # ---- external memory: the weight path ----------------------------------------------------
        wp.add_to(m, self.mem)

        # ---- buffers -----------------------------------------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.qkv = qkv = self.qkv_buffer
        m.submodules.e8 = e8 = self.e8_buffer
        m.submodules.rowtab = rtab = self.row_table
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, seq.e8_wr, e8.write_port())
        wiring.connect(m, seq.rt_wr, rtab.write_port())
        wiring.connect(m, eng.rowtab_rd, rtab.read_port())
        wiring.connect(m, eng.res_rd, res.read_port())
        connect_operand_reads(m, eng, cfg, act=act, qkv=qkv, e8=e8, wbuf=self.wbuf, pbuf=self.pbuf)

        # ---- the client ---------------------------------------------------------------------------
        connect_client(m, seq.client, eng, self.wstream, self.pstream, self.wbuf, self.pbuf)
        wiring.connect(m, eng.o, seq.o)
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        m.d.comb += [self.done.eq(seq.done), self.busy.eq(seq.busy)]
        for name in ("cycles", "compute_cycles", "engine_idle_cycles", "attn_cycles", "attn_compute_cycles",
                     "softmax_cycles", "overlap_cycles", "phase_cycles"):
            m.d.comb += getattr(self, name).eq(getattr(seq, name))
        running = seq.busy
        # The weight path's own counter: bytes written into the weight and parameter buffers.
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += self.weight_bytes.eq(0)
        with m.Elif(running):
            m.d.sync += self.weight_bytes.eq(self.weight_bytes + wp.written_bytes())

        # ---- load and read-back (while idle) -----------------------------------------------------
        ld = self.load
        # One write port per buffer: the engine's while a layer runs, the host's load while idle.
        act_w = act.write_port(granularity=1)
        connect_qkv_copy(m, cfg, qkv, act_w)
        connect_host_writes(m, act_w, res.write_port(granularity=1),
                            eng.act_wr, eng.res_wr, ld, busy=running, h=AttnLoadTarget.H, x=AttnLoadTarget.X,
                            act_bits=numerics.ACT_BITS)
        connect_read_back(m, res.read_port(), self.rd_addr, self.rd_data, idle=~running)

        return m
