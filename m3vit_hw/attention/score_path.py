"""The score path of attention: score reorder buffer -> streamed softmax -> e8 tile and row table.

The GEMM engine emits the RAW scores of a query tile (``Q_tile . K^T``) *tile-interleaved*: for each row
tile, for each column tile, for each row. The softmax needs each row whole and in order, so the
:class:`ScorePath`

1. **writes** every score beat into the *score reorder buffer* at the word the engine's destination
   addressing gives it (``addr``: slot base + row * score_words + column tile). Two slots; a slot is
   FULL from the command's ``last`` beat until it has been read out (the engine's stream waits);
2. **reads** a FULL slot row by row (``ceil(T / C)`` words a row) into a
   :class:`~m3vit_hw.rowops.softmax.SoftmaxUnit` in attention mode, once an e8 slot is free. The unit
   has ``L = config.attn_softmax_lanes`` lanes (``gcd(softmax_lanes, C)``): each word is cut into
   ``C / L`` beats, the row's last word only into the beats that hold elements below ``T``;
3. **writes** the e8 weights into the e8 slot (same row pitch; ``C / L`` output beats are gathered into
   a word, lanes past ``T`` zero) and, on each row's last beat, the row's AV reciprocal into the row
   table (``scale``), then pulses ``tile_done``.

The three buffers are owned by the layer top; this unit talks to them through memory-port signatures.
Slots alternate 0, 1, 0, ... on every side, one per query tile, so no side names a slot. An e8 slot is
freed by ``slot_release`` (the layer pulses it when the AV GEMM that read the slot is done).
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..gemm.epilogue import StreamOutLayout
from ..gemm.gemm_engine import RowEntryLayout
from ..lib.skid import SkidBuffer
from ..moe.router import FlagQueue
from ..rowops.counts import ShiftQueue, thermometer_step
from ..rowops.softmax import SHIFT_BITS, SoftmaxMode, SoftmaxUnit
from .attn_layout import BufferMap

__all__ = ["ScorePath", "ScoreParamsLayout", "mem_addr_width"]

#: Read-ahead of the reorder buffer reader (words between the buffer and the softmax input). The
#: FIFO's output is a register (``SyncFIFOBuffered``: no distributed-RAM read in front of the softmax
#: input), which lengthens the read loop by a cycle; six words keep it at a word a cycle.
_READ_AHEAD = 6
#: Query tiles that may be between "rows announced" and "e8 written" (two slots + margin).
_TILE_FIFO = 4


def mem_addr_width(depth):
    """Address width of an :class:`amaranth.lib.memory.Memory` of ``depth`` words (ceil log2)."""
    return (int(depth) - 1).bit_length()


class ScoreParamsLayout(data.StructLayout):
    """Per-layer softmax parameters: ``tokens`` (T = row length), ``beats`` (= ceil(T / C)),
    ``c_mult``, ``c_shift``, ``out_mult``."""

    def __init__(self, config):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "beats": range(-(-config.token_capacity // config.pe_cols) + 1),
            "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS),
            "c_shift": unsigned(SHIFT_BITS),
            "out_mult": unsigned(numerics.AV_OUT_MULT_BITS),
        })


class ScorePath(wiring.Component):
    """Score reorder, streamed softmax and e8 / row-table writer for one query tile at a time.

    Parameters
    ----------
    config : AcceleratorConfig
    bmap : BufferMap
        The attention buffer map (slot sizes and pitches).

    Interface attributes
    --------------------
    i : In(stream.Signature(StreamOutLayout(C, dst_addr_bits)))
        The engine's RAW beats of QKᵀ commands (one command per query tile, ``last`` on its final beat).
    tiles : In(stream.Signature(range(q_tile + 1)))
        The row count of each query tile, in QKᵀ command order (send it with the command).
    params : In(ScoreParamsLayout(config))
        Held while a layer runs.
    slot_release : In(1)
        An AV GEMM has finished reading its e8 slot and row-table slot.
    sbuf_wr, sbuf_rd : the score reorder buffer's ports (int32 words, ``2 * score_slot`` words).
    e8_wr : the e8 bank's write port (``2 * e8_slot`` words of C uint8 bit patterns).
    rt_wr : the row table's write port (``RowEntryLayout``).
    tile_done : Out(1)
        Pulses when a query tile's e8 rows and reciprocals are all written.
    busy : Out(1)
        A query tile is between the reorder reader and the e8 writer.
    """

    def __init__(self, config, bmap, *, rowtab_depth):
        if not isinstance(bmap, BufferMap):
            raise TypeError(f"bmap must be a BufferMap, not {bmap!r}")
        self._config = config
        self._bmap = bmap
        C = config.pe_cols
        self.softmax = SoftmaxUnit(lanes=config.attn_softmax_lanes, max_length=config.token_capacity)
        score_word = data.ArrayLayout(signed(numerics.ACC_BITS), C)
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        self.sbuf_aw = mem_addr_width(bmap.score_buffer_words)
        self.e8_aw = mem_addr_width(bmap.e8_words)
        self.rt_aw = mem_addr_width(rowtab_depth)
        super().__init__({
            "i": In(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "tiles": In(stream.Signature(range(bmap.q_tile + 1))),
            "params": In(ScoreParamsLayout(config)),
            "slot_release": In(1),
            "sbuf_wr": In(memory.WritePort.Signature(addr_width=self.sbuf_aw, shape=score_word)),
            "sbuf_rd": In(memory.ReadPort.Signature(addr_width=self.sbuf_aw, shape=score_word)),
            "e8_wr": In(memory.WritePort.Signature(addr_width=self.e8_aw, shape=word8)),
            "rt_wr": In(memory.WritePort.Signature(addr_width=self.rt_aw, shape=RowEntryLayout(config))),
            "tile_done": Out(1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, bm = self._config, self._bmap
        C = cfg.pe_cols
        tw = bm.score_words
        m.submodules.softmax = sm = self.softmax
        prm = self.params

        # ---- writer: engine beats -> reorder slot ------------------------------------------------
        full = Signal(2)
        wslot = Signal()
        set_full = Signal(2)
        clr_full = Signal(2)
        m.d.comb += [
            self.i.ready.eq(~full.bit_select(wslot, 1)),
            self.sbuf_wr.addr.eq(self.i.payload.addr[:self.sbuf_aw]),
            self.sbuf_wr.data.eq(self.i.payload.data),
            self.sbuf_wr.en.eq(self.i.valid & self.i.ready),
        ]
        with m.If(self.i.valid & self.i.ready & self.i.payload.last):
            m.d.comb += set_full.bit_select(wslot, 1).eq(1)
            m.d.sync += wslot.eq(~wslot)
        m.d.sync += full.eq((full | set_full) & ~clr_full)

        # ---- e8 slot credits ---------------------------------------------------------------------
        e8_free = Signal(range(3), init=2)
        take = Signal()
        m.d.sync += e8_free.eq(e8_free - take + self.slot_release)

        # ---- reader: FULL slot -> softmax, row by row --------------------------------------------
        # Both tile queues are ShiftQueues (flip-flops, thermometer counts). Their read data are
        # registers: ``rows_in.r_data - 1`` goes into rows_out's write data, and a distributed-RAM
        # read in front of that subtraction was the unit's longest path. Their read enables end the
        # reader's start decision and the e8 writer's tile-end compare, and a SyncFIFOBuffered's
        # level adder behind them missed 300 MHz in the whole top.
        m.submodules.rows_in = rows_in = ShiftQueue(unsigned(len(self.tiles.payload)), _TILE_FIFO)
        m.d.comb += [self.tiles.ready.eq(rows_in.w_rdy), rows_in.w_en.eq(self.tiles.valid),
                     rows_in.w_data.eq(self.tiles.payload)]
        # rows_out holds each tile's row count less one, behind a registered output: the e8 writer's
        # "last row of the tile" test compares two flip-flops (no distributed-RAM read, no - 1).
        m.submodules.rows_out = rows_out = ShiftQueue(unsigned(len(self.tiles.payload)), _TILE_FIFO)
        # Registered occupancy flags (moe.router.FlagQueue): the pop, which ends in the softmax input's
        # handshake, reaches only the queue's counters, not a level compare behind its read enable.
        m.submodules.ahead = ahead = FlagQueue(C * numerics.ACC_BITS, _READ_AHEAD)
        rslot = Signal()
        r_rows = Signal(range(bm.q_tile + 1))
        r_w = Signal(range(tw + 1))
        r_addr = Signal(self.sbuf_aw + 1)
        pend = Signal()
        rd_en = Signal()                  # the port's ``en`` resets to 1: drive it from a 0-reset signal
        m.d.comb += self.sbuf_rd.en.eq(rd_en)
        # Held layer parameters, registered (they are set long before the first tile is read): the
        # row's last word index, the one before it, and the address step from a row's last word to
        # the next row's first.
        beats_m1 = Signal.like(prm.beats)
        beats_m2 = Signal.like(prm.beats)
        one_word = Signal()
        wrap_step = Signal(self.sbuf_aw + 1)
        m.d.sync += [beats_m1.eq(prm.beats - 1), beats_m2.eq(prm.beats - 2), one_word.eq(prm.beats == 1),
                     wrap_step.eq(1 + tw - prm.beats)]
        # Reads in flight or waiting in ``ahead`` (its level plus the pending read), kept as a
        # thermometer code of its own (no adder behind the pop, which ends in the softmax input's
        # handshake); "below the read-ahead" is its top bit.
        in_ahead = Signal(_READ_AHEAD)
        ahead_room = ~in_ahead[_READ_AHEAD - 1]
        r_wlast = Signal()                # r_w == beats_m1
        # The softmax command's payload comes from registers in every state (only its valid depends on
        # the state), so the unit's per-command registers see no state decode on their data path.
        m.d.comb += [
            sm.cmd.payload.mode.eq(SoftmaxMode.ATTENTION),
            sm.cmd.payload.length.eq(prm.tokens),
            sm.cmd.payload.rows.eq(r_rows),
            sm.cmd.payload.c_mult.eq(prm.c_mult),
            sm.cmd.payload.c_shift.eq(prm.c_shift),
            sm.cmd.payload.out_mult.eq(prm.out_mult),
        ]
        with m.FSM(name="reader"):
            with m.State("IDLE"):
                ok = full.bit_select(rslot, 1) & rows_in.r_rdy & (e8_free != 0) & rows_out.w_rdy
                m.d.comb += [rows_in.r_en.eq(ok), take.eq(ok),
                             rows_out.w_en.eq(ok), rows_out.w_data.eq(rows_in.r_data - 1)]
                # The read walk starts here, not at the command's accept: the softmax's command
                # ready ends in its input handshake (W2's top missed 300 MHz on it into these
                # registers), and nothing reads them before READ.
                with m.If(ok):
                    m.d.sync += [r_rows.eq(rows_in.r_data), r_w.eq(0), r_wlast.eq(one_word),
                                 r_addr.eq(Mux(rslot, bm.score_slot, 0))]
                    m.next = "CMD"
            with m.State("CMD"):
                m.d.comb += sm.cmd.valid.eq(1)
                with m.If(sm.cmd.ready):
                    m.next = "READ"
            with m.State("READ"):
                issue = ahead_room
                m.d.comb += [rd_en.eq(issue), self.sbuf_rd.addr.eq(r_addr[:self.sbuf_aw])]
                with m.If(issue):
                    m.d.sync += [r_w.eq(r_w + 1), r_addr.eq(r_addr + 1), r_wlast.eq(r_w == beats_m2)]
                    with m.If(r_wlast):
                        m.d.sync += [r_w.eq(0), r_wlast.eq(one_word), r_addr.eq(r_addr + wrap_step),
                                     r_rows.eq(r_rows - 1)]
                        with m.If(r_rows == 1):
                            # The last read is issued: the writer may refill the slot from the next cycle.
                            m.d.comb += clr_full.bit_select(rslot, 1).eq(1)
                            m.d.sync += rslot.eq(~rslot)
                            m.next = "IDLE"
        m.d.sync += pend.eq(rd_en)
        popped = ahead.r_en & ahead.r_rdy
        thermometer_step(m, in_ahead, rd_en, popped)
        m.d.comb += [
            ahead.w_en.eq(pend),
            ahead.w_data.eq(self.sbuf_rd.data.as_value()),
        ]

        # ---- word -> softmax beats: S = C / L beats a word, fewer in the row's last word ----------
        L = cfg.attn_softmax_lanes
        S = C // L
        beat_bits = L * numerics.ACC_BITS
        # A skid buffer in front of the softmax input: the unit's ready (its row-queue and buffer-room
        # logic) ends in the buffer, and the read-ahead FIFO's pop and count see a flip-flop.
        m.submodules.beat_skid = skid = SkidBuffer(sm.i.payload.shape())
        wiring.connect(m, skid.o, sm.i)
        smi = skid.i
        if S == 1:
            m.d.comb += [smi.valid.eq(ahead.r_rdy), smi.payload.eq(ahead.r_data), ahead.r_en.eq(smi.ready)]
        else:
            # Beats of the row's last word, less one: (T - (beats - 1) * C - 1) // L, registered (the
            # parameters are held while the layer runs, long before the first row is read).
            tail = Signal(range(S))
            rem = Signal(range(C + 1))
            m.d.comb += rem.eq(prm.tokens - (prm.beats - 1) * C)
            m.d.sync += tail.eq((rem - 1) >> (L.bit_length() - 1) if L & (L - 1) == 0 else (rem - 1) // L)
            sub = Signal(range(S))
            i_w = Signal(range(tw + 1))                    # word of the row being cut
            # "The word is the row's last" and "the beat is the word's last" as registers, set for
            # the next beat at each transfer and refreshed from the counters between transfers (the
            # parameters are held while a layer runs): the pop, which ends in the read-ahead FIFO's
            # level and the count above, is one AND of flip-flops.
            iw_last = Signal()                             # i_w == beats_m1
            at_last = Signal()                             # sub == (tail if iw_last else S - 1)
            tail_0 = Signal()
            tail_m1 = Signal.like(tail)                    # compared with sub before its increment
            m.d.sync += [tail_0.eq(tail == 0), tail_m1.eq(tail - 1)]
            beat = smi.valid & smi.ready
            pop = beat & at_last
            m.d.comb += [
                smi.valid.eq(ahead.r_rdy),
                smi.payload.eq(ahead.r_data.word_select(sub, beat_bits)),
                ahead.r_en.eq(pop),
            ]
            with m.If(pop):
                # The next word is the row's last: word 0 of a one-word row, else i_w + 1 == beats - 1.
                nxt_last = Mux(iw_last, one_word, i_w == beats_m2)
                m.d.sync += [sub.eq(0), i_w.eq(Mux(iw_last, 0, i_w + 1)),
                             iw_last.eq(nxt_last), at_last.eq(nxt_last & tail_0)]
            with m.Elif(beat):
                # sub + 1 == last_sub as sub == last_sub - 1 (last_sub >= 1 here: at_last was 0).
                m.d.sync += [sub.eq(sub + 1), at_last.eq(sub == Mux(iw_last, tail_m1, S - 2))]
            with m.Else():
                # Refreshed from the registers (one cycle behind iw_last's own refresh; the
                # parameters settle long before a layer's first beat).
                m.d.sync += [iw_last.eq(i_w == beats_m1), at_last.eq(sub == Mux(iw_last, tail, S - 1))]

        # ---- e8 writer: softmax output -> e8 slot, reciprocal -> row table -----------------------
        eslot = Signal()
        e_row = Signal(range(bm.q_tile + 1))
        e_w = Signal(range(tw + 1))
        e_base = Signal(self.e8_aw + 1)
        go = sm.o.valid
        # S output beats make a word: the earlier beats wait in ``gather``; the word is written with
        # its last beat (or the row's last beat; the lanes after it are zero, as the unit's padding).
        o_sub = Signal(range(S))
        gather = Signal(data.ArrayLayout(unsigned(numerics.ACT_BITS), C))
        put = go & ((o_sub == S - 1) | sm.o.payload.last)
        m.d.comb += [
            sm.o.ready.eq(1),
            self.e8_wr.addr.eq((e_base + e_w)[:self.e8_aw]),
            self.e8_wr.en.eq(put),
            self.rt_wr.addr.eq((Mux(eslot, bm.q_pad, 0) + e_row)[:self.rt_aw]),
            self.rt_wr.en.eq(go & sm.o.payload.last),
            self.rt_wr.data.token.eq(e_row),
            self.rt_wr.data.scale.eq(sm.o.payload.recip[:numerics.MULT_BITS]),
        ]
        for j in range(C):
            g, k = divmod(j, L)
            here = sm.o.payload.data[k][:numerics.ACT_BITS]
            if S == 1:
                m.d.comb += self.e8_wr.data[j].eq(here)
            else:
                m.d.comb += self.e8_wr.data[j].eq(Mux(o_sub == g, here, Mux(o_sub > g, gather[j], 0)))
                with m.If(go & (o_sub == g)):
                    m.d.sync += gather[j].eq(here)
        with m.If(go):
            m.d.sync += o_sub.eq(Mux(put, 0, o_sub + 1))
        with m.If(put):
            m.d.sync += e_w.eq(e_w + 1)
        with m.If(go):
            with m.If(sm.o.payload.last):
                m.d.sync += [e_w.eq(0), e_row.eq(e_row + 1), e_base.eq(e_base + tw)]
                with m.If(e_row == rows_out.r_data):
                    m.d.comb += [rows_out.r_en.eq(1), self.tile_done.eq(1)]
                    m.d.sync += [e_row.eq(0), eslot.eq(~eslot),
                                 e_base.eq(Mux(eslot, 0, bm.e8_slot))]
        # busy (rows_out not empty) as a register a cycle ahead, from a count of its own kept as a
        # thermometer code (no adder behind the tile-end compare): busy is its bit 0.
        tiles_in = Signal(_TILE_FIFO)
        tile_end = Signal()
        m.d.comb += tile_end.eq(rows_out.r_en)
        thermometer_step(m, tiles_in, take, tile_end)
        busy_r = tiles_in[0]
        m.d.comb += self.busy.eq(busy_r)
        return m
