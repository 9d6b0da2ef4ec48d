"""``AcceleratorTop``: the encoder as a Zynq UltraScale+ peripheral (AXI4 masters, AXI4-Lite slave, IRQ).

The compute core is the :class:`~m3vit_hw.encoder.EncoderTop` (program sequencer, units, shared
datapath). It fetches its program and every parameter itself through one read port and writes the
tokens through one write port; this top adds the SoC around it: the register block, the AXI masters,
the start checks, the error codes, the counters and the interrupt.

A run (``CTRL.START`` while idle):

1. **check**: every base address (``PROGRAM``, ``PARAM``, ``OUTPUT``, ``IMAGE``) must be a multiple of
   the AXI beat (else ``ERROR.UNALIGNED``) and
   ``TASK`` below the model's task count (else ``ERROR.BAD_TASK``); either ends the run at once;
2. **run**: ``{task, program_base, param_base, output_base, image_base}`` go to the core's ``start``; the core
   fetches and executes the program (``docs/isa.md``) until ``END``. An opcode outside the
   instruction set is ``ERROR.BAD_PROGRAM``, one whose unit this build lacks ``ERROR.NO_UNIT``;
   the sequencer stops there;
3. **finish**: when the core raises ``done`` (after ``END``, every unit idle, so every write response
   of ``STORE`` is back) ``STATUS.DONE`` and ``IRQ_STATUS.DONE`` are set; ``interrupt`` is high while
   ``IRQ_STATUS.DONE & IRQ_ENABLE.DONE``. A non-OKAY AXI response anywhere sets ``ERROR.AXI``
   (the run still completes, so no transaction is left hanging).

The camera frame: ``LOAD_IMAGE`` reads it at ``IMAGE_BASE`` + its ``img_addr`` (the image layout's
``input`` offset, :mod:`m3vit_hw.control.image_layout`): ``IMAGE_BASE = PARAM_BASE`` for a frame written
into the image's ``input`` section, ``frame - input offset`` for a frame in a buffer of its own (what the
driver does).

Memory traffic: the core's read requests (weights, parameters, program, frame; its own arbiter has
merged them) are spread round-robin over ``axi_masters`` AXI4 masters by a
:class:`~.datapath.ReadInterleaver` (one per HP port) and come back in order. Writes (``STORE``) use
master 0, with byte strobes. Every request of the core's ports should already be a burst of at most
``mem_max_burst`` beats that never crosses 4 KiB (the port contract, :mod:`m3vit_hw.lib.mem_port`);
a :class:`~.datapath.PageSplitter` on the read side cuts any that would (the LayerNorm parameter
reader assumes a record-aligned ``PARAM_BASE``), and the store DMA splits its own bursts at pages.
``sim/axi_checker.py`` checks both on the emitted Verilog.

:func:`xilinx_ports` and :class:`XilinxTop` give the Verilog top its Xilinx names: ``m_axi<k>_<signal>``,
``s_axi_<signal>``, ``interrupt``, ``aclk`` and ``aresetn``.
"""

import math

from amaranth.hdl import ClockDomain, Const, Elaboratable, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from ..config import AcceleratorConfig
from ..encoder import CounterPhase, EncoderTop, SeqError
from .axi import AXI4LiteSignature, AXI4Signature, AxiMaster
from .csr import CsrBlock
from .datapath import PageSplitter, ReadInterleaver
from .regmap import BASES, COUNTED_OPS, ERRORS, REGMAP_VERSION, config_id
from .slice import AxiRegisterSlice
from .width import ReadDownsizer, WriteDownsizer

__all__ = ["AcceleratorTop", "XilinxTop", "xilinx_ports", "port_directions", "HP_PORT_BYTES", "HP_PORTS",
           "hp_ports_needed", "default_axi_masters"]

#: Bytes a cycle one ``S_AXI_HP*_FPD`` port of the Zynq UltraScale+ PS carries (128 bits), and how
#: many such ports there are for an accelerator (HP0..HP3).
HP_PORT_BYTES, HP_PORTS = 16, 4


def hp_ports_needed(bytes_per_cycle):
    """128-bit HP ports an external-memory bandwidth of ``bytes_per_cycle`` needs (``AcceleratorTop``'s
    ``axi_masters``), or ``None`` above what four give."""
    n = max(1, -(-math.ceil(bytes_per_cycle) // HP_PORT_BYTES))
    return n if n <= HP_PORTS else None


def default_axi_masters(config):
    """The build's default number of AXI masters for ``config``: enough 128-bit HP ports to carry one
    memory beat a cycle, and at least three (more outstanding reads than one port's in-order return
    hides; the measured 16-byte-beat builds use three).

    A 64-byte beat gets four: HP0..HP3 at 300 MHz are 19.2 GB/s, the PS DDR4's peak.
    """
    return max(3, hp_ports_needed(min(config.mem_data_bytes, HP_PORTS * HP_PORT_BYTES)))

_ERR = {f.name: f.lsb for f in ERRORS}


class AcceleratorTop(wiring.Component):
    """The encoder with AXI4 masters, an AXI4-Lite register block and a done interrupt.

    Parameters
    ----------
    config : AcceleratorConfig
    axi_masters : int
        Number of AXI4 masters, 1..4 (reads are spread over all; writes use master 0).
    axi_data_bytes : int or None
        Data width of every AXI master in bytes (default ``min(mem_data_bytes, 16)``: the 128-bit
        ``S_AXI_HP*_FPD`` ports of the Zynq UltraScale+ PS). Narrower than the core's beat, each
        master gets a :class:`~.width.ReadDownsizer` (and master 0 a :class:`~.width.WriteDownsizer`):
        the core keeps its beat, each port carries ``axi_data_bytes`` a cycle, so a 64-byte core
        reads up to 64 bytes a cycle only over four masters.
    csr_addr_width : int
        Address width of ``s_axi`` (8..32).
    register_slices : bool
        Put an :class:`~.slice.AxiRegisterSlice` on every AXI4 master port (default), so no
        combinational path crosses the accelerator's AXI boundary.

    The AXI address width is the config's ``mem_addr_width``; the longest AXI burst is
    ``mem_max_burst * mem_data_bytes / axi_data_bytes`` beats (at most 4 KiB, never across a page).

    Interface attributes
    --------------------
    m_axi : ``Out(AXI4Signature(addr_width, 8 * axi_data_bytes)).array(axi_masters)``
    s_axi : ``In(AXI4LiteSignature(csr_addr_width, 32))``
    interrupt : ``Out(1)``

    Raises
    ------
    TypeError, ValueError
        On a bad parameter (before elaboration).
    """

    def __init__(self, config, *, axi_masters=1, csr_addr_width=12, register_slices=True, axi_data_bytes=None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        _check_int("axi_masters", axi_masters, 1, 4)
        _check_int("csr_addr_width", csr_addr_width, 8, 32)
        self._aw, self._db, self._mb = config.mem_addr_width, config.mem_data_bytes, config.mem_max_burst
        if axi_data_bytes is None:
            axi_data_bytes = min(self._db, HP_PORT_BYTES)
        _check_int("axi_data_bytes", axi_data_bytes, 1, self._db)
        if self._db % axi_data_bytes or axi_data_bytes & (axi_data_bytes - 1):
            raise ValueError(f"axi_data_bytes must be a power of two dividing mem_data_bytes={self._db}, "
                             f"not {axi_data_bytes}")
        self._adb = axi_data_bytes
        #: The compute core: the whole encoder.
        self.core = EncoderTop(config)
        self._config = config
        self._n = axi_masters
        self._slices = bool(register_slices)
        #: The value of the ``ID`` register (see :func:`~.regmap.config_id`).
        self.config_id = config_id(config, axi_masters=axi_masters)
        self.csr = CsrBlock(addr_width=csr_addr_width)
        super().__init__({
            "m_axi": Out(AXI4Signature(addr_width=self._aw, data_width=8 * self._adb)).array(axi_masters),
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
    def axi_data_bytes(self):
        """Bytes per beat of every AXI master (``data_bytes`` or a power-of-two fraction of it)."""
        return self._adb

    @property
    def addr_width(self):
        return self._aw

    @property
    def axi_masters(self):
        return self._n

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        aw, db, mb, n = self._aw, self._db, self._mb, self._n
        tasks = cfg.model.num_tasks
        core, csr = self.core, self.csr
        m.submodules.core = core
        m.submodules.csr = csr
        wiring.connect(m, wiring.flipped(self.s_axi), csr.bus)
        port = dict(addr_width=aw, data_bytes=db, max_burst=mb)

        # ---- AXI masters, reads spread over all of them ---------------------------------------
        ratio = db // self._adb
        aport = dict(addr_width=aw, data_bytes=self._adb, max_burst=mb * ratio)
        masters = [AxiMaster(**aport, write=(k == 0)) for k in range(n)]
        for k, mk in enumerate(masters):
            m.submodules[f"axi{k}"] = mk
            if self._slices:
                # Every AXI channel starts and ends at a register (one cycle each way).
                m.submodules[f"slice{k}"] = sl = AxiRegisterSlice(mk.axi.signature)
                wiring.connect(m, mk.axi, sl.s)
                wiring.connect(m, sl.m, wiring.flipped(self.m_axi[k]))
            else:
                wiring.connect(m, mk.axi, wiring.flipped(self.m_axi[k]))
        # The core's reads must not cross 4 KiB (the port contract); the guard enforces it at the AXI edge.
        m.submodules.pages = pages = PageSplitter(**port, depth=min(256, 2 * cfg.arbiter_depth))
        wiring.connect(m, core.mem, pages.up)
        # Narrow masters: one burst-buffering downsizer per master, behind the interleaver, so each
        # port streams its own bursts while the in-order return drains another's.
        rd = [mk.rd for mk in masters]
        if ratio > 1:
            for k in range(n):
                m.submodules[f"rdsize{k}"] = ds = ReadDownsizer(addr_width=aw, wide_bytes=db,
                                                                narrow_bytes=self._adb, max_burst=mb)
                wiring.connect(m, ds.down, masters[k].rd)
                rd[k] = ds.up
        if n == 1:
            wiring.connect(m, pages.down, rd[0])
        else:
            m.submodules.interleave = il = ReadInterleaver(n, **port, depth=cfg.arbiter_depth)
            wiring.connect(m, pages.down, il.up)
            for k in range(n):
                wiring.connect(m, il.down[k], rd[k])
        if ratio > 1:
            m.submodules.wrsize = ws = WriteDownsizer(addr_width=aw, wide_bytes=db, narrow_bytes=self._adb,
                                                      max_burst=mb)
            wiring.connect(m, core.wr, ws.up)
            wiring.connect(m, ws.down, masters[0].wr)
        else:
            wiring.connect(m, core.wr, masters[0].wr)

        # ---- run state ---------------------------------------------------------------------------
        bases = {b: Signal(aw, name=f"{b.lower()}_base") for b, _ in BASES}
        task = Signal(8)
        busy = Signal()
        done = Signal()
        finish = Signal()                     # one cycle: the run ends (sets IRQ_STATUS.DONE)
        errors = Signal(len(ERRORS))
        axi_err = Signal()
        m.d.comb += axi_err.eq(_any(mk.error for mk in masters))
        start = csr.ctrl[0] & ~busy
        m.d.comb += [mk.clear_error.eq(start) for mk in masters]
        cycles = Signal(64)
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)

        st = core.start
        m.d.comb += [st.payload.task.eq(task), st.payload.program_base.eq(bases["PROGRAM"]),
                     st.payload.param_base.eq(bases["PARAM"]), st.payload.output_base.eq(bases["OUTPUT"]),
                     st.payload.image_base.eq(bases["IMAGE"])]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [busy.eq(1), done.eq(0), errors.eq(0), task.eq(csr.task[:8]), cycles.eq(0)]
                    for b, _ in BASES:
                        lo = getattr(csr, f"{b.lower()}_base_lo")
                        hi = getattr(csr, f"{b.lower()}_base_hi")
                        m.d.sync += bases[b].eq((hi << 32) | lo)
                    m.next = "CHECK"
            with m.State("CHECK"):
                unaligned = _any((s[:db.bit_length() - 1] != 0) for s in bases.values()) if db > 1 else 0
                with m.If(unaligned):
                    m.d.sync += errors[_ERR["UNALIGNED"]].eq(1)
                    m.next = "FINISH"
                with m.Elif(task >= tasks):
                    m.d.sync += errors[_ERR["BAD_TASK"]].eq(1)
                    m.next = "FINISH"
                with m.Else():
                    m.next = "START"
            with m.State("START"):
                m.d.comb += st.valid.eq(1)
                with m.If(st.ready):
                    m.next = "RUN"
            with m.State("RUN"):
                # The core clears ``done`` when it takes the start, so ``done`` here is this run's.
                with m.If(core.done):
                    m.d.sync += [errors[_ERR["BAD_PROGRAM"]].eq(core.error == SeqError.BAD_OPCODE),
                                 errors[_ERR["NO_UNIT"]].eq(core.error == SeqError.NO_UNIT)]
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += finish.eq(1)
                m.d.sync += [busy.eq(0), done.eq(1),
                             errors[_ERR["AXI"]].eq(errors[_ERR["AXI"]] | axi_err)]
                m.next = "IDLE"

        # ---- register block connections ----------------------------------------------------------
        m.d.comb += [
            csr.id.eq(self.config_id),
            csr.version.eq(REGMAP_VERSION[0] << 16 | REGMAP_VERSION[1]),
            csr.status.eq(busy | (done << 1)),
            csr.error.eq(errors | (axi_err << _ERR["AXI"])),
            csr.irq_status_set.eq(finish),
            csr.cycles_lo.eq(cycles[:32]), csr.cycles_hi.eq(cycles[32:]),
            csr.insn_count.eq(core.insn_count),
            csr.config0.eq(cfg.pe_rows | cfg.pe_cols << 16),
            csr.config1.eq(db | n << 8 | cfg.token_capacity << 16),
            self.interrupt.eq(csr.irq_status[0] & csr.irq_enable[0]),
        ]
        for op in COUNTED_OPS:
            m.d.comb += [getattr(csr, f"op_cycles_{op.name.lower()}").eq(core.op_cycles[op.value]),
                         getattr(csr, f"pe_cycles_{op.name.lower()}").eq(core.pe_cycles[op.value])]
        for p in CounterPhase:
            m.d.comb += [getattr(csr, f"phase_cycles_{p.name.lower()}").eq(core.phase_cycles[p.value]),
                         getattr(csr, f"phase_pe_cycles_{p.name.lower()}").eq(core.phase_pe_cycles[p.value])]
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
