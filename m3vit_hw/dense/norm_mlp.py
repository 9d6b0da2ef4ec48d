"""``NormMlp``: ``x <- x + fc2(GELU(fc1(LN2(x))))``, a LayerNorm stage and a dense MLP sharing one engine
and one set of buffers.

This is the composition the encoder top performs for every sub-layer, on a small scale: the top owns
the GEMM engine, the activation and residual buffers, the ping-pong weight and parameter buffers, their
streamers and the external-memory arbiter; the units own none of them and take turns on the ports:

======================  ==================================  ==========================================
port                    LayerNorm phase                     MLP phase
======================  ==================================  ==========================================
residual read           :class:`NormStage` (``x`` rows)     engine ``res_rd`` (RESADD)
activation write        :class:`NormStage` (``h`` rows)     engine ``act_wr`` (GELU8 hidden rows)
residual write          --                                  engine ``res_wr``
external memory         NormStage records (master 2)        GELU table (3), streamers (0, 1)
======================  ==================================  ==========================================

The MLP's :class:`~m3vit_hw.dense.dense_layer.DenseSequencer` starts when the LayerNorm is done (its
first GEMM reads ``h``); both read their parameters from external memory. Bit-exact with
``golden_model.dense_mlp(x, layernorm(x, ln2), mlp)``.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.host_access import connect_read_back
from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.gemm_engine import GemmEngine
from ..lib.mem_port import ReadPortSignature
from ..weights.client import connect_client, connect_weight_reads
from .dense_layer import DenseLoadLayout, DenseLoadTarget, DenseSequencer
from .dense_layout import dense_buffer_map, plan_dense
from .norm_stage import NormStage
from ..weights.weight_path import WeightPath

__all__ = ["NormMlp", "NormMlpStartLayout"]


class NormMlpStartLayout(data.StructLayout):
    """``tokens``; ``base`` (the :func:`~m3vit_hw.dense.dense_layout.pack_dense` image), ``ln_base``
    (the :func:`~m3vit_hw.dense.norm_stage.pack_norm_params` records); the fc1 and fc2 shifts."""

    def __init__(self, config, addr_width):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "base": unsigned(addr_width),
            "ln_base": unsigned(addr_width),
            "fc1_shift": range(numerics.SHIFT_MAX + 1),
            "fc2_shift": range(numerics.SHIFT_MAX + 1),
        })


class NormMlp(wiring.Component):
    """LayerNorm + dense MLP on one engine and one set of buffers (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig
        Also the external-memory port, arbiter depth, tile tag width and counter width.
    hidden, token_tile : int or None
        As :class:`~m3vit_hw.dense.dense_layer.DenseLayer`.

    Interface attributes
    --------------------
    start : In(stream.Signature(NormMlpStartLayout(config, config.mem_addr_width)))
    done, busy : Out(1)
    mem : Out(ReadPortSignature(...))
    load : In(stream.Signature(DenseLoadLayout(config)))
        ``X`` (residual words) while idle (``H`` is ignored: the LayerNorm makes h).
    rd_addr, rd_data
        Residual read-back while idle.
    norm_cycles, mlp_cycles : Out(counter_width)
        Cycles of each phase.
    """

    def __init__(self, config, *, hidden=None, token_tile=None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # As DenseLayer: only ``hidden``, ``token_tile`` or the image size can be refused here, before
        # any sub-unit is built (the config covers the default MLP and the LayerNorm records).
        self._layout = plan_dense(config, hidden=hidden)
        self._bmap = dense_buffer_map(config, hidden=self._layout.hidden, token_tile=token_tile)
        if self._layout.image_bytes >= 1 << config.mem_addr_width:
            raise ValueError(f"mem_addr_width={config.mem_addr_width} cannot address the "
                             f"{self._layout.image_bytes}-byte dense MLP image")
        self._config = config
        lay, bm = self._layout, self._bmap
        C = config.pe_cols
        db = config.mem_data_bytes
        mport = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self.norm = NormStage(config)
        self.engine = GemmEngine(config)
        self.weights = WeightPath(config, weight_half_bytes=lay.weight_half_bytes,
                                  param_half_bytes=lay.param_half_bytes, param_word_bytes=lay.param_word_bytes,
                                  readers=2)
        for name in ("arbiter", "wbuf", "pbuf", "wstream", "pstream"):
            setattr(self, name, getattr(self.weights, name))
        self.mlp = DenseSequencer(config, lay, bm)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        self.act_buffer = memory.Memory(shape=word8, depth=config.act_buffer_words, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        super().__init__({
            "start": In(stream.Signature(NormMlpStartLayout(config, config.mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(**mport)),
            "load": In(stream.Signature(DenseLoadLayout(config))),
            "rd_addr": In(stream.Signature(unsigned(config.res_addr_bits))),
            "rd_data": Out(stream.Signature(word16)),
            "norm_cycles": Out(config.counter_width),
            "mlp_cycles": Out(config.counter_width),
        })

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        return self._layout

    @property
    def buffer_map(self):
        return self._bmap

    def elaborate(self, platform):
        m = Module()
        cfg, bm = self._config, self._bmap
        C = cfg.pe_cols
        eng, nrm, mlp = self.engine, self.norm, self.mlp
        for name in ("engine", "norm", "mlp"):
            m.submodules[name] = getattr(self, name)
        self.weights.add_to(m, self.mem)
        wiring.connect(m, nrm.mem, self.weights.readers[0])
        wiring.connect(m, mlp.lut_mem, self.weights.readers[1])
        m.submodules.act = act = self.act_buffer
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, eng.a_rd, act.read_port())
        connect_weight_reads(m, eng, self.wbuf, self.pbuf, C)
        connect_client(m, mlp.client, eng, self.wstream, self.pstream, self.wbuf, self.pbuf)
        m.d.comb += eng.o.ready.eq(1)

        # ---- phases ------------------------------------------------------------------------------
        prm = Signal(NormMlpStartLayout(cfg, len(self.mem.req.payload.addr)))
        with m.FSM(name="phase") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.start.ready.eq(1)
                with m.If(self.start.valid):
                    m.d.sync += prm.eq(self.start.payload)
                    m.next = "NORM_START"
            with m.State("NORM_START"):
                m.d.comb += [
                    nrm.start.valid.eq(1), nrm.start.payload.tokens.eq(prm.tokens),
                    nrm.start.payload.param_base.eq(prm.ln_base), nrm.start.payload.src_base.eq(0),
                    nrm.start.payload.dst_base.eq(0), nrm.start.payload.dst_stride.eq(bm.row_words),
                ]
                with m.If(nrm.start.ready):
                    m.next = "NORM"
            with m.State("NORM"):
                with m.If(nrm.done):
                    m.next = "MLP_START"
            with m.State("MLP_START"):
                m.d.comb += [
                    mlp.start.valid.eq(1), mlp.start.payload.tokens.eq(prm.tokens),
                    mlp.start.payload.base.eq(prm.base), mlp.start.payload.fc1_shift.eq(prm.fc1_shift),
                    mlp.start.payload.fc2_shift.eq(prm.fc2_shift),
                ]
                with m.If(mlp.start.ready):
                    m.next = "MLP"
            with m.State("MLP"):
                with m.If(mlp.done):
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
        running = ~fsm.ongoing("IDLE")
        in_norm = fsm.ongoing("NORM_START") | fsm.ongoing("NORM")
        m.d.comb += self.busy.eq(running)

        # ---- shared ports ------------------------------------------------------------------------
        res_r = res.read_port()
        m.d.comb += [
            res_r.addr.eq(Mux(in_norm, nrm.res_rd.addr, eng.res_rd.addr)),
            res_r.en.eq(Mux(in_norm, nrm.res_rd.en, eng.res_rd.en)),
            nrm.res_rd.data.eq(res_r.data), eng.res_rd.data.eq(res_r.data),
        ]
        act_w = act.write_port(granularity=1)
        res_w = res.write_port(granularity=1)
        ld = self.load
        m.d.comb += ld.ready.eq(~running)
        ld_go = ld.valid & ld.ready
        with m.If(in_norm):
            m.d.comb += [act_w.addr.eq(nrm.act_wr.addr), act_w.data.eq(nrm.act_wr.data),
                         act_w.en.eq(nrm.act_wr.en)]
        with m.Else():
            m.d.comb += [act_w.addr.eq(eng.act_wr.addr), act_w.data.eq(eng.act_wr.data),
                         act_w.en.eq(eng.act_wr.en)]
        with m.If(running):
            m.d.comb += [res_w.addr.eq(eng.res_wr.addr), res_w.data.eq(eng.res_wr.data),
                         res_w.en.eq(eng.res_wr.en)]
        with m.Else():
            m.d.comb += [res_w.addr.eq(ld.payload.addr), res_w.data.eq(ld.payload.data),
                         res_w.en.eq(Mux(ld_go & (ld.payload.target == DenseLoadTarget.X), (1 << C) - 1, 0))]
        connect_read_back(m, res.read_port(), self.rd_addr, self.rd_data, idle=~running)

        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [self.norm_cycles.eq(0), self.mlp_cycles.eq(0)]
        with m.Elif(in_norm):
            m.d.sync += self.norm_cycles.eq(self.norm_cycles + 1)
        with m.Elif(running):
            m.d.sync += self.mlp_cycles.eq(self.mlp_cycles + 1)
        return m
