"""``NormStage``: the LayerNorm sub-layer (norm1/norm2): int16 residual rows -> int8 rows in the
activation buffer, with the layer's gain/bias fetched from external memory.

The stage owns no buffer. It reads the residual buffer through a memory read port, writes the
activation buffer through a memory write port (lane-enabled, so it writes only the ``lanes`` values it
has), and fetches the per-layer LayerNorm parameters through an external-memory read port, so the
encoder top (or a shared datapath) keeps the buffers and arbitrates the ports.

Lanes
-----
The :class:`~m3vit_hw.rowops.layernorm.LayerNormUnit` runs ``L = gcd(config.ln_lanes, pe_cols, D)``
values per cycle. A residual word (``C = pe_cols`` lanes) is cut into ``C / L`` beats; the last word of a
row only into the beats that hold channels below ``D`` (so D need not be a multiple of C). Each output
beat is written straight into lanes ``k*L .. k*L+L-1`` of its activation word; the padding lanes of a row's
last word are left untouched (the GEMMs never read them: their ``k`` stops at D).

Parameters in external memory (:func:`pack_norm_params`)
--------------------------------------------------------
``D / L`` *records*, record ``r`` for channels ``r*L .. r*L+L-1``, each ``record_bytes`` (a power of two,
at least one memory beat) at ``base + r * record_bytes``: bytes ``[0, 2L)`` gamma_mult (int16 LE per
lane), ``[2L, 6L)`` beta_int (int32 LE), ``[6L, 6L+4)`` eps_int (uint32 LE), byte ``6L+4`` the shift.
Every record carries eps and shift because the LayerNorm unit loads them with every parameter write.

Sequence (one ``start``)
------------------------
1. read requests of ``min(record beats, largest power of two <= mem_max_burst)`` beats (several
   outstanding; a record is one or more whole requests, so any burst limit works), each record -> one
   parameter write;
2. rows ``0 .. T-1``: residual word ``src_base + t*row_words + w`` -> LayerNorm -> activation word
   ``dst_base + t*dst_stride + w``; reads run one word per cycle when ``L = C``. The beats reach the
   LayerNorm unit through a skid buffer and the activation write port is registered (one cycle
   each), so every signal the stage drives into the shared buffers is a flip-flop or one LUT of them;
3. ``done`` pulses after the last write.

``cycles`` counts start .. done (reset by start).
"""


import numpy as np
from amaranth.hdl import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..lib.mem_port import ReadPortSignature
from ..lib.skid import SkidBuffer
from ..rowops.layernorm import SHIFT_BITS, LayerNormUnit

__all__ = ["NormStage", "NormStartLayout", "norm_lanes", "norm_record_bytes", "pack_norm_params"]


def norm_lanes(config):
    """Values per cycle of the stage's LayerNorm unit (:attr:`AcceleratorConfig.norm_lanes`:
    ``gcd(ln_lanes, pe_cols, dim)``)."""
    return config.norm_lanes


def norm_record_bytes(config):
    """Bytes of one parameter record (:attr:`AcceleratorConfig.norm_record_bytes`: ``6*lanes + 5``
    rounded up to a power of two >= ``mem_data_bytes``)."""
    return config.norm_record_bytes


def pack_norm_params(qln, config):
    """One LayerNorm's parameters (a :class:`reference.qparams.QLayerNorm`) as the stage's records
    (``config.model.dim`` channels, ``config.norm_lanes`` a record)."""
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    dim, lanes = config.model.dim, config.norm_lanes
    gamma = np.asarray(qln.gamma_mult, dtype=np.int64).reshape(-1)
    beta = np.asarray(qln.beta_int, dtype=np.int64).reshape(-1)
    if gamma.shape != (dim,) or beta.shape != (dim,):
        raise ValueError(f"qln must have gamma_mult and beta_int of {dim} channels, not {gamma.shape} and "
                         f"{beta.shape}")
    glo, ghi = numerics.int_range(numerics.LN_GAMMA_BITS)
    blo, bhi = numerics.int_range(numerics.LN_BETA_BITS)
    if gamma.min() < glo or gamma.max() > ghi or beta.min() < blo or beta.max() > bhi:
        raise ValueError("gamma_mult must be int16 and beta_int int32")
    if not 0 <= int(qln.eps_int) < 1 << numerics.LN_EPS_BITS:
        raise ValueError(f"eps_int must be in [0, 2**{numerics.LN_EPS_BITS}), not {qln.eps_int}")
    if not 0 <= int(qln.shift) <= numerics.SHIFT_MAX:
        raise ValueError(f"shift must be in [0, {numerics.SHIFT_MAX}], not {qln.shift}")
    rb = config.norm_record_bytes
    out = bytearray(dim // lanes * rb)
    for r in range(dim // lanes):
        at = r * rb
        ch = slice(r * lanes, (r + 1) * lanes)
        out[at:at + 2 * lanes] = (gamma[ch] & 0xFFFF).astype("<u2").tobytes()
        out[at + 2 * lanes:at + 6 * lanes] = (beta[ch] & 0xFFFFFFFF).astype("<u4").tobytes()
        out[at + 6 * lanes:at + 6 * lanes + 4] = int(qln.eps_int).to_bytes(4, "little")
        out[at + 6 * lanes + 4] = int(qln.shift)
    return bytes(out)


class NormStartLayout(data.StructLayout):
    """``tokens`` in ``[1, token_capacity]``; ``param_base`` (external byte address of the records, a
    multiple of ``record_bytes``); ``src_base`` (residual word of row 0); ``dst_base``, ``dst_stride``
    (activation word of row 0 and the row pitch in words)."""

    def __init__(self, config, addr_width):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "param_base": unsigned(addr_width),
            "src_base": unsigned(config.res_addr_bits),
            "dst_base": unsigned(config.act_addr_bits),
            "dst_stride": unsigned(config.act_addr_bits),
        })


class NormStage(wiring.Component):
    """LayerNorm sub-layer over memory ports (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig
        Also the external-memory read port (a record fits one burst: the config checks it) and the
        width of ``cycles`` (``counter_width``).

    Interface attributes
    --------------------
    start : In(stream.Signature(NormStartLayout(config, config.mem_addr_width)))
        Accepted when idle.
    done : Out(1)
        Pulses after the last activation write.
    busy : Out(1)
    mem : Out(ReadPortSignature(...))
        Parameter records.
    res_rd : In(memory.ReadPort.Signature(res_addr_bits, ArrayLayout(signed(16), pe_cols)))
        Driven by the stage (``addr``, ``en``); data one cycle after ``en``, held while ``en`` is low.
    act_wr : In(memory.WritePort.Signature(act_addr_bits, ArrayLayout(signed(8), pe_cols), granularity=1))
    cycles : Out(counter_width)

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig` (every size was checked by the config).
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._lanes = config.norm_lanes
        self._rec_bytes = config.norm_record_bytes
        self.ln = LayerNormUnit(config.model.dim, self._lanes)
        self._config = config
        self._db = config.mem_data_bytes
        mem_addr_width, counter_width = config.mem_addr_width, config.counter_width
        C = config.pe_cols
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        port = dict(addr_width=mem_addr_width, data_bytes=config.mem_data_bytes,
                    max_burst=config.mem_max_burst)
        super().__init__({
            "start": In(stream.Signature(NormStartLayout(config, mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(**port)),
            "res_rd": In(memory.ReadPort.Signature(addr_width=config.res_addr_bits, shape=word16)),
            "act_wr": In(memory.WritePort.Signature(addr_width=config.act_addr_bits, shape=word8,
                                                    granularity=1)),
            "cycles": Out(counter_width),
        })

    @property
    def config(self):
        return self._config

    @property
    def lanes(self):
        return self._lanes

    @property
    def record_bytes(self):
        return self._rec_bytes

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        C, L, D = cfg.pe_cols, self._lanes, cfg.model.dim
        S = C // L                                   # LayerNorm beats per residual word
        rw = cfg.row_words
        nrec = D // L
        rec_beats = self._rec_bytes // self._db
        m.submodules.ln = ln = self.ln

        prm = Signal(NormStartLayout(cfg, len(self.mem.req.payload.addr)))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += [self.start.ready.eq(~running), self.busy.eq(running)]
        with m.If(start):
            m.d.sync += [prm.eq(self.start.payload), running.eq(1)]

        # ---- parameter records: whole requests, beats assembled into a record ------------------
        # A request is the record, or a power-of-two part of it when the port's bursts are shorter:
        # parts are aligned to their size (records are aligned to theirs), so none crosses 4 KiB.
        req_beats = min(rec_beats, 1 << (cfg.mem_max_burst.bit_length() - 1))
        nreq = nrec * (rec_beats // req_beats)
        req_n = Signal(range(nreq + 1))
        m.d.comb += [
            self.mem.req.valid.eq(running & (req_n != nreq)),
            self.mem.req.payload.addr.eq(prm.param_base + req_n * (req_beats * self._db)),
            self.mem.req.payload.beats.eq(req_beats),
        ]
        with m.If(start):
            m.d.sync += req_n.eq(0)
        with m.Elif(self.mem.req.valid & self.mem.req.ready):
            m.d.sync += req_n.eq(req_n + 1)
        beat_bits = self._db * 8
        rec = Signal(rec_beats * beat_bits)
        rec_full = Signal()
        rec_beat = Signal(range(rec_beats))
        rec_n = Signal(range(nrec + 1))              # records written to the LayerNorm unit
        resp = self.mem.resp
        m.d.comb += resp.ready.eq(~rec_full)
        with m.If(resp.valid & resp.ready):
            # Beats shift in from the top, so the record's first beat ends up at bit 0.
            if rec_beats > 1:
                m.d.sync += rec.eq(Cat(rec[beat_bits:], resp.payload.data))
            else:
                m.d.sync += rec.eq(resp.payload.data)
            m.d.sync += rec_beat.eq(Mux(rec_beat == rec_beats - 1, 0, rec_beat + 1))
            with m.If(rec_beat == rec_beats - 1):
                m.d.sync += rec_full.eq(1)
        pw = ln.param
        m.d.comb += [pw.valid.eq(rec_full), pw.payload.addr.eq(rec_n)]
        for j in range(L):
            m.d.comb += [
                pw.payload.gamma[j].eq(rec[16 * j:16 * j + numerics.LN_GAMMA_BITS]),
                pw.payload.beta[j].eq(rec[16 * L + 32 * j:16 * L + 32 * j + numerics.LN_BETA_BITS]),
            ]
        m.d.comb += [
            pw.payload.eps.eq(rec[48 * L:48 * L + numerics.LN_EPS_BITS]),
            pw.payload.shift.eq(rec[48 * L + 32:48 * L + 32 + SHIFT_BITS]),
        ]
        with m.If(pw.valid & pw.ready):
            m.d.sync += [rec_full.eq(0), rec_n.eq(rec_n + 1)]
        with m.If(start):
            m.d.sync += [rec_n.eq(0), rec_full.eq(0), rec_beat.eq(0)]
        params_done = rec_n == nrec

        # ---- reader: residual words -> LayerNorm beats ------------------------------------------
        # The read port's data holds while ``en`` is low, so it is the word register: the next word is
        # read in the cycle the current one's last beat transfers. The beats go to the LayerNorm unit
        # through a skid buffer, so the read enable (which the encoder top multiplexes into the
        # residual buffer) is one LUT of flip-flops: the skid's registered ``ready``, ``have``,
        # ``at_last`` and ``reading``, not the unit's input handshake (a decode of its own state).
        rd_w = Signal(range(rw))
        rows_left = Signal(range(cfg.token_capacity + 1))   # rows whose words remain to be read
        rd_addr = Signal(cfg.res_addr_bits)
        have = Signal()                               # res_rd.data holds an unconsumed word
        cur_last_sub = Signal(range(S))               # index of the word's last valid beat
        sub = Signal(range(S))
        at_last = Signal()                            # sub == cur_last_sub, kept as a flag
        reading = Signal()                            # rows remain to be read (parameters are in)
        word = self.res_rd.data
        m.submodules.in_skid = isk = SkidBuffer(ln.i.payload.shape())
        wiring.connect(m, isk.o, ln.i)
        m.d.comb += isk.i.valid.eq(have)
        with m.Switch(sub):
            for k in range(S):
                with m.Case(k):
                    for j in range(L):
                        m.d.comb += isk.i.payload[j].eq(word[k * L + j])
        beat_go = isk.i.valid & isk.i.ready
        word_end = beat_go & at_last
        fetch = reading & (~have | word_end)
        m.d.comb += [self.res_rd.addr.eq(rd_addr), self.res_rd.en.eq(fetch)]
        # Valid beats of word w: all S, except the row's last word (channels below D only).
        last_w_subs = -(-(D - (rw - 1) * C) // L)
        with m.If(fetch):
            m.d.sync += [have.eq(1), sub.eq(0), rd_addr.eq(rd_addr + 1),
                         cur_last_sub.eq(Mux(rd_w == rw - 1, last_w_subs - 1, S - 1)),
                         at_last.eq(Mux(rd_w == rw - 1, last_w_subs == 1, S == 1))]
            with m.If(rd_w == rw - 1):
                m.d.sync += [rd_w.eq(0), rows_left.eq(rows_left - 1)]
                with m.If(rows_left == 1):
                    m.d.sync += reading.eq(0)
            with m.Else():
                m.d.sync += rd_w.eq(rd_w + 1)
        with m.Elif(word_end):
            m.d.sync += have.eq(0)
        with m.Elif(beat_go):
            m.d.sync += [sub.eq(sub + 1), at_last.eq(sub + 1 == cur_last_sub)]
        # Rows are read once every parameter record is in the unit (``tokens`` >= 1).
        with m.If(pw.valid & pw.ready & (rec_n == nrec - 1)):
            m.d.sync += reading.eq(1)
        with m.If(start):
            m.d.sync += [rows_left.eq(self.start.payload.tokens), rd_w.eq(0),
                         rd_addr.eq(self.start.payload.src_base), have.eq(0), reading.eq(0)]

        # ---- writer: LayerNorm beats -> lanes of activation words -------------------------------
        # The write port is registered (address, lane enables, data): the encoder top multiplexes it
        # into the activation buffer's bank and Q|K|V-copy decodes, which then start at flip-flops.
        wr_t = Signal(range(cfg.token_capacity + 1))
        wr_w = Signal(range(rw))
        wr_sub = Signal(range(S))
        row_addr = Signal(cfg.act_addr_bits)
        w_addr = Signal(cfg.act_addr_bits)
        w_en = Signal(S)                              # one-hot: the beat's lanes in the word
        w_data = Signal(data.ArrayLayout(signed(numerics.ACT_BITS), L))
        m.d.comb += ln.o.ready.eq(1)
        out_go = ln.o.valid
        m.d.sync += [w_addr.eq(row_addr + wr_w), w_data.eq(ln.o.payload),
                     w_en.eq(Mux(out_go, 1 << wr_sub, 0))]
        m.d.comb += self.act_wr.addr.eq(w_addr)
        for k in range(S):
            m.d.comb += self.act_wr.en[k * L:(k + 1) * L].eq(w_en[k].replicate(L))
            for j in range(L):
                m.d.comb += self.act_wr.data[k * L + j].eq(w_data[j])
        row_end = (wr_w == rw - 1) & (wr_sub == last_w_subs - 1)
        with m.If(out_go):
            with m.If(row_end):
                m.d.sync += [wr_sub.eq(0), wr_w.eq(0), wr_t.eq(wr_t + 1), row_addr.eq(row_addr + prm.dst_stride)]
            with m.Elif(wr_sub == S - 1):
                m.d.sync += [wr_sub.eq(0), wr_w.eq(wr_w + 1)]
            with m.Else():
                m.d.sync += wr_sub.eq(wr_sub + 1)
        with m.If(start):
            m.d.sync += [wr_t.eq(0), wr_w.eq(0), wr_sub.eq(0), row_addr.eq(self.start.payload.dst_base)]
        # ``done`` waits for the registered write of the last beat (``w_en`` clear again).
        with m.If(running & (wr_t == prm.tokens) & params_done & (req_n == nreq) & (w_en == 0)):
            m.d.sync += running.eq(0)
            m.d.comb += self.done.eq(1)

        with m.If(start):
            m.d.sync += self.cycles.eq(0)
        with m.Elif(running):
            m.d.sync += self.cycles.eq(self.cycles + 1)
        return m
