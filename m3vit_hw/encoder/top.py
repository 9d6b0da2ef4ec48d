"""``EncoderTop``: the whole encoder behind one external-memory read port and one write port.

::

      start {task, program_base, param_base, output_base}
        |
    ProgramSequencer --insn--> LOAD_IMAGE  EmbedSequencer + PatchLoader
        |  (fetch)             LAYERNORM   NormStage
        |                      GEMM        GemmExecutor
        |                      ATTENTION   the attention client (when the top has one)
        |                      MOE         the MoE client (when the top has one)
        |                      STORE       StoreDma ---------------------------> wr
        v
    SharedDatapath (engine, act + e8 banks, residual, row table, weight/param ping-pong, streamers,
                    read arbiter) ------------------------------------------> mem

The sequencer hands each instruction to its opcode's unit, turning the instruction's fields into the
unit's start payload (``*_addr`` fields plus ``param_base``; ``LOAD_IMAGE.img_addr`` plus
``image_base``; ``STORE.dst_addr`` plus ``output_base``; the task register for ``MOE``). The payload
and its valid go through a command register per unit (one cycle per instruction; the register counts
as the unit's busy), so no unit's start logic sees the sequencer's decode. The unit of
the last dispatched instruction owns the shared datapath: its GEMM-client port, the engine's result stream and the buffers' side ports are multiplexed onto the
datapath by :func:`~m3vit_hw.encoder.mux.mux_interfaces` under one-hot owner registers loaded at
dispatch (the sequencer changes owner only while every unit is idle). Every external reader is a master of the datapath's read arbiter.

Model shape: LOAD_IMAGE (image size, patch grid, D) and LAYERNORM (D) are elaborated for
``config.model``; ATTENTION takes its heads from the instruction's ``dims`` (0: the elaborated
model's); MOE takes its experts, top-k and
expert hidden (each at most the elaborated model's) from the instruction (``top_k``, ``plan_fetch``,
``plan_addr``, ``expert_stride``); GEMM instructions carry their whole shape, so dense blocks (hidden
width, token tiling) change at run time; the depth, the block order, the task and every parameter
address are run time (the program).

Counters (reset by start, valid after ``done``): ``cycles``; ``op_cycles[op]`` (cycles the unit of
opcode class ``op`` is busy); ``pe_cycles[op]`` (PE-array busy cycles while that class owns the
datapath); ``insn_count``; and the phases inside the ``ATTENTION`` and ``MOE`` classes,
``phase_cycles[p]`` / ``phase_pe_cycles[p]`` for :class:`CounterPhase` ``p`` (cycles and PE-array busy
cycles, summed over the frame's sub-layers):

* ``ATTN_CORE``: the attention matmuls, ``AttnSequencer.attn_cycles`` / ``attn_compute_cycles`` of each
  sub-layer (the oldest unfinished engine command is a QK^T or an AV, or the engine is empty while a
  head's QK^T/AV sequence waits for the score path). The rest of ``op_cycles[ATTENTION]`` is the QKV
  and projection GEMMs.
* ``SOFTMAX``: a query tile in the score path (``softmax_cycles``; PE: ``overlap_cycles``, the PE array
  computing meanwhile). It overlaps ``ATTN_CORE``: it says how much softmax work there was, not how
  much of it was exposed.
* ``MOE_ROUTER``: a ``MOE`` instruction from its dispatch (its command register) until its first expert GEMM (any command
  whose epilogue mode is not ``RAW``) is accepted: the gate GEMMs, the router softmax, top-k, the
  expert queues and the first expert tile's weight fetch. The rest of ``op_cycles[MOE]`` is the
  experts.

The attention phases are added when a sub-layer's unit finishes (its own counters are final the cycle
after its ``done``), the router phase cycle by cycle.
"""

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from ..attention.attn_layout import buffer_map, plan_attention
from ..attention.attn_sequencer import AttnSequencer
from ..config import AcceleratorConfig
from ..control.isa import Opcode
from ..dense.embed_layout import embed_buffer_map, plan_embed
from ..dense.norm_stage import NormStage
from ..dense.patch_embed import EmbedSequencer
from ..dense.patch_loader import PatchLoader
from ..gemm.epilogue import EpilogueMode, StreamOutLayout
from ..lib.mem_port import ReadPortSignature, WritePortSignature
from ..moe.moe_sequencer import MoESequencer
from .datapath import SharedDatapath
from .gemm_exec import GemmExecutor
from .mux import mux_interfaces
from .sequencer import OP_CLASSES, ProgramSequencer, SeqError, SeqStartLayout
from .store import StoreDma

__all__ = ["EncoderTop", "CounterPhase", "COUNTER_PHASES"]


class CounterPhase(enum.Enum):
    """The phase counters' indices (``EncoderTop.phase_cycles``; see the module docstring)."""
    ATTN_CORE = 0
    SOFTMAX = 1
    MOE_ROUTER = 2


#: Number of phase counters.
COUNTER_PHASES = len(CounterPhase)


def _connect_client(m, cl, port):
    """``wiring.connect`` of a client port, except ``gelu_lut`` (declared ``Out(WritePort.Signature)``,
    so its leaves flow ``In`` although the client drives them: copied by hand, as ``connect_client``
    does)."""
    sig = cl.signature
    for path, member, val in sig.flatten(cl):
        other = port
        for p in path:
            other = getattr(other, p) if isinstance(p, str) else other[p]
        if path[0] == "gelu_lut" or member.flow == Out:
            m.d.comb += other.eq(val)
        else:
            m.d.comb += val.eq(other)


class _NullSink(wiring.Component):
    """Takes the engine's result stream when no RAW consumer owns the datapath."""

    def __init__(self, config):
        super().__init__({"o": In(stream.Signature(StreamOutLayout(config.pe_cols, config.dst_addr_bits)))})

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.o.ready.eq(1)
        return m


class EncoderTop(wiring.Component):
    """The encoder: sequencer, units and the shared datapath (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig

    Interface attributes
    --------------------
    start : In(stream.Signature(SeqStartLayout(mem_addr_width)))
        ``task``, ``program_base`` (beat-aligned), ``param_base`` (the image, beat-aligned),
        ``output_base`` (beat-aligned), ``image_base`` (LOAD_IMAGE's ``img_addr`` is relative to it:
        ``param_base`` when the frame is in the image's ``input`` section); accepted while not busy.
    mem : Out(ReadPortSignature(mem_addr_width, mem_data_bytes, mem_max_burst))
    wr : Out(WritePortSignature(...))
    done : Out(1)
        High from the end of the program until the next start.
    busy : Out(1)
    error : Out(SeqError)
    cycles, insn_count : Out(counter_width)
    op_cycles, pe_cycles : Out(ArrayLayout(counter_width, 8)), indexed by opcode value.
    phase_cycles, phase_pe_cycles : Out(ArrayLayout(counter_width, COUNTER_PHASES)), indexed by :class:`CounterPhase`.
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        aw, db = config.mem_addr_width, config.mem_data_bytes
        port = dict(addr_width=aw, data_bytes=db, max_burst=config.mem_max_burst)
        self.embed = EmbedSequencer(config, plan_embed(config), embed_buffer_map(config))
        self.loader = PatchLoader(config)
        self.norm = NormStage(config)
        self.gemm = GemmExecutor(config)
        self.store = StoreDma(config)
        self.attention = AttnSequencer(config, plan_attention(config), buffer_map(config))
        self.moe = MoESequencer(config) if config.model.moe_blocks else None
        units = [Opcode.LOAD_IMAGE, Opcode.LAYERNORM, Opcode.GEMM, Opcode.ATTENTION, Opcode.STORE]
        if self.moe is not None:
            units.append(Opcode.MOE)
        self.sequencer = ProgramSequencer(config, units=units)
        # Read masters 2..: sequencer, LayerNorm records, patch loader, residual init, GELU tables,
        # the MoE client's router records and GELU table.
        self._readers = [self.sequencer.mem, self.norm.mem, self.loader.mem, self.embed.init_mem,
                         self.gemm.lut_mem] + ([self.moe.mem] if self.moe is not None else [])
        self.datapath = SharedDatapath(config, masters=len(self._readers))
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(SeqStartLayout(aw))),
            "mem": Out(ReadPortSignature(**port)),
            "wr": Out(WritePortSignature(**port)),
            "done": Out(1),
            "busy": Out(1),
            "error": Out(SeqError),
            "cycles": Out(cw),
            "insn_count": Out(cw),
            "op_cycles": Out(data.ArrayLayout(cw, OP_CLASSES)),
            "pe_cycles": Out(data.ArrayLayout(cw, OP_CLASSES)),
            "phase_cycles": Out(data.ArrayLayout(cw, COUNTER_PHASES)),
            "phase_pe_cycles": Out(data.ArrayLayout(cw, COUNTER_PHASES)),
        })

    @property
    def config(self):
        return self._config

    @property
    def isa(self):
        return self.sequencer.isa

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        isa = self.isa
        seq, dp, emb, ld, nrm, gx, st = (self.sequencer, self.datapath, self.embed, self.loader, self.norm,
                                         self.gemm, self.store)
        at, mo = self.attention, self.moe
        for name in ("sequencer", "datapath", "embed", "loader", "norm", "gemm", "store", "attention"):
            m.submodules[name] = getattr(self, name)
        if mo is not None:
            m.submodules.moe = mo
        m.submodules.null_sink = null = _NullSink(cfg)

        # ---- external memory -------------------------------------------------------------------------
        for i, rd in enumerate(self._readers):
            wiring.connect(m, rd, dp.masters[i])
        wiring.connect(m, dp.mem, wiring.flipped(self.mem))
        wiring.connect(m, st.wr, wiring.flipped(self.wr))

        # ---- start, status, counters -----------------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        m.d.comb += [self.done.eq(seq.done), self.busy.eq(seq.busy), self.error.eq(seq.error),
                     self.cycles.eq(seq.cycles), self.insn_count.eq(seq.insn_count),
                     self.op_cycles.eq(seq.op_cycles)]
        busy = {Opcode.LOAD_IMAGE: emb.busy | ld.busy, Opcode.LAYERNORM: nrm.busy, Opcode.GEMM: gx.busy,
                Opcode.ATTENTION: at.busy, Opcode.STORE: st.busy}
        if mo is not None:
            busy[Opcode.MOE] = mo.busy
        cmd_valid = {}      # op -> the unit's command register valid (the dispatch section)

        # ---- dispatch --------------------------------------------------------------------------------
        regs = seq.regs
        ins = seq.insn
        pb = regs.param_base
        active = Signal(Opcode)                 # the class that owns the datapath
        dispatch = ins.valid & ins.ready
        with m.If(dispatch):
            m.d.sync += active.eq(ins.payload.op)

        def owner_select(name, owners, other=False, reset_less=False, extra=()):
            """One-hot select registers for one multiplexer: bit ``i`` is high while ``owners[i]`` is
            the class of the last dispatched instruction (with ``other``, one more bit for any class
            not in ``owners``). Loaded at dispatch: the owner is known then, a cycle before its unit
            drives anything, so each multiplexer gate is a flip-flop of its own client, not a decode
            of ``active``. yosys merges flip-flops of the same function into one (all the selects
            of one class are one net); ``reset_less`` ones are a different cell, so they stay apart.
            With ``extra`` (one bit only), the bit is high for those classes too."""
            bits = [Signal(name=f"{name}_{op.name.lower()}", reset_less=reset_less) for op in owners]
            with m.If(dispatch):
                m.d.sync += [b.eq(ins.payload.op.as_value().matches(op, *extra))
                             for b, op in zip(bits, owners)]
            if other:
                b = Signal(name=f"{name}_other", init=1)
                with m.If(dispatch):
                    m.d.sync += b.eq(~ins.payload.op.as_value().matches(*owners))
                bits.append(b)
            return bits
        m.d.comb += gx.lut_flush.eq(ins.valid & ins.ready & (ins.payload.op != Opcode.GEMM))

        def view(op):
            return data.View(isa.layout(op), ins.payload.bits)

        li, ln, gm, so = view(Opcode.LOAD_IMAGE), view(Opcode.LAYERNORM), view(Opcode.GEMM), view(Opcode.STORE)
        ai, mi = view(Opcode.ATTENTION), view(Opcode.MOE)
        # Each unit's start payload, field by field, from the instruction (field plus base register).
        starts = {
            Opcode.LOAD_IMAGE: (emb.start, dict(
                base=pb + li.param_addr, img_base=regs.image_base + li.img_addr, shift=li.shift)),
            Opcode.LAYERNORM: (nrm.start, dict(
                tokens=ln.tokens, param_base=pb + ln.param_addr, src_base=ln.res_base,
                dst_base=ln.act_base, dst_stride=cfg.row_words)),
            Opcode.GEMM: (gx.start, dict(
                m=gm.m, k=gm.k, n=gm.n, a_base=gm.a_base, a_stride=gm.a_stride,
                dst_base=gm.dst_base, dst_stride=gm.dst_stride,
                w_addr=pb + gm.w_addr, p_addr=pb + gm.p_addr, lut_addr=pb + gm.lut_addr,
                shift=gm.shift, mode=gm.mode, gather=gm.gather, scatter=gm.scatter, sync=gm.wait,
                a_unsigned=gm.a_unsigned)),
            # dims: the run-time shape (0: the elaborated model's).
            Opcode.ATTENTION: (at.start, dict(
                tokens=ai.tokens, base=pb + ai.param_addr, c_mult=ai.c_mult, c_shift=ai.c_shift,
                out_mult=ai.out_mult, out_shift=ai.out_shift, qkv_shift=ai.qkv_shift,
                proj_shift=ai.proj_shift, dims=ai.dims)),
            Opcode.STORE: (st.start, dict(
                res_base=so.res_base, words=so.words, addr=regs.output_base + so.dst_addr)),
        }
        if mo is not None:
            # The router record and the GELU table come from memory (router_fetch, lut_fetch);
            # top_k / plan / expert stride from the instruction (0: the elaborated shape).
            starts[Opcode.MOE] = (mo.start, dict(
                task=regs.task, tokens=mi.tokens, gate_base=pb + mi.gate_addr,
                expert_base=pb + mi.expert_addr, fc1_shift=mi.fc1_shift, fc2_shift=mi.fc2_shift,
                router_fetch=1, router_addr=pb + mi.router_addr, lut_fetch=1, lut_addr=pb + mi.lut_addr,
                top_k=mi.top_k, plan_fetch=mi.plan_fetch, plan_addr=pb + mi.plan_addr,
                expert_stride=mi.expert_stride))
        # Registered dispatch: one command register per unit (valid and the unit's start payload).
        # While empty it loads the payload from the instruction every cycle (the adders above sit
        # between the instruction register and it), and the sequencer's instruction is taken only
        # into an empty register. So no unit's start logic sees the sequencer's
        # decode, and no unit's ``start.ready`` reaches the sequencer. One cycle per instruction; the
        # register counts as its unit's busy, so the sequencer's wait and owner rules cover it.
        for op, (ust, fields) in starts.items():
            v = Signal(name=f"{op.name.lower()}_cmd_valid")
            p = Signal(ust.payload.shape(), name=f"{op.name.lower()}_cmd", reset_less=True)
            with m.If(~v):
                m.d.sync += [getattr(p, k).eq(val) for k, val in fields.items()]
            with m.If(v & ust.ready):
                m.d.sync += v.eq(0)
            with m.Elif(dispatch & (ins.payload.op == op)):
                m.d.sync += v.eq(1)
            m.d.comb += [ust.valid.eq(v), ust.payload.eq(p)]
            cmd_valid[op] = v
        # ``ready`` while every command register is empty: the same as "this opcode's register is
        # empty", since the owner rule lets an instruction of another class out only while every unit
        # (its command register included) is idle. It is a register of its own, set from the next
        # state of the command registers (a dispatch fills one; a register empties when its unit
        # takes the command), so the sequencer's dispatch decode starts at one flip-flop, not at an
        # OR over the command registers.
        all_empty = Signal(init=1)
        m.d.sync += all_empty.eq(~dispatch & Cat(*[~v | starts[op][0].ready
                                                   for op, v in cmd_valid.items()]).all())
        m.d.comb += ins.ready.eq(all_empty)

        for op, b in busy.items():
            m.d.comb += seq.unit_busy[op.value].eq(b | cmd_valid[op])

        # ---- the datapath's owner ----------------------------------------------------------------------
        # GEMM clients: index by opcode class.
        clients = [(Opcode.LOAD_IMAGE, emb.client), (Opcode.GEMM, gx.client), (Opcode.ATTENTION, at.client)]
        if mo is not None:
            clients.append((Opcode.MOE, mo.client))
        csel = owner_select("csel", [op for op, _ in clients])
        # The payload AND-OR (the engine and streamer commands, some 340 bits) takes reset-less copies
        # of the select: the client's handshake gates (ready, tile_valid, busy, done into its control
        # logic; its valid into the datapath's skid buffers) then hang on a flip-flop with a fanout of
        # a few dozen, not of every payload bit.
        csel_wide = owner_select("csel_wide", [op for op, _ in clients], reset_less=True)
        cl = mux_interfaces(m, csel, [c for _, c in clients], name="client", driven=("gelu_lut",),
                            wide_owns=csel_wide)
        _connect_client(m, cl, dp.client)
        # The engine's result stream (RAW scores, gate logits): attention or the MoE router, else the
        # null sink.
        consumers = [(Opcode.ATTENTION, at.o)] + ([(Opcode.MOE, mo.o)] if mo is not None else [])
        osel = owner_select("osel", [op for op, _ in consumers], other=True)
        o = mux_interfaces(m, osel, [c for _, c in consumers] + [null.o], name="o")
        wiring.connect(m, dp.o, o)
        # The one row table: attention's score path or the MoE reorder controller writes it.
        writers = [(Opcode.ATTENTION, at.rt_wr)] + ([(Opcode.MOE, mo.rt_wr)] if mo is not None else [])
        wsel = owner_select("wsel", [op for op, _ in writers])
        rt = mux_interfaces(m, wsel, [w for _, w in writers], name="rt_w")
        wiring.connect(m, rt, dp.rt_wr)
        wiring.connect(m, at.e8_wr, dp.e8_wr)
        (is_at,), (is_mo,) = owner_select("is_attention", [Opcode.ATTENTION]), \
            owner_select("is_moe", [Opcode.MOE])
        m.d.comb += dp.e8_mode.eq(is_at)
        # The parameter buffer's read port for the MoE router's gate phase.
        if mo is not None:
            m.d.comb += [dp.param_rd_own.eq(is_mo & mo.param.own),
                         dp.param_rd.addr.eq(mo.param.rd.addr), dp.param_rd.en.eq(mo.param.rd.en),
                         mo.param.rd.data.eq(dp.param_rd.data)]
        else:
            m.d.comb += [dp.param_rd_own.eq(0), dp.param_rd.en.eq(0)]

        # Activation side writes: LayerNorm or the patch loader.
        aw_sel = owner_select("aw_sel", [Opcode.LAYERNORM, Opcode.LOAD_IMAGE])
        rr_sel = owner_select("rr_sel", [Opcode.LAYERNORM, Opcode.STORE])
        is_li = aw_sel[1]
        # Wide members (write data and lane enables, addresses) on reset-less copies, as for the
        # client multiplexer: the gate flip-flops are also the embedding client's and LayerNorm's.
        aw_wide = owner_select("aw_wide", [Opcode.LAYERNORM, Opcode.LOAD_IMAGE], reset_less=True)
        rr_wide = owner_select("rr_wide", [Opcode.LAYERNORM, Opcode.STORE], reset_less=True)
        act_w = mux_interfaces(m, aw_sel, [nrm.act_wr, ld.act_wr], name="act_w", wide_owns=aw_wide)
        wiring.connect(m, act_w, dp.act_wr)
        # The datapath's side-port selects are flip-flops of their own (each selects ~150 bits there),
        # not ORs of two owner bits.
        (act_own,) = owner_select("act_own", [Opcode.LAYERNORM], extra=[Opcode.LOAD_IMAGE])
        (res_own,) = owner_select("res_own", [Opcode.LAYERNORM], extra=[Opcode.STORE])
        m.d.comb += dp.act_wr_own.eq(act_own)
        # Residual side reads: LayerNorm or the store DMA.
        res_r = mux_interfaces(m, rr_sel, [nrm.res_rd, st.res_rd], name="res_r", wide_owns=rr_wide)
        wiring.connect(m, res_r, dp.res_rd)
        m.d.comb += dp.res_rd_own.eq(res_own)
        # Residual side writes: the embedding's initialisation (cls + pos rows).
        wiring.connect(m, emb.res_init_wr, dp.res_wr)
        m.d.comb += dp.res_wr_own.eq(is_li & ~emb.init_done)
        # The loader takes the embedding's commands.
        wiring.connect(m, emb.loader, ld.cmd)
        m.d.comb += emb.loader_done.eq(ld.done)
        m.d.comb += [dp.act_rd_own.eq(0), dp.act_rd.en.eq(0)]

        # ---- PE-busy counters per class ------------------------------------------------------------------
        pe = dp.engine.pe_active
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [self.pe_cycles[i].eq(0) for i in range(OP_CLASSES)]
        with m.Elif(seq.busy & pe):
            with m.Switch(active):
                for op in Opcode:
                    with m.Case(op):
                        m.d.sync += self.pe_cycles[op.value].eq(self.pe_cycles[op.value] + 1)
        m.d.comb += gx.clear.eq(self.start.valid & self.start.ready)

        # ---- phase counters ------------------------------------------------------------------------------
        # Attention: the sub-layer's own counters, added the cycle after its done (when they are final).
        at_done = Signal()
        m.d.sync += at_done.eq(at.done)
        adds = [(CounterPhase.ATTN_CORE, at.attn_cycles, at.attn_compute_cycles),
                (CounterPhase.SOFTMAX, at.softmax_cycles, at.overlap_cycles)]
        # MoE router: from dispatch (the MoE command register) until the first expert (non-RAW)
        # command is accepted. Taken from registers and the MoE client's own port, not from the
        # sequencer's decode or the client multiplexer's output.
        router = Signal()
        if mo is not None:
            mg = mo.client.gemm
            with m.If(cmd_valid[Opcode.MOE]):
                m.d.sync += router.eq(1)
            with m.Elif(mg.valid & mg.ready & (mg.payload.mode != EpilogueMode.RAW)):
                m.d.sync += router.eq(0)
        in_router = router & is_mo
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [c[p.value].eq(0) for p in CounterPhase for c in (self.phase_cycles, self.phase_pe_cycles)]
        with m.Elif(seq.busy):
            with m.If(at_done):
                for p, cyc, pec in adds:
                    m.d.sync += [self.phase_cycles[p.value].eq(self.phase_cycles[p.value] + cyc),
                                 self.phase_pe_cycles[p.value].eq(self.phase_pe_cycles[p.value] + pec)]
            p = CounterPhase.MOE_ROUTER.value
            with m.If(in_router):
                m.d.sync += [self.phase_cycles[p].eq(self.phase_cycles[p] + 1),
                             self.phase_pe_cycles[p].eq(self.phase_pe_cycles[p] + pe)]
        return m
