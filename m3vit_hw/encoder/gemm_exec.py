"""``GemmExecutor``: the client that runs ``GEMM`` instructions on the shared datapath.

A ``GEMM`` instruction names one weight tile in external memory (``ceil(n / C)`` panels of ``k``
words at ``w_addr``, their parameter words at ``p_addr``), the operands on chip and an epilogue mode
(:mod:`m3vit_hw.control.isa`). Every shape field is a run-time value: nothing of the model is
elaborated in, so one design runs dense MLPs of any ``D`` and hidden width its buffers hold.

Queueing and overlap
--------------------
Jobs (decoded instructions) enter two 2-deep queues at once. The **fetch** side takes the head of its
queue, computes the tile's byte lengths (``panels * k * C`` weight bytes and ``panels *
param_word_bytes`` parameter bytes, each rounded up to the memory beat, as the layout modules pack
them) and sends one command to each streamer; the streamers fill the other halves of the ping-pong
buffers while the engine computes, so the next tile's weights arrive during the current GEMM. The
**compute** side takes the head of its queue, loads the GELU table when the job's mode is GELU8 and
the table at ``lut_addr`` is not the one already in the engine (a one-entry cache, cleared by
``lut_flush``: another client may write the table), waits for the tile (``tile_valid``) and the
previous command's ``done``, and issues the GEMM command; the tile's halves are released on its
``done``. One command is in the engine at a time, so results are ordered without ``sync``; a job's
``wait`` still sets the command's ``sync``.

``busy`` is high from the cycle after a job is taken until its command has left the engine.
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..weights.client import GemmClientSignature
from ..lib.burst_requester import BurstRequester
from ..gemm.epilogue import EpilogueMode
from ..lib.mem_port import ReadPortSignature

__all__ = ["GemmExecutor", "GemmJobLayout"]

_LUT_BYTES = 1 << numerics.ACT_BITS


class GemmJobLayout(data.StructLayout):
    """One ``GEMM`` instruction with absolute external addresses: ``m, k, n``, ``a_base, a_stride,
    dst_base, dst_stride`` (on-chip words), ``w_addr, p_addr, lut_addr`` (bytes, beat-aligned),
    ``shift``, ``mode`` (:class:`~m3vit_hw.gemm.epilogue.EpilogueMode`), ``gather``, ``scatter``,
    ``sync``, ``a_unsigned`` (A read as uint8: fc2 on the GELU codes)."""

    def __init__(self, config):
        aw = config.mem_addr_width
        super().__init__({
            "m": range(config.largest_m + 1),
            "k": range(config.largest_k + 1),
            "n": range(config.largest_n + 1),
            "a_base": unsigned(config.act_addr_bits),
            "a_stride": unsigned(config.act_addr_bits),
            "dst_base": unsigned(config.dst_addr_bits),
            "dst_stride": unsigned(config.dst_addr_bits),
            "w_addr": unsigned(aw),
            "p_addr": unsigned(aw),
            "lut_addr": unsigned(aw),
            "shift": range(numerics.SHIFT_MAX + 1),
            "mode": EpilogueMode,
            "gather": 1,
            "scatter": 1,
            "sync": 1,
            "a_unsigned": 1,
        })


class GemmExecutor(wiring.Component):
    """``GEMM`` instructions as a shared-datapath client (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig

    Interface attributes
    --------------------
    start : In(stream.Signature(GemmJobLayout(config)))
        Ready while both queues have room (a second job is taken while the first one runs).
    busy : Out(1)
    lut_flush : In(1)
        Forget the cached GELU table (another client wrote the engine's table).
    client : Out(GemmClientSignature(config))
    lut_mem : Out(ReadPortSignature(...))
        GELU table reads.
    cycles, compute_cycles : Out(counter_width)
        Cycles busy and PE-array beats, since the last ``clear``.
    clear : In(1)
        Zero the counters.
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        db = config.mem_data_bytes
        port = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self.lut_reader = BurstRequester(**port, max_beats=-(-_LUT_BYTES // db))
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(GemmJobLayout(config))),
            "busy": Out(1),
            "lut_flush": In(1),
            "client": Out(GemmClientSignature(config)),
            "lut_mem": Out(ReadPortSignature(**port)),
            "cycles": Out(cw),
            "compute_cycles": Out(cw),
            "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        C = cfg.pe_cols
        db = cfg.mem_data_bytes
        lb = db.bit_length() - 1
        lc = C.bit_length() - 1
        assert 1 << lc == C, "pe_cols is a power of two (config: word bytes vs memory beat)"
        pwb = cfg.param_word_bytes
        cl = self.client
        job = GemmJobLayout(cfg)
        m.submodules.fq = fq = fifo.SyncFIFOBuffered(width=job.size, depth=2)
        m.submodules.cq = cq = fifo.SyncFIFOBuffered(width=job.size, depth=2)
        m.d.comb += [
            self.start.ready.eq(fq.w_rdy & cq.w_rdy),
            fq.w_data.eq(self.start.payload), cq.w_data.eq(self.start.payload),
            fq.w_en.eq(self.start.valid & self.start.ready), cq.w_en.eq(self.start.valid & self.start.ready),
        ]

        # ---- fetch side: one weight and one parameter command per job ----------------------------
        fj = data.View(job, fq.r_data)
        panels = Signal(range(-(-cfg.largest_n // C) + 1))
        m.d.comb += panels.eq((fj.n + (C - 1)) >> lc)
        w_len = Signal(cfg.mem_addr_width)
        p_len = Signal(cfg.mem_addr_width)
        have_len = Signal()
        w_sent, p_sent = Signal(), Signal()
        wcmd, pcmd = cl.wcmd, cl.pcmd
        tag = Signal(cfg.tile_tag_width)

        def up(v):
            return ((v + (db - 1)) >> lb) << lb

        # The lengths take three registered steps (panels and k; the products, a DSP with its input
        # and output registers; the round-up), so neither the multiplier nor the adders around it
        # share a cycle. The fetch side runs ahead of the compute side, so this latency hides.
        lstep = Signal(range(3))
        panels_r = Signal.like(panels)
        k_r = Signal.like(fj.k)
        w_prod = Signal(cfg.mem_addr_width)
        p_prod = Signal(cfg.mem_addr_width)
        with m.If(fq.r_rdy & ~have_len):
            with m.Switch(lstep):
                with m.Case(0):
                    m.d.sync += [panels_r.eq(panels), k_r.eq(fj.k), lstep.eq(1)]
                with m.Case(1):
                    m.d.sync += [w_prod.eq(panels_r * k_r), p_prod.eq(panels_r * pwb), lstep.eq(2)]
                with m.Case(2):
                    m.d.sync += [w_len.eq(up(w_prod << lc)), p_len.eq(up(p_prod)), have_len.eq(1),
                                 lstep.eq(0)]
        m.d.comb += [
            wcmd.valid.eq(have_len & ~w_sent), wcmd.payload.addr.eq(fj.w_addr),
            wcmd.payload.length.eq(w_len), wcmd.payload.tag.eq(tag),
            pcmd.valid.eq(have_len & ~p_sent), pcmd.payload.addr.eq(fj.p_addr),
            pcmd.payload.length.eq(p_len), pcmd.payload.tag.eq(tag),
        ]
        w_go = wcmd.valid & wcmd.ready
        p_go = pcmd.valid & pcmd.ready
        both = (w_sent | w_go) & (p_sent | p_go)
        m.d.comb += fq.r_en.eq(have_len & both)
        with m.If(have_len & both):
            m.d.sync += [w_sent.eq(0), p_sent.eq(0), have_len.eq(0), tag.eq(tag + 1)]
        with m.Else():
            with m.If(w_go):
                m.d.sync += w_sent.eq(1)
            with m.If(p_go):
                m.d.sync += p_sent.eq(1)

        # ---- GELU table: one entry per cycle into the engine -------------------------------------
        m.submodules.lut_reader = lr = self.lut_reader
        wiring.connect(m, lr.req, wiring.flipped(self.lut_mem.req))
        lut_ok = Signal()
        lut_cur = Signal(cfg.mem_addr_width)
        lut_idx = Signal(range(_LUT_BYTES + 1))
        lut_byte = Signal(range(db))
        lresp = self.lut_mem.resp
        last_byte = lut_byte == db - 1
        # The table write is registered: the byte select (a db:1 mux) and the client multiplexer
        # would otherwise run into the engine's table in one cycle. LUT ends on the registered write
        # of the last entry, not on the response (whose valid is a decode in the read arbiter).
        lut_wa = Signal.like(cl.gelu_lut.addr, reset_less=True)
        lut_wd = Signal.like(cl.gelu_lut.data, reset_less=True)
        lut_we = Signal()
        m.d.sync += [lut_wa.eq(lut_idx), lut_we.eq(lresp.valid & (lut_idx < _LUT_BYTES))]
        m.d.comb += [
            cl.gelu_lut.addr.eq(lut_wa), cl.gelu_lut.en.eq(lut_we), cl.gelu_lut.data.eq(lut_wd),
            lresp.ready.eq(last_byte | (lut_idx == _LUT_BYTES - 1)),
        ]
        with m.Switch(lut_byte):
            for k in range(db):
                with m.Case(k):
                    m.d.sync += lut_wd.eq(lresp.payload.data[8 * k:8 * k + 8])
        with m.If(lresp.valid):
            m.d.sync += [lut_byte.eq(Mux(last_byte, 0, lut_byte + 1)), lut_idx.eq(lut_idx + 1)]

        # ---- compute side ------------------------------------------------------------------------
        cj = data.View(job, cq.r_data)
        inflight = Signal()
        g = cl.gemm
        gp = g.payload
        m.d.comb += cl.release.eq(cl.gemm_done)
        with m.If(cl.gemm_done):
            m.d.sync += inflight.eq(0)
        need_lut = (cj.mode == EpilogueMode.GELU8) & ~(lut_ok & (lut_cur == cj.lut_addr))
        with m.If(self.lut_flush):
            m.d.sync += lut_ok.eq(0)
        # The table check (a compare of the whole address) is registered in IDLE and acted on in
        # DECIDE, one cycle per job (the job, lut_ok and lut_cur cannot change meanwhile: the
        # executor is busy, so no other instruction flushes the table).
        need_lut_q = Signal()
        with m.FSM(name="compute") as fsm:
            with m.State("IDLE"):
                with m.If(cq.r_rdy & ~inflight):
                    m.d.sync += need_lut_q.eq(need_lut)
                    m.next = "DECIDE"
            with m.State("DECIDE"):
                with m.If(need_lut_q & ~cl.gemm_busy):
                    # The table changes only while no command reads it.
                    m.d.sync += [lut_idx.eq(0), lut_byte.eq(0), lut_ok.eq(0)]
                    m.next = "LUT_CMD"
                with m.Elif(~need_lut_q & cl.tile_valid):
                    m.next = "ISSUE"
            with m.State("LUT_CMD"):
                m.d.comb += [lr.cmd.valid.eq(1), lr.cmd.payload.addr.eq(cj.lut_addr),
                             lr.cmd.payload.beats.eq(-(-_LUT_BYTES // db))]
                with m.If(lr.cmd.ready):
                    m.next = "LUT"
            with m.State("LUT"):
                with m.If(lut_we & (lut_wa == _LUT_BYTES - 1)):
                    m.d.sync += [lut_ok.eq(1), lut_cur.eq(cj.lut_addr)]
                    m.next = "IDLE"
            with m.State("ISSUE"):
                m.d.comb += [
                    g.valid.eq(1),
                    gp.m.eq(cj.m), gp.k.eq(cj.k), gp.n.eq(cj.n),
                    gp.a_base.eq(cj.a_base), gp.a_stride.eq(cj.a_stride),
                    gp.b_base.eq(0), gp.b_tile_stride.eq(cj.k), gp.b_k_stride.eq(1),
                    gp.dst_base.eq(cj.dst_base), gp.dst_stride.eq(cj.dst_stride),
                    gp.rowtab_base.eq(0), gp.colp_base.eq(0),
                    gp.shift.eq(cj.shift), gp.mode.eq(cj.mode),
                    gp.gather.eq(cj.gather), gp.scatter.eq(cj.scatter), gp.sync.eq(cj.sync),
                    gp.a_unsigned.eq(cj.a_unsigned),
                ]
                with m.If(g.ready):
                    m.d.comb += cq.r_en.eq(1)
                    m.d.sync += inflight.eq(1)
                    m.next = "IDLE"
        # Jobs taken and not yet issued: counted from the cycle after ``start`` (the queue's output
        # register shows a job a cycle later), so ``busy`` rises the cycle after a job is taken, as
        # the sequencer's ``wait`` rule expects.
        jobs = Signal(range(4))
        taken = self.start.valid & self.start.ready
        issued = cq.r_en
        m.d.sync += jobs.eq(jobs + taken - issued)
        m.d.comb += self.busy.eq((jobs != 0) | inflight | cl.gemm_busy | ~fsm.ongoing("IDLE"))

        with m.If(self.clear):
            m.d.sync += [self.cycles.eq(0), self.compute_cycles.eq(0)]
        with m.Elif(self.busy):
            m.d.sync += [self.cycles.eq(self.cycles + 1),
                         self.compute_cycles.eq(self.compute_cycles + cl.pe_active)]
        return m
