"""The MoE router datapath after the gate GEMM: logit bias, softmax, top-k.

The gate GEMM itself (``logits = h . w_gate``, M = T tokens, K = D, N = E) runs on the shared
:class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` in RAW mode, as one GEMM per *gate chunk*
(:attr:`~m3vit_hw.config.AcceleratorConfig.gate_chunks`: N-chunks of whole column tiles, each fitting
one half of the weight double buffer, so the weight buffer does not grow with E); the chunks' result
beats enter :class:`Router` on ``i``, chunk after chunk. The router then computes, bit-exact with
``reference/golden.py``:

1. ``logits += task_bias`` (``golden.router_logits``): the per-task constant logit offset of the
   task-embedding router (zero for ``multi_gate``), read per beat through ``bias_rd`` from the layer's
   parameter buffer, where each chunk's bias words arrive with the chunk's gate weights (so switching
   tasks needs only that task's gate record, and no per-task state is kept here);
2. ``p = router_probs(logits)`` in a :class:`~m3vit_hw.rowops.softmax.SoftmaxUnit` (ROUTER mode, ``lanes =
   min(pe_cols, E)``, ``max_length = E``), while a copy of the logits waits in a FIFO. The lanes past E
   of an engine beat are never used, so neither the softmax nor the logit buffer and FIFO are wider
   than E: a wide PE array (64 columns) does not widen the router;
3. ``golden.topk(logits, k)`` in a :class:`~m3vit_hw.moe.topk.TopK` whose tags are the probabilities, so the
   k winners leave with their Q0.15 combine weights.

The output is one beat per token, in token order, in the input layout of
:class:`~m3vit_hw.moe.expert_queues.ExpertQueues`.

Why a logit buffer
------------------
The engine emits RAW results in tile order (``for mb: for nb: for row in tile``), and with several
gate chunks a token's logits arrive in as many separate GEMMs. The softmax and top-k need each
token's ``ceil(E/C)`` words consecutively, so the router writes every biased beat to its place in a
*logit buffer* (word ``row * ceil(E/C) + nb`` of a row-tile bank) and reads rows out in token order
once a row tile is complete (its last chunk written):

* one gate chunk (the whole gate fits one weight half): two banks of ``pe_rows x ceil(E/C)`` words,
  the engine fills one while the other drains (the same overlap as a single GEMM);
* several chunks: one bank per row tile, ``ceil(token_capacity / pe_rows) x pe_rows x ceil(E/C)``
  int32 words, since every chunk but the last completes before any row can be read. This is router
  state of size O(T x E) logits, not weight storage: it replaces a weight buffer that would grow with E.
"""

from amaranth.hdl import Cat, Const, Elaboratable, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.epilogue import StreamOutLayout
from ..lib.skid import SkidBuffer
from ..numerics import SHIFT_BITS
from ..rowops.counts import thermometer_step
from ..rowops.softmax import OUT_BITS, SoftmaxMode, SoftmaxUnit
from .topk import TopK, expert_id_width

__all__ = ["Router", "RouterCommandLayout", "RouterOutLayout", "FlagQueue"]


class RouterCommandLayout(data.StructLayout):
    """One layer's router command.

    Fields
    ------
    tokens : range(token_capacity + 1)
        T, tokens of the layer, in [1, token_capacity].
    c_mult : unsigned(SOFTMAX_MULT_BITS), c_shift : unsigned(SHIFT_BITS)
        The router softmax's exponent scale (``golden.router_probs``) of the selected gate.
    """

    def __init__(self, config):
        super().__init__({
            "tokens": range(config.token_capacity + 1),
            "c_mult": unsigned(numerics.SOFTMAX_MULT_BITS),
            "c_shift": unsigned(SHIFT_BITS),
        })


class RouterOutLayout(data.StructLayout):
    """One token's routing: ``experts`` (k ids, best first), ``weights`` (their Q0.15 probabilities),
    ``last`` (the layer's final token). This is :class:`~m3vit_hw.moe.expert_queues.ExpertQueues`' input."""

    def __init__(self, config):
        k, E = config.model.top_k, config.model.experts
        super().__init__({
            "experts": data.ArrayLayout(unsigned(expert_id_width(E)), k),
            "weights": data.ArrayLayout(unsigned(OUT_BITS), k),
            "last": unsigned(1),
        })


class Router(wiring.Component):
    """Gate-logit bias, softmax over all experts and top-k, for one layer of T tokens per command.

    Parameters
    ----------
    config : AcceleratorConfig
        ``pe_rows`` and ``pe_cols`` (the engine's output beat and row-tile shape), ``model.experts``
        (E), ``model.top_k`` (k) and ``token_capacity``.

    Interface attributes
    --------------------
    cmd : ``In(stream.Signature(RouterCommandLayout(config)))``
        One command per layer, accepted when the previous layer's last token has left on ``o``.
    i : ``In(stream.Signature(StreamOutLayout(pe_cols, dst_addr_bits)))``
        The gate chunks' RAW beats, chunk after chunk (``config.gate_chunks``), each exactly as the
        engine emits it for ``m = T, n = chunk.n``: row tiles of ``pe_rows`` tokens (the last one
        possibly shorter), for each of the chunk's column tiles its rows in order. Only ``data`` is
        used (the position follows from the order); lanes past E are ignored.
    bias_rd : ``In(memory.ReadPort.Signature(addr_width=, shape=ArrayLayout(signed(32), pe_cols)))``
        Read port (driven by the router) of the current chunk's bias words: word ``j`` holds
        ``task_bias`` of the chunk's ``j``-th column tile; data returns one cycle after a cycle with
        ``en`` high and holds while ``en`` is low. The router uses the port (and its data) only while
        ``drained`` is low: the port (and the chunk's bias words behind it) may change whenever
        ``drained`` is high.
    o : ``Out(stream.Signature(RouterOutLayout(config)))``
        One beat per token, in token order; ``last`` on token T-1.
    drained : ``Out(1)``
        Every beat accepted on ``i`` has been biased and written, so ``bias_rd`` (address, enable
        *and* data) is not in use. Low only in the cycle after a beat is accepted; a chunk's bias
        words may be replaced once its last beat has been accepted and ``drained`` is high.
    busy : ``Out(1)``
        A command is in progress (until its last ``o`` beat).

    Throughput and latency
    ----------------------
    Input: one beat per cycle while a bank is free (with several chunks, always); a row tile's bank
    frees as soon as its rows have been read out. Output: limited by the softmax, one token per ``max(ceil(E/C),
    softmax.min_row_beats)`` cycles (router rows are short, so the softmax's per-row divider sets the
    pace for small E). From a token's last input beat to its output beat: the rest of its row tile,
    the read stage, :meth:`SoftmaxUnit.row_latency` and one cycle of top-k.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`~m3vit_hw.config.AcceleratorConfig`.
    """

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        C = config.pe_cols
        E = config.model.experts
        self._nb = -(-E // C)
        self._chunks = config.gate_chunks
        # Lanes past E carry no logit: with E <= pe_cols one min(C, E)-lane word holds a token's row.
        self._lanes = min(C, E)
        self.softmax = SoftmaxUnit(self._lanes, E)
        self.topk = TopK(E, config.model.top_k, lanes=self._lanes, tag_width=OUT_BITS)
        super().__init__({
            "cmd": In(stream.Signature(RouterCommandLayout(config))),
            "i": In(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "bias_rd": In(memory.ReadPort.Signature(
                addr_width=max(1, (max(self._chunks) - 1).bit_length()),
                shape=data.ArrayLayout(signed(numerics.ACC_BITS), C))),
            "o": Out(stream.Signature(RouterOutLayout(config))),
            "drained": Out(1),
            "busy": Out(1),
        })

    @property
    def config(self):
        return self._config

    @property
    def logit_fifo_depth(self):
        """Beats of the logit FIFO: everything the softmax and the skid buffer in front of it (2)
        can hold, so the fork never waits on it."""
        return self.softmax.score_buffer_depth + self.softmax.exp_buffer_depth + 4 + 2

    @property
    def banks(self):
        """Row-tile banks of the logit buffer: two (ping-pong) for a single gate chunk, otherwise one
        per row tile of ``token_capacity`` (every chunk but the last completes before rows drain)."""
        cfg = self._config
        if len(self._chunks) == 1:
            return 2
        return max(2, -(-cfg.token_capacity // cfg.pe_rows))

    @property
    def lanes(self):
        """Logits per word of the logit buffer, FIFO and softmax: ``min(pe_cols, E)``."""
        return self._lanes

    @property
    def logit_buffer_words(self):
        """Words (:attr:`lanes` int32 logits each) of the logit buffer."""
        return self.banks * self._config.pe_rows * self._nb

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R, C = cfg.pe_rows, cfg.pe_cols
        E = cfg.model.experts
        NB = self._nb
        L = self._lanes
        cap = cfg.token_capacity
        banks = self.banks
        bank_words = R * NB
        chunks = self._chunks
        n_chunks = len(chunks)
        word = data.ArrayLayout(signed(numerics.ACC_BITS), L)

        m.submodules.softmax = sm = self.softmax
        m.submodules.topk = tk = self.topk
        # The fork feeds the softmax through a skid buffer: the softmax's input ready (its row-queue
        # and buffer-room logic) then ends in the buffer, and the fork's ready, the reader's advance
        # and its bank registers see a flip-flop.
        m.submodules.sm_skid = sm_skid = SkidBuffer(sm.i.payload.shape())
        wiring.connect(m, sm_skid.o, sm.i)
        sm_in = sm_skid.i
        m.submodules.tiles = tiles = memory.Memory(shape=word, depth=banks * bank_words, init=[])
        t_w = tiles.write_port()
        t_r = tiles.read_port()
        m.submodules.logits = lf = FlagQueue(word.size, self.logit_fifo_depth)

        tokens = Signal(range(cap + 1))
        active = Signal()

        # ---- command: start the layer and the softmax's command -----------------------------------
        sm_pending = Signal()
        # The row-tile bookkeeping registers below are loaded from the command itself when it is
        # accepted (`start`), so no compare or subtract on T sits in a per-beat path.
        start = Signal()
        setup = Signal()
        m.d.comb += [self.cmd.ready.eq(~active), start.eq(self.cmd.valid & self.cmd.ready)]
        m.d.sync += setup.eq(start)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                tokens.eq(Mux(self.cmd.p.tokens == 0, 1, self.cmd.p.tokens)),
                active.eq(1), sm_pending.eq(1),
                sm.cmd.p.c_mult.eq(self.cmd.p.c_mult), sm.cmd.p.c_shift.eq(self.cmd.p.c_shift),
                sm.cmd.p.rows.eq(Mux(self.cmd.p.tokens == 0, 1, self.cmd.p.tokens)),
                sm.cmd.p.mode.eq(SoftmaxMode.ROUTER),
                sm.cmd.p.length.eq(E),
                sm.cmd.p.out_mult.eq(0),
            ]
        m.d.comb += sm.cmd.valid.eq(sm_pending)
        with m.If(sm.cmd.valid & sm.cmd.ready):
            m.d.sync += sm_pending.eq(0)

        # ---- writer: engine beats (for chunk: for mb: for nb: for row) into the row-tile banks ----
        full = Signal(banks)
        w_chunk = Signal(range(max(2, n_chunks)))
        w_bank = Signal(range(banks))
        w_base = Signal(range(banks * bank_words + 1))   # w_bank * bank_words
        w_row = Signal(range(R))
        w_nb = Signal(range(max(chunks)))                 # column tile within the chunk
        w_rem = Signal(range(cap + 1))                    # tokens from the tile's first row to T
        w_row_rem = Signal(range(R))                      # rows of the tile after w_row
        w_last_tile = Signal()                            # the chunk's last row tile
        w_done = Signal()                                 # every chunk written
        w_np = Signal(range(max(chunks) + 1))             # column tiles of the chunk
        w_n0 = Signal(range(NB))                          # the chunk's first column tile
        with m.Switch(w_chunk):
            first = 0
            for j, count in enumerate(chunks):
                with m.Case(j):
                    m.d.comb += [w_np.eq(count), w_n0.eq(first)]
                first += count
        w_ok = active & ~w_done & ~full.bit_select(w_bank, 1)
        m.d.comb += self.i.ready.eq(w_ok)
        w_go = self.i.valid & w_ok
        # The writer's end-of-row / end-of-tile / last-bank / last-chunk tests are flip-flops, kept
        # beside the counters they test (w_row_rem == 0, w_nb == w_np - 1, w_bank == banks - 1,
        # w_chunk == n_chunks - 1): the accept (the engine's valid through the encoder's owner gate)
        # then reaches the bank and row registers through one decision LUT, not through the compares
        # (the W1 top's csel_moe -> w_bank / w_base / w_rem paths).
        w_row_last = Signal()
        w_nb_last = Signal()
        w_tile_end = w_row_last & w_nb_last
        w_bank_last = Signal(init=banks == 1)
        w_chunk_last = Signal(init=n_chunks == 1)

        # Stage 1 (accept): read the beat's bias word. Stage 2: write the biased beat.
        s1_valid = Signal()
        s1_addr = Signal(range(banks * bank_words))
        s1_data = Signal(word)
        s1_full = Signal()                                # the write completes bank s1_bank
        s1_bank = Signal(range(banks))
        m.d.comb += [self.bias_rd.addr.eq(w_nb), self.bias_rd.en.eq(w_go)]
        m.d.sync += [s1_valid.eq(w_go), s1_full.eq(w_go & w_tile_end & w_chunk_last)]
        with m.If(w_go):
            m.d.sync += [s1_addr.eq(w_base + w_row * NB + w_n0 + w_nb), s1_bank.eq(w_bank)]
            m.d.sync += [s1_data[j].eq(self.i.p.data[j]) for j in range(L)]
        m.d.comb += [t_w.addr.eq(s1_addr), t_w.en.eq(s1_valid), self.drained.eq(~s1_valid)]
        for j in range(L):
            m.d.comb += t_w.data[j].eq(s1_data[j] + self.bias_rd.data[j])

        # Rows of a tile starting at w_rem tokens before T, minus one; the next tile's and the
        # first tile's, from registers.
        def rows_m1(rem):
            return Mux(rem >= R, R - 1, rem - 1)
        next_rem = w_rem - R
        # rows_m1(next_rem) with the subtraction folded into the constants: the compare and the
        # low bits' decrement both start at w_rem, in parallel.
        next_rows_m1 = Mux(w_rem >= 2 * R, R - 1, (w_rem - (R + 1))[:len(w_row_rem)])
        # What a tile end loads from w_rem (the next tile's rows, whether it is a one-row tile and
        # whether it is the chunk's last), registered every cycle from w_rem: a tile end that uses
        # them ends a tile of R >= 2 rows (only the chunk's last tile is shorter, and its end loads
        # the chunk's first tile or nothing), so w_rem has held for at least a cycle. The compares
        # and the subtraction then sit between w_rem and these registers, not behind the accept.
        next_one = w_rem <= R + 1
        next_last = w_rem <= 2 * R
        if R >= 2:
            nr_m1_r, next_one_r, next_last_r = Signal(range(R)), Signal(), Signal()
            next_rem_r = Signal.like(w_rem)
            m.d.sync += [nr_m1_r.eq(next_rows_m1), next_one_r.eq(next_one), next_last_r.eq(next_last),
                         next_rem_r.eq(next_rem)]
            next_rows_m1, next_one, next_last = nr_m1_r, next_one_r, next_last_r
            next_rem = next_rem_r
        # What a tile end loads into w_rem: the chunk's next tile (w_rem - R), or after a chunk's last
        # tile the next chunk's first (T; after the last chunk's, unused: w_done). A select of
        # registers, assigned in one place under the tile end, so the accept (the engine's valid
        # through the encoder's owner gate) reaches w_rem only as its enable, with no select of the
        # branch nest behind it (the W1 top's csel_moe -> w_rem path).
        w_rem_at_end = Signal.like(w_rem)
        m.d.comb += w_rem_at_end.eq(Mux(w_last_tile, tokens, next_rem))
        first_rows_m1 = Signal(range(R))
        # The row-tile registers load in the cycle after the accept (``setup``), from the registered
        # T: the command's payload then only reaches registers through the T == 0 clamp. The writer
        # takes no beat in that cycle (the engine's first gate beat comes many cycles after the
        # command, so this costs nothing).
        # w_nb_last for the chunk starting at column tile 0 of ``chunk`` (a constant per chunk).
        def nb_last_at(chunk):
            return Cat(*(chunk == j for j, count in enumerate(chunks) if count == 1)).any()

        # The current row tile's rows_m1(w_rem), and whether it is 0 (a one-row tile), in registers
        # loaded with w_rem: the next column tile restarts its rows from them.
        tile_rows_m1 = Signal(range(R))
        tile_one = Signal()

        def one_row(cond):
            # rows_m1(...) == 0 from ``cond`` (the tile's rows <= 1); always with one-row tiles.
            return Const(1, 1) if R == 1 else cond
        with m.If(start):
            m.d.sync += w_done.eq(1)
        with m.If(setup):
            m.d.sync += [w_rem.eq(tokens), w_row_rem.eq(rows_m1(tokens)), first_rows_m1.eq(rows_m1(tokens)),
                         tile_rows_m1.eq(rows_m1(tokens)), tile_one.eq(one_row(tokens <= 1)),
                         w_last_tile.eq(tokens <= R), w_done.eq(0),
                         w_row_last.eq(one_row(tokens <= 1)), w_nb_last.eq(nb_last_at(w_chunk))]
        with m.If(w_go):
            m.d.sync += [w_row.eq(w_row + 1), w_row_rem.eq(w_row_rem - 1), w_row_last.eq(w_row_rem == 1)]
            with m.If(w_row_last):
                m.d.sync += [w_row.eq(0), w_nb.eq(w_nb + 1), w_row_rem.eq(tile_rows_m1),
                             w_row_last.eq(tile_one), w_nb_last.eq(w_nb == w_np - 2)]
                with m.If(w_tile_end):
                    # rows_m1(next_rem) == 0: next_rem = w_rem - R <= 1 (this is not the last tile).
                    m.d.sync += [w_nb.eq(0), w_rem.eq(w_rem_at_end), w_row_rem.eq(next_rows_m1),
                                 tile_rows_m1.eq(next_rows_m1), tile_one.eq(one_row(next_one)),
                                 w_row_last.eq(one_row(next_one)), w_nb_last.eq(w_np == 1),
                                 w_last_tile.eq(next_last)]
                    with m.If(w_bank_last):
                        m.d.sync += [w_bank.eq(0), w_base.eq(0), w_bank_last.eq(banks == 1)]
                    with m.Else():
                        m.d.sync += [w_bank.eq(w_bank + 1), w_base.eq(w_base + bank_words),
                                     w_bank_last.eq(w_bank == banks - 2)]
                    # A chunk's last row tile: the next chunk starts again at token 0, bank 0
                    # (several chunks: one bank per row tile, none drained yet).
                    with m.If(w_last_tile):
                        with m.If(w_chunk_last):
                            m.d.sync += w_done.eq(1)
                        with m.Else():
                            m.d.sync += [w_row_rem.eq(first_rows_m1),
                                         tile_rows_m1.eq(first_rows_m1), tile_one.eq(one_row(tokens <= 1)),
                                         w_row_last.eq(one_row(tokens <= 1)),
                                         w_nb_last.eq(nb_last_at(w_chunk + 1)),
                                         w_last_tile.eq(tokens <= R), w_bank.eq(0), w_base.eq(0),
                                         w_bank_last.eq(banks == 1), w_chunk.eq(w_chunk + 1),
                                         w_chunk_last.eq(w_chunk == n_chunks - 2)]

        # ---- reader: rows in token order (one registered read stage) ------------------------------
        release = Signal()                        # the reader frees its bank this cycle
        r_bank = Signal(range(banks))
        r_base = Signal(range(banks * bank_words + 1))
        r_rem = Signal(range(cap + 1))            # rows of the layer from r_row on
        r_row = Signal(range(R))
        r_nb = Signal(range(NB))
        s_valid = Signal()
        fork_ready = Signal()
        # r_end: the row being read is its tile's last ((r_row == R - 1) | (r_rem == 1)), and
        # r_bank_last: r_bank == banks - 1, flip-flops kept beside the counters, so the fork's
        # handshake reaches the bank registers through one decision, not the compares (the W1 top's
        # sent_sm -> r_base / r_bank path).
        r_end = Signal()
        r_bank_last = Signal(init=banks == 1)
        with m.If(setup):
            m.d.sync += [r_rem.eq(tokens), r_end.eq((R == 1) | (tokens == 1))]
        r_go = full.bit_select(r_bank, 1) & (~s_valid | fork_ready)
        m.d.comb += [
            t_r.addr.eq(r_base + r_row * NB + r_nb),
            t_r.en.eq(r_go),
        ]
        with m.If(r_go):
            m.d.sync += [s_valid.eq(1), r_nb.eq(r_nb + 1)]
            with m.If(r_nb == NB - 1):
                m.d.sync += [r_nb.eq(0), r_row.eq(r_row + 1), r_rem.eq(r_rem - 1),
                             r_end.eq((r_row == R - 2) | (r_rem == 2))]
                with m.If(r_end):
                    m.d.sync += [r_row.eq(0), r_end.eq((R == 1) | (r_rem == 2))]
                    with m.If(r_bank_last):
                        m.d.sync += [r_bank.eq(0), r_base.eq(0), r_bank_last.eq(banks == 1)]
                    with m.Else():
                        m.d.sync += [r_bank.eq(r_bank + 1), r_base.eq(r_base + bank_words),
                                     r_bank_last.eq(r_bank == banks - 2)]
                    m.d.comb += release.eq(1)
        with m.Elif(fork_ready):
            m.d.sync += s_valid.eq(0)

        one = Const(1, banks)
        set_full = Mux(s1_full, one << s1_bank, 0)
        clr_full = Mux(release, one << r_bank, 0)
        m.d.sync += full.eq((full | set_full[:banks]) & ~clr_full[:banks])

        # The biased logits. Read data holds while en is low, so the beat holds until the fork is done.
        biased = t_r.data

        # ---- fork: one copy to the softmax, one to the logit FIFO ---------------------------------
        # Each branch gets valid at most once per beat (valid never waits on the other's ready).
        sent_sm = Signal()
        sent_lf = Signal()
        m.d.comb += [
            sm_in.valid.eq(s_valid & ~sent_sm),
            sm_in.payload.eq(biased),
            lf.w_en.eq(s_valid & ~sent_lf),
            lf.w_data.eq(biased),
            fork_ready.eq((sent_sm | sm_in.ready) & (sent_lf | lf.w_rdy)),
        ]
        with m.If(s_valid & fork_ready):
            m.d.sync += [sent_sm.eq(0), sent_lf.eq(0)]
        with m.Else():
            with m.If(sm_in.valid & sm_in.ready):
                m.d.sync += sent_sm.eq(1)
            with m.If(lf.w_en & lf.w_rdy):
                m.d.sync += sent_lf.eq(1)

        # ---- join: probabilities with their logits -> top-k ---------------------------------------
        lf_word = data.View(word, lf.r_data)
        m.d.comb += [
            tk.i.valid.eq(sm.o.valid & lf.r_rdy),
            sm.o.ready.eq(tk.i.ready & lf.r_rdy),
            lf.r_en.eq(tk.i.ready & sm.o.valid),
        ]
        for j in range(L):
            m.d.comb += [tk.i.p.logits[j].eq(lf_word[j]), tk.i.p.tags[j].eq(sm.o.p.data[j])]

        # ---- output: one beat per token ------------------------------------------------------------
        o_left = Signal(range(cap + 1))          # tokens not yet sent, a down-counter (no compare with T - 1)
        o_last = Signal()                        # o_left == 1, a flip-flop beside it
        with m.If(setup):
            m.d.sync += [o_left.eq(tokens), o_last.eq(tokens == 1)]
        m.d.comb += [
            self.o.valid.eq(tk.o.valid),
            self.o.p.experts.eq(tk.o.p.experts),
            self.o.p.weights.eq(tk.o.p.tags),
            self.o.p.last.eq(o_last),
            tk.o.ready.eq(self.o.ready),
            self.busy.eq(active),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += [o_left.eq(o_left - 1), o_last.eq(o_left == 2)]
            with m.If(o_last):
                m.d.sync += [active.eq(0), w_chunk.eq(0), w_chunk_last.eq(n_chunks == 1),
                             w_bank.eq(0), w_base.eq(0), w_bank_last.eq(banks == 1),
                             r_bank.eq(0), r_base.eq(0), r_bank_last.eq(banks == 1)]
        return m


class FlagQueue(Elaboratable):
    """A FIFO with ``SyncFIFOBuffered``'s interface and registered flags (the router's logit FIFO, the
    score path's read-ahead FIFO): ``SyncFIFOBuffered``'s interface (``w_en``/``w_rdy``/``w_data``,
    ``r_en``/``r_rdy``/``r_data``, ``depth`` entries with the output register) with its occupancy kept
    as a thermometer code (:func:`~m3vit_hw.rowops.counts.thermometer_step`): ``w_rdy`` and the
    storage's not-empty test are flip-flops of that code, and each of its bits updates through a LUT
    of the write and read enables and its neighbours. No level adder or compare sits behind the
    fork's write enable and the join's read enable (the W1 top's ``score.i.valid -> ahead.n`` path
    ran through one). Costs ``depth - 1`` flip-flops for the count."""

    def __init__(self, width, depth):
        self.width, self.depth = width, depth
        self.w_en, self.w_rdy, self.w_data = Signal(), Signal(), Signal(width)
        self.r_en, self.r_rdy, self.r_data = Signal(), Signal(), Signal(width)

    def elaborate(self, platform):
        m = Module()
        inner = max(1, self.depth - 1)                   # storage entries besides the output register
        m.submodules.storage = storage = memory.Memory(shape=self.width, depth=inner, init=[])
        wr = storage.write_port()
        rd = storage.read_port(transparent_for=())
        # therm[i] == (entries in the storage > i): room is ~therm[inner - 1], not-empty therm[0].
        therm = Signal(inner)
        room = ~therm[inner - 1]
        any_ = therm[0]
        wptr = Signal(range(inner))
        rptr = Signal(range(inner))
        out_valid = Signal()
        write = self.w_en & room
        read = any_ & (~out_valid | self.r_en)
        m.d.comb += [
            self.w_rdy.eq(room), self.r_rdy.eq(out_valid), self.r_data.eq(rd.data),
            wr.addr.eq(wptr), wr.data.eq(self.w_data), wr.en.eq(write),
            rd.addr.eq(rptr), rd.en.eq(read),
        ]
        thermometer_step(m, therm, write, read)
        with m.If(write):
            m.d.sync += wptr.eq(Mux(wptr == inner - 1, 0, wptr + 1))
        with m.If(read):
            m.d.sync += [rptr.eq(Mux(rptr == inner - 1, 0, rptr + 1)), out_valid.eq(1)]
        with m.Elif(self.r_en):
            m.d.sync += out_valid.eq(0)
        return m
