"""Per-expert token queues built by counting: the first half of the MoE reordering controller.

Checked against :func:`reference.golden.expert_queues`. The queues group the layer's (token, combine
weight) pairs by expert, ascending token order inside each expert, so that each active expert's weights
are fetched once and every token routed to it is computed in one pass.
"""

from amaranth.hdl import Array, Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .. import numerics
from .topk import expert_id_width
from ..checks import check_int as _check_int
# A token id is an index into token_capacity entries: the same width as config.token_bits.
from ..config import index_bits

__all__ = ["ExpertQueues"]


class ExpertQueues(wiring.Component):
    """Builds the per-expert token queues of one MoE layer and walks them out, active experts ascending.

    Input: one beat per token, in token order; the token id is the arrival index within the layer
    (0, 1, ...), and ``last`` marks the layer's final token. Output: for each active expert in ascending
    order, a *header* beat (``header=1``, ``expert``, ``count``) followed by ``count`` *entry* beats
    (``header=0``, ``token``, ``weight``; ``expert`` and ``count`` repeat the header's) in ascending token
    order. The final entry of the layer has ``last=1``. ``token``/``weight`` are 0 on header beats.
    Idle experts produce nothing. A consumer (the reordering controller) can start fetching an expert's
    weights as soon as it sees the header. The walk is produced once per layer: a consumer that needs an
    expert's list more than once (fc1 gather, fc2 scatter, one pass per weight tile) keeps it locally;
    it is at most T entries.

    Parameters
    ----------
    experts : int
        E, >= 1.
    top_k : int
        k, expert ids per token, in [1, E]. The k ids of a token must be distinct (as
        :class:`~m3vit_hw.moe.topk.TopK` guarantees); each queue then holds at most T entries.
    token_capacity : int
        Largest T per layer, >= 1. Sizes the token memory (T entries of k ids and k weights) and the queue
        memory (T*k entries of token and weight).
    weight_width : int
        Width of an unsigned combine weight; Q0.15 router probabilities need 16 (1.0 = 2**15).

    Interface attributes
    --------------------
    i : ``In(stream.Signature(StructLayout))``
        ``experts``: ``ArrayLayout(unsigned(expert_id_width(E)), k)``; ``weights``:
        ``ArrayLayout(unsigned(weight_width), k)`` (weight j belongs to expert j); ``last``: 1.
    o : ``Out(stream.Signature(StructLayout))``
        ``header``: 1; ``expert``: ``unsigned(expert_id_width(E))``; ``count``:
        ``range(token_capacity + 1)``; ``token``: ``unsigned(index_bits(token_capacity))``;
        ``weight``: ``unsigned(weight_width)``; ``last``: 1.
    k : ``In(range(1, top_k + 1), init=top_k)``
        The layer's k, in ``[1, top_k]`` (held while a layer is in the unit): only each token's first
        ``k`` ids and weights are queued (the router's top-k list is best first, so its first ``k``
        entries are the layer's top-k). Left unconnected it is ``top_k``.
    overflow : ``Out(1)``
        Sticky (until reset): a layer had more than ``token_capacity`` tokens. The token that filled the
        capacity was treated as the layer's last; later beats are taken as the next layer.

    Timing
    ------
    The unit works one layer at a time in four phases; ``i.ready`` is high only in the first.

    1. *Ingest* (histogram): 1 token/cycle, T cycles. Each token is stored and the k expert counters
       are incremented (a cycle later, from registered hits: one more cycle after the last token).
    2. *Prefix*: E cycles; an exclusive prefix sum of the counts gives each expert's write pointer.
    3. *Scatter*: 1 entry/cycle, T*k cycles; entry j of token t goes to ``queue[wp[e]++]``. Since tokens
       are scattered in order, each queue is already in ascending token order: no sort. The entries
       pass three stages (pick, one-hot decode, write), so the walk starts one cycle after the last
       pick, when the last write is in flight.
    4. *Walk*: one cycle per expert (header or skip) plus one per entry, E + T*k cycles at full
       output rate; the unit then returns to ingest.

    Total with an always-ready consumer: ``T + 2*E + 2*T*k + 3`` cycles per layer, from the first
    token's transfer to the final entry's.
    """

    #: Cycles between the scatter's last pick and the walk's first cycle: the picked entry is
    #: registered before its one-hot decode (a block-RAM read without output register in front of
    #: the decode missed 300 MHz in the W1 top), so the last write is a cycle later. Fixed per layer.
    SCATTER_DRAIN = 1

    def __init__(self, experts, top_k, token_capacity, *, weight_width=numerics.COMBINE_WEIGHT_BITS):
        _check_int("experts", experts, 1)
        _check_int("top_k", top_k, 1, experts)
        _check_int("token_capacity", token_capacity, 1)
        _check_int("weight_width", weight_width, 1)
        self._experts = experts
        self._top_k = top_k
        self._capacity = token_capacity
        self._weight_width = weight_width
        idw = expert_id_width(experts)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({
                "experts": data.ArrayLayout(unsigned(idw), top_k),
                "weights": data.ArrayLayout(unsigned(weight_width), top_k),
                "last": unsigned(1),
            }))),
            "o": Out(stream.Signature(data.StructLayout({
                "header": unsigned(1),
                "expert": unsigned(idw),
                "count": range(token_capacity + 1),
                "token": unsigned(index_bits(token_capacity)),
                "weight": unsigned(weight_width),
                "last": unsigned(1),
            }))),
            "overflow": Out(1),
            # Run-time k (the MoE client sets it from its start; unconnected it stays ``top_k``).
            "k": In(range(1, top_k + 1), init=top_k),
        })

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from an ``AcceleratorConfig``: ``model.experts``, ``model.top_k``, ``token_capacity``."""
        return cls(config.model.experts, config.model.top_k, config.token_capacity, **kwargs)

    @property
    def experts(self):
        return self._experts

    @property
    def top_k(self):
        return self._top_k

    @property
    def token_capacity(self):
        return self._capacity

    def cycles(self, tokens):
        """Cycles for one layer of ``tokens`` tokens with a source and sink that never stall."""
        return tokens + 2 * self._experts + 2 * tokens * self._top_k + 2 + self.SCATTER_DRAIN

    def elaborate(self, platform):
        m = Module()
        E, k, cap = self._experts, self._top_k, self._capacity
        idw = expert_id_width(E)
        tokw = index_bits(cap)
        ww = self._weight_width

        tok_layout = data.StructLayout({
            "experts": data.ArrayLayout(unsigned(idw), k),
            "weights": data.ArrayLayout(unsigned(ww), k),
        })
        q_layout = data.StructLayout({"token": unsigned(tokw), "weight": unsigned(ww)})
        m.submodules.tokmem = tokmem = Memory(shape=tok_layout, depth=cap, init=[])
        m.submodules.qmem = qmem = Memory(shape=q_layout, depth=cap * k, init=[])
        tok_wr = tokmem.write_port()
        tok_rd = tokmem.read_port()
        q_wr = qmem.write_port()
        q_rd = qmem.read_port()

        # With distinct ids per token an expert gets at most T entries, so count fits range(cap + 1);
        # write pointers address the whole T*k queue memory (plus one past the end).
        counts = [Signal(range(cap + 1), name=f"count{e}") for e in range(E)]
        # active[e] == (counts[e] != 0), kept alongside so the walk tests one bit, not a wide count.
        active = [Signal(name=f"active{e}") for e in range(E)]
        wptr = Array(Signal(range(cap * k + 1), name=f"wptr{e}") for e in range(E))
        ntok = Signal(range(cap + 1))       # tokens in this layer
        ntok_full = Signal(init=cap == 1)   # ntok == cap - 1, registered a token ahead
        total = Signal(range(cap * k + 1))  # entries in this layer (the prefix sum's final value)
        ps_expert = Signal(range(E))        # prefix-sum expert
        t = Signal(range(cap))              # scatter token
        t1 = Signal(range(cap + 1))         # t + 1 (the token memory's read address), kept beside t
        j = Signal(range(k))                # scatter slot within the token
        we = Signal(range(E))               # walk expert
        in_exp = Signal()                   # walk: inside an expert's entries
        rem = Signal(range(cap + 1))        # walk: entries left in this expert
        rem1 = Signal()                     # rem == 1, registered with rem
        ptr = Signal(range(cap * k + 1))    # walk: queue read address
        # Down-counters, so that "last" tests compare with a constant instead of an adder's output.
        t_left = Signal(range(cap))         # scatter: tokens after t
        t_last = Signal()                   # t_left == 0, registered with t_left
        left = Signal(range(cap * k + 1))   # walk: entries not yet issued
        # Scatter stage 2 registers: the entry picked from the token memory's output in stage 1
        # (registered as is: the memory's read data has no output register, so the pick's k:1 mux and
        # the one-hot decode behind it would be one path from the block RAM: the W1 top's
        # tok_rd__data -> sc_oh).
        pk_valid = Signal()
        pk_e = Signal(range(E))
        pk_w = Signal(ww)
        pk_t = Signal(range(cap))
        # Scatter stage 3 registers: the picked entry with its expert decoded one-hot, so each write
        # pointer increments by its own bit (no E:1 mux in front of the adder) and only the queue
        # memory's address muxes the pointers.
        sc_valid = Signal()
        sc_e = Signal(range(E))
        sc_oh = Signal(E)
        sc_w = Signal(ww)
        sc_t = Signal(range(cap))
        # The run-time k, registered as a slot mask and as k - 1 (k is held while a layer runs and is
        # set long before the first token arrives): the per-expert hit counts and the scatter's
        # slot compare then start at flip-flops, not at the port (a register in the MoE client).
        k_mask = Signal(k, init=(1 << k) - 1)
        k_m1 = Signal(range(k), init=k - 1)
        m.d.sync += [k_mask.eq(Cat(*(jj < self.k for jj in range(k)))), k_m1.eq(self.k - 1)]

        # The phase, one flip-flop per phase (one-hot, set and cleared by the transitions), so the wide
        # per-expert updates below select on flip-flops, not on a decoded state vector: the W1 top's
        # phase_state -> active / total / ps_expert paths. The walk has two: ``walking`` (issuing
        # headers and entries) and ``walk_end`` (everything issued; the next free output slot ends it).
        ingest = Signal(init=1)             # also i.ready: the router's output FIFO's read enable
        hist = Signal()
        prefix = Signal()
        scatter = Signal()
        sc_drain = Signal()                 # the cycle after the last pick (its write is in flight)
        walking = Signal()
        walk_end = Signal()

        # Output register stage: header fields from registers, entry fields straight from the queue
        # memory's read register (it holds its value while the read port is disabled).
        o_header = Signal()
        o_expert = Signal(idw)
        o_count = Signal(range(cap + 1))
        o_last = Signal()
        m.d.comb += [
            self.o.p.header.eq(o_header),
            self.o.p.expert.eq(o_expert),
            self.o.p.count.eq(o_count),
            self.o.p.token.eq(Mux(o_header, 0, q_rd.data.token)),
            self.o.p.weight.eq(Mux(o_header, 0, q_rd.data.weight)),
            self.o.p.last.eq(o_last),
            # The read addresses are their pointers in every phase (they matter only with en).
            tok_rd.addr.eq(t1),
            tok_rd.en.eq(0),
            q_rd.addr.eq(ptr),
            q_rd.en.eq(0),
            self.i.ready.eq(ingest),
        ]

        # ---- the walk's decisions, from flip-flops -------------------------------------------------
        # The counts and active flags rotate by one as the walk moves to the next expert (as in
        # PREFIX), so expert ``we``'s are always counts[0] / active[0]: no E:1 mux between ``we`` and
        # the header's count and the walk's decisions.
        can_issue = ~self.o.valid | self.o.ready
        walk_go = walking & can_issue
        entry_go = walk_go & in_exp                       # issue an entry
        header_go = walk_go & ~in_exp & active[0]         # issue a header
        next_expert = walk_go & Mux(in_exp, rem1, ~active[0])   # the walk moves to expert we + 1
        walk_done = walk_end & can_issue                  # back to ingest

        # ---- per-expert counts and flags -------------------------------------------------------------
        # Ingest's registered per-expert hits (cleared unless a token arrives). ``hit`` is zero outside
        # INGEST and HIST, so the counters add it unconditionally; the rotations (PREFIX, the walk's
        # next expert) and the walk's final clear override.
        hit = Signal(E)
        m.d.sync += hit.eq(0)
        rotate_counts = prefix | next_expert
        for e in range(E):
            with m.If(walk_done):
                m.d.sync += [counts[e].eq(0), active[e].eq(0)]
            with m.Elif(rotate_counts):
                m.d.sync += counts[e].eq(counts[(e + 1) % E])
                with m.If(next_expert):
                    m.d.sync += active[e].eq(active[(e + 1) % E])
            with m.Else():
                m.d.sync += [counts[e].eq(counts[e] + hit[e]), active[e].eq(active[e] | hit[e])]

        # ---- INGEST (histogram): 1 token/cycle --------------------------------------------------------
        m.d.comb += [
            tok_wr.addr.eq(ntok),
            tok_wr.data.experts.eq(self.i.p.experts),
            tok_wr.data.weights.eq(self.i.p.weights),
            tok_wr.en.eq(self.i.valid & ingest),
        ]
        with m.If(self.i.valid & ingest):
            for e in range(E):
                # A token's k ids are distinct (the contract), so an expert is hit at most once per
                # token: an OR of the slot compares, registered; the counters add the registered hits
                # a cycle later, so no compare drives a counter's adder.
                m.d.sync += hit[e].eq(
                    Cat(*((self.i.p.experts[jj] == e) & k_mask[jj] for jj in range(k))).any())
            m.d.sync += [ntok.eq(ntok + 1), ntok_full.eq((ntok == cap - 2) if cap >= 2 else 0)]
            with m.If(self.i.p.last | ntok_full):
                with m.If(~self.i.p.last):
                    m.d.sync += self.overflow.eq(1)
                m.d.sync += [ps_expert.eq(0), total.eq(0), ingest.eq(0), hist.eq(1)]

        # ---- HIST: the last token's registered hits reach the counters ---------------------------------
        with m.If(hist):
            m.d.sync += [hist.eq(0), prefix.eq(1)]

        # ---- PREFIX: E cycles -------------------------------------------------------------------------
        # The counts rotate by one per cycle (E cycles bring them back in place) and the write
        # pointers shift in at the top, so expert ps_expert's count is always counts[0] and its
        # pointer lands in wptr[e] after the last shift: no E:1 mux in front of the adder.
        with m.If(prefix):
            m.d.sync += [total.eq(total + counts[0]), ps_expert.eq(ps_expert + 1), wptr[E - 1].eq(total)]
            for e in range(E - 1):
                m.d.sync += wptr[e].eq(wptr[e + 1])
            with m.If(ps_expert == E - 1):
                # Prefetch token 0 (t1 is 0 here) so scatter runs one entry per cycle from its first
                # cycle.
                m.d.comb += tok_rd.en.eq(1)
                m.d.sync += [t.eq(0), t1.eq(1), j.eq(0), t_left.eq(ntok - 1), t_last.eq(ntok == 1),
                             prefix.eq(0), scatter.eq(1)]
        with m.Else():
            # Scatter stage 2: the entry's expert's pointer, used and incremented.
            for e in range(E):
                m.d.sync += wptr[e].eq(wptr[e] + sc_oh[e])
        with m.If(hist):
            m.d.sync += t1.eq(0)

        # ---- SCATTER: 1 entry/cycle, stage 1 picks entry j of the token memory's output ---------------
        m.d.sync += [pk_valid.eq(scatter), sc_valid.eq(pk_valid), sc_oh.eq(0)]
        with m.If(pk_valid):
            m.d.sync += [sc_e.eq(pk_e), sc_w.eq(pk_w), sc_t.eq(pk_t)]
            m.d.sync += [sc_oh[e].eq(pk_e == e) for e in range(E)]
        m.d.comb += [
            q_wr.addr.eq(wptr[sc_e]),
            q_wr.data.token.eq(sc_t),
            q_wr.data.weight.eq(sc_w),
            q_wr.en.eq(sc_valid),
        ]
        with m.If(scatter):
            pick = tok_rd.data.experts[j]
            m.d.sync += [pk_e.eq(pick), pk_w.eq(tok_rd.data.weights[j]), pk_t.eq(t)]
            with m.If(j == k_m1):
                m.d.comb += tok_rd.en.eq(1)
                m.d.sync += [j.eq(0), t.eq(t1), t1.eq(t1 + 1), t_left.eq(t_left - 1), t_last.eq(t_left == 1)]
                with m.If(t_last):
                    m.d.sync += [we.eq(0), in_exp.eq(0), ptr.eq(0), left.eq(total),
                                 scatter.eq(0), sc_drain.eq(1)]
            with m.Else():
                m.d.sync += j.eq(j + 1)

        with m.If(sc_drain):
            m.d.sync += [sc_drain.eq(0), walking.eq(1)]

        # ---- WALK: a header or skip per expert, one beat per entry -------------------------------------
        # The scatter's last entry is written in the walk's first cycle (stage 3); the walk reads the
        # queue memory no earlier than its second cycle.
        with m.If(can_issue & (walking | walk_end)):
            m.d.sync += self.o.valid.eq(0)
        with m.If(walk_done):
            m.d.sync += [ntok.eq(0), ntok_full.eq(cap == 1), walk_end.eq(0), ingest.eq(1)]
        m.d.comb += q_rd.en.eq(entry_go)
        with m.If(entry_go):
            m.d.sync += [
                self.o.valid.eq(1), o_header.eq(0), o_last.eq(left == 1),
                ptr.eq(ptr + 1), rem.eq(rem - 1), rem1.eq(rem == 2), left.eq(left - 1),
            ]
            with m.If(rem1):
                m.d.sync += in_exp.eq(0)
        with m.If(header_go):
            m.d.sync += [
                self.o.valid.eq(1), o_header.eq(1), o_expert.eq(we),
                o_count.eq(counts[0]), o_last.eq(0),
                rem.eq(counts[0]), rem1.eq(counts[0] == 1), in_exp.eq(1),
            ]
        with m.If(next_expert):
            m.d.sync += we.eq(we + 1)
            with m.If(we == E - 1):
                m.d.sync += [walking.eq(0), walk_end.eq(1)]
        return m
