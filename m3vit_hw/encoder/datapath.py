"""``SharedDatapath``: the one engine and the one set of on-chip buffers every encoder client uses.

It owns (one of each, sized by :class:`~m3vit_hw.config.AcceleratorConfig`):

* the :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` (and the GELU table inside it);
* the int8 activation buffer: the main bank (``act_buffer_words``) and the attention e8 bank
  (``2 * attn_e8_slot`` words at ``attn_e8_base``, see :func:`~m3vit_hw.attention.attn_layout.buffer_map`);
* the int16 residual buffer (``res_buffer_words``);
* the row table (:class:`~m3vit_hw.gemm.gemm_engine.RowEntryLayout`, ``rowtab_entries`` deep): the
  engine reads it, the active client writes it through ``rt_wr``;
* the weight path (:class:`~m3vit_hw.weights.weight_path.WeightPath`): the ping-pong weight and
  column-parameter buffers, their two streamers and the external-memory read arbiter, whose masters 0
  and 1 are the streamers and masters ``2 ..`` the ``masters`` ports (one per reader of the top).

Its ports take *one* client each; the encoder top multiplexes the active client onto them
(:func:`~m3vit_hw.encoder.mux.mux_interfaces`).
The engine command, the two streamer commands and the engine's RAW result stream pass through a
:class:`~m3vit_hw.lib.skid.SkidBuffer` each (one cycle, full throughput), so no ready/valid chain
crosses from the active client through the datapath into the engine, the streamers or another unit;
``client.gemm_busy`` also covers a command or result beat held there. ``client.gemm_done`` and
``client.gemm_busy`` come from registers, a cycle after the engine's.

Address decode
--------------
* Engine A reads: with ``e8_mode`` (attention) a word address ``>= attn_e8_base`` reads the e8 bank
  (its low bits), else the main bank. The select follows the read's one-cycle latency.
* Engine B reads: the address MSB selects the activation buffer (Kᵀ, V) over the weight buffer
  (:attr:`~m3vit_hw.config.AcceleratorConfig.b_addr_bits`). They read the Q|K|V region's copy (its
  own bank, written with the main bank by
  :func:`~m3vit_hw.attention.attention_layer.connect_qkv_copy`), so the main bank has one read port.
* Side ports (``act_wr``, ``act_rd``, ``res_rd``, ``res_wr``) take the buffer's port from the engine
  while their ``*_own`` input is high: LayerNorm and the patch loader write activations while the
  engine does not, the store DMA and the residual initialisation use the residual buffer while the
  engine does not. The e8 bank's write port belongs to ``e8_wr`` alone, the row table's to ``rt_wr``.
* The parameter buffer's read port goes to ``param_rd`` (raw parameter words) while ``param_rd_own``
  is high (the MoE router reads the gate bias in its gate phase), else to the engine's column
  parameters.
"""

from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..attention.attn_layout import buffer_map
from ..attention.attention_layer import connect_qkv_copy
from ..config import AcceleratorConfig
from ..attention.score_path import mem_addr_width
from ..weights.client import GemmClientSignature, connect_client
from ..weights.weight_path import WeightPath
from ..gemm.epilogue import StreamOutLayout
from ..gemm.gemm_engine import GemmEngine, RowEntryLayout
from ..lib.lane_memory import LaneMemory
from ..lib.mem_port import ReadPortSignature
from ..lib.skid import SkidBuffer
from ..moe.expert_layout import PARAM_LANE_BYTES

__all__ = ["SharedDatapath", "param_half_bytes"]


def _bank(config, bits, depth):
    """A buffer bank of ``depth`` words of ``pe_cols`` signed ``bits``-bit lanes: one memory, or with
    ``config.lane_split`` (where :meth:`~m3vit_hw.config.AcceleratorConfig.lane_split_at` splits
    this width) a :class:`LaneMemory` that fills whole URAM columns."""
    split = config.lane_split_at(bits)
    if split is None:
        return memory.Memory(shape=data.ArrayLayout(signed(bits), config.pe_cols), depth=depth, init=[])
    return LaneMemory(lane_shape=signed(bits), lanes=config.pe_cols, split=split, depth=depth)


def param_half_bytes(config):
    """Bytes of one half of the column-parameter buffer (whole parameter words and memory beats; the
    same rule every layout module uses)."""
    pwb, db = config.param_word_bytes, config.mem_data_bytes
    unit = max(pwb, db)
    return -(-(config.param_buffer_words // 2) * pwb // unit) * unit


class SharedDatapath(wiring.Component):
    """The shared engine, buffers, weight path and read arbiter (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig
    masters : int
        External-memory readers besides the two streamers, in ``[0, 14]``.

    Interface attributes
    --------------------
    client : In(GemmClientSignature(config))
        The active client's engine and weight-streamer port.
    o : Out(stream.Signature(StreamOutLayout(pe_cols, dst_addr_bits)))
        The engine's RAW results (attention scores, router logits).
    masters : In(ReadPortSignature(...)).array(masters)
    mem : Out(ReadPortSignature(...))
        The one external-memory read port.
    e8_mode : In(1)
        Decode engine A reads at ``>= attn_e8_base`` to the e8 bank.
    act_wr, act_rd, res_rd, res_wr : the buffers' side ports (memory-port signatures, ``granularity=1``
        for the writes); each with an ``*_own`` input.
    rt_wr : Out(memory.WritePort.Signature(rowtab_addr_bits, RowEntryLayout(config)))
    e8_wr : Out(memory.WritePort.Signature(e8 address bits, ArrayLayout(signed(8), pe_cols)))
    """

    def __init__(self, config, *, masters=0):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if not isinstance(masters, int) or not 0 <= masters <= 14:
            raise ValueError(f"masters must be an int in [0, 14], not {masters!r}")
        self._config = config
        self._nm = masters
        C = config.pe_cols
        db = config.mem_data_bytes
        port = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self._bm = bm = buffer_map(config)
        self.e8_aw = mem_addr_width(bm.e8_words)
        phalf = param_half_bytes(config)
        self._p_aw = max(1, (phalf // config.param_word_bytes - 1).bit_length())
        self.engine = GemmEngine(config)
        self.weights = WeightPath(config, weight_half_bytes=config.weight_buffer_half_bytes,
                                  param_half_bytes=phalf, param_word_bytes=config.param_word_bytes,
                                  readers=masters)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        #: The buffers (exposed so that simulations can read them back between instructions).
        #: With ``config.act_split_words`` the main bank is two memories: ``act_buffer`` (the words
        #: below the split; a build puts it in URAM) and ``act_buffer_hi`` (the rest, addressed by the
        #: low bits; block RAM), else ``act_buffer`` alone (``act_buffer_hi`` None). With
        #: ``config.lane_split``, ``act_buffer``, ``qkv_buffer`` and ``res_buffer`` are
        #: :class:`~m3vit_hw.lib.lane_memory.LaneMemory` (read back with ``peek_word``).
        split = config.act_split_words
        self.act_buffer = _bank(config, numerics.ACT_BITS, split or config.act_buffer_words)
        self.act_buffer_hi = (memory.Memory(shape=word8, depth=config.act_buffer_words - split, init=[])
                              if split else None)
        #: The copy of the Q|K|V region that the engine's B operand reads (K, V): see below.
        self.qkv_buffer = _bank(config, numerics.ACT_BITS, bm.qkv_words)
        self.e8_buffer = memory.Memory(shape=word8, depth=bm.e8_words, init=[])
        self.res_buffer = _bank(config, numerics.RES_BITS, config.res_buffer_words)
        self.row_table = memory.Memory(shape=RowEntryLayout(config), depth=1 << config.rowtab_addr_bits,
                                       init=[])
        sig = {
            "client": In(GemmClientSignature(config)),
            "o": Out(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "mem": Out(ReadPortSignature(**port)),
            "e8_mode": In(1),
            "act_wr": Out(memory.WritePort.Signature(addr_width=config.act_addr_bits, shape=word8,
                                                     granularity=1)),
            "act_wr_own": In(1),
            "act_rd": Out(memory.ReadPort.Signature(addr_width=config.act_addr_bits, shape=word8)),
            "act_rd_own": In(1),
            "res_rd": Out(memory.ReadPort.Signature(addr_width=config.res_addr_bits, shape=word16)),
            "res_rd_own": In(1),
            "res_wr": Out(memory.WritePort.Signature(addr_width=config.res_addr_bits, shape=word16,
                                                     granularity=1)),
            "res_wr_own": In(1),
            "rt_wr": Out(memory.WritePort.Signature(addr_width=config.rowtab_addr_bits,
                                                    shape=RowEntryLayout(config))),
            "e8_wr": Out(memory.WritePort.Signature(addr_width=self.e8_aw, shape=word8)),
            "param_rd": Out(memory.ReadPort.Signature(addr_width=self._p_aw,
                                                      shape=unsigned(8 * config.param_word_bytes))),
            "param_rd_own": In(1),
        }
        if masters:
            sig["masters"] = In(ReadPortSignature(**port)).array(masters)
        super().__init__(sig)

    @property
    def config(self):
        return self._config

    def elaborate(self, platform):
        m = Module()
        cfg, bm = self._config, self._bm
        C = cfg.pe_cols
        eng = self.engine
        m.submodules.engine = eng
        wp = self.weights
        wp.add_to(m, self.mem)
        for i, master in enumerate(wp.readers):
            wiring.connect(m, wiring.flipped(self.masters[i]), master)
        # Every stream that crosses the client multiplexer goes through a skid buffer (registered
        # valid, payload and ready on both sides), so no ready/valid chain runs from one unit through
        # the multiplexer and the datapath into another unit's logic: the engine's command accept
        # (deep in its loader) no longer reaches the client's FIFOs, the client's command logic no
        # longer reaches the engine's or the streamers' registers, and the RAW consumer's ready no
        # longer reaches the epilogue. One cycle of latency each, full throughput.
        m.submodules.gemm_skid = gsk = SkidBuffer(self.engine.cmd.payload.shape())
        m.submodules.wcmd_skid = wsk = SkidBuffer(wp.wstream.cmd.payload.shape())
        m.submodules.pcmd_skid = psk = SkidBuffer(wp.pstream.cmd.payload.shape())
        m.submodules.o_skid = osk = SkidBuffer(eng.o.payload.shape())
        wiring.connect(m, gsk.o, eng.cmd)
        wiring.connect(m, wsk.o, wp.wstream.cmd)
        wiring.connect(m, psk.o, wp.pstream.cmd)
        # The engine's done and busy reach the client a cycle late, from registers: both are ORs
        # deep in the epilogue's and the loader's state, and every client's control acts on them.
        # They keep their relation (busy is high in the cycle done pulses). A command waiting in its
        # skid buffer, a result beat in the output one, or a command accepted in the previous cycle
        # keeps the client's engine busy: a client that waits for ~gemm_busy (before a GELU-table
        # write, at its end) must not see the engine idle while its command or last result is in
        # flight.
        done_q, busy_q = Signal(), Signal()
        m.d.sync += [done_q.eq(eng.done),
                     busy_q.eq(eng.busy | gsk.o.valid | osk.o.valid | (gsk.i.valid & gsk.i.ready))]
        connect_client(m, wiring.flipped(self.client), eng, wp.wstream, wp.pstream, wp.wbuf, wp.pbuf,
                       gemm=gsk.i, wcmd=wsk.i, pcmd=psk.i, busy=busy_q, done=done_q)
        wiring.connect(m, eng.o, osk.i)
        wiring.connect(m, osk.o, wiring.flipped(self.o))

        # ---- buffers -----------------------------------------------------------------------------
        m.submodules.act = act = self.act_buffer
        m.submodules.e8 = e8 = self.e8_buffer
        m.submodules.res = res = self.res_buffer
        m.submodules.rowtab = rtab = self.row_table
        wiring.connect(m, eng.rowtab_rd, rtab.read_port())
        wiring.connect(m, wiring.flipped(self.rt_wr), rtab.write_port())
        wiring.connect(m, wiring.flipped(self.e8_wr), e8.write_port())

        # A operand (or the side read-back): the main bank, or the e8 bank in attention mode.
        a_main, a_e8 = act.read_port(), e8.read_port()
        a_addr = Mux(self.act_rd_own, self.act_rd.addr, eng.a_rd.addr)
        a_en = Mux(self.act_rd_own, self.act_rd.en, eng.a_rd.en)
        a_sel = Signal()
        a_main_data = a_main.data.as_value()
        split = cfg.act_split_words
        if split:
            # The upper bank: selected (registered with the read, like a_sel) at words >= split;
            # addressed by the low bits. split is a multiple of the bank's power-of-two span and
            # every word lies below split + span, so a word's high bits never exceed split's: they
            # reach split (the word is in the upper bank) exactly when split's one-bits are all set,
            # an AND of a few address bits (W2: 2), not a compare. The write enables below need it
            # behind two owner multiplexers (W2's top missed 300 MHz on the compare, 4 LUT levels).
            m.submodules.act_hi = act_hi = self.act_buffer_hi
            hi_bits = cfg.act_hi_span.bit_length() - 1
            ones = [b for b in range(hi_bits, cfg.act_addr_bits) if split >> b & 1]

            def upper(addr):
                return Cat(*(addr[b] for b in ones)).all()

            a_hi, hi_sel = act_hi.read_port(), Signal()
            a_main_data = Mux(hi_sel, a_hi.data.as_value(), a_main_data)
            m.d.comb += [a_hi.addr.eq(a_addr[:hi_bits]), a_hi.en.eq(a_en)]
            with m.If(a_en):
                m.d.sync += hi_sel.eq(upper(a_addr))
        a_data = Mux(a_sel, a_e8.data.as_value(), a_main_data)
        m.d.comb += [
            a_main.addr.eq(a_addr), a_main.en.eq(a_en),
            a_e8.addr.eq(a_addr[:self.e8_aw]), a_e8.en.eq(a_en),
            eng.a_rd.data.eq(a_data), self.act_rd.data.eq(a_data),
        ]
        # ``a_addr >= e8_base`` on the address bits above e8_base's trailing zeros (the same
        # result): a compare of a few bits instead of a carry chain behind the engine's address adders.
        tz = (bm.e8_base & -bm.e8_base).bit_length() - 1 if bm.e8_base else 0
        with m.If(a_en):
            m.d.sync += a_sel.eq(self.e8_mode & (a_addr[tz:] >= (bm.e8_base >> tz)))

        # B operand: the weight buffer, or (address MSB set) the Q|K|V region's copy (Kᵀ, V), at the
        # address's low bits. B reads nothing else of the activation buffer, so the main bank has one
        # read port (one block-RAM/URAM copy, not one per read port); the copy is the region only.
        m.submodules.qkv = qkv = self.qkv_buffer
        b_main = qkv.read_port()
        b_sel = Signal()
        msb = cfg.b_addr_bits - 1
        wr, pr = wp.wbuf.read, wp.pbuf.read
        m.d.comb += [
            b_main.addr.eq(eng.b_rd.addr[:bm.qkv_bits]), b_main.en.eq(eng.b_rd.en),
            wr.addr.eq(eng.b_rd.addr), wr.en.eq(eng.b_rd.en),
            eng.b_rd.data.eq(Mux(b_sel, b_main.data.as_value(), wr.data)),
        ]
        with m.If(eng.b_rd.en):
            m.d.sync += b_sel.eq(eng.b_rd.addr[msb])

        # Column parameters (lanes unpacked), or the raw words for the MoE router's gate phase.
        m.d.comb += [
            pr.addr.eq(Mux(self.param_rd_own, self.param_rd.addr, eng.colp_rd.addr)),
            pr.en.eq(Mux(self.param_rd_own, self.param_rd.en, eng.colp_rd.en)),
            self.param_rd.data.eq(pr.data),
        ]
        lane = PARAM_LANE_BYTES * 8
        for c in range(C):
            m.d.comb += [
                eng.colp_rd.data[c].bias.eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS]),
                eng.colp_rd.data[c].mult.eq(pr.data[c * lane + 32:c * lane + 32 + numerics.MULT_BITS]),
            ]

        # Side ports.
        act_w = memory.WritePort.Signature(addr_width=cfg.act_addr_bits, shape=act.shape,
                                           granularity=1).create()
        res_w = res.write_port(granularity=1)
        res_r = res.read_port()
        for own, side, engp, port in ((self.act_wr_own, self.act_wr, eng.act_wr, act_w),
                                      (self.res_wr_own, self.res_wr, eng.res_wr, res_w)):
            with m.If(own):
                m.d.comb += [port.addr.eq(side.addr), port.data.eq(side.data), port.en.eq(side.en)]
            with m.Else():
                m.d.comb += [port.addr.eq(engp.addr), port.data.eq(engp.data), port.en.eq(engp.en)]
        # The main bank's write port(s), and the Q|K|V copy's.
        lo_w = act.write_port(granularity=1)
        m.d.comb += [lo_w.addr.eq(act_w.addr), lo_w.data.eq(act_w.data), lo_w.en.eq(act_w.en)]
        if split:
            hi_w = act_hi.write_port(granularity=1)
            hi_hit = upper(act_w.addr)
            m.d.comb += [hi_w.addr.eq(act_w.addr[:hi_bits]), hi_w.data.eq(act_w.data),
                         hi_w.en.eq(Mux(hi_hit, act_w.en, 0)), lo_w.en.eq(Mux(hi_hit, 0, act_w.en))]
        connect_qkv_copy(m, cfg, qkv, act_w)
        m.d.comb += [
            res_r.addr.eq(Mux(self.res_rd_own, self.res_rd.addr, eng.res_rd.addr)),
            res_r.en.eq(Mux(self.res_rd_own, self.res_rd.en, eng.res_rd.en)),
            eng.res_rd.data.eq(res_r.data), self.res_rd.data.eq(res_r.data),
        ]
        return m
