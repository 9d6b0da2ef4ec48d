"""Sequential integer square root with stream ports.

LayerNorm needs ``den = isqrt(D*S2 - S1**2 + eps_int)`` once per row (``reference/golden.py::isqrt``).
The digit-by-digit (restoring) method produces one root bit per step from a compare-subtract of
about half the operand width, so a row's root costs a few tens of cycles of one narrow subtractor
instead of a multiplier-based Newton iteration.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .credit_fifo import CreditFIFO
from .divider import PIPELINED_FIFO_LATENCY

__all__ = ["ISqrt"]


class ISqrt(wiring.Component):
    """Floor square root: ``root = floor(sqrt(value))``, ``remainder = value - root**2``.

    Parameters
    ----------
    width : int
        Width of the unsigned operand, >= 1. The root has ``ceil(width / 2)`` bits.
    bits_per_cycle : int
        Root bits produced per cycle, in [1, 8]. Each is a compare-subtract of about
        ``width / 2 + 2`` bits chained combinationally: only 1 keeps a register-to-register path
        within 300 MHz.
    pipelined : bool
        Unroll the iteration into a pipeline of ``ceil(width / 2)`` registered steps (one
        compare-subtract each; ``bits_per_cycle`` must be 1) and an output FIFO: a new root every cycle, 2 cycles more latency than
        ``bits_per_cycle=1``. ``i.ready`` is a register. Each stage's registers are only as wide as the
        values they can hold, so no register of the pipeline holds a constant.

    Interface attributes
    --------------------
    i : In(stream.Signature(unsigned(width)))
        Operands.
    o : Out(stream.Signature(StructLayout({...})))
        Results, one per operand, in order: ``root`` (``unsigned(root_width)``) and ``remainder``
        (``unsigned(root_width + 1)``: ``remainder <= 2 * root``).

    Contract
    --------
    * Latency: ``o.valid`` rises exactly :attr:`latency` cycles after an operand transfers on ``i``.
    * Throughput: one root at a time; ``i.ready`` is high when idle or in the cycle the result
      transfers, so back-to-back roots are :attr:`period` cycles apart. Pipelined: one root per
      cycle; ``i.ready`` is high when ``o`` is empty or transfers.
    * ``o.valid`` does not depend on ``o.ready``; the result holds until it transfers.
    """

    def __init__(self, width, *, bits_per_cycle=1, pipelined=False):
        if not isinstance(width, int) or isinstance(width, bool):
            raise TypeError(f"width must be an integer, not {width!r}")
        if width < 1:
            raise ValueError(f"width must be an integer >= 1, not {width}")
        if not isinstance(bits_per_cycle, int) or isinstance(bits_per_cycle, bool):
            raise TypeError(f"bits_per_cycle must be an integer, not {bits_per_cycle!r}")
        if not 1 <= bits_per_cycle <= 8:
            raise ValueError(f"bits_per_cycle must be in [1, 8], not {bits_per_cycle}")
        if not isinstance(pipelined, bool):
            raise TypeError(f"pipelined must be a bool, not {pipelined!r}")
        if pipelined and bits_per_cycle != 1:
            raise ValueError(f"bits_per_cycle must be 1 when pipelined, not {bits_per_cycle}")
        self._pipelined = pipelined
        self._width = width
        self._root_width = (width + 1) // 2
        self._bits_per_cycle = bits_per_cycle
        self._steps = -(-self._root_width // bits_per_cycle)
        super().__init__({
            "i": In(stream.Signature(unsigned(width))),
            "o": Out(stream.Signature(data.StructLayout({
                "root": unsigned(self._root_width),
                "remainder": unsigned(self._root_width + 1),
            }))),
        })

    width = property(lambda self: self._width)
    root_width = property(lambda self: self._root_width)
    bits_per_cycle = property(lambda self: self._bits_per_cycle)
    pipelined = property(lambda self: self._pipelined)

    @property
    def latency(self):
        """Cycles from the operand transfer to ``o.valid``: ``ceil(root_width / bits_per_cycle) + 1``.

        One cycle loads the operands; each of the following ``ceil(root_width / bits_per_cycle)``
        cycles retires ``bits_per_cycle`` bits. Pipelined, the result then passes an output FIFO
        (:data:`PIPELINED_FIFO_LATENCY` more cycles).
        """
        return self._steps + 1 + (PIPELINED_FIFO_LATENCY if self._pipelined else 0)

    @property
    def period(self):
        """Minimum cycles between operand transfers when ``o`` never stalls: 1 when pipelined, else
        equal to :attr:`latency` (the next operand loads in the cycle the previous result transfers)."""
        return 1 if self._pipelined else self._steps + 1

    def _step(self, m, r, q, x, name):
        """One step of the iterative root: bring down ``x``'s top two bits; the next root bit is 1 iff
        4*root + 1 fits."""
        ne = self._steps * self._bits_per_cycle
        rw = ne + 2
        r4 = Cat(x[2 * ne - 2:], r)
        trial = Cat(Const(1, 2), q)
        # One subtraction gives the trial remainder and, by its sign, whether it fits (one carry
        # chain then a mux, not a compare chain and a subtract chain).
        diff = Signal(signed(len(r4) + 1), name=f"diff_{name}")
        m.d.comb += diff.eq(r4 - trial)
        fits = ~diff[-1]
        r_next = Signal(rw, name=f"rem_{name}")
        q_next = Signal(ne, name=f"root_{name}")
        m.d.comb += [r_next.eq(Mux(fits, diff[:rw], r4[:rw])), q_next.eq(Cat(fits, q)[:ne])]
        return r_next, q_next, Cat(Const(0, 2), x)[:2 * ne]

    def _elaborate_pipelined(self, m):
        n = self._steps
        W = self._width
        # Stage s (the registers in front of step s) brings down operand bits 2(n-1-s) and 2(n-1-s)+1
        # (the top pair has one bit for an odd width). Every register is only as wide as what it can
        # hold: the root bits found so far (s at stage s), the remainder (<= 2 * root < 2**(s + 1)) and
        # the operand bits not yet brought down. No flip-flop of the pipeline has a constant input (the
        # zeros shifted into a full-width operand register were found by a synthesizer one stage per
        # opt iteration).
        def lo(s):
            return 2 * (n - 1 - s)

        v = [Signal(name=f"v{s}") for s in range(n + 1)]
        rem = [Signal(s + 1, name=f"rem{s}", reset_less=True) if s else Const(0, 1) for s in range(n + 1)]
        root = [Signal(s, name=f"root{s}", reset_less=True) if s else None for s in range(n + 1)]
        xs = [Signal(lo(s), name=f"xs{s}", reset_less=True) if lo(s) else None for s in range(n)]
        # The operand bit pair each stage brings down, in flip-flops of their own that stay on reset:
        # the reset-less operand registers copy the pairs from stage to stage, and yosys turns such
        # chains into shift registers (SRLs), whose slow clock-to-out would otherwise start the
        # compare-subtract chain. With the reset these last registers stay flip-flops.
        pairs = [Signal(min(2, W - lo(s)), name=f"pair{s}") for s in range(n)]
        # The stages have no enable: every operand is counted in on input and out on output, and
        # input is taken only while the output FIFO has room for all in flight. So i.ready is a
        # register, and o.ready drives only the FIFO's read side.
        depth = self.latency + 1
        m.submodules.out_fifo = out_fifo = CreditFIFO(self.o.payload.shape(), depth)
        take = self.i.valid & out_fifo.room
        m.d.comb += [self.i.ready.eq(out_fifo.room), out_fifo.take.eq(take), out_fifo.w_en.eq(v[n])]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))

        x = self.i.payload
        m.d.sync += [v[0].eq(take), pairs[0].eq(x[lo(0):])]
        if xs[0] is not None:
            m.d.sync += xs[0].eq(x[:lo(0)])
        for s in range(n):
            pair = pairs[s] if len(pairs[s]) == 2 else Cat(pairs[s], Const(0, 1))
            r4 = Cat(pair, rem[s])                          # 4*r + next pair
            trial = Cat(Const(1, 2), root[s]) if root[s] is not None else Const(1, 2)   # 4*root + 1
            # One subtraction gives the trial remainder and, by its sign, whether it fits (one carry
            # chain then a mux, not a compare chain and a subtract chain).
            diff = Signal(signed(max(len(r4), len(trial)) + 1), name=f"diff_{s}")
            m.d.comb += diff.eq(r4 - trial)
            fits = ~diff[-1]
            m.d.sync += [v[s + 1].eq(v[s]), rem[s + 1].eq(Mux(fits, diff, r4)[:s + 2]),
                         root[s + 1].eq(Cat(fits, root[s]) if root[s] is not None else fits)]
            if s + 1 < n:
                m.d.sync += pairs[s + 1].eq(xs[s][lo(s + 1):])
                if xs[s + 1] is not None:
                    m.d.sync += xs[s + 1].eq(xs[s][:lo(s + 1)])
        result = Signal(self.o.payload.shape())
        m.d.comb += [
            result.root.eq(root[n]),
            result.remainder.eq(rem[n]),
            out_fifo.w_data.eq(result),
        ]
        return m

    def elaborate(self, platform):
        m = Module()
        if self._pipelined:
            return self._elaborate_pipelined(m)
        k = self._bits_per_cycle
        # Pad the root to a multiple of k digits; leading zero digit pairs leave the result unchanged.
        ne = self._steps * k
        # The partial remainder never exceeds 2 * partial root < 2**(ne + 1).
        rw = ne + 2

        rem = Signal(rw)
        root = Signal(ne)
        xs = Signal(2 * ne)           # operand digit pairs still to bring down, MSB first
        count = Signal(range(self._steps + 1))
        busy = Signal()

        m.d.comb += self.i.ready.eq(~busy & (~self.o.valid | self.o.ready))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [
                rem.eq(0), root.eq(0), xs.eq(self.i.payload),
                count.eq(self._steps), busy.eq(1),
            ]

        # Each step's results are named signals, so the k-step expression stays linear in k.
        r, q, x = rem, root, xs
        for step in range(k):
            r, q, x = self._step(m, r, q, x, step)
        with m.If(busy):
            m.d.sync += [rem.eq(r), root.eq(q), xs.eq(x), count.eq(count - 1)]
            with m.If(count == 1):
                m.d.sync += [busy.eq(0), self.o.valid.eq(1)]

        m.d.comb += [
            self.o.payload.root.eq(root[:self._root_width]),
            self.o.payload.remainder.eq(rem[:self._root_width + 1]),
        ]
        return m
