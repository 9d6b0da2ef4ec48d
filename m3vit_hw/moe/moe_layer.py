"""``MoELayer``: one M³ViT mixture-of-experts MLP layer on the accelerator, end to end.

``x <- x + sum_k p_k * expert_k(h)`` for every token, bit-exact with
``reference.golden_model.moe_layer`` (``h`` = the int8 ``norm2`` output, ``x`` = the int16 residual
stream). The layer is built from the project's units:

* a :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` (one PE array) that runs the gate GEMM and every expert
  tile. Its ``pe_active`` strobe drives the ``compute_cycles`` counter, and the controller counts it to
  release a tile's buffer halves as soon as the engine has read them, so consecutive tiles overlap in
  the engine;
* the :class:`~m3vit_hw.moe.router.Router` (task bias, softmax, top-k) and
  :class:`~m3vit_hw.moe.expert_queues.ExpertQueues` (counting-based per-expert token queues);
* the :class:`~m3vit_hw.moe.reorder_controller.ReorderController`, which captures the queues into the row
  table and sequences weight fetch and compute, active expert by active expert, tile by tile
  (:mod:`m3vit_hw.moe.expert_layout` defines the tiles);
* two ping-pong :class:`~m3vit_hw.weights.weight_buffer.WeightBuffer` instances, one for weight panels
  (``config.weight_buffer_bytes``, independent of E) and one for the column parameters (bias and
  multiplier words, ``config.param_buffer_words``), each filled by a
  :class:`~m3vit_hw.weights.weight_streamer.WeightStreamer`; the streamers share the external-memory port
  through a :class:`~m3vit_hw.lib.mem_arbiter.ReadArbiter`;
* the activation buffer (``h`` rows at word 0, the hidden region after ``token_capacity`` rows), the
  residual buffer (``x``) and the row table, sized by the config.

Structure
---------
Everything that is control (router, queues, controller, table fetch, counters) is one
:class:`~m3vit_hw.moe.moe_sequencer.MoESequencer`, a client of the datapath: it owns no engine, buffer
or row table. This class is the standalone wrapper = the datapath pieces (engine, act/res buffers,
row table, weight and parameter buffers, streamers, a three-master arbiter) + that client, wired as
the encoder's shared datapath wires it; ``controller``, ``router`` and ``queues`` are the client's
units (for testbenches). The start may also ask the client to fetch the router record, the GELU table
and a run-time expert plan itself (:class:`~m3vit_hw.moe.reorder_controller.LayerStartLayout`), so
one elaborated layer runs smaller models too (see the sequencer's *Run-time model shape*).

Use
---
1. Place the image of :func:`~m3vit_hw.moe.expert_layout.pack_moe` in external memory.
2. Load ``h``, ``x`` and the GELU table through ``load`` (while idle).
3. Send ``start`` (:func:`~m3vit_hw.moe.expert_layout.start_fields` builds it) and wait for ``done``.
4. Read ``x`` back through ``rd_addr`` / ``rd_data``. Another ``start`` (any task, any T) may follow
   without reloading the GELU table; switching tasks fetches only that task's gate record.

Counters (reset by ``start``, valid after ``done``): ``cycles`` (start accepted .. done),
``compute_cycles`` (cycles in which the PE array accepted an operand beat, i.e. did ``pe_rows x
pe_cols`` MACs: derived from the engine's PE array input handshake), ``expert_bytes`` and
``gate_bytes`` (bytes of the expert and gate pieces commanded to the streamers, each fetched exactly
once before ``done``: the bytes written into the two buffers).
"""

from amaranth.hdl import Module, Mux, signed, unsigned
from amaranth.lib import data, enum, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.host_access import connect_host_writes, connect_read_back
from .. import numerics
from ..config import AcceleratorConfig
from ..weights.client import connect_client
from ..weights.weight_path import WeightPath
from .expert_layout import PARAM_LANE_BYTES, plan_moe
from ..gemm.gemm_engine import GemmEngine, RowEntryLayout
from ..lib.mem_port import ReadPortSignature
from ..lib.skid import SkidBuffer
from .moe_sequencer import MoESequencer
from .reorder_controller import LayerStartLayout

__all__ = ["MoELayer", "LoadTarget", "LoadLayout"]


class LoadTarget(enum.Enum, shape=2):
    """Where a ``load`` beat goes."""
    #: Activation-buffer word ``addr`` (``h`` row ``t`` word ``w`` is ``t * row_words + w``); lanes
    #: take the low 8 bits of ``data``.
    H = 0
    #: Residual-buffer word ``addr`` (``x`` row ``t`` word ``w`` is ``t * row_words + w``).
    X = 1
    #: GELU table entry ``addr`` (0..255, the int8 input + 128) = ``data[0]`` (low 8 bits).
    GELU = 2


class LoadLayout(data.StructLayout):
    """A ``load`` beat: ``target`` (:class:`LoadTarget`), ``addr``, ``data`` (pe_cols int16 lanes)."""

    def __init__(self, config):
        super().__init__({
            "target": LoadTarget,
            "addr": unsigned(max(config.act_addr_bits, config.res_addr_bits, numerics.ACT_BITS)),
            "data": data.ArrayLayout(signed(numerics.RES_BITS), config.pe_cols),
        })


class MoELayer(wiring.Component):
    """One MoE layer: router, expert queues, reordering controller, buffers, streamers, GEMM engine.

    Parameters
    ----------
    config : AcceleratorConfig
        Every size: PE array, token capacity, experts, top-k, tasks, buffers, the external-memory
        port (``mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``), ``arbiter_depth``,
        ``tile_tag_width`` and ``counter_width``.

    Interface attributes
    --------------------
    start : ``In(stream.Signature(LayerStartLayout(config)))``
        Starts a layer; accepted when idle (see :class:`~m3vit_hw.moe.reorder_controller.LayerStartLayout`).
    done : ``Out(1)``
        Pulses when the layer's last result is in the residual buffer.
    busy : ``Out(1)``
        A layer is running (``load`` and ``rd_addr`` wait meanwhile).
    mem : ``Out(ReadPortSignature(...))``
        External memory (weights, column parameters, gates).
    load : ``In(stream.Signature(LoadLayout(config)))``
        Preloads ``h``, ``x`` and the GELU table, one word or entry per beat; ready while idle.
    rd_addr : ``In(stream.Signature(unsigned(res_addr_bits)))``
        Residual-buffer word addresses to read back; ready while idle and the output slot is free.
    rd_data : ``Out(stream.Signature(ArrayLayout(signed(16), pe_cols)))``
        The words, in request order, one per address.
    cycles, compute_cycles, expert_bytes, gate_bytes : ``Out(config.counter_width)``
        Performance counters of the last layer (see the module docstring).
    active_experts : ``Out(range(E + 1))``
        Active experts of the last layer.
    overflow : ``Out(1)``
        The expert queues saw more than ``token_capacity`` tokens (sticky).

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`~m3vit_hw.config.AcceleratorConfig` (sizes are checked when
        the config is built).
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # Every size was checked when the config was built (a config that validates elaborates), so
        # nothing below can refuse it; the sub-units are built here because testbenches reach into them.
        layout = plan_moe(config)
        self._config = config
        self._layout = layout
        C = config.pe_cols
        #: The MoE client (router, queues, controller, table fetch, counters): what the encoder's
        #: shared datapath runs; the rest of this class is the datapath.
        self.sequencer = MoESequencer(config)
        # The client's units, under their old names (testbenches and monitors reach into them).
        self.controller = self.sequencer.controller
        self.router = self.sequencer.router
        self.queues = self.sequencer.queues
        # The weight path (arbiter, streamers, ping-pong buffers), shared with the other wrappers; the
        # arbiter's third master is the client's table fetch.
        self.weight_path = WeightPath(config, weight_half_bytes=layout.weight_half_bytes,
                                      param_half_bytes=layout.param_half_bytes,
                                      param_word_bytes=layout.param_word_bytes, readers=1)
        wp = self.weight_path
        self.arbiter, self.wbuf, self.pbuf = wp.arbiter, wp.wbuf, wp.pbuf
        self.wstream, self.pstream = wp.wstream, wp.pstream
        self.engine = GemmEngine(config)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The activation buffer (``h`` rows, then the hidden region), the residual buffer and the row
        #: table; exposed so that testbenches can inspect them.
        self.act_buffer = memory.Memory(shape=word8, depth=config.act_buffer_words, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        self.row_table = memory.Memory(shape=RowEntryLayout(config), depth=config.rowtab_entries, init=[])
        super().__init__({
            "start": In(stream.Signature(LayerStartLayout(config))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(addr_width=config.mem_addr_width,
                                         data_bytes=config.mem_data_bytes,
                                         max_burst=config.mem_max_burst)),
            "load": In(stream.Signature(LoadLayout(config))),
            "rd_addr": In(stream.Signature(unsigned(config.res_addr_bits))),
            "rd_data": Out(stream.Signature(word16)),
            "cycles": Out(config.counter_width),
            "compute_cycles": Out(config.counter_width),
            "expert_bytes": Out(config.counter_width),
            "gate_bytes": Out(config.counter_width),
            "active_experts": Out(range(config.model.experts + 1)),
            "overflow": Out(1),
        })

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        """The :class:`~m3vit_hw.moe.expert_layout.MoELayout` the layer expects in external memory."""
        return self._layout

    @property
    def row_words(self):
        """Words per ``h`` row and per ``x`` row."""
        return self._config.row_words

    @property
    def hidden_base(self):
        return self.controller.hidden_base

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        C = cfg.pe_cols
        eng, seq = self.engine, self.sequencer
        cl = seq.client
        for name in ("engine", "sequencer"):
            m.submodules[name] = getattr(self, name)

        # ---- external memory: two streamers and the client's table fetch behind the arbiter ------
        self.weight_path.add_to(m, self.mem)
        wiring.connect(m, seq.mem, self.weight_path.readers[0])

        # ---- the client on the engine, the streamers and the buffers' tile handshakes ------------
        # The streamer commands go through a skid buffer each, as in the encoder's shared datapath
        # (encoder.datapath): without it the controller's fetch decision ran through the streamer's
        # command accept into its plan registers in one cycle. The streamers take a command only
        # long after the previous one, so the cycle it adds is hidden behind the tile in flight.
        m.submodules.wcmd_skid = wsk = SkidBuffer(self.wstream.cmd.payload.shape())
        m.submodules.pcmd_skid = psk = SkidBuffer(self.pstream.cmd.payload.shape())
        wiring.connect(m, wsk.o, self.wstream.cmd)
        wiring.connect(m, psk.o, self.pstream.cmd)
        connect_client(m, cl, eng, self.wstream, self.pstream, self.wbuf, self.pbuf, wcmd=wsk.i, pcmd=psk.i)
        wiring.connect(m, eng.o, seq.o)

        # ---- buffers' read data: B from the weight buffer, column parameters from the parameter
        # buffer, whose read port the client's router owns during the gate phase (the RAW gate GEMM
        # reads no column parameters; the router reads the gate chunk's task-bias words).
        wr, pr = self.wbuf.read, self.pbuf.read
        m.d.comb += [wr.addr.eq(eng.b_rd.addr), wr.en.eq(eng.b_rd.en), eng.b_rd.data.eq(wr.data)]
        own = seq.param.own
        m.d.comb += [
            pr.addr.eq(Mux(own, seq.param.rd.addr, eng.colp_rd.addr)),
            pr.en.eq(Mux(own, seq.param.rd.en, eng.colp_rd.en)),
            seq.param.rd.data.eq(pr.data),
        ]
        lane = PARAM_LANE_BYTES * 8
        for c in range(C):
            m.d.comb += [
                eng.colp_rd.data[c].bias.eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS]),
                eng.colp_rd.data[c].mult.eq(pr.data[c * lane + 32:c * lane + 32 + numerics.MULT_BITS]),
            ]

        # ---- the row table: the client writes it, the engine reads it ----------------------------
        m.submodules.rowtab = rt = self.row_table
        wiring.connect(m, seq.rt_wr, rt.write_port())
        wiring.connect(m, eng.rowtab_rd, rt.read_port())

        # ---- start / done / counters -------------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        busy = seq.busy
        m.d.comb += [self.done.eq(seq.done), self.busy.eq(busy)]
        for name in ("cycles", "compute_cycles", "expert_bytes", "gate_bytes", "active_experts",
                     "overflow"):
            m.d.comb += getattr(self, name).eq(getattr(seq, name))

        # ---- on-chip activation and residual buffers ---------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, eng.a_rd, act.read_port())
        wiring.connect(m, eng.res_rd, res.read_port())
        ld = self.load
        # One write port per buffer: the engine's while a layer runs, the host's load while idle.
        ld_go = connect_host_writes(m, act.write_port(granularity=1), res.write_port(granularity=1),
                                    eng.act_wr, eng.res_wr, ld, busy=busy, h=LoadTarget.H, x=LoadTarget.X,
                                    act_bits=numerics.ACT_BITS)
        # The GELU table: the host's ``load`` while idle, the client's fetch while a layer runs.
        with m.If(~busy):
            m.d.comb += [
                eng.gelu_lut.addr.eq(ld.p.addr[:numerics.ACT_BITS]),
                eng.gelu_lut.data.eq(ld.p.data[0][:numerics.ACT_BITS]),
                eng.gelu_lut.en.eq(ld_go & (ld.p.target == LoadTarget.GELU)),
            ]

        # Read-back: one registered read stage (the read data holds while the port is disabled).
        connect_read_back(m, res.read_port(), self.rd_addr, self.rd_data, idle=~busy)
        return m
