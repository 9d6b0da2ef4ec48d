"""``AcceleratorTop``: the accelerator as a Zynq UltraScale+ peripheral (AXI4 masters, AXI4-Lite slave, IRQ).

The compute core is, for now, one :class:`~m3vit_hw.moe.moe_layer.MoELayer` (the stand-in until the
encoder top exists); everything around it is meant to stay when the encoder replaces it: the register
block, the AXI masters, the loader that fills on-chip buffers from DDR, the storer that writes results
back, the error codes, the counters and the interrupt.

A run (``CTRL.START`` while idle):

1. **check**: every base address must be a multiple of the AXI beat (else ``ERROR.UNALIGNED``) and
   ``TASK`` below the task count (else ``ERROR.BAD_TASK``);
2. **descriptor**: read the PROGRAM descriptor (:mod:`.image`); a wrong magic or config ID, a token
   count outside ``[1, token_capacity]`` or a shift above ``SHIFT_MAX`` is ``ERROR.BAD_PROGRAM``;
3. **load**: read the GELU table, ``h`` and ``x`` through width converters into the core's ``load``
   port;
4. **layer**: start the core with the descriptor's fields and the WEIGHTS base, wait for ``done``
   (the core's weight streams read DDR through the same AXI masters meanwhile);
5. **store**: read ``x`` back from the core and write it to OUTPUT (byte strobes mask the padding of
   the last beat), then wait for every write response;
6. **finish**: ``STATUS.DONE`` and ``IRQ_STATUS.DONE`` set; ``interrupt`` is high while
   ``IRQ_STATUS.DONE & IRQ_ENABLE.DONE``.

An error stops the run at the step that found it (AXI errors are recorded and the run completes, so
no transaction is left hanging) and still finishes with DONE and the interrupt.

Memory traffic: the loader and the core's port share a :class:`~m3vit_hw.lib.mem_arbiter.ReadArbiter`,
whose requests a :class:`~.datapath.ReadInterleaver` spreads round-robin over ``axi_masters`` AXI4
masters (one per HP port), so the weight streams use the bandwidth of all of them. Writes use master 0.

:func:`xilinx_ports` and :class:`XilinxTop` give the Verilog top its Xilinx names: ``m_axi<k>_<signal>``,
``s_axi_<signal>``, ``interrupt``, ``aclk`` and ``aresetn``.
"""

from amaranth.hdl import ClockDomain, Const, Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int as _check_int
from ..config import AcceleratorConfig
from ..lib.mem_arbiter import ReadArbiter
from ..moe.moe_layer import LoadTarget, MoELayer
from ..rowops.softmax import SHIFT_BITS
from .axi import AXI4LiteSignature, AXI4Signature, AxiMaster
from .csr import CsrBlock
from .datapath import BurstSplitter, Gearbox, ReadInterleaver
from .slice import AxiRegisterSlice
from .image import DESC_HEADER_WORDS, GELU_BYTES, MAGIC, ImageLayout, config_id
from .regmap import ERRORS, REGMAP_VERSION

__all__ = ["AcceleratorTop", "XilinxTop", "xilinx_ports", "port_directions"]

_ERR = {f.name: f.lsb for f in ERRORS}


class AcceleratorTop(wiring.Component):
    """The accelerator with AXI4 masters, an AXI4-Lite register block and a done interrupt.

    Parameters
    ----------
    config : AcceleratorConfig
    axi_masters : int
        Number of AXI4 masters, 1..4 (reads are spread over all; writes use master 0).
    csr_addr_width : int
        Address width of ``s_axi`` (8..32).
    register_slices : bool
        Put an :class:`~.slice.AxiRegisterSlice` on every AXI4 master port (default), so no
        combinational path crosses the accelerator's AXI boundary.

    The AXI data width, address width and longest burst are those of the core's memory port.

    Interface attributes
    --------------------
    m_axi : ``Out(AXI4Signature(addr_width, 8 * data_bytes)).array(axi_masters)``
    s_axi : ``In(AXI4LiteSignature(csr_addr_width, 32))``
    interrupt : ``Out(1)``

    Raises
    ------
    TypeError, ValueError
        On a bad parameter (before elaboration).
    """

    def __init__(self, config, *, axi_masters=1, csr_addr_width=12, register_slices=True):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        _check_int("axi_masters", axi_masters, 1, 4)
        _check_int("csr_addr_width", csr_addr_width, 8, 32)
        #: The compute core (the MoE-layer stand-in for the encoder top).
        self.core = MoELayer(config)
        msig = self.core.signature.members["mem"].signature
        self._aw, self._db, self._mb = msig.addr_width, msig.data_bytes, msig.max_burst
        self._config = config
        self._n = axi_masters
        self._slices = bool(register_slices)
        self.image = ImageLayout(config)
        for name, wb in (("pe_cols (h word)", self.image.h_word_bytes),
                         ("pe_cols (x word)", self.image.x_word_bytes)):
            big, small = max(wb, self._db), min(wb, self._db)
            if big % small or (big // small) & (big // small - 1):
                raise ValueError(f"{name} of {wb} bytes must be a power-of-two multiple or fraction "
                                 f"of the {self._db}-byte AXI beat")
        #: The value of the ``ID`` register (see :func:`~.image.config_id`).
        self.config_id = config_id(config, axi_masters=axi_masters)
        self.csr = CsrBlock(addr_width=csr_addr_width)
        super().__init__({
            "m_axi": Out(AXI4Signature(addr_width=self._aw, data_width=8 * self._db)).array(axi_masters),
            "s_axi": In(AXI4LiteSignature(addr_width=csr_addr_width, data_width=32)),
            "interrupt": Out(1),
        })

    @property
    def config(self):
        return self._config

    @property
    def data_bytes(self):
        return self._db

    @property
    def addr_width(self):
        return self._aw

    @property
    def axi_masters(self):
        return self._n

    def elaborate(self, platform):
        m = Module()
        cfg, img = self._config, self.image
        aw, db, mb, n = self._aw, self._db, self._mb, self._n
        C = cfg.pe_cols
        tasks = cfg.model.num_tasks
        core, csr = self.core, self.csr
        m.submodules.core = core
        m.submodules.csr = csr
        wiring.connect(m, wiring.flipped(self.s_axi), csr.bus)
        port = dict(addr_width=aw, data_bytes=db, max_burst=mb)

        # ---- AXI masters, reads spread over all of them ---------------------------------------
        masters = [AxiMaster(**port, write=(k == 0)) for k in range(n)]
        for k, mk in enumerate(masters):
            m.submodules[f"axi{k}"] = mk
            if self._slices:
                # Every AXI channel starts and ends at a register (one cycle each way).
                m.submodules[f"slice{k}"] = sl = AxiRegisterSlice(mk.axi.signature)
                wiring.connect(m, mk.axi, sl.s)
                wiring.connect(m, sl.m, wiring.flipped(self.m_axi[k]))
            else:
                wiring.connect(m, mk.axi, wiring.flipped(self.m_axi[k]))
        m.submodules.arbiter = arb = ReadArbiter(2, **port, depth=16)
        wiring.connect(m, core.mem, arb.masters[1])
        if n == 1:
            wiring.connect(m, arb.mem, masters[0].rd)
        else:
            m.submodules.interleave = il = ReadInterleaver(n, **port, depth=16)
            wiring.connect(m, arb.mem, il.up)
            for k in range(n):
                wiring.connect(m, il.down[k], masters[k].rd)
        lport = arb.masters[0]          # the loader's read port (In side of the arbiter)
        m.submodules.rsplit = rsplit = BurstSplitter(**port, len_width=24)
        m.d.comb += [lport.req.valid.eq(rsplit.req.valid), lport.req.p.eq(rsplit.req.p),
                     rsplit.req.ready.eq(lport.req.ready)]
        m.submodules.wsplit = wsplit = BurstSplitter(**port, len_width=24)
        wr = masters[0].wr
        m.d.comb += [wr.req.valid.eq(wsplit.req.valid), wr.req.p.eq(wsplit.req.p),
                     wsplit.req.ready.eq(wr.req.ready)]

        # ---- run state ---------------------------------------------------------------------------
        bases = {}
        for b in ("program", "weights", "image", "output"):
            bases[b] = Signal(aw, name=f"{b}_base")
        task = Signal(8)
        tokens = Signal(range(cfg.token_capacity + 1))
        nwords = Signal(24)                   # h / x words of this run: tokens * row_words
        busy = Signal()
        done = Signal()
        finish = Signal()                     # one cycle: the run ends (sets IRQ_STATUS.DONE)
        loading = Signal()                    # the loader's responses go to the gearboxes
        errors = Signal(len(ERRORS))
        axi_err = Signal()
        m.d.comb += axi_err.eq(_any(mk.error for mk in masters))

        start = csr.ctrl[0] & ~busy
        m.d.comb += [mk.clear_error.eq(start) for mk in masters]

        # ---- descriptor capture -------------------------------------------------------------------
        desc_beats = img.desc_bytes // db
        desc = Signal(8 * img.desc_bytes)
        def dword(k):
            return desc[32 * k:32 * k + 32]
        c_mult = Signal(32)
        c_shift = Signal(32)
        with m.Switch(task):
            for t in range(tasks):
                with m.Case(t):
                    m.d.comb += [c_mult.eq(dword(DESC_HEADER_WORDS + 2 * t)),
                                 c_shift.eq(dword(DESC_HEADER_WORDS + 2 * t + 1))]
        fc1_shift = dword(3)[0:8]
        fc2_shift = dword(3)[8:16]
        desc_tokens = dword(2)
        bad_program = ((dword(0) != MAGIC) | (dword(1) != self.config_id) |
                       (desc_tokens == 0) | (desc_tokens > cfg.token_capacity) |
                       (fc1_shift > numerics.SHIFT_MAX) | (fc2_shift > numerics.SHIFT_MAX) |
                       (dword(3)[16:] != 0) |
                       (c_mult >= (1 << numerics.SOFTMAX_MULT_BITS)) | (c_shift >= (1 << SHIFT_BITS)))

        # ---- loader: read transfers and width converters into core.load --------------------------
        gears = {LoadTarget.GELU: Gearbox(db, 1), LoadTarget.H: Gearbox(db, img.h_word_bytes),
                 LoadTarget.X: Gearbox(db, img.x_word_bytes)}
        for tgt, g in gears.items():
            m.submodules[f"gear_{tgt.name.lower()}"] = g
        target = Signal(LoadTarget)
        widx = Signal(24)                      # words out of the active gearbox so far
        wtotal = Signal(24)                    # words the region's beats make
        wreal = Signal(24)                     # of which the first wreal go to the core
        ld = core.load
        resp = lport.resp
        beats_in = Signal(range(desc_beats + 1))
        for tgt, g in gears.items():
            sel = target == tgt
            m.d.comb += [g.i.p.data.eq(resp.p.data), g.i.p.strb.eq(-1)]
            m.d.comb += g.i.valid.eq(resp.valid & sel & loading)
        g_o_valid = Signal()
        g_o_data = Signal(8 * img.x_word_bytes)
        with m.Switch(target):
            for tgt, g in gears.items():
                with m.Case(tgt):
                    m.d.comb += [g_o_valid.eq(g.o.valid), g_o_data.eq(g.o.p.data)]
        real = widx < wreal
        g_o_ready = Signal()
        for tgt, g in gears.items():
            m.d.comb += g.o.ready.eq(g_o_ready & (target == tgt))
        m.d.comb += [
            ld.valid.eq(g_o_valid & real), ld.p.target.eq(target), ld.p.addr.eq(widx),
            g_o_ready.eq(ld.ready | ~real),
        ]
        for c in range(C):
            with m.Switch(target):
                with m.Case(LoadTarget.X):
                    m.d.comb += ld.p.data[c].eq(g_o_data[16 * c:16 * c + 16])
                with m.Case(LoadTarget.H):
                    m.d.comb += ld.p.data[c].eq(g_o_data[8 * c:8 * c + 8])
                with m.Default():
                    if c == 0:
                        m.d.comb += ld.p.data[c].eq(g_o_data[0:8])
        with m.If(g_o_valid & g_o_ready):
            m.d.sync += widx.eq(widx + 1)

        # ---- storer: core.rd_addr/rd_data -> gearbox -> write port -------------------------------
        m.submodules.gear_out = gout = Gearbox(img.x_word_bytes, db)
        ra = Signal(24)
        sw = Signal(24)
        store_on = Signal()
        m.d.comb += [core.rd_addr.valid.eq(store_on & (ra < nwords)), core.rd_addr.payload.eq(ra)]
        with m.If(core.rd_addr.valid & core.rd_addr.ready):
            m.d.sync += ra.eq(ra + 1)
        out_total = Signal(24)
        with m.If(sw < nwords):
            m.d.comb += [gout.i.valid.eq(store_on & core.rd_data.valid),
                         gout.i.p.data.eq(core.rd_data.payload), gout.i.p.strb.eq(-1),
                         core.rd_data.ready.eq(store_on & gout.i.ready)]
        with m.Else():
            # Pad words fill the last beat; their strobes are 0, so memory there is untouched.
            m.d.comb += [gout.i.valid.eq(store_on & (sw < out_total)), gout.i.p.strb.eq(0)]
        with m.If(gout.i.valid & gout.i.ready):
            m.d.sync += sw.eq(sw + 1)
        m.d.comb += [wr.data.valid.eq(gout.o.valid), wr.data.p.data.eq(gout.o.p.data),
                     wr.data.p.strb.eq(gout.o.p.strb), gout.o.ready.eq(wr.data.ready)]
        bursts = Signal(24)
        m.d.comb += wr.resp.ready.eq(1)
        with m.If(wsplit.req.valid & wsplit.req.ready):
            m.d.sync += bursts.eq(bursts + 1)
        bresps = Signal(24)
        with m.If(wr.resp.valid):
            m.d.sync += bresps.eq(bresps + 1)

        # ---- counters ----------------------------------------------------------------------------
        cycles = Signal(64)
        load_cycles = Signal(32)
        store_cycles = Signal(32)
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)

        # ---- the run sequence ---------------------------------------------------------------------
        def region_words(words, wb):
            # Words the gearbox emits for a region of ``words`` words padded to whole beats.
            if wb >= db:
                return words
            k = db // wb
            return ((words + k - 1) >> (k.bit_length() - 1)) << (k.bit_length() - 1)

        def beats_of(words, wb):
            if wb >= db:
                return words * (wb // db)
            k = db // wb
            return (words + k - 1) >> (k.bit_length() - 1)

        cmd = rsplit.cmd
        with m.FSM():
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [
                        busy.eq(1), done.eq(0), errors.eq(0), task.eq(csr.task[:8]),
                        cycles.eq(0), load_cycles.eq(0), store_cycles.eq(0),
                    ]
                    for b, s in bases.items():
                        lo = getattr(csr, f"{b}_base_lo")
                        hi = getattr(csr, f"{b}_base_hi")
                        m.d.sync += s.eq((hi << 32) | lo)
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                unaligned = _any((s[:db.bit_length() - 1] != 0) for s in bases.values()) if db > 1 else 0
                with m.If(unaligned):
                    m.d.sync += errors[_ERR["UNALIGNED"]].eq(1)
                    m.next = "FINISH"
                with m.Elif(task >= tasks):
                    m.d.sync += errors[_ERR["BAD_TASK"]].eq(1)
                    m.next = "FINISH"
                with m.Else():
                    m.d.sync += beats_in.eq(0)
                    m.next = "DESC_CMD"
            with m.State("DESC_CMD"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                m.d.comb += [cmd.valid.eq(1), cmd.p.addr.eq(bases["program"]), cmd.p.beats.eq(desc_beats)]
                with m.If(cmd.ready):
                    m.next = "DESC"
            with m.State("DESC"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                m.d.comb += resp.ready.eq(1)
                with m.If(resp.valid):
                    if desc_beats == 1:
                        m.d.sync += desc.eq(resp.p.data)
                    else:
                        m.d.sync += desc.eq((desc >> (8 * db)) |
                                            (resp.p.data << (8 * (img.desc_bytes - db))))
                    m.d.sync += beats_in.eq(beats_in + 1)
                    with m.If(beats_in == desc_beats - 1):
                        m.next = "VALIDATE"
            with m.State("VALIDATE"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                with m.If(bad_program | axi_err):
                    m.d.sync += errors[_ERR["BAD_PROGRAM"]].eq(bad_program)
                    m.next = "FINISH"
                with m.Else():
                    m.d.sync += [
                        tokens.eq(desc_tokens), nwords.eq(desc_tokens * cfg.row_words),
                        target.eq(LoadTarget.GELU), widx.eq(0),
                        wtotal.eq(GELU_BYTES), wreal.eq(GELU_BYTES),
                    ]
                    m.next = "LOAD_CMD"
            with m.State("LOAD_CMD"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                m.d.comb += cmd.valid.eq(1)
                with m.Switch(target):
                    with m.Case(LoadTarget.GELU):
                        m.d.comb += [cmd.p.addr.eq(bases["program"] + img.gelu_offset),
                                     cmd.p.beats.eq(-(-GELU_BYTES // db))]
                    with m.Case(LoadTarget.H):
                        m.d.comb += [cmd.p.addr.eq(bases["image"]),
                                     cmd.p.beats.eq(beats_of(nwords, img.h_word_bytes))]
                    with m.Case(LoadTarget.X):
                        m.d.comb += [cmd.p.addr.eq(bases["image"] +
                                                   (beats_of(nwords, img.h_word_bytes) << (db.bit_length() - 1))),
                                     cmd.p.beats.eq(beats_of(nwords, img.x_word_bytes))]
                with m.If(cmd.ready):
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.sync += load_cycles.eq(load_cycles + 1)
                m.d.comb += loading.eq(1)
                with m.Switch(target):
                    for tgt, g in gears.items():
                        with m.Case(tgt):
                            m.d.comb += resp.ready.eq(g.i.ready)
                with m.If(widx == wtotal):
                    m.d.sync += widx.eq(0)
                    with m.Switch(target):
                        with m.Case(LoadTarget.GELU):
                            m.d.sync += [target.eq(LoadTarget.H), wreal.eq(nwords),
                                         wtotal.eq(region_words(nwords, img.h_word_bytes))]
                            m.next = "LOAD_CMD"
                        with m.Case(LoadTarget.H):
                            m.d.sync += [target.eq(LoadTarget.X), wreal.eq(nwords),
                                         wtotal.eq(region_words(nwords, img.x_word_bytes))]
                            m.next = "LOAD_CMD"
                        with m.Default():
                            m.next = "RUN"
            with m.State("RUN"):
                st = core.start
                m.d.comb += [
                    st.valid.eq(1), st.p.task.eq(task), st.p.tokens.eq(tokens),
                    st.p.gate_base.eq(bases["weights"] + core.layout.gate_offset),
                    st.p.expert_base.eq(bases["weights"] + core.layout.experts_offset),
                    st.p.c_mult.eq(c_mult), st.p.c_shift.eq(c_shift),
                    st.p.fc1_shift.eq(fc1_shift), st.p.fc2_shift.eq(fc2_shift),
                ]
                with m.If(st.ready):
                    m.next = "LAYER"
            with m.State("LAYER"):
                with m.If(core.done):
                    m.d.sync += [ra.eq(0), sw.eq(0), bursts.eq(0), bresps.eq(0),
                                 out_total.eq(region_words(nwords, img.x_word_bytes))]
                    m.next = "STORE_CMD"
            with m.State("STORE_CMD"):
                m.d.sync += store_cycles.eq(store_cycles + 1)
                wcmd = wsplit.cmd
                m.d.comb += [wcmd.valid.eq(1), wcmd.p.addr.eq(bases["output"]),
                             wcmd.p.beats.eq(beats_of(nwords, img.x_word_bytes))]
                with m.If(wcmd.ready):
                    m.next = "STORE"
            with m.State("STORE"):
                m.d.sync += store_cycles.eq(store_cycles + 1)
                m.d.comb += store_on.eq(1)
                with m.If((sw == out_total) & wsplit.idle & (bresps == bursts) & ~gout.o.valid):
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += finish.eq(1)
                m.d.sync += [busy.eq(0), done.eq(1),
                             errors[_ERR["AXI"]].eq(errors[_ERR["AXI"]] | axi_err),
                             errors[_ERR["OVERFLOW"]].eq(core.overflow)]
                m.next = "IDLE"

        # ---- register block connections ----------------------------------------------------------
        m.d.comb += [
            csr.id.eq(self.config_id),
            csr.version.eq(REGMAP_VERSION[0] << 16 | REGMAP_VERSION[1]),
            csr.status.eq(busy | (done << 1)),
            csr.error.eq(errors | (axi_err << _ERR["AXI"])),
            csr.irq_status_set.eq(finish),
            csr.cycles_lo.eq(cycles[:32]), csr.cycles_hi.eq(cycles[32:]),
            csr.load_cycles.eq(load_cycles), csr.store_cycles.eq(store_cycles),
            csr.layer_cycles.eq(core.cycles), csr.compute_cycles.eq(core.compute_cycles),
            csr.expert_bytes.eq(core.expert_bytes), csr.gate_bytes.eq(core.gate_bytes),
            csr.active_experts.eq(core.active_experts),
            csr.config0.eq(cfg.pe_rows | cfg.pe_cols << 16),
            csr.config1.eq(db | n << 8 | cfg.token_capacity << 16),
            self.interrupt.eq(csr.irq_status[0] & csr.irq_enable[0]),
        ]
        return m


def _any(values):
    out = Const(0, 1)
    for v in values:
        out = out | v
    return out



class XilinxTop(Elaboratable):
    """The Verilog top for Vivado: ``top``'s ports with Xilinx names, plus ``aclk`` and ``aresetn``.

    ``sync`` is clocked by ``aclk`` and reset while ``aresetn`` is low (AXI's active-low reset, held
    for at least one ``aclk`` edge, so a synchronous reset is enough). :meth:`ports` lists the ports
    for :func:`amaranth.back.verilog.convert`.
    """

    def __init__(self, top):
        if not isinstance(top, AcceleratorTop):
            raise TypeError(f"top must be an AcceleratorTop, not {top!r}")
        self.top = top
        self.aclk = Signal(name="aclk")
        self.aresetn = Signal(name="aresetn")
        self._ports = []
        for name, flow, value in xilinx_ports(top):
            self._ports.append((Signal(len(value), name=name), flow, value))

    def ports(self):
        """Every top-level port signal (named as Vivado expects)."""
        return [self.aclk, self.aresetn] + [p for p, _, _ in self._ports]

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.aclk), cd.rst.eq(~self.aresetn)]
        m.submodules.accel = self.top
        for port, flow, value in self._ports:
            if flow == In:
                m.d.comb += value.eq(port)
            else:
                m.d.comb += port.eq(value)
        return m


def port_directions(top):
    """``[(name, "input" | "output", width)]`` of :class:`XilinxTop`'s ports, clock and reset first."""
    return ([("aclk", "input", 1), ("aresetn", "input", 1)] +
            [(name, "input" if flow == In else "output", len(v)) for name, flow, v in xilinx_ports(top)])


def xilinx_ports(top):
    """``[(name, flow, value)]`` of ``top``'s ports with Xilinx names (``m_axi<k>_araddr``, ...)."""
    out = []
    for path, member, value in top.signature.flatten(top):
        if path[0] == "m_axi":
            name = f"m_axi{path[1]}_{path[2]}"
        elif path[0] == "s_axi":
            name = f"s_axi_{path[1]}"
        else:
            name = "_".join(map(str, path))
        if hasattr(value, "as_value"):
            value = value.as_value()
        out.append((name, member.flow, value))
    return out
