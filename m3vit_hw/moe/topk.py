"""Top-k expert selection per token: the router's last step before the expert queues.

Checked against :func:`reference.golden.topk`: the k largest integer gate logits, best first, ties to the
lowest expert index. Selection uses the logits, not the quantized probabilities (softmax is monotonic and
the logits have fewer ties).
"""

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int as _check_int
from ..lib.credit_fifo import CreditFIFO

__all__ = ["TopK", "expert_id_width"]



def expert_id_width(experts):
    """Bits of an expert index (at least 1, so a one-expert design still has a field to carry)."""
    return max(1, (experts - 1).bit_length())


class TopK(wiring.Component):
    """Streaming top-k over the E gate logits of each token.

    A token's E logits arrive in ascending expert order, ``lanes`` per beat, in exactly
    ``ceil(E / lanes)`` beats (E is a generation-time parameter, so the unit counts beats and needs no
    ``last`` flag; lanes past E in the final beat are ignored). For each token one output beat carries the
    k selected expert indices, best first, ties going to the lowest index, bit-exact with
    :func:`reference.golden.topk`. Each logit can carry an unsigned ``tag`` (e.g. its Q0.15 router
    probability) that is returned alongside the selected index, so no second gather pass is needed.

    Parameters
    ----------
    experts : int
        E, number of logits per token, >= 1.
    top_k : int
        k, indices selected per token, in [1, E].
    lanes : int
        Logits per input beat, in [1, E].
    logit_width : int
        Width of a signed logit; the gate GEMM's int32 accumulator by default.
    tag_width : int
        Width of the per-logit tag, >= 0; 0 drops the ``tags`` fields from both layouts.

    Interface attributes
    --------------------
    i : ``In(stream.Signature(StructLayout))``
        ``logits``: ``ArrayLayout(signed(logit_width), lanes)``, lane ``l`` of beat ``b`` is expert
        ``b * lanes + l``; ``tags``: ``ArrayLayout(unsigned(tag_width), lanes)`` (if ``tag_width``).
    o : ``Out(stream.Signature(StructLayout))``
        ``experts``: ``ArrayLayout(unsigned(expert_id_width(E)), k)``, best first; ``tags``:
        ``ArrayLayout(unsigned(tag_width), k)``, the tags of those experts (if ``tag_width``).

    Timing
    ------
    One input beat per cycle (``lanes`` logits/cycle), so a token takes ``ceil(E / lanes)`` cycles at full
    rate. The result leaves :attr:`latency` cycles after the token's final beat. Only a token's final
    beat can wait, and only while the output FIFO is full (``i.ready`` is a register).

    Hardware: a registered merge tree, sized for 300 MHz. Each beat's lanes are the leaves, each a
    one-entry list; every tree node merges two sorted lists of at most k (logit, index, tag) entries into
    the sorted top k of both, in two registered stages: all-pairs comparison of the two lists' entries
    (at most k*k comparators), then each output slot selects the entry whose rank (its position in its
    own list plus the entries of the other list that beat it) is the slot. The left list holds the lower
    expert indices, so it wins ties: ties go to the lowest index with no index comparator. With several
    beats per token, a last stage merges the beat's top k into a running list (one compare-and-select
    per cycle, the only loop). The datapath registers have no enable and no reset; input is accepted
    while the output FIFO has room for every token in flight (a credit count), so no ``ready`` chain
    runs through the tree.

    Raises
    ------
    TypeError, ValueError
        On a non-integer or out-of-range parameter (the message names it).
    """

    def __init__(self, experts, top_k, *, lanes=1, logit_width=numerics.ACC_BITS, tag_width=0):
        _check_int("experts", experts, 1)
        _check_int("top_k", top_k, 1, experts)
        _check_int("lanes", lanes, 1, experts)
        _check_int("logit_width", logit_width, 1)
        _check_int("tag_width", tag_width, 0)
        self._experts = experts
        self._top_k = top_k
        self._lanes = lanes
        self._logit_width = logit_width
        self._tag_width = tag_width
        self._beats = -(-experts // lanes)

        in_fields = {"logits": data.ArrayLayout(signed(logit_width), lanes)}
        out_fields = {"experts": data.ArrayLayout(unsigned(expert_id_width(experts)), top_k)}
        if tag_width:
            in_fields["tags"] = data.ArrayLayout(unsigned(tag_width), lanes)
            out_fields["tags"] = data.ArrayLayout(unsigned(tag_width), top_k)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout(in_fields))),
            "o": Out(stream.Signature(data.StructLayout(out_fields))),
        })

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from an ``AcceleratorConfig`` (``config.model.experts``, ``config.model.top_k``)."""
        return cls(config.model.experts, config.model.top_k, **kwargs)

    @property
    def experts(self):
        return self._experts

    @property
    def top_k(self):
        return self._top_k

    @property
    def lanes(self):
        return self._lanes

    @property
    def cycles_per_token(self):
        """Input beats (= cycles at full rate) per token."""
        return self._beats

    @property
    def tree_levels(self):
        """Merge-tree levels over one beat's lanes: ``ceil(log2(lanes))``, two register stages each."""
        return (self._lanes - 1).bit_length()

    @property
    def latency(self):
        """Cycles from the transfer of a token's final beat to its result on ``o`` (output ready):
        two stages per tree level (the last level's select unregistered with one beat per token),
        the running-list stage with several beats per token, and the output FIFO."""
        levels = self.tree_levels
        if self._beats > 1:
            return 2 * levels + 1 + CreditFIFO.LATENCY
        return 2 * levels - (1 if levels else 0) + CreditFIFO.LATENCY

    def elaborate(self, platform):
        m = Module()
        k, L, E = self._top_k, self._lanes, self._experts
        idw = expert_id_width(E)
        tw = self._tag_width
        lw = self._logit_width
        beats = self._beats
        entry_layout = data.StructLayout({
            "val": signed(lw), "idx": unsigned(idw), "tag": unsigned(tw), "vld": 1})
        out_layout = self.o.payload.shape()

        def entries(name, n):
            return [Signal(entry_layout, name=f"{name}_{j}", reset_less=True) for j in range(n)]

        def above(a, b):
            """Entry a (lower expert indices) ranks above entry b: valid beats invalid, ties to a."""
            return Mux(a.vld, ~b.vld | (a.val >= b.val), ~b.vld)

        def select(a, b, c, n_out):
            """The first n_out entries of the merge of sorted lists a and b, from the compare
            matrix c[i][j] = a[i] ranks above b[j] (expressions).

            Both lists are sorted, so c[i][j] is monotone: false then true along j (a[i] ranks above
            every b after the first one it beats) and true then false along i. a[i]'s rank is
            i + (the first j with c[i][j]), b[j]'s is j + (the first i without c[i][j]); "rank ==
            slot" is then the AND of two neighbouring compare bits, not a sum of compare bits
            compared with the slot (an adder chain in front of the output multiplexer)."""
            na, nb = len(a), len(b)

            def a_at(i, s):        # a[i] has exactly s b-entries above it
                lo = Const(1) if s == 0 else ~c[i][s - 1]
                hi = Const(1) if s == nb else c[i][s]
                return lo & hi

            def b_at(j, s):        # b[j] has exactly s a-entries above it
                lo = Const(1) if s == 0 else c[s - 1][j]
                hi = Const(1) if s == na else ~c[s][j]
                return lo & hi

            out = []
            for slot in range(n_out):
                word = Const(0, entry_layout.size)
                # a[i] lands in slot i + s (s <= nb), b[j] in slot j + s (s <= na).
                for i, e in enumerate(a):
                    if 0 <= slot - i <= nb:
                        word = word | Mux(a_at(i, slot - i), e.as_value(), 0)
                for j, e in enumerate(b):
                    if 0 <= slot - j <= na:
                        word = word | Mux(b_at(j, slot - j), e.as_value(), 0)
                out.append(word)
            return out

        # ---- credits: tokens in flight plus tokens in the output FIFO ---------------------------
        m.submodules.out_fifo = out_fifo = CreditFIFO(out_layout, self.latency + 1)
        in_beat = Signal(range(beats))
        in_final = Signal(init=beats == 1)
        take = self.i.valid & self.i.ready
        # Only a final beat makes a result, so only a final beat needs room.
        m.d.comb += [self.i.ready.eq(out_fifo.room | ~in_final), out_fifo.take.eq(take & in_final)]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))
        if beats > 1:
            with m.If(take):
                m.d.sync += [in_beat.eq(Mux(in_final, 0, in_beat + 1)),
                             in_final.eq(in_beat == beats - 2)]

        # ---- the input beat as L one-entry lists ---------------------------------------------------
        lanes_in_final = E - (beats - 1) * L     # lanes past E exist only in the final beat
        v0 = Signal(name="v0")
        first0 = Signal(name="first0")
        final0 = Signal(name="final0")
        leaves = entries("leaf", L)
        # The leaves are the input beat itself (its producers hold registers), not a register stage.
        m.d.comb += [v0.eq(take), first0.eq(in_beat == 0), final0.eq(in_final)]
        for l, e in enumerate(leaves):
            m.d.comb += [
                e.val.eq(self.i.p.logits[l]),
                e.idx.eq(in_beat * L + l),
                e.vld.eq(Const(1) if l < lanes_in_final else ~in_final),
            ]
            if tw:
                m.d.comb += e.tag.eq(self.i.p.tags[l])

        # ---- merge tree over the lanes: compare stage, then select stage, per level --------------
        lists = [[e] for e in leaves]
        v, first, final = v0, first0, final0
        for lvl in range(self.tree_levels):
            cv, cfirst, cfinal = Signal(name=f"v{lvl}c"), Signal(name=f"first{lvl}c"), Signal(name=f"final{lvl}c")
            sv, sfirst, sfinal = Signal(name=f"v{lvl}s"), Signal(name=f"first{lvl}s"), Signal(name=f"final{lvl}s")
            # With one beat per token the last level's select feeds the output FIFO directly (whose
            # output register it reaches through one mux): no register of its own.
            sel = m.d.comb if (lvl == self.tree_levels - 1 and beats == 1) else m.d.sync
            m.d.sync += [cv.eq(v), cfirst.eq(first), cfinal.eq(final)]
            sel += [sv.eq(cv), sfirst.eq(cfirst), sfinal.eq(cfinal)]
            nxt_lists = []
            for n in range(0, len(lists), 2):
                pair = lists[n:n + 2]
                ra = entries(f"l{lvl}n{n // 2}a", len(pair[0]))
                m.d.sync += [r.eq(e) for r, e in zip(ra, pair[0])]
                if len(pair) == 1:            # an odd list passes through both stages
                    rs = entries(f"l{lvl}n{n // 2}s", len(ra))
                    sel += [r.eq(e) for r, e in zip(rs, ra)]
                    nxt_lists.append(rs)
                    continue
                rb = entries(f"l{lvl}n{n // 2}b", len(pair[1]))
                m.d.sync += [r.eq(e) for r, e in zip(rb, pair[1])]
                c = [[Signal(name=f"l{lvl}n{n // 2}c{i}_{j}", reset_less=True) for j in range(len(rb))]
                     for i in range(len(ra))]
                for i, a in enumerate(pair[0]):
                    for j, b in enumerate(pair[1]):
                        m.d.sync += c[i][j].eq(above(a, b))
                n_out = min(k, len(ra) + len(rb))
                rs = entries(f"l{lvl}n{n // 2}s", n_out)
                sel += [r.eq(w) for r, w in zip(rs, select(ra, rb, c, n_out))]
                nxt_lists.append(rs)
            lists = nxt_lists
            v, first, final = sv, sfirst, sfinal
        (beat_top,) = lists

        # ---- several beats per token: merge each beat's top k into the running list -------------
        if beats > 1:
            lst = entries("top", k)
            res_v = Signal(name="res_v")
            # At a token's first beat the list is empty (all entries invalid).
            held = [Signal(entry_layout, name=f"held_{j}") for j in range(k)]
            for h, e in zip(held, lst):
                m.d.comb += [h.eq(e), h.vld.eq(e.vld & ~first)]
            c = [[above(a, b) for b in beat_top] for a in held]
            merged = select(held, beat_top, c, k)
            with m.If(v):
                m.d.sync += [r.eq(w) for r, w in zip(lst, merged)]
            m.d.sync += res_v.eq(v & final)
            result, res_valid = lst, res_v
        else:
            result, res_valid = beat_top, v

        # ---- output FIFO ----------------------------------------------------------------------------
        out_word = Signal(out_layout)
        for j, e in enumerate(result):
            m.d.comb += out_word.experts[j].eq(e.idx)
            if tw:
                m.d.comb += out_word.tags[j].eq(e.tag)
        m.d.comb += [out_fifo.w_data.eq(out_word), out_fifo.w_en.eq(res_valid)]
        return m
