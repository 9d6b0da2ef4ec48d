"""``MoESequencer``: the MoE layer's control as a client of the shared datapath.

The sequencer holds everything of one MoE layer that is not datapath: the
:class:`~m3vit_hw.moe.router.Router` (task bias, softmax, top-k), the
:class:`~m3vit_hw.moe.expert_queues.ExpertQueues`, the
:class:`~m3vit_hw.moe.reorder_controller.ReorderController` (with its private active-expert list), a
small fetcher for the task's router record and the experts' GELU table, and the counters. It owns no
GEMM engine, no activation, residual, weight or parameter buffer and no row table: it drives them
through

* ``client`` (:class:`~m3vit_hw.weights.client.GemmClientSignature`): engine commands, the two streamers'
  commands, the tile handshake of both ping-pong buffers (the controller always releases both halves
  together) and the engine's GELU table;
* ``param`` (:class:`MoEParamSignature`): the router's reads of the gate chunk's task-bias words from the
  parameter buffer's current half, while ``param.own`` is high (the gate phase: the RAW gate GEMM reads
  no column parameters, so the datapath hands the parameter buffer's read port to the router);
* ``o``: the engine's result stream (the gate chunks' RAW logits) into the router;
* ``rt_wr``: the captured expert queues into the datapath's one row table (the engine gathers and
  scatters through it);
* ``mem``: its own external-memory read port (router record, run-time plan table, GELU table), a
  third master of the datapath's read arbiter.

Run-time model shape
--------------------
One elaborated sequencer runs MoE layers of any model with the config's ``D`` and at most its
experts, top-k, expert hidden width and tasks (:func:`~m3vit_hw.moe.expert_layout.plan_moe` with
``hidden=``, ``experts=``, ``tasks=``):

* **experts**: the image's gate is padded to the config's E columns with
  :data:`~m3vit_hw.moe.expert_layout.PAD_LOGIT` (probability exactly 0, never in the top-k), so the
  gate chunks, the router and the queues are the elaborated ones; only the used experts are fetched;
* **top-k**: the start's ``top_k`` sets the queues' ``k`` (the router's list is best first, so its
  first ``k`` entries are the top-k);
* **expert hidden width and tile plan**: with ``plan_fetch`` the sequencer reads the plan table
  (:func:`~m3vit_hw.moe.expert_layout.pack_plan`) into the controller's plan memory before the first
  expert tile, and ``expert_stride`` comes from the start.

Elaboration-time: ``D`` (the row pitch of the activation and residual buffers, the gate's K and its
chunks), the maximum E, k, hidden and task count (buffer, queue, router and list sizes), ``pe_rows``
/ ``pe_cols`` and the buffer halves; the hidden region's row pitch stays ``ceil(config hidden / C)``.

:class:`~m3vit_hw.moe.moe_layer.MoELayer` is the standalone wrapper (datapath pieces + this client);
the encoder top puts the same client on its shared datapath.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..weights.client import GemmClientSignature
from ..lib.burst_requester import BurstRequester
from ..gemm.epilogue import StreamOutLayout
from ..gemm.gemm_engine import RowEntryLayout
from ..lib.mem_port import ReadPortSignature
from ..lib.skid import SkidBuffer
from .expert_layout import (LUT_BYTES, PARAM_LANE_BYTES, PLAN_ENTRY_BYTES, PLAN_FIELDS, ROUTER_RECORD_BYTES,
                            plan_moe)
from .expert_queues import ExpertQueues
from .reorder_controller import GATE_TAG, LayerStartLayout, ReorderController
from .router import Router

__all__ = ["MoESequencer", "MoEParamSignature"]


class MoEParamSignature(wiring.Signature):
    """The MoE client's use of the parameter buffer's read port (declare it ``Out`` in the client).

    Members
    -------
    own : Out(1)
        The gate phase: the datapath connects the parameter buffer's read port (``addr``, ``en``) to
        ``rd`` instead of the engine's ``colp_rd``. High from the layer's start until the last gate
        chunk is released, so it changes only while no engine command reads column parameters.
    rd : In(memory.ReadPort.Signature(addr_width=param_addr_bits, shape=unsigned(8 * param_word_bytes)))
        The read port itself; ``data`` is the raw parameter word (lanes of
        :data:`~m3vit_hw.moe.expert_layout.PARAM_LANE_BYTES` bytes, the bias in each lane's low 32
        bits), one cycle after ``en``, holding while ``en`` is low.

    Parameters
    ----------
    config : AcceleratorConfig
        ``param_word_bytes`` and the parameter buffer's half (:func:`~m3vit_hw.moe.expert_layout.plan_moe`).
    """

    def __init__(self, config):
        lay = plan_moe(config)
        words = lay.param_half_bytes // lay.param_word_bytes
        self._config = config
        self._addr_width = max(1, (words - 1).bit_length())
        self._bits = 8 * lay.param_word_bytes
        super().__init__({
            "own": Out(1),
            "rd": In(memory.ReadPort.Signature(addr_width=self._addr_width, shape=unsigned(self._bits))),
        })

    @property
    def addr_width(self):
        return self._addr_width

    def __eq__(self, other):
        return isinstance(other, MoEParamSignature) and self._config == other._config

    def __repr__(self):
        return f"MoEParamSignature({self._config.model.name}, addr_width={self._addr_width})"


class MoESequencer(wiring.Component):
    """The MoE layer's client: router, expert queues, reordering controller, table fetch, counters.

    Parameters
    ----------
    config : AcceleratorConfig
        Every size (see :class:`~m3vit_hw.moe.moe_layer.MoELayer`); the tile plan is
        :func:`~m3vit_hw.moe.expert_layout.plan_moe` of it.

    Interface attributes
    --------------------
    start : In(stream.Signature(LayerStartLayout(config)))
        Accepted when idle. ``router_fetch`` / ``plan_fetch`` / ``lut_fetch`` make the sequencer read
        the task's router record, the expert plan table and the GELU table through ``mem`` (see
        :class:`~m3vit_hw.moe.reorder_controller.LayerStartLayout`); the gate's router command waits
        for the record, the first expert tile fetch for the plan and the first expert GEMM for the
        table, so the fetches overlap the gate. ``top_k`` (0 = the config's) is the layer's k.
    done : Out(1)
        Pulses when the layer's last result has been written (the last GEMM's ``done``).
    busy : Out(1)
        From ``start`` until ``done``.
    client : Out(GemmClientSignature(config))
        The engine, the two streamers, the tile handshake and the GELU table (see above).
    param : Out(MoEParamSignature(config))
        The router's bias reads from the parameter buffer during the gate phase.
    o : In(stream.Signature(StreamOutLayout(pe_cols, dst_addr_bits)))
        The engine's result stream (only the gate chunks' RAW GEMMs emit on it).
    rt_wr : In(memory.WritePort.Signature(addr_width=rowtab_addr_bits, shape=RowEntryLayout(config)))
        The datapath's row table.
    mem : Out(ReadPortSignature(mem_addr_width, mem_data_bytes, mem_max_burst))
        Router record, plan table and GELU table reads (idle when nothing is fetched).
    cycles, compute_cycles, expert_bytes, gate_bytes : Out(counter_width)
        Reset by ``start``: cycles busy; cycles with ``client.pe_active``; bytes of the expert and of
        the gate pieces commanded to the streamers (every piece is fetched exactly once before
        ``done``, so after ``done`` these are the bytes that crossed the port into the buffers).
    active_experts : Out(range(E + 1))
    overflow : Out(1)
        The expert queues saw more than ``token_capacity`` tokens (sticky).
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        layout = plan_moe(config)
        self._config = config
        self._layout = layout
        db = config.mem_data_bytes
        port = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self._rec_beats = max(1, ROUTER_RECORD_BYTES // db)
        self._lut_beats = max(1, LUT_BYTES // db)
        self.controller = ReorderController(config, layout)
        self.router = Router(config)
        self.queues = ExpertQueues.from_config(config)
        #: Entries of the run-time plan table the sequencer fetches (``pack_plan(layout, config)``).
        self.plan_entries = self.controller.plan_entries
        self._plan_beats = -(-self.plan_entries * PLAN_ENTRY_BYTES // db)
        self.fetcher = BurstRequester(**port, max_beats=max(self._rec_beats, self._lut_beats,
                                                            self._plan_beats))
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(LayerStartLayout(config))),
            "done": Out(1),
            "busy": Out(1),
            "client": Out(GemmClientSignature(config)),
            "param": Out(MoEParamSignature(config)),
            "o": In(stream.Signature(StreamOutLayout(config.pe_cols, config.dst_addr_bits))),
            "rt_wr": In(memory.WritePort.Signature(addr_width=config.rowtab_addr_bits,
                                                    shape=RowEntryLayout(config))),
            "mem": Out(ReadPortSignature(**port)),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "expert_bytes": Out(cw),
            "gate_bytes": Out(cw),
            "active_experts": Out(range(config.model.experts + 1)),
            "overflow": Out(1),
        })

    @property
    def config(self):
        return self._config

    @property
    def layout(self):
        return self._layout

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        C = cfg.pe_cols
        db = cfg.mem_data_bytes
        aw = cfg.mem_addr_width
        ctl, rtr, qs = self.controller, self.router, self.queues
        m.submodules.controller = ctl
        m.submodules.router = rtr
        m.submodules.queues = qs
        m.submodules.fetcher = fr = self.fetcher
        cl = self.client

        # ---- start ----------------------------------------------------------------------------------
        wiring.connect(m, wiring.flipped(self.start), ctl.start)
        start = self.start.valid & self.start.ready
        busy = ctl.busy
        m.d.comb += [self.busy.eq(busy), self.done.eq(ctl.done)]

        # ---- fetcher: the task's router record, then the GELU table ----------------------------------
        rec_want = Signal()         # a record fetch is owed by the request side
        plan_want = Signal()
        lut_want = Signal()
        rec_ok = Signal()           # c_mult / c_shift are valid (given or fetched)
        plan_ok = Signal()          # the run-time plan is in the controller (or not used)
        lut_ok = Signal()           # the engine's GELU table is this layer's
        top_k = Signal.like(self.queues.k, init=cfg.model.top_k)
        rec_left = Signal(range(self._rec_beats + 1))    # response beats of the record still due
        rec_off = Signal(range(max(1, db // ROUTER_RECORD_BYTES)))   # the record within its beat
        c_mult = Signal(numerics.SOFTMAX_MULT_BITS)
        c_shift = Signal.like(ctl.start.p.c_shift)
        sp = self.start.p
        rec_addr = sp.router_addr + sp.task * ROUTER_RECORD_BYTES
        rec_at = Signal(aw)
        with m.If(start):
            m.d.sync += [
                rec_want.eq(sp.router_fetch), lut_want.eq(sp.lut_fetch), plan_want.eq(sp.plan_fetch),
                rec_ok.eq(~sp.router_fetch), lut_ok.eq(~sp.lut_fetch), plan_ok.eq(~sp.plan_fetch),
                top_k.eq(Mux(sp.top_k == 0, cfg.model.top_k, sp.top_k)),
                rec_left.eq(Mux(sp.router_fetch, self._rec_beats, 0)),
                rec_at.eq(rec_addr),
                c_mult.eq(sp.c_mult), c_shift.eq(sp.c_shift),
            ]
            if db > ROUTER_RECORD_BYTES:
                m.d.sync += rec_off.eq(rec_addr[(ROUTER_RECORD_BYTES.bit_length() - 1):
                                                (db.bit_length() - 1)])
        lut_at = Signal(aw)
        plan_at = Signal(aw)
        with m.If(start):
            m.d.sync += [lut_at.eq(sp.lut_addr), plan_at.eq(sp.plan_addr)]
        lb = db.bit_length() - 1
        # Requests in the order they are needed: the record (the gate's router command), the plan
        # (the first expert tile's fetch), the table (the first expert GEMM).
        m.d.comb += fr.cmd.valid.eq(rec_want | plan_want | lut_want)
        with m.If(rec_want):
            m.d.comb += [fr.cmd.p.addr.eq((rec_at >> lb) << lb), fr.cmd.p.beats.eq(self._rec_beats)]
        with m.Elif(plan_want):
            m.d.comb += [fr.cmd.p.addr.eq(plan_at), fr.cmd.p.beats.eq(self._plan_beats)]
        with m.Else():
            m.d.comb += [fr.cmd.p.addr.eq(lut_at), fr.cmd.p.beats.eq(self._lut_beats)]
        with m.If(fr.cmd.valid & fr.cmd.ready):
            with m.If(rec_want):
                m.d.sync += rec_want.eq(0)
            with m.Elif(plan_want):
                m.d.sync += plan_want.eq(0)
            with m.Else():
                m.d.sync += lut_want.eq(0)
        wiring.connect(m, fr.req, wiring.flipped(self.mem.req))

        # Responses arrive in request order: the record's beats first (beats wider than a record hold
        # it at ``rec_off``), then the table, one entry per cycle into the engine's GELU table.
        # Which part a beat belongs to, and where in it the walk is, are flip-flops kept beside their
        # counters (in_rec: rec_left != 0; plan_any: plan_left != 0; last_byte: lut_byte == db - 1;
        # lut_more: lut_idx < LUT_BYTES; beat_end's parts), so ``resp.ready`` and the plan and table
        # write enables are one LUT of flip-flops and the response's valid (the W1 top's arbiter
        # r_rdy -> plan_left / plan_ok / res_w.en and lut_byte -> arbiter paths).
        resp = self.mem.resp
        rec_word = resp.p.data.word_select(rec_off, 8 * min(db, ROUTER_RECORD_BYTES)) \
            if db > ROUTER_RECORD_BYTES else resp.p.data
        lut_idx = Signal(range(LUT_BYTES + 1))
        lut_byte = Signal(range(db))
        in_rec = Signal()
        last_byte = Signal(init=db == 1)
        lut_more = Signal()

        # The plan table: entries of PLAN_ENTRY_BYTES; a beat holds several (wide beats) or an entry
        # takes several beats (narrow beats, assembled in ``acc``).
        E_BITS = 8 * PLAN_ENTRY_BYTES
        n_plan = self.plan_entries
        plan_left = Signal(range(n_plan + 1))        # entries still to write
        plan_idx = Signal(range(n_plan + 1))
        plan_any = Signal()
        plan_one = Signal()                          # plan_left == 1
        in_plan = ~in_rec & plan_any
        pw = ctl.plan_wr
        if db >= PLAN_ENTRY_BYTES:
            per_beat = db // PLAN_ENTRY_BYTES
            sub = Signal(range(per_beat))
            sub_last = Signal(init=per_beat == 1)    # sub == per_beat - 1
            entry = resp.p.data.word_select(sub, E_BITS) if per_beat > 1 else resp.p.data
            beat_end = sub_last | plan_one
            write = resp.valid & in_plan
            with m.If(write):
                m.d.sync += [sub.eq(Mux(beat_end, 0, sub + 1)),
                             sub_last.eq(Mux(beat_end, per_beat == 1, sub == per_beat - 2))]
        else:
            per_entry = PLAN_ENTRY_BYTES // db
            part = Signal(range(per_entry))
            acc = Signal(E_BITS)
            entry = Cat(acc[8 * db:], resp.p.data)
            beat_end = 1
            write = resp.valid & in_plan & (part == per_entry - 1)
            with m.If(resp.valid & in_plan):
                m.d.sync += [acc.eq(entry), part.eq(Mux(part == per_entry - 1, 0, part + 1))]
        fields = {name: entry[8 * at:8 * (at + size)] for name, (at, size) in PLAN_FIELDS.items()}
        m.d.comb += [pw.addr.eq(plan_idx), pw.en.eq(write)]
        for name in ("w_off", "w_len", "p_off", "p_len", "n", "n0w", "nk", "k", "w_last"):
            m.d.comb += getattr(pw.data, name).eq(fields[name])
        m.d.comb += [pw.data.fc2.eq(fields["flags"][0]), pw.data.first_fc2.eq(fields["flags"][1]),
                     pw.data.last.eq(fields["flags"][2])]
        with m.If(start):
            m.d.sync += [plan_left.eq(Mux(sp.plan_fetch, n_plan, 0)), plan_idx.eq(0),
                         plan_any.eq(sp.plan_fetch & (n_plan != 0)), plan_one.eq(sp.plan_fetch & (n_plan == 1))]
        with m.Elif(write):
            m.d.sync += [plan_left.eq(plan_left - 1), plan_idx.eq(plan_idx + 1),
                         plan_any.eq(~plan_one), plan_one.eq(plan_left == 2)]
            with m.If(plan_one):
                m.d.sync += plan_ok.eq(1)
        m.d.comb += ctl.plan_ready.eq(plan_ok)

        # The GELU table's write leaves through registers (address, byte, enable): the byte
        # multiplexer on ``lut_byte`` ends here, not in the engine's table behind the encoder's client
        # multiplexer. The table is complete (lut_ok) a cycle after its last write is decided, when
        # that write lands.
        gl_addr = Signal.like(cl.gelu_lut.addr)
        gl_data = Signal.like(cl.gelu_lut.data)
        gl_en = Signal()
        lut_fin = Signal()
        lut_go = resp.valid & ~in_rec & ~plan_any
        m.d.sync += [gl_en.eq(lut_go & lut_more), gl_addr.eq(lut_idx), lut_fin.eq(0)]
        with m.Switch(lut_byte):
            for k in range(db):
                with m.Case(k):
                    m.d.sync += gl_data.eq(resp.p.data[8 * k:8 * k + 8])
        m.d.comb += [
            resp.ready.eq(in_rec | Mux(plan_any, beat_end, last_byte)),
            cl.gelu_lut.addr.eq(gl_addr),
            cl.gelu_lut.data.eq(gl_data),
            cl.gelu_lut.en.eq(gl_en),
        ]
        with m.If(lut_fin):
            m.d.sync += lut_ok.eq(1)
        with m.If(start):
            m.d.sync += [lut_idx.eq(0), lut_byte.eq(0), last_byte.eq(db == 1), lut_more.eq(1),
                         in_rec.eq(sp.router_fetch)]
        with m.Elif(resp.valid & in_rec):
            m.d.sync += [rec_left.eq(rec_left - 1), in_rec.eq(rec_left != 1)]
            # c_mult is the record's bytes 0-1, c_shift its byte 2: in its first beat unless beats are
            # narrower than 4 bytes.
            for i in range(-(-3 // min(db, ROUTER_RECORD_BYTES))):
                with m.If(rec_left == self._rec_beats - i):
                    for j in range(min(db, ROUTER_RECORD_BYTES)):
                        at = i * db + j
                        byte = rec_word[8 * j:8 * j + 8]
                        if at < 2:
                            m.d.sync += c_mult[8 * at:8 * at + 8].eq(byte)
                        elif at == 2:
                            m.d.sync += c_shift.eq(byte)
            with m.If(rec_left == 1):
                m.d.sync += rec_ok.eq(1)
        with m.Elif(lut_go):
            m.d.sync += [lut_byte.eq(Mux(last_byte, 0, lut_byte + 1)),
                         last_byte.eq(Mux(last_byte, db == 1, lut_byte == db - 2)),
                         lut_idx.eq(lut_idx + 1), lut_more.eq(lut_idx < LUT_BYTES - 1)]
            with m.If(lut_idx == LUT_BYTES - 1):
                m.d.sync += lut_fin.eq(1)

        # ---- router path: engine RAW beats -> router -> queues -> controller -------------------------
        wiring.connect(m, wiring.flipped(self.o), rtr.i)
        # The router's command waits for the record (its valid only rises: the stream rules hold).
        m.d.comb += [
            rtr.cmd.valid.eq(ctl.router_cmd.valid & rec_ok),
            ctl.router_cmd.ready.eq(rtr.cmd.ready & rec_ok),
            rtr.cmd.p.tokens.eq(ctl.router_cmd.p.tokens),
            rtr.cmd.p.c_mult.eq(c_mult),
            rtr.cmd.p.c_shift.eq(c_shift),
            ctl.router_drained.eq(rtr.drained),
        ]
        wiring.connect(m, rtr.o, qs.i)
        m.d.comb += qs.k.eq(top_k)
        wiring.connect(m, qs.o, ctl.q)
        wiring.connect(m, ctl.rt_wr, wiring.flipped(self.rt_wr))

        # ---- engine and streamers ---------------------------------------------------------------------
        # The controller's three command streams leave through skid buffers: at the client boundary
        # valid, payload and ready are flip-flops, so the encoder's owner gates (csel) and the shared
        # datapath's command skids meet registers, not the controller's fetch and compute state
        # logic (the W1 top's fetch_state -> wcmd/pcmd skid, csel_moe -> compute_state and
        # -> gemm skid paths). One cycle of latency per command: the fetch runs tiles ahead, and a
        # GEMM command is issued while the previous one still computes.
        m.submodules.gemm_skid = gemm_skid = SkidBuffer(ctl.gemm.payload.shape())
        m.submodules.wcmd_skid = wcmd_skid = SkidBuffer(ctl.wcmd.payload.shape())
        m.submodules.pcmd_skid = pcmd_skid = SkidBuffer(ctl.pcmd.payload.shape())
        # Expert GEMMs (GELU8 fc1 reads the table) wait for the table; the gate's RAW GEMMs (issued in
        # the gate phase, the only RAW commands) do not. The phase flag, not a compare on the command's
        # mode (a mux of the controller's state), so the skid's accept sees one LUT.
        g_ok = lut_ok | ctl.gate_phase
        m.d.comb += [
            gemm_skid.i.valid.eq(ctl.gemm.valid & g_ok),
            gemm_skid.i.payload.eq(ctl.gemm.p),
            ctl.gemm.ready.eq(gemm_skid.i.ready & g_ok),
            ctl.gemm_done.eq(cl.gemm_done),
            ctl.pe_beat.eq(cl.pe_active),
        ]
        wiring.connect(m, gemm_skid.o, wiring.flipped(cl.gemm))
        wiring.connect(m, ctl.wcmd, wcmd_skid.i)
        wiring.connect(m, wcmd_skid.o, wiring.flipped(cl.wcmd))
        wiring.connect(m, ctl.pcmd, pcmd_skid.i)
        wiring.connect(m, pcmd_skid.o, wiring.flipped(cl.pcmd))
        # The controller releases both halves together and waits for both to be FULL.
        m.d.comb += [
            ctl.wtile.valid.eq(cl.tile_valid), ctl.ptile.valid.eq(cl.tile_valid),
            cl.release.eq(ctl.wtile.ready),
        ]

        # ---- the router's bias reads from the parameter buffer (gate phase) --------------------------
        pr = self.param.rd
        lane = PARAM_LANE_BYTES * 8
        m.d.comb += [
            self.param.own.eq(ctl.gate_phase),
            pr.addr.eq(rtr.bias_rd.addr), pr.en.eq(rtr.bias_rd.en),
        ]
        for c in range(C):
            m.d.comb += rtr.bias_rd.data[c].eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS])

        m.d.comb += [self.overflow.eq(qs.overflow), self.active_experts.eq(ctl.active_experts)]

        # ---- counters ------------------------------------------------------------------------------
        w_go = ctl.wcmd.valid & ctl.wcmd.ready
        p_go = ctl.pcmd.valid & ctl.pcmd.ready
        w_gate = ctl.wcmd.p.tag == GATE_TAG
        p_gate = ctl.pcmd.p.tag == GATE_TAG
        w_len, p_len = ctl.wcmd.p.length, ctl.pcmd.p.length
        # The byte counters add through two registered stages (the pieces' lengths, their sum), so
        # the streamer handshake does not drive two chained counter-wide adders; the last piece is
        # commanded long before ``done`` (it is fetched and computed first), so they are exact there.
        w_gl, p_gl, w_el, p_el = (Signal.like(w_len, name=n) for n in ("w_gl", "p_gl", "w_el", "p_el"))
        gate_add = Signal(len(w_len) + 1)
        exp_add = Signal(len(w_len) + 1)
        m.d.sync += [
            w_gl.eq(Mux(w_go & w_gate, w_len, 0)), p_gl.eq(Mux(p_go & p_gate, p_len, 0)),
            w_el.eq(Mux(w_go & ~w_gate, w_len, 0)), p_el.eq(Mux(p_go & ~p_gate, p_len, 0)),
            gate_add.eq(w_gl + p_gl), exp_add.eq(w_el + p_el),
        ]
        with m.If(start):
            m.d.sync += [self.cycles.eq(0), self.compute_cycles.eq(0), self.expert_bytes.eq(0),
                         self.gate_bytes.eq(0)]
        with m.Elif(busy):
            m.d.sync += [
                self.cycles.eq(self.cycles + 1),
                self.compute_cycles.eq(self.compute_cycles + cl.pe_active),
                self.expert_bytes.eq(self.expert_bytes + exp_add),
                self.gate_bytes.eq(self.gate_bytes + gate_add),
            ]
        return m
