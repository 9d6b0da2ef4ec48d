"""The MoE router datapath after the gate GEMM: logit bias, softmax, top-k.

The gate GEMM itself (``logits = h . w_gate``, M = T tokens, K = D, N = E) runs on the shared
:class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` in RAW mode; its result beats enter :class:`Router` on ``i``.
The router then computes, bit-exact with ``reference/golden.py``:

1. ``logits += task_bias`` (``golden.router_logits``): the per-task constant logit offset of the
   task-embedding router (zero for ``multi_gate``), read per beat through ``bias_rd`` from the layer's
   parameter buffer, where it arrives with the task's gate weights (so switching tasks needs only that
   task's gate record, and no per-task state is kept here);
2. ``p = router_probs(logits)`` in a :class:`~m3vit_hw.rowops.softmax.SoftmaxUnit` (ROUTER mode, ``lanes =
   pe_cols``, ``max_length = E``), while a copy of the logits waits in a FIFO;
3. ``golden.topk(logits, k)`` in a :class:`~m3vit_hw.moe.topk.TopK` whose tags are the probabilities, so the
   k winners leave with their Q0.15 combine weights.

The output is one beat per token, in token order, in the input layout of
:class:`~m3vit_hw.moe.expert_queues.ExpertQueues`.

Why a row-tile buffer
---------------------
The engine emits RAW results in tile order (``for mb: for nb: for row in tile``): the ``ceil(E/C)``
chunks of one token's logits are interleaved with the other ``pe_rows - 1`` tokens of its row tile. The
softmax and top-k need each token's chunks consecutively, so the router regroups one row tile at a time
in a buffer of ``2 x pe_rows x ceil(E/C)`` words (two banks: the engine fills one while the other
drains). Its size is O(E) router metadata and does not depend on the token count.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from ..gemm.epilogue import StreamOutLayout
from ..numerics import SHIFT_BITS
from ..rowops.softmax import OUT_BITS, SoftmaxMode, SoftmaxUnit
from .topk import TopK, expert_id_width

__all__ = ["Router", "RouterCommandLayout", "RouterOutLayout"]


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
        The gate GEMM's RAW beats, exactly as the engine emits them for ``m = T, n = E``: row tiles of
        ``pe_rows`` tokens (the last one possibly shorter), for each column tile ``nb`` its rows in
        order. Only ``data`` is used (the position follows from the order); lanes past E are ignored.
    bias_rd : ``In(memory.ReadPort.Signature(addr_width=, shape=ArrayLayout(signed(32), pe_cols)))``
        Read port (driven by the router) of the bias words: word ``nb`` holds ``task_bias`` of experts
        ``C*nb .. C*nb+C-1``; data returns one cycle after a cycle with ``en`` high and holds while
        ``en`` is low. The router uses the port (and its data) only between accepting ``cmd`` and
        raising ``drained``.
    o : ``Out(stream.Signature(RouterOutLayout(config)))``
        One beat per token, in token order; ``last`` on token T-1.
    drained : ``Out(1)``
        Every logit of the current command has been biased and handed to the softmax and the logit
        FIFO, so ``bias_rd`` (address, enable *and* data) is no longer used. Low from ``cmd``
        acceptance until then; high when idle.
    busy : ``Out(1)``
        A command is in progress (until its last ``o`` beat).

    Throughput and latency
    ----------------------
    Input: one beat per cycle while a bank is free; a row tile's bank frees as soon as its rows have
    been read out. Output: limited by the softmax, one token per ``max(ceil(E/C),
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
        self.softmax = SoftmaxUnit(C, E)
        self.topk = TopK(E, config.model.top_k, lanes=min(C, E), tag_width=OUT_BITS)
        super().__init__({
            "cmd": In(stream.Signature(RouterCommandLayout(config))),
            "i": In(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "bias_rd": In(memory.ReadPort.Signature(
                addr_width=max(1, (self._nb - 1).bit_length()),
                shape=data.ArrayLayout(signed(numerics.ACC_BITS), C))),
            "o": Out(stream.Signature(RouterOutLayout(config))),
            "drained": Out(1, init=1),
            "busy": Out(1),
        })

    @property
    def config(self):
        return self._config

    @property
    def logit_fifo_depth(self):
        """Beats of the logit FIFO: everything the softmax can hold, so the fork never waits on it."""
        return self.softmax.score_buffer_depth + self.softmax.exp_buffer_depth + 4

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R, C = cfg.pe_rows, cfg.pe_cols
        E = cfg.model.experts
        NB = self._nb
        L = min(C, E)
        cap = cfg.token_capacity
        bank_words = R * NB
        word = data.ArrayLayout(signed(numerics.ACC_BITS), C)

        m.submodules.softmax = sm = self.softmax
        m.submodules.topk = tk = self.topk
        m.submodules.tiles = tiles = memory.Memory(shape=word, depth=2 * bank_words, init=[])
        t_w = tiles.write_port()
        t_r = tiles.read_port()
        m.submodules.logits = lf = fifo.SyncFIFOBuffered(width=word.size, depth=self.logit_fifo_depth)

        tokens = Signal(range(cap + 1))
        active = Signal()

        # ---- command: start the layer and the softmax's command -----------------------------------
        sm_pending = Signal()
        m.d.comb += self.cmd.ready.eq(~active)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                tokens.eq(Mux(self.cmd.p.tokens == 0, 1, self.cmd.p.tokens)),
                active.eq(1), sm_pending.eq(1), self.drained.eq(0),
                sm.cmd.p.c_mult.eq(self.cmd.p.c_mult), sm.cmd.p.c_shift.eq(self.cmd.p.c_shift),
                sm.cmd.p.rows.eq(Mux(self.cmd.p.tokens == 0, 1, self.cmd.p.tokens)),
                sm.cmd.p.mode.eq(SoftmaxMode.ROUTER),
                sm.cmd.p.length.eq(E),
                sm.cmd.p.out_mult.eq(0),
            ]
        m.d.comb += sm.cmd.valid.eq(sm_pending)
        with m.If(sm.cmd.valid & sm.cmd.ready):
            m.d.sync += sm_pending.eq(0)

        # ---- writer: engine beats into the row-tile banks (for nb: for row) -----------------------
        full = Signal(2)
        rows_in = [Signal(range(R + 1), name=f"rows_in{b}") for b in range(2)]
        w_bank = Signal()
        w_row = Signal(range(R))
        w_nb = Signal(range(NB))
        w_m0 = Signal(range(cap + R + 1))        # first token of the row tile being written
        w_rows = Signal(range(R + 1))            # rows in that tile: min(R, T - w_m0)
        left = tokens - w_m0
        m.d.comb += w_rows.eq(Mux(left >= R, R, left))
        w_ok = active & (w_m0 < tokens) & ~full.bit_select(w_bank, 1)
        m.d.comb += self.i.ready.eq(w_ok)
        w_go = self.i.valid & w_ok
        m.d.comb += [
            t_w.addr.eq(Mux(w_bank, bank_words, 0) + w_row * NB + w_nb),
            t_w.data.eq(self.i.p.data),
            t_w.en.eq(w_go),
        ]
        release = Signal()                        # the reader frees its bank this cycle
        r_bank = Signal()
        with m.If(w_go):
            m.d.sync += w_row.eq(w_row + 1)
            with m.If(w_row == w_rows - 1):
                m.d.sync += [w_row.eq(0), w_nb.eq(w_nb + 1)]
                with m.If(w_nb == NB - 1):
                    m.d.sync += [w_nb.eq(0), w_bank.eq(~w_bank), w_m0.eq(w_m0 + R)]
                    for b in range(2):
                        with m.If(w_bank == b):
                            m.d.sync += rows_in[b].eq(w_rows)
        set_full = Signal(2)
        clr_full = Signal(2)
        m.d.comb += [
            set_full.eq(Mux(w_go & (w_row == w_rows - 1) & (w_nb == NB - 1),
                            Mux(w_bank, 0b10, 0b01), 0)),
            clr_full.eq(Mux(release, Mux(r_bank, 0b10, 0b01), 0)),
        ]
        m.d.sync += full.eq((full | set_full) & ~clr_full)

        # ---- reader: rows in token order, bias added (one registered read stage) ------------------
        r_row = Signal(range(R))
        r_nb = Signal(range(NB))
        r_tok = Signal(range(cap + 1))            # tokens whose last beat has been read
        s_valid = Signal()
        s_last = Signal()                         # the registered beat is the command's final one
        fork_ready = Signal()
        r_rows = Mux(r_bank, rows_in[1], rows_in[0])
        r_go = full.bit_select(r_bank, 1) & (~s_valid | fork_ready)
        m.d.comb += [
            t_r.addr.eq(Mux(r_bank, bank_words, 0) + r_row * NB + r_nb),
            t_r.en.eq(r_go),
            self.bias_rd.addr.eq(r_nb),
            self.bias_rd.en.eq(r_go),
        ]
        with m.If(r_go):
            m.d.sync += [s_valid.eq(1), r_nb.eq(r_nb + 1),
                         s_last.eq((r_nb == NB - 1) & (r_tok == tokens - 1))]
            with m.If(r_nb == NB - 1):
                m.d.sync += [r_nb.eq(0), r_row.eq(r_row + 1), r_tok.eq(r_tok + 1)]
                with m.If(r_row == r_rows - 1):
                    m.d.sync += [r_row.eq(0), r_bank.eq(~r_bank)]
                    m.d.comb += release.eq(1)
        with m.Elif(fork_ready):
            m.d.sync += s_valid.eq(0)
        # bias_rd's data is part of the beat until the fork has delivered it to both branches, so the
        # port is only given up (drained) after the final beat's fork, not after its read.
        with m.If(s_valid & fork_ready & s_last):
            m.d.sync += [self.drained.eq(1), s_last.eq(0)]

        # The biased logits. Read data holds while en is low, so the sum holds until the fork is done.
        biased = Signal(word)
        for j in range(C):
            m.d.comb += biased[j].eq(t_r.data[j] + self.bias_rd.data[j])

        # ---- fork: one copy to the softmax, one to the logit FIFO ---------------------------------
        # Each branch gets valid at most once per beat (valid never waits on the other's ready).
        sent_sm = Signal()
        sent_lf = Signal()
        m.d.comb += [
            sm.i.valid.eq(s_valid & ~sent_sm),
            sm.i.payload.eq(biased),
            lf.w_en.eq(s_valid & ~sent_lf),
            lf.w_data.eq(biased),
            fork_ready.eq((sent_sm | sm.i.ready) & (sent_lf | lf.w_rdy)),
        ]
        with m.If(s_valid & fork_ready):
            m.d.sync += [sent_sm.eq(0), sent_lf.eq(0)]
        with m.Else():
            with m.If(sm.i.valid & sm.i.ready):
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
        o_tok = Signal(range(cap + 1))
        m.d.comb += [
            self.o.valid.eq(tk.o.valid),
            self.o.p.experts.eq(tk.o.p.experts),
            self.o.p.weights.eq(tk.o.p.tags),
            self.o.p.last.eq(o_tok == tokens - 1),
            tk.o.ready.eq(self.o.ready),
            self.busy.eq(active),
        ]
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += o_tok.eq(o_tok + 1)
            with m.If(o_tok == tokens - 1):
                m.d.sync += [active.eq(0), o_tok.eq(0), r_tok.eq(0), w_m0.eq(0)]
        return m
