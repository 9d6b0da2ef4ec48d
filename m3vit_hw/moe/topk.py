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
    One input beat per cycle (``lanes`` logits/cycle), so a token takes ``ceil(E / lanes)`` cycles. The
    result is valid the cycle after the token's final beat and is held in an output register, so the next
    token streams in meanwhile; only the next token's final beat waits for the output to drain.

    Hardware: a sorted list of k (logit, index, tag) registers. Every beat, the k list entries and the
    lanes new logits are ranked in one cycle by all-pairs comparison (k*lanes + lanes*(lanes-1)/2
    comparators; list entries need no comparison among themselves since they are already sorted), and
    list slot j takes the candidate of rank j. Ties need no index comparator: candidates are ordered by
    expert index (list entries precede the current beat, lanes ascend), so "earlier wins a tie" is static.

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

    def elaborate(self, platform):
        m = Module()
        k, L, E = self._top_k, self._lanes, self._experts
        idw = expert_id_width(E)
        tw = self._tag_width

        def entry(name):
            return (Signal(signed(self._logit_width), name=f"{name}_val"),
                    Signal(unsigned(idw), name=f"{name}_idx"),
                    Signal(unsigned(tw), name=f"{name}_tag"),
                    Signal(name=f"{name}_vld"))

        lst = [entry(f"top{j}") for j in range(k)]
        out = [(Signal(unsigned(idw), name=f"out{j}_idx"), Signal(unsigned(tw), name=f"out{j}_tag"))
               for j in range(k)]

        beat = Signal(range(self._beats))
        base = Signal(range(self._beats * L))   # expert index of lane 0 in this beat
        first = beat == 0
        final = beat == self._beats - 1
        # Lanes past E exist only in the final beat (E % lanes != 0): mark them invalid there.
        lanes_in_final = E - (self._beats - 1) * L

        # Candidates in expert-index order: the list (masked at a token's first beat), then the lanes.
        cands = []
        for val, idx, tag, vld in lst:
            cands.append((val, idx, tag, vld & ~first, True))
        for l in range(L):
            tag = self.i.p.tags[l] if tw else Const(0, 0)
            vld = Const(1) if l < lanes_in_final else ~final
            cands.append((self.i.p.logits[l], (base + l)[:idw], tag, vld, False))

        def wins(a, b):
            """Whether candidate a (earlier in index order) ranks above candidate b."""
            if a[4] and b[4]:
                return Const(1)        # the list is already sorted
            return Mux(a[3], ~b[3] | (a[0] >= b[0]), ~b[3])

        n = len(cands)
        beaten_by = [[None] * n for _ in range(n)]
        for x in range(n):
            for y in range(x + 1, n):
                w = Signal(name=f"win_{x}_{y}")
                m.d.comb += w.eq(wins(cands[x], cands[y]))
                beaten_by[y][x] = w
                beaten_by[x][y] = ~w
        ranks = []
        for x in range(n):
            r = Signal(range(n), name=f"rank_{x}")
            m.d.comb += r.eq(sum(beaten_by[x][y] for y in range(n) if y != x) if n > 1 else 0)
            ranks.append(r)

        # Slot j of the new list is the candidate ranked j (ranks are a permutation, so exactly one hits).
        new = []
        for j in range(k):
            sel = [Const(0, signed(self._logit_width)), Const(0, idw), Const(0, tw), Const(0)]
            for x, cand in enumerate(cands):
                hit = ranks[x] == j
                sel = [Mux(hit, field, prev) for field, prev in zip(cand[:4], sel)]
            new.append(tuple(sel))

        # The final beat may only be taken when the output register is free (or freeing this cycle).
        m.d.comb += self.i.ready.eq(~final | ~self.o.valid | self.o.ready)
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            for (val, idx, tag, vld), (nval, nidx, ntag, nvld) in zip(lst, new):
                m.d.sync += [val.eq(nval), idx.eq(nidx), tag.eq(ntag), vld.eq(nvld)]
            with m.If(final):
                m.d.sync += [beat.eq(0), base.eq(0), self.o.valid.eq(1)]
                for (oidx, otag), (_, nidx, ntag, _) in zip(out, new):
                    m.d.sync += [oidx.eq(nidx), otag.eq(ntag)]
            with m.Else():
                m.d.sync += [beat.eq(beat + 1), base.eq(base + L)]

        for j, (oidx, otag) in enumerate(out):
            m.d.comb += self.o.p.experts[j].eq(oidx)
            if tw:
                m.d.comb += self.o.p.tags[j].eq(otag)
        return m
