"""``PatchEmbed``: the camera image in external memory -> the int16 residual stream entering block 0.

Bit-exact with ``reference.golden_model.embed``: ``x[0] = cls_int``, ``x[1 + i] = sat16(pos_int[1 + i] +
requantize(patch_i . W_pe^T))``. The uint8 HWC image stays in external memory; the
:class:`~m3vit_hw.dense.patch_loader.PatchLoader` unfolds it into patch rows (its address pattern, with
the ``pixel - 128`` conversion), the patch-embedding GEMM runs on the shared
:class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` in RESADD mode, and the cls token and position embedding
enter the residual buffer on chip from the embedding image (:func:`~m3vit_hw.dense.embed_layout.pack_embed`).

Sequence
--------
1. *Residual initialisation*: the ``T * row_words`` records at the image base are read (one
   :class:`~m3vit_hw.lib.burst_requester.BurstRequester` command) into residual words ``0 ..``: row 0
   ``cls_int``, row ``t`` ``pos_int[t]``.
2. *Patch tiles* of ``patch_tile`` rows (:class:`~m3vit_hw.dense.embed_layout.EmbedBufferMap`) alternate
   between two slots: the loader fills slot ``j % 2`` with tile ``j`` while the engine computes tile
   ``j - 1`` from the other slot. A slot is refilled once the last GEMM command reading it is done.
3. Per patch tile, every weight tile of the plan (:func:`~m3vit_hw.dense.embed_layout.plan_embed`):
   ``m = rows, k = patch_dim, n = tile.n`` RESADD, A = the slot (pitch ``kw``), out to residual rows
   ``1 + first patch ..`` (added to the position embedding already there). The first command waits for
   step 1. Weights stream through the ping-pong weight and parameter buffers, the plan once per patch
   tile; one command is in the engine at a time (halves are released on its ``done``).

The ``T x D`` residual is written only by this unit while it runs; the activation buffer holds only the
two patch slots. The image must be readable up to the memory beat after its last byte (the loader
reads whole aligned beats).

Structure: :class:`EmbedSequencer` holds the control and talks to the engine, streamers and weight
buffers through a :class:`~m3vit_hw.weights.client.GemmClientSignature`, to the loader through its command
stream, and to the residual buffer through a write port; :class:`PatchEmbed` is the standalone wrapper
that owns the engine, loader, buffers, streamers and arbiter.

Counters (reset by ``start``, valid after ``done``): ``cycles``, ``compute_cycles`` (PE operand beats),
``gemm_cycles`` (a command in the engine), ``patch_wait_cycles`` (the engine idle waiting for a patch
slot), ``weight_wait_cycles`` (idle waiting for a weight tile) and ``init_cycles`` (start to the end of
the residual initialisation).
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.host_access import connect_read_back
from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.epilogue import EpilogueMode
from ..gemm.gemm_engine import GemmEngine
from ..lib.mem_port import ReadPortSignature
from .embed_layout import embed_buffer_map, plan_embed
from ..weights.client import GemmClientSignature, connect_client, connect_weight_reads
from .patch_loader import BurstRequester, PatchLoader, PatchLoadLayout
from ..weights.weight_path import WeightPath

__all__ = ["PatchEmbed", "EmbedSequencer", "EmbedStartLayout"]

_COUNTERS = ("cycles", "compute_cycles", "gemm_cycles", "patch_wait_cycles", "weight_wait_cycles", "init_cycles")


class EmbedStartLayout(data.StructLayout):
    """``base``: external byte address of the :func:`pack_embed` image (a multiple of the memory
    beat); ``img_base``: byte address of the uint8 HWC image (any byte); ``shift``: the patch GEMM's
    requantization shift."""

    def __init__(self, addr_width):
        super().__init__({
            "base": unsigned(addr_width),
            "img_base": unsigned(addr_width),
            "shift": range(numerics.SHIFT_MAX + 1),
        })


class PatchEmbed(wiring.Component):
    """Patch embedding: loader, GEMM engine, buffers, streamers and sequencer.

    Parameters
    ----------
    config : AcceleratorConfig
    patch_tile : int or None
        Patch rows per slot (default: the largest multiple of ``pe_rows`` two slots fit).

    The external-memory port (shared by the image, the residual initialisation and the weights), the
    arbiter depth, the tile tag width and the counter width come from ``config``.

    Interface attributes
    --------------------
    start : In(stream.Signature(EmbedStartLayout(config.mem_addr_width)))
        Accepted when idle.
    done : Out(1)
        Pulses when the last patch embedding is in the residual buffer.
    busy : Out(1)
    mem : Out(ReadPortSignature(...))
    rd_addr : In(stream.Signature(unsigned(res_addr_bits)))
    rd_data : Out(stream.Signature(ArrayLayout(signed(16), pe_cols)))
        Residual read-back while idle.
    cycles, compute_cycles, gemm_cycles, patch_wait_cycles, weight_wait_cycles, init_cycles : Out(counter_width)

    Raises
    ------
    TypeError, ValueError
        On a bad ``patch_tile``, or a ``mem_addr_width`` too narrow for the image.
    """

    def __init__(self, config, *, patch_tile=None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # The config's act_buffer_needs include two patch slots of one row tile and its checks cover
        # the frame and the patch panel; only ``patch_tile`` (an argument) or the image size can be
        # refused here, before any sub-unit is built.
        self._layout = plan_embed(config)
        self._bmap = embed_buffer_map(config, patch_tile=patch_tile)
        if self._layout.image_bytes >= 1 << config.mem_addr_width:
            raise ValueError(f"mem_addr_width={config.mem_addr_width} cannot address the "
                             f"{self._layout.image_bytes}-byte embedding image")
        self._config = config
        self._aw = config.mem_addr_width
        self._db = db = config.mem_data_bytes
        lay = self._layout
        C = config.pe_cols
        mport = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self.loader = PatchLoader(config)
        self.engine = GemmEngine(config)
        self.weights = WeightPath(config, weight_half_bytes=lay.weight_half_bytes,
                                  param_half_bytes=lay.param_half_bytes, param_word_bytes=lay.param_word_bytes,
                                  readers=2)
        for name in ("arbiter", "wbuf", "pbuf", "wstream", "pstream"):
            setattr(self, name, getattr(self.weights, name))
        self.sequencer = EmbedSequencer(config, lay, self._bmap)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The buffers, owned here for now (the shared datapath takes them over).
        self.act_buffer = memory.Memory(shape=word8, depth=config.act_buffer_words, init=[])
        self.res_buffer = memory.Memory(shape=word16, depth=config.res_buffer_words, init=[])
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(EmbedStartLayout(config.mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(**mport)),
            "rd_addr": In(stream.Signature(unsigned(config.res_addr_bits))),
            "rd_data": Out(stream.Signature(word16)),
            **{name: Out(cw) for name in _COUNTERS},
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
        cfg = self._config
        C = cfg.pe_cols
        eng, ld, seq = self.engine, self.loader, self.sequencer
        for name in ("engine", "loader", "sequencer"):
            m.submodules[name] = getattr(self, name)

        # ---- external memory: weights, parameters, image, residual initialisation ----------------
        self.weights.add_to(m, self.mem)
        wiring.connect(m, ld.mem, self.weights.readers[0])
        wiring.connect(m, seq.init_mem, self.weights.readers[1])

        # ---- buffers -----------------------------------------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.res = res = self.res_buffer
        wiring.connect(m, eng.a_rd, act.read_port())
        wiring.connect(m, ld.act_wr, act.write_port(granularity=1))
        wiring.connect(m, eng.res_rd, res.read_port())
        connect_weight_reads(m, eng, self.wbuf, self.pbuf, C)
        m.d.comb += eng.o.ready.eq(1)
        # The residual write port: the sequencer's initialisation, then the engine's (RESADD).
        res_w = res.write_port(granularity=1)
        with m.If(seq.init_done):
            m.d.comb += [res_w.addr.eq(eng.res_wr.addr), res_w.data.eq(eng.res_wr.data),
                         res_w.en.eq(eng.res_wr.en)]
        with m.Else():
            m.d.comb += [res_w.addr.eq(seq.res_init_wr.addr), res_w.data.eq(seq.res_init_wr.data),
                         res_w.en.eq(seq.res_init_wr.en)]

        # ---- sequencer ---------------------------------------------------------------------------
        connect_client(m, seq.client, eng, self.wstream, self.pstream, self.wbuf, self.pbuf)
        wiring.connect(m, seq.loader, ld.cmd)
        m.d.comb += seq.loader_done.eq(ld.done)
        wiring.connect(m, wiring.flipped(self.start), seq.start)
        running = seq.busy
        m.d.comb += [self.done.eq(seq.done), self.busy.eq(running)]
        for name in _COUNTERS:
            m.d.comb += getattr(self, name).eq(getattr(seq, name))

        # ---- read-back (while idle) --------------------------------------------------------------
        connect_read_back(m, res.read_port(), self.rd_addr, self.rd_data, idle=~running)
        return m


class EmbedSequencer(wiring.Component):
    """The patch embedding's control alone: residual initialisation, patch-slot bookkeeping, the loader's
    commands, and the fetch and compute sequencers. It owns no buffer or engine.

    Parameters
    ----------
    config : AcceleratorConfig
    layout : EmbedLayout
    buffer_map : EmbedBufferMap

    The external-memory port of ``init_mem`` and the counter width come from ``config``.

    Interface attributes
    --------------------
    start : In(stream.Signature(EmbedStartLayout(config.mem_addr_width)))
    done, busy : Out(1)
    client : Out(GemmClientSignature(config))
    loader : Out(stream.Signature(PatchLoadLayout(config, config.mem_addr_width)))
        Commands for a :class:`~m3vit_hw.dense.patch_loader.PatchLoader`.
    loader_done : In(1)
        The loader's ``done``.
    init_mem : Out(ReadPortSignature(...))
        Reads the residual initialisation.
    res_init_wr : In(memory.WritePort.Signature(res_addr_bits, ArrayLayout(signed(16), pe_cols), granularity=1))
        Its writes into the residual buffer.
    init_done : Out(1)
        The initialisation is complete (from then on the engine owns the residual write port).
    cycles, compute_cycles, gemm_cycles, patch_wait_cycles, weight_wait_cycles, init_cycles : Out(counter_width)
    """

    def __init__(self, config, layout, buffer_map):
        addr_width, data_bytes = config.mem_addr_width, config.mem_data_bytes
        self._config, self._layout, self._bmap = config, layout, buffer_map
        self._aw, self._db = addr_width, data_bytes
        rec_beats = layout.res_record_bytes // data_bytes
        port = dict(addr_width=addr_width, data_bytes=data_bytes, max_burst=config.mem_max_burst)
        self.init_reader = BurstRequester(**port, max_beats=layout.res_words * rec_beats)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), config.pe_cols)
        super().__init__({
            "start": In(stream.Signature(EmbedStartLayout(addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "client": Out(GemmClientSignature(config)),
            "loader": Out(stream.Signature(PatchLoadLayout(config, addr_width))),
            "loader_done": In(1),
            "init_mem": Out(ReadPortSignature(**port)),
            "res_init_wr": In(memory.WritePort.Signature(addr_width=config.res_addr_bits, shape=word16,
                                                         granularity=1)),
            "init_done": Out(1),
            **{name: Out(config.counter_width) for name in _COUNTERS},
        })

    def _tile_rom(self, m, index, name):
        cfg, lay = self._config, self._layout
        C = cfg.pe_cols
        t = Signal(data.StructLayout({
            "w_off": unsigned(self._aw), "w_len": unsigned(self._aw),
            "p_off": unsigned(self._aw), "p_len": unsigned(self._aw),
            "last": 1, "n": range(cfg.largest_n + 1), "n0w": range(-(-cfg.largest_n // C) + 1),
        }), name=name)
        with m.Switch(index):
            for tl in lay.tiles:
                with m.Case(tl.index):
                    m.d.comb += [
                        t.w_off.eq(tl.w_offset), t.w_len.eq(tl.w_bytes),
                        t.p_off.eq(tl.p_offset), t.p_len.eq(tl.p_bytes),
                        t.last.eq(tl.index == len(lay.tiles) - 1), t.n.eq(tl.n), t.n0w.eq(tl.n0 // C),
                    ]
        return t

    def elaborate(self, platform):
        m = Module()
        cfg, lay, bm = self._config, self._layout, self._bmap
        C = cfg.pe_cols
        rw = cfg.row_words
        N = cfg.model.patches
        K = lay.patch_dim
        pt = bm.patch_tile
        ntl = len(lay.tiles)
        db = self._db
        cl = self.client
        m.submodules.init_reader = self.init_reader

        # ---- start -------------------------------------------------------------------------------
        prm = Signal(EmbedStartLayout(self._aw))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += [self.start.ready.eq(~running), self.busy.eq(running)]
        with m.If(start):
            m.d.sync += [prm.eq(self.start.payload), running.eq(1)]

        # ---- residual initialisation -------------------------------------------------------------
        rec_beats = lay.res_record_bytes // db
        ir = self.init_reader
        init_issued = Signal()
        m.d.comb += [
            ir.cmd.valid.eq(running & ~init_issued),
            ir.cmd.payload.addr.eq(prm.base),
            ir.cmd.payload.beats.eq(lay.res_words * rec_beats),
        ]
        with m.If(start):
            m.d.sync += init_issued.eq(0)
        with m.Elif(ir.cmd.valid & ir.cmd.ready):
            m.d.sync += init_issued.eq(1)
        rec = Signal(rec_beats * db * 8)
        rbeat = Signal(range(rec_beats))
        init_addr = Signal(range(lay.res_words + 1))
        init_done = Signal()
        wiring.connect(m, ir.req, wiring.flipped(self.init_mem.req))
        resp = self.init_mem.resp
        m.d.comb += resp.ready.eq(1)
        new_rec = Cat(rec[db * 8:], resp.payload.data) if rec_beats > 1 else resp.payload.data
        res_w = self.res_init_wr
        init_wr = resp.valid & (rbeat == rec_beats - 1)
        with m.If(resp.valid):
            m.d.sync += [rec.eq(new_rec), rbeat.eq(Mux(rbeat == rec_beats - 1, 0, rbeat + 1))]
            with m.If(rbeat == rec_beats - 1):
                m.d.sync += init_addr.eq(init_addr + 1)
        # The write port is registered: the record is written the cycle after its last beat, from
        # ``rec`` (which holds it then), so the response's valid (a decode in the read arbiter)
        # reaches only registers, not the residual buffer's enable through the datapath's select.
        # ``init_done`` follows the last registered write (it also hands the port back to the engine).
        w_en = Signal()
        w_last = Signal()
        w_addr = Signal.like(init_addr)
        m.d.sync += [w_en.eq(init_wr), w_last.eq(init_addr == lay.res_words - 1), w_addr.eq(init_addr)]
        with m.If(w_en & w_last):
            m.d.sync += init_done.eq(1)
        with m.If(start):
            m.d.sync += [init_addr.eq(0), init_done.eq(0), rbeat.eq(0)]

        m.d.comb += [self.init_done.eq(init_done), res_w.addr.eq(w_addr), res_w.en.eq(w_en.replicate(C))]
        for c in range(C):
            m.d.comb += res_w.data[c].eq(rec[16 * c:16 * c + 16])

        # ---- patch loader: tiles into alternating slots ------------------------------------------
        slot_full = Signal(2)
        l_slot = Signal()
        l_left = Signal(range(N + 1))             # patches not yet requested from the loader
        l_first = Signal()
        l_pending = Signal()                      # a loader command is running
        l_nz = Signal()                           # l_left != 0, kept as a flag
        l_count = Signal(range(pt + 1))           # min(l_left, pt): the next command's count
        lc = self.loader
        # The command's valid is one LUT of flip-flops (no compare of ``l_left``): it drives the
        # loader's command skid buffer, whose load enable fans out to the whole command register.
        m.d.comb += [
            lc.valid.eq(running & l_nz & ~l_pending & ~slot_full.bit_select(l_slot, 1)),
            lc.payload.img_base.eq(prm.img_base), lc.payload.restart.eq(l_first),
            lc.payload.count.eq(l_count),
            lc.payload.dst_base.eq(Mux(l_slot, bm.slot_words, 0)), lc.payload.dst_stride.eq(bm.kw),
        ]
        slot_set = Signal(2)
        slot_clr = Signal(2)
        with m.If(start):
            m.d.sync += [l_left.eq(N), l_nz.eq(N != 0), l_count.eq(min(N, pt)), l_first.eq(1), l_slot.eq(0),
                         l_pending.eq(0)]
        with m.Elif(lc.valid & lc.ready):
            m.d.sync += [l_left.eq(Mux(l_left > pt, l_left - pt, 0)), l_nz.eq(l_left > pt),
                         l_count.eq(Mux(l_left > 2 * pt, pt, Mux(l_left > pt, l_left - pt, 0))),
                         l_first.eq(0), l_pending.eq(1)]
        with m.If(self.loader_done & l_pending):
            m.d.sync += [l_pending.eq(0), l_slot.eq(~l_slot)]
            m.d.comb += slot_set.eq(Mux(l_slot, 0b10, 0b01))
        with m.If(start):
            m.d.sync += slot_full.eq(0)
        with m.Else():
            m.d.sync += slot_full.eq((slot_full | slot_set) & ~slot_clr)

        # ---- fetch sequencer: the weight plan once per patch tile --------------------------------
        fw, fp = Signal(range(ntl)), Signal(range(ntl))
        fw_left, fp_left = Signal(range(N + 1)), Signal(range(N + 1))
        tw_ = self._tile_rom(m, fw, "fetch_w_tile")
        tp_ = self._tile_rom(m, fp, "fetch_p_tile")
        wcmd, pcmd = cl.wcmd, cl.pcmd
        # The commands' addresses (base + a tile's offset, an adder of the address width) are
        # registered: the client multiplexer and the datapath's skid buffer follow a flip-flop. The
        # register is stale for the cycle after a start or a transfer (the tile index moves), in which
        # ``a_ok`` holds the command back.
        w_addr, p_addr = Signal.like(wcmd.payload.addr), Signal.like(pcmd.payload.addr)
        w_ok, p_ok = Signal(), Signal()
        m.d.sync += [w_addr.eq(prm.base + tw_.w_off), p_addr.eq(prm.base + tp_.p_off)]
        m.d.comb += [
            wcmd.valid.eq(running & (fw_left != 0) & w_ok),
            wcmd.payload.addr.eq(w_addr), wcmd.payload.length.eq(tw_.w_len),
            wcmd.payload.tag.eq(fw),
            pcmd.valid.eq(running & (fp_left != 0) & p_ok),
            pcmd.payload.addr.eq(p_addr), pcmd.payload.length.eq(tp_.p_len),
            pcmd.payload.tag.eq(fp),
        ]
        for idx, left, cmd_, a_ok in ((fw, fw_left, wcmd, w_ok), (fp, fp_left, pcmd, p_ok)):
            m.d.sync += a_ok.eq(~start & ~(cmd_.valid & cmd_.ready))
            with m.If(start):
                m.d.sync += [idx.eq(0), left.eq(N)]
            with m.Elif(cmd_.valid & cmd_.ready):
                with m.If(idx == ntl - 1):
                    m.d.sync += [idx.eq(0), left.eq(Mux(left > pt, left - pt, 0))]
                with m.Else():
                    m.d.sync += idx.eq(idx + 1)

        # ---- compute sequencer -------------------------------------------------------------------
        ti = Signal(range(ntl))
        c_slot = Signal()
        c_left = Signal(range(N + 1))
        rows = Signal(range(pt + 1))
        m.d.comb += rows.eq(Mux(c_left > pt, pt, c_left))
        r_base = Signal(cfg.dst_addr_bits)        # residual word of the tile's first patch row
        # The tile's descriptor and its first destination word, registered from the table every
        # cycle: ti and r_base change only when a command is accepted in ISSUE, which then waits a
        # cycle or more in WAIT, so ISSUE always sees the current tile's. The table lookup and the
        # destination add were in front of the GEMM command's skid buffer (W2's top: 4 LUT + 4 CARRY4).
        rom = self._tile_rom(m, ti, "compute_tile_rom")
        tc = Signal(data.StructLayout({"n": len(rom.n), "last": 1}), name="compute_tile")
        tc_dst = Signal(cfg.dst_addr_bits, name="compute_dst")
        m.d.sync += [tc.n.eq(rom.n), tc.last.eq(rom.last), tc_dst.eq(r_base + rom.n0w)]
        inflight = Signal()
        frees_slot = Signal()                     # the command in the engine is its tile's last
        g = cl.gemm
        gp = g.payload
        m.d.comb += cl.release.eq(cl.gemm_done)
        with m.If(cl.gemm_done):
            m.d.sync += inflight.eq(0)
            with m.If(frees_slot):
                m.d.comb += slot_clr.eq(Mux(c_slot, 0b01, 0b10))   # c_slot already moved on
        patch_wait = Signal()
        weight_wait = Signal()
        with m.FSM(name="seq"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [ti.eq(0), c_slot.eq(0), c_left.eq(N), r_base.eq(rw)]
                    m.next = "WAIT"
            with m.State("WAIT"):
                ready_patch = init_done & slot_full.bit_select(c_slot, 1)
                ready_w = cl.tile_valid
                m.d.comb += [patch_wait.eq(~inflight & ~ready_patch),
                             weight_wait.eq(~inflight & ready_patch & ~ready_w)]
                with m.If(ready_patch & ready_w & ~inflight):
                    m.next = "ISSUE"
            with m.State("ISSUE"):
                m.d.comb += [
                    g.valid.eq(1),
                    gp.m.eq(rows), gp.k.eq(K), gp.n.eq(tc.n),
                    gp.a_base.eq(Mux(c_slot, bm.slot_words, 0)), gp.a_stride.eq(bm.kw),
                    gp.b_base.eq(0), gp.b_k_stride.eq(1), gp.b_tile_stride.eq(K), gp.colp_base.eq(0),
                    gp.dst_base.eq(tc_dst), gp.dst_stride.eq(rw),
                    gp.shift.eq(prm.shift), gp.mode.eq(EpilogueMode.RESADD),
                ]
                with m.If(g.ready):
                    m.d.sync += [inflight.eq(1), frees_slot.eq(tc.last)]
                    with m.If(~tc.last):
                        m.d.sync += ti.eq(ti + 1)
                        m.next = "WAIT"
                    with m.Elif(c_left > pt):
                        m.d.sync += [ti.eq(0), c_slot.eq(~c_slot), c_left.eq(c_left - pt),
                                     r_base.eq(r_base + pt * rw)]
                        m.next = "WAIT"
                    with m.Else():
                        m.d.sync += c_slot.eq(~c_slot)
                        m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(~inflight & ~cl.gemm_busy):
                    m.d.sync += running.eq(0)
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"

        # ---- counters ----------------------------------------------------------------------------
        counters = [
            (self.cycles, 1), (self.compute_cycles, cl.pe_active), (self.gemm_cycles, inflight),
            (self.patch_wait_cycles, patch_wait), (self.weight_wait_cycles, weight_wait),
            (self.init_cycles, ~init_done),
        ]
        for ctr, inc in counters:
            with m.If(start):
                m.d.sync += ctr.eq(0)
            with m.Elif(running):
                m.d.sync += ctr.eq(ctr + inc)
        return m
