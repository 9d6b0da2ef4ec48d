"""``PatchLoader``: unfolds the camera image in external memory into patch rows of the activation buffer.

The image is the camera's uint8 RGB frame, row-major HWC: pixel ``(y, x)`` channel ``c`` is the byte at
``img_base + (y * W + x) * Cin + c``. Unfolding is the loader's address pattern, not host
preprocessing: patch ``(py, px)`` (raster order) is ``p`` *runs* of ``p * Cin`` contiguous bytes, run
``kh`` at ``img_base + ((py*p + kh) * W + px*p) * Cin``. A patch row therefore holds its
``K = p * p * Cin`` features in ``(kh, kw, c)`` order; the embedding layout
(:mod:`m3vit_hw.dense.embed_layout`) orders the patch-embedding weight's columns the same way, so the
GEMM is unchanged. Every byte becomes the int8 ``pixel - 128`` (its top bit flipped), the encoder's
input format (``reference.quantize.quantize_image``).

Runs need not be aligned to the memory beat: each run reads the aligned beats that cover it (bursts
split at ``max_burst`` and at 4 KiB boundaries by :class:`BurstRequester`) and a byte gearbox keeps
only the run's bytes, packing them ``pe_cols`` to an activation word: up to ``min(pe_cols, data_bytes) / 2``
bytes per cycle. The gearbox is three register stages (a beat with its byte bounds, in a skid buffer; the run's bytes
moved to byte 0; appended to the word being packed, or a word emitted), so a 16-byte beat into 16-lane words moves 8 bytes a cycle.
The activation write port is a register stage of its own (a word is written the cycle after it is packed).
Patch row ``r`` of a command goes to words ``dst_base + r * dst_stride + 0 ..
ceil(K / C) - 1`` (the last word's lanes past K hold junk the GEMM never reads).
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..lib.burst_requester import BurstRequester
from ..lib.mem_port import ReadPortSignature
from ..lib.skid import SkidBuffer
from ..rowops.counts import ShiftQueue

__all__ = ["PatchLoader", "PatchLoadLayout"]


class PatchLoadLayout(data.StructLayout):
    """A load command: ``count`` patch rows (the next ones in raster order, or from patch 0 with
    ``restart``, which also takes ``img_base``) to activation words ``dst_base + r * dst_stride``."""

    def __init__(self, config, addr_width):
        super().__init__({
            "img_base": unsigned(addr_width),
            "restart": 1,
            "count": range(config.model.patches + 1),
            "dst_base": unsigned(config.act_addr_bits),
            "dst_stride": unsigned(config.act_addr_bits),
        })


class PatchLoader(wiring.Component):
    """Image -> patch rows (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig
        ``model.img_size``, ``patch_size``, ``in_chans``; ``pe_cols``; ``act_addr_bits``; the
        external-memory read port (``mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``).

    Interface attributes
    --------------------
    cmd : In(stream.Signature(PatchLoadLayout(config, config.mem_addr_width)))
        Through a :class:`~m3vit_hw.lib.skid.SkidBuffer` (registered ``ready``; up to two commands
        wait in it); a command starts one cycle after its accept at the earliest, when the loader is
        idle.
    done : Out(1)
        Pulses when a command's last row is written.
    busy : Out(1)
        A command is waiting or running.
    mem : Out(ReadPortSignature(...))
    act_wr : In(memory.WritePort.Signature(act_addr_bits, ArrayLayout(signed(8), pe_cols), granularity=1))
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        # The config checked that mem_addr_width addresses a whole frame (frame_bytes).
        m = config.model
        mem_addr_width, mem_data_bytes = config.mem_addr_width, config.mem_data_bytes
        mem_max_burst = config.mem_max_burst
        self._config = config
        self._aw, self._db, self._mb = mem_addr_width, mem_data_bytes, mem_max_burst
        run = m.patch_size * m.in_chans
        self._run_beats_max = -(-(mem_data_bytes - 1 + run) // mem_data_bytes)
        self.requester = BurstRequester(addr_width=mem_addr_width, data_bytes=mem_data_bytes,
                                        max_burst=mem_max_burst, max_beats=self._run_beats_max)
        C = config.pe_cols
        super().__init__({
            "cmd": In(stream.Signature(PatchLoadLayout(config, mem_addr_width))),
            "done": Out(1),
            "busy": Out(1),
            "mem": Out(ReadPortSignature(addr_width=mem_addr_width, data_bytes=mem_data_bytes,
                                         max_burst=mem_max_burst)),
            "act_wr": In(memory.WritePort.Signature(addr_width=config.act_addr_bits,
                                                    shape=data.ArrayLayout(signed(numerics.ACT_BITS), C),
                                                    granularity=1)),
        })

    @property
    def config(self):
        return self._config

    @property
    def row_words(self):
        """Activation words per patch row, ``ceil(K / pe_cols)``."""
        return -(-self._config.model.patch_dim // self._config.pe_cols)

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        mc = cfg.model
        C, db, aw = cfg.pe_cols, self._db, self._aw
        lb = db.bit_length() - 1
        p, cin = mc.patch_size, mc.in_chans
        H, W = mc.img_size
        gw = mc.grid[1]
        run = p * cin                               # bytes per run
        kw = self.row_words
        rbm = self._run_beats_max
        m.submodules.requester = rq = self.requester
        wiring.connect(m, rq.req, wiring.flipped(self.mem.req))

        c = Signal(PatchLoadLayout(cfg, aw))
        gen_active = Signal()                       # runs of the command still to issue
        rx_active = Signal()                        # rows of the command still to write
        w_en = Signal()                             # the registered write port writes a word
        # The command enters through a skid buffer: the sequencer's valid (a decode of its own state)
        # and the accept's fan-out (every generator and writer register, the run count's multiply)
        # are then in different cycles. A command waiting in it counts as busy.
        m.submodules.cmd_skid = csk = SkidBuffer(self.cmd.payload.shape())
        wiring.connect(m, wiring.flipped(self.cmd), csk.i)
        cmd = csk.o
        m.d.comb += [cmd.ready.eq(~gen_active & ~rx_active),
                     self.busy.eq(gen_active | rx_active | cmd.valid | w_en)]

        # ---- run generator ---------------------------------------------------------------------
        kh = Signal(range(p))
        px = Signal(range(gw))
        prow_addr = Signal(aw)                      # (py*p, 0)
        patch_addr = Signal(aw)                     # (py*p, px*p)
        run_addr = Signal(aw)                       # (py*p + kh, px*p)
        runs_left = Signal(range(mc.patches * p + 1))
        # A run's descriptor: its first beat's first byte and its last beat's end (both within a beat).
        # ``last_b`` (beats - 1) is stored too, so the response side's "last beat of the run" compares
        # two registers (no decrement in front of the descriptor FIFO's read enable).
        # ``n0`` (the run's bytes in its first beat, min(run, db - lo)) is stored too, so the response
        # side's byte count of a beat is a select of registers and constants (no subtraction).
        desc = data.StructLayout({"lo": range(db), "hi": range(1, db + 1), "beats": range(rbm + 1),
                                  "last_b": range(rbm + 1), "row_last": 1, "n0": range(db + 1)})
        # Five runs in flight: with short runs the loader is bound by the request round trip over
        # this depth (four, before the response skid buffer added a cycle to that round trip).
        # In flip-flops with a thermometer count (ShiftQueue): a SyncFIFOBuffered's level adder sat
        # behind the response side's read enable (the W1 top's rx_active -> descs.inner_level path).
        m.submodules.descs = dq = ShiftQueue(desc.size, 5)
        off = Signal(range(db))
        m.d.comb += off.eq(run_addr[:lb] if lb else 0)
        d_in = Signal(desc)
        end_low = (off + (run - 1))[:lb] if lb else 0
        m.d.comb += [d_in.lo.eq(off), d_in.hi.eq(end_low + 1), d_in.beats.eq((off + run + db - 1) >> lb),
                     d_in.last_b.eq((off + run - 1) >> lb),
                     d_in.n0.eq(Mux(off + run <= db, run, db - off)),
                     d_in.row_last.eq(kh == p - 1)]
        # The descriptor and the request's address are registered from the run address (the requester
        # subtracts from ``beats`` at its command: no adder chain into it). They are stale for the cycle
        # after an issue or a command, when the run address moves; ``d_ok`` blocks that cycle, which the
        # requester's own gap between commands (at least three cycles) hides.
        d_r = Signal(desc)
        a_r = Signal(aw)
        d_ok = Signal()
        issue = gen_active & d_ok & dq.w_rdy & rq.cmd.ready
        m.d.sync += [d_r.eq(d_in), a_r.eq(run_addr & ~(db - 1)),
                     d_ok.eq(~issue & ~(cmd.valid & cmd.ready))]
        m.d.comb += [
            rq.cmd.valid.eq(gen_active & d_ok & dq.w_rdy),
            rq.cmd.payload.addr.eq(a_r),
            rq.cmd.payload.beats.eq(d_r.beats),
            dq.w_data.eq(d_r),
            dq.w_en.eq(issue),
        ]
        row_bytes = W * cin
        # The generator's next state (after an issue) is registered from its current state, so an
        # issue (the descriptor FIFO's room and the requester's ready) only enables registers: no
        # adder or select stands between it and them. The next state is stale for the cycle after
        # an issue or a command, which ``d_ok`` blocks.
        n_kh, n_px = Signal.like(kh), Signal.like(px)
        n_prow, n_patch, n_run = Signal(aw), Signal(aw), Signal(aw)
        n_left = Signal.like(runs_left)
        n_last = Signal()                           # the issue is the command's last run
        m.d.sync += [n_left.eq(runs_left - 1), n_last.eq(runs_left == 1)]
        with m.If(kh != p - 1):
            m.d.sync += [n_kh.eq(kh + 1), n_px.eq(px), n_prow.eq(prow_addr), n_patch.eq(patch_addr),
                         n_run.eq(run_addr + row_bytes)]
        with m.Elif(px == gw - 1):
            nxt = prow_addr + p * row_bytes
            m.d.sync += [n_kh.eq(0), n_px.eq(0), n_prow.eq(nxt), n_patch.eq(nxt), n_run.eq(nxt)]
        with m.Else():
            m.d.sync += [n_kh.eq(0), n_px.eq(px + 1), n_prow.eq(prow_addr), n_patch.eq(patch_addr + run),
                         n_run.eq(patch_addr + run)]
        with m.If(issue):
            m.d.sync += [runs_left.eq(n_left), kh.eq(n_kh), px.eq(n_px), prow_addr.eq(n_prow),
                         patch_addr.eq(n_patch), run_addr.eq(n_run)]
            with m.If(n_last):
                m.d.sync += gen_active.eq(0)

        # ---- stage 1: a beat with the bounds of the run's bytes in it ----------------------------
        # The response enters through a skid buffer of its own: the read arbiter's response valid is
        # a decode of its routing FIFO, and behind it the descriptor FIFO's read and the stage
        # register's load would chain into it; both now start at flip-flops (one cycle of latency).
        m.submodules.resp_skid = rsk = SkidBuffer(self.mem.resp.payload.shape())
        wiring.connect(m, wiring.flipped(self.mem.resp), rsk.i)
        resp = rsk.o
        cur = Signal(desc)
        m.d.comb += cur.eq(dq.r_data)
        b = Signal(range(rbm + 1))                  # beat index within the run
        last_beat = b == cur.last_b
        # The stage register is a skid buffer: its ``ready`` is a flip-flop, so the response's ready and
        # the descriptor FIFO's read enable do not wait on the take / emit chain of stages 2 and 3.
        # ``n`` = hi - lo (the run's bytes in the beat), selected here: stage 2 then keeps byte i of the
        # beat shifted down by lo iff i < n (a compare with a constant), with no lo/hi mask compares
        # in front of its shift.
        qlay = data.StructLayout({"data": 8 * db, "lo": range(db), "n": range(db + 1), "row_end": 1})
        m.submodules.qbuf = qbuf = SkidBuffer(qlay)
        q_valid = qbuf.o.valid
        q_data, q_lo, q_n = qbuf.o.payload.data, qbuf.o.payload.lo, qbuf.o.payload.n
        q_row_end = qbuf.o.payload.row_end
        q_take = Signal()
        m.d.comb += [
            resp.ready.eq(rx_active & dq.r_rdy & qbuf.i.ready),
            qbuf.i.valid.eq(resp.valid & rx_active & dq.r_rdy),
            qbuf.i.payload.data.eq(resp.payload.data),
            qbuf.i.payload.lo.eq(Mux(b == 0, cur.lo, 0)),
            qbuf.i.payload.n.eq(Mux(b == 0, cur.n0, Mux(last_beat, cur.hi, db))),
            qbuf.i.payload.row_end.eq(last_beat & cur.row_last),
            qbuf.o.ready.eq(q_take),
        ]
        with m.If(resp.valid & resp.ready):
            with m.If(last_beat):
                m.d.sync += b.eq(0)
                m.d.comb += dq.r_en.eq(1)
            with m.Else():
                m.d.sync += b.eq(b + 1)

        # ---- stage 2: the run's bytes moved to byte 0, the rest cleared --------------------------
        fill_ge = Signal()                          # fill >= C and fill != 0 (stage 3, registered)
        fill_nz = Signal()
        row_in_done = Signal()                      # stage 3 holds the row's last bytes
        p_valid = Signal()
        p_data = Signal(8 * db)
        p_n = Signal(range(db + 1))
        p_row_end = Signal()
        p_take = Signal()
        # Stage 3 takes unless it emits or holds a finished row; under ``~row_in_done`` it emits only
        # when full. Written out from the registers (not through ``p_take``), so that the skid buffer's
        # ready sees one LUT of this chain.
        s3_free = ~row_in_done & ~(rx_active & fill_ge)
        m.d.comb += q_take.eq(q_valid & (~p_valid | s3_free))
        shifted = Signal(8 * db)
        kept = Signal(8 * db)
        m.d.comb += shifted.eq(q_data >> (q_lo * 8))
        for i in range(db):
            # Byte i of the shifted beat is byte lo + i of the beat: the run's iff lo + i < hi, i.e.
            # i < n; the others belong to other runs (or to nothing) and are cleared.
            m.d.comb += kept[8 * i:8 * i + 8].eq(Mux(q_n > i, shifted[8 * i:8 * i + 8], 0))
        with m.If(q_take):
            m.d.sync += [p_valid.eq(1), p_data.eq(kept), p_n.eq(q_n),
                         p_row_end.eq(q_row_end)]
        with m.Elif(p_take):
            m.d.sync += p_valid.eq(0)

        # ---- stage 3: append to the word being packed, or emit a word (never both) ---------------
        fill = Signal(range(C + db))
        fill_next = Signal.like(fill)
        acc = Signal(8 * (C + db))
        wcnt = Signal(range(kw + 1))
        rows_left = Signal(range(mc.patches + 1))
        dst_row = Signal(cfg.act_addr_bits)
        # ``fill >= C`` and ``fill != 0`` as flags registered with ``fill``, so that ``emit`` is one LUT
        # at the head of the take / ready chain back to the response and the FIFO. Each branch's flags
        # come straight from its own terms (no compare behind the next-fill mux): a take adds at most
        # db bytes to fill < C, so with C a power of two >= db the sum's bit log2(C) is ``>= C``.
        m.d.comb += fill_next.eq(fill)
        sum_take = Signal(range(C + 2 * db + 1))
        m.d.comb += sum_take.eq(fill + p_n)
        ge_take = sum_take[C.bit_length() - 1] if (C & (C - 1)) == 0 and db <= C else (sum_take >= C)
        emit = rx_active & (fill_ge | (row_in_done & fill_nz))
        m.d.comb += p_take.eq(p_valid & ~emit & ~row_in_done)
        m.d.sync += fill.eq(fill_next)
        # A take finds fill < C (``fill_ge`` low), so the placement shift needs only fill's low
        # log2(C) bits when C is a power of two: a shifter of fewer stages behind ``fill``.
        fill_at = fill[:C.bit_length() - 1] if (C & (C - 1)) == 0 else fill
        # acc loads under one enable (take or emit, never both) with the emit selecting its next
        # value: the take/emit decision then meets the placement shift in the last LUT rather than
        # adding a multiplexer level behind it (4 LUT levels from ``fill`` missed 300 MHz in the top).
        with m.If(p_take | emit):
            m.d.sync += acc.eq(Mux(emit, acc >> (8 * C), acc | (p_data << (fill_at * 8))))
        # After an emit with fill >= C the fill is fill - C, nonzero unless fill == C; with C a power
        # of two and fill < C + db <= 2C that is fill's low log2(C) bits (no compare of all of fill).
        rest_nz = fill[:C.bit_length() - 1].any() if (C & (C - 1)) == 0 and db <= C else (fill != C)
        with m.If(p_take):
            m.d.sync += [fill_ge.eq(ge_take), fill_nz.eq(fill_nz | (p_n != 0))]
            m.d.comb += fill_next.eq(sum_take)
            with m.If(p_row_end):
                m.d.sync += row_in_done.eq(1)
        with m.Elif(emit):
            m.d.sync += [fill_ge.eq(fill >= 2 * C), fill_nz.eq(fill_ge & rest_nz)]
            m.d.comb += fill_next.eq(Mux(fill_ge, fill - C, 0))

        # The write port is registered (address, enable, data; ``done`` with it): the encoder top
        # multiplexes it into the activation buffer's bank and Q|K|V-copy decodes, which then start
        # at flip-flops instead of behind ``emit`` (a decode fanning out to the whole gearbox) and an
        # address adder.
        w_addr = Signal(cfg.act_addr_bits)
        w_data = Signal(data.ArrayLayout(signed(numerics.ACT_BITS), C))
        done_r = Signal()
        m.d.sync += [w_en.eq(emit), w_addr.eq(dst_row + wcnt), done_r.eq(0)]
        for j in range(C):
            m.d.sync += w_data[j].eq(acc[8 * j:8 * j + 8] ^ 0x80)
        m.d.comb += [self.act_wr.addr.eq(w_addr), self.act_wr.en.eq(w_en.replicate(C)),
                     self.act_wr.data.eq(w_data), self.done.eq(done_r)]
        with m.If(emit):
            with m.If(wcnt == kw - 1):
                m.d.sync += [wcnt.eq(0), row_in_done.eq(0), dst_row.eq(dst_row + c.dst_stride),
                             rows_left.eq(rows_left - 1)]
                with m.If(rows_left == 1):
                    m.d.sync += [rx_active.eq(0), done_r.eq(1)]
            with m.Else():
                m.d.sync += wcnt.eq(wcnt + 1)

        # ---- command accept ---------------------------------------------------------------------
        with m.If(cmd.valid & cmd.ready):
            pl = cmd.payload
            m.d.sync += [
                c.eq(pl), gen_active.eq(pl.count != 0), rx_active.eq(pl.count != 0),
                runs_left.eq(pl.count * p), rows_left.eq(pl.count), dst_row.eq(pl.dst_base),
                wcnt.eq(0), row_in_done.eq(0), b.eq(0),
            ]
            m.d.comb += fill_next.eq(0)
            m.d.sync += [fill_ge.eq(0), fill_nz.eq(0)]
            with m.If(pl.restart):
                m.d.sync += [kh.eq(0), px.eq(0), prow_addr.eq(pl.img_base), patch_addr.eq(pl.img_base),
                             run_addr.eq(pl.img_base)]
            with m.If(pl.count == 0):
                m.d.sync += done_r.eq(1)
        return m
