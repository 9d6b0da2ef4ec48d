"""``StoreDma``: the ``STORE`` instruction, residual words -> the external-memory write port.

Residual word ``res_base + i`` (``pe_cols`` int16 lanes, little-endian) lands at byte
``addr + i * 2 * pe_cols`` (the layout :func:`sim.program_executor.read_tokens` and the driver read).
Words are cut into (``2*C > data_bytes``) or packed into (``2*C <= data_bytes``) memory beats; a final
partial beat is written with byte strobes. Requests are bursts of at most ``mem_max_burst`` beats that
never cross a 4 KiB boundary (:class:`~m3vit_hw.lib.burst_requester.BurstRequester`); ``addr`` is a
multiple of the beat. ``done`` pulses once every request's response is back.

One residual word is read every ``max(1, 2C / data_bytes) + 1`` cycles or so: a ``STORE`` of a
whole frame is a few hundred cycles, far below the rest of the frame, so the unit is kept simple.
"""

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..lib.burst_requester import BurstRequester
from ..lib.mem_port import WritePortSignature

__all__ = ["StoreDma", "StoreLayout"]


class StoreLayout(data.StructLayout):
    """``res_base`` (first residual word), ``words`` (count, >= 1), ``addr`` (beat-aligned bytes)."""

    def __init__(self, config):
        super().__init__({
            "res_base": unsigned(config.res_addr_bits),
            "words": range(config.res_buffer_words + 1),
            "addr": unsigned(config.mem_addr_width),
        })


class StoreDma(wiring.Component):
    """Residual buffer -> external memory (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig

    Interface attributes
    --------------------
    start : In(stream.Signature(StoreLayout(config)))
    done, busy : Out(1)
    res_rd : In(memory.ReadPort.Signature(res_addr_bits, ArrayLayout(signed(16), pe_cols)))
        Driven by the DMA.
    wr : Out(WritePortSignature(...))
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        db = config.mem_data_bytes
        wb = config.pe_cols * numerics.RES_BITS // 8
        self._wb = wb
        self._max_beats = -(-config.res_buffer_words * wb // db)
        port = dict(addr_width=config.mem_addr_width, data_bytes=db, max_burst=config.mem_max_burst)
        self.requester = BurstRequester(**port, max_beats=self._max_beats)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), config.pe_cols)
        super().__init__({
            "start": In(stream.Signature(StoreLayout(config))),
            "done": Out(1),
            "busy": Out(1),
            "res_rd": In(memory.ReadPort.Signature(addr_width=config.res_addr_bits, shape=word16)),
            "wr": Out(WritePortSignature(**port)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        db, wb = cfg.mem_data_bytes, self._wb
        g = min(db, wb)                       # bytes per chunk
        wchunks, bchunks = wb // g, db // g   # chunks per residual word / per beat
        lg = (wb // g).bit_length() - 1
        lb = bchunks.bit_length() - 1
        m.submodules.requester = rq = self.requester
        prm = Signal(StoreLayout(cfg))
        running = Signal()
        start = self.start.valid & self.start.ready
        m.d.comb += [self.start.ready.eq(~running), self.busy.eq(running)]

        # ---- requests ------------------------------------------------------------------------------
        issued = Signal()
        total_beats = Signal(range(self._max_beats + 1))
        m.d.comb += [rq.cmd.valid.eq(running & ~issued), rq.cmd.payload.addr.eq(prm.addr),
                     rq.cmd.payload.beats.eq(total_beats)]
        req = self.wr.req
        m.d.comb += [req.valid.eq(rq.req.valid), req.payload.addr.eq(rq.req.payload.addr),
                     req.payload.beats.eq(rq.req.payload.beats), rq.req.ready.eq(req.ready)]
        reqs = Signal(range(self._max_beats + 1))       # requests sent, responses outstanding
        resp = self.wr.resp
        m.d.comb += resp.ready.eq(1)
        sent = req.valid & req.ready
        got = resp.valid
        with m.If(start):
            m.d.sync += [prm.eq(self.start.payload), running.eq(1), issued.eq(0), reqs.eq(0),
                         total_beats.eq(((self.start.payload.words << lg) + (bchunks - 1)) >> lb)]
        with m.Else():
            with m.If(rq.cmd.valid & rq.cmd.ready):
                m.d.sync += issued.eq(1)
            m.d.sync += reqs.eq(reqs + sent - got)

        # ---- data: read a word, cut it into chunks, pack the chunks into beats ---------------------
        rd = self.res_rd
        left = Signal(range(cfg.res_buffer_words + 1))  # words not yet read
        raddr = Signal(cfg.res_addr_bits)
        word = Signal(8 * wb)
        wchunk = Signal(range(wchunks + 1))              # chunks of ``word`` still to move
        beat = Signal(8 * db)
        strb = Signal(db)
        bfill = Signal(range(bchunks + 1))
        pending = Signal()                               # a read was issued last cycle
        dv = self.wr.data
        out_full = dv.valid
        m.d.comb += [dv.payload.data.eq(beat), dv.payload.strb.eq(strb)]
        with m.If(dv.valid & dv.ready):
            m.d.sync += [dv.valid.eq(0), bfill.eq(0), strb.eq(0)]
        # ``left != 0`` and ``wchunk == 0`` are kept as flags, so the read enable (which the encoder
        # top multiplexes into the residual buffer) is one LUT of flip-flops. A read never coincides
        # with ``start`` (it needs ``running``).
        left_nz = Signal()
        wchunk_z = Signal(init=1)
        can_read = running & left_nz & wchunk_z & ~pending
        m.d.comb += [rd.addr.eq(raddr), rd.en.eq(can_read)]
        with m.If(start):
            m.d.sync += [left.eq(self.start.payload.words), raddr.eq(self.start.payload.res_base),
                         left_nz.eq(self.start.payload.words != 0), wchunk_z.eq(1),
                         wchunk.eq(0), bfill.eq(0), strb.eq(0), pending.eq(0), dv.valid.eq(0)]
        with m.Else():
            # Read the next word when the previous one is used up.
            m.d.sync += pending.eq(can_read)
            with m.If(can_read):
                m.d.sync += [raddr.eq(raddr + 1), left.eq(left - 1), left_nz.eq(left != 1)]
            with m.If(pending):
                m.d.sync += [word.eq(rd.data), wchunk.eq(wchunks), wchunk_z.eq(0)]
            # Move one chunk into the beat while the beat register is free.
            with m.Elif(~wchunk_z & ~out_full):
                shift = (bfill * (8 * g))
                m.d.sync += [beat.eq(beat | (word[:8 * g] << shift)),
                             strb.eq(strb | (((1 << g) - 1) << (bfill * g))),
                             word.eq(word >> (8 * g)), wchunk.eq(wchunk - 1), bfill.eq(bfill + 1),
                             wchunk_z.eq(wchunk == 1)]
                last = (wchunk == 1) & (left == 0)
                with m.If((bfill == bchunks - 1) | last):
                    m.d.sync += dv.valid.eq(1)
            with m.If(dv.valid & dv.ready):
                m.d.sync += beat.eq(0)

        with m.If(running & issued & (left == 0) & (wchunk == 0) & ~pending & ~dv.valid
                  & rq.cmd.ready & ~req.valid & (reqs == 0) & (bfill == 0)):
            m.d.sync += running.eq(0)
            m.d.comb += self.done.eq(1)
        return m
