"""Sequential unsigned integer divider with stream ports.

The accelerator needs one exact integer division per row, never per element: the LayerNorm
reciprocal ``floor(2**LN_INV_BITS / den)``, the attention AV multiplier
``floor(out_mult * 2**AV_RECIP_BITS / l)`` and the router normaliser
``floor(2**ROUTER_RECIP_BITS / sum(e16))`` (see :mod:`m3vit_hw.numerics`). A row lasts tens of cycles,
so a small shift-and-subtract divider that retires ``bits_per_cycle`` quotient bits per cycle is enough
and costs one subtractor per retired bit instead of a full array divider.
"""

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .credit_fifo import CreditFIFO

#: Cycles a pipelined Divider or ISqrt result spends in its output FIFO.
PIPELINED_FIFO_LATENCY = CreditFIFO.LATENCY

__all__ = ["PIPELINED_FIFO_LATENCY", "Divider"]


def _check_width(name, value, minimum=1):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value}")


class Divider(wiring.Component):
    """Restoring shift-and-subtract divider: ``quotient = dividend // divisor``.

    Parameters
    ----------
    dividend_width : int
        Width of the unsigned dividend, >= 1.
    divisor_width : int
        Width of the unsigned divisor (and of the remainder), >= 1.
    quotient_width : int or None
        Width of the quotient, >= 1; defaults to ``dividend_width``. A caller that knows the quotient
        is small (e.g. a divisor with a known lower bound) saves iterations by narrowing it.
    bits_per_cycle : int
        Quotient bits retired per cycle, in [1, 8]. Each one is a subtractor of ``divisor_width + 1``
        bits chained combinationally: only 1 keeps a register-to-register path within 300 MHz.
    pipelined : bool
        Unroll the iteration into a pipeline of ``quotient_width`` registered steps (one subtractor
        each, ``bits_per_cycle`` must be 1) and an output FIFO: a new division every cycle, 2 cycles more latency than
        ``bits_per_cycle=1``, ``quotient_width`` times the subtractors and registers. ``i.ready`` is a register.

    Interface attributes
    --------------------
    i : In(stream.Signature(StructLayout({...})))
        Operands: ``dividend`` (``unsigned(dividend_width)``) and ``divisor``
        (``unsigned(divisor_width)``).
    o : Out(stream.Signature(StructLayout({...})))
        Results, one per operand beat, in order: ``quotient`` (``unsigned(quotient_width)``),
        ``remainder`` (``unsigned(divisor_width)``) and ``overflow`` (1 bit). ``overflow`` is set when ``divisor == 0`` or the
        quotient does not fit in ``quotient_width`` bits; the quotient then saturates to all ones and
        the remainder reads 0.

    Contract
    --------
    * Latency: ``o.valid`` rises exactly :attr:`latency` cycles after the cycle in which an operand
      transfers on ``i`` (constant, overflow included).
    * Throughput: one division at a time. ``i.ready`` is high when the divider is idle, or in the cycle
      its result transfers on ``o`` (so back-to-back divisions are :attr:`period` cycles apart).
      Pipelined: one division per cycle; ``i.ready`` is high when ``o`` is empty or transfers (all
      stages advance together).
    * ``o.valid`` does not depend on ``o.ready``; the result holds until it transfers.
    """

    def __init__(self, dividend_width, divisor_width, quotient_width=None, *, bits_per_cycle=1, pipelined=False):
        _check_width("dividend_width", dividend_width)
        _check_width("divisor_width", divisor_width)
        if quotient_width is None:
            quotient_width = dividend_width
        _check_width("quotient_width", quotient_width)
        if not isinstance(bits_per_cycle, int) or isinstance(bits_per_cycle, bool):
            raise TypeError(f"bits_per_cycle must be an integer, not {bits_per_cycle!r}")
        if not 1 <= bits_per_cycle <= 8:
            raise ValueError(f"bits_per_cycle must be in [1, 8], not {bits_per_cycle}")
        if not isinstance(pipelined, bool):
            raise TypeError(f"pipelined must be a bool, not {pipelined!r}")
        if pipelined and bits_per_cycle != 1:
            raise ValueError(f"bits_per_cycle must be 1 when pipelined, not {bits_per_cycle}")
        self._pipelined = pipelined
        self._dividend_width = dividend_width
        self._divisor_width = divisor_width
        self._quotient_width = quotient_width
        self._bits_per_cycle = bits_per_cycle
        self._steps = -(-quotient_width // bits_per_cycle)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout({
                "dividend": unsigned(dividend_width),
                "divisor": unsigned(divisor_width),
            }))),
            "o": Out(stream.Signature(data.StructLayout({
                "quotient": unsigned(quotient_width),
                "remainder": unsigned(divisor_width),
                "overflow": unsigned(1),
            }))),
        })

    dividend_width = property(lambda self: self._dividend_width)
    divisor_width = property(lambda self: self._divisor_width)
    quotient_width = property(lambda self: self._quotient_width)
    bits_per_cycle = property(lambda self: self._bits_per_cycle)
    pipelined = property(lambda self: self._pipelined)

    @property
    def latency(self):
        """Cycles from the operand transfer to ``o.valid``: ``ceil(quotient_width / bits_per_cycle) + 1``.

        One cycle loads the operands; each of the following ``ceil(quotient_width / bits_per_cycle)``
        cycles retires ``bits_per_cycle`` bits. Pipelined, the result then passes an output FIFO
        (:data:`PIPELINED_FIFO_LATENCY` more cycles).
        """
        return self._steps + 1 + (PIPELINED_FIFO_LATENCY if self._pipelined else 0)

    @property
    def period(self):
        """Minimum cycles between operand transfers when ``o`` never stalls: 1 when pipelined, else
        equal to :attr:`latency` (the next operand loads in the cycle the previous result transfers)."""
        return 1 if self._pipelined else self._steps + 1

    def _step(self, m, r, q, den, name, bit=None):
        """One restoring step: bring down the next dividend bit (``q``'s top bit unless ``bit`` is
        given), subtract if it fits."""
        vw, qe = self._divisor_width, self._steps * self._bits_per_cycle
        shifted = Cat(q[qe - 1] if bit is None else bit, r)    # 2*r + next bit, vw + 1 bits
        # One subtraction gives both the trial remainder and, by its sign, whether it fits: a single
        # carry chain then a mux (a separate >= compare would be a second chain feeding the mux).
        diff = Signal(signed(vw + 2), name=f"diff_{name}")
        m.d.comb += diff.eq(shifted - den)
        fits = ~diff[-1]
        r_next = Signal(vw, name=f"rem_{name}")
        q_next = Signal(qe, name=f"quo_{name}")
        m.d.comb += [
            r_next.eq(Mux(fits, diff[:vw], shifted[:vw])),   # < den, so vw bits suffice
            q_next.eq(Cat(fits, q[:qe - 1])),
        ]
        return r_next, q_next

    def _load(self, dividend, divisor):
        """The load stage's values: (rem, quo, den, ovf)."""
        qe = self._steps * self._bits_per_cycle
        # Overflow iff floor(dividend / 2**quotient_width) >= divisor (covers divisor == 0).
        return (dividend >> qe, dividend[:qe] if qe < self._dividend_width else dividend, divisor,
                (dividend >> self._quotient_width) >= divisor)

    def _outputs(self, m, rem, quo, ovf, target=None):
        target = self.o.payload if target is None else target
        all_ones = Const((1 << self._quotient_width) - 1, self._quotient_width)
        m.d.comb += [
            target.quotient.eq(Mux(ovf, all_ones, quo[:self._quotient_width])),
            target.remainder.eq(Mux(ovf, 0, rem)),
            target.overflow.eq(ovf),
        ]

    def _elaborate_pipelined(self, m):
        vw, qe, n = self._divisor_width, self._steps, self._steps
        v = [Signal(name=f"v{s}") for s in range(n + 1)]
        rem = [Signal(vw, name=f"rem{s}", reset_less=True) for s in range(n + 1)]
        quo = [Signal(qe, name=f"quo{s}", reset_less=True) for s in range(n + 1)]
        den = [Signal(vw, name=f"den{s}", reset_less=True) for s in range(n)]
        ovf = [Signal(name=f"ovf{s}", reset_less=True) for s in range(n + 1)]
        # The dividend bit each stage brings down, in a flip-flop of its own that stays on reset: the
        # reset-less quotient registers shift each dividend bit up one place per stage, and yosys turns
        # such chains into shift registers (SRLs), whose slow clock-to-out would otherwise start the
        # compare-subtract chain. With the reset this last register of each chain stays a flip-flop.
        nxt = [Signal(name=f"nxt{s}") for s in range(n)]
        # The stages have no enable: every operand is counted in on input and out on output, and
        # input is taken only while the output FIFO has room for all in flight. So i.ready is a
        # register, and o.ready drives only the FIFO's read side.
        depth = self.latency + 1
        m.submodules.out_fifo = out_fifo = CreditFIFO(self.o.payload.shape(), depth)
        take = self.i.valid & out_fifo.room
        m.d.comb += [self.i.ready.eq(out_fifo.room), out_fifo.take.eq(take), out_fifo.w_en.eq(v[n])]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))
        adv = 1
        r0, q0, d0, o0 = self._load(self.i.payload.dividend, self.i.payload.divisor)
        with m.If(adv):
            m.d.sync += [v[0].eq(take), rem[0].eq(r0), quo[0].eq(q0), den[0].eq(d0), ovf[0].eq(o0),
                         nxt[0].eq(q0[qe - 1])]
            for s in range(n):
                r, q = self._step(m, rem[s], quo[s], den[s], s, bit=nxt[s])
                m.d.sync += [v[s + 1].eq(v[s]), rem[s + 1].eq(r), quo[s + 1].eq(q), ovf[s + 1].eq(ovf[s])]
                if s + 1 < n:
                    m.d.sync += [den[s + 1].eq(den[s]), nxt[s + 1].eq(q[qe - 1])]
        result = Signal(self.o.payload.shape())
        self._outputs(m, rem[n], quo[n], ovf[n], result)
        m.d.comb += out_fifo.w_data.eq(result)
        return m

    def elaborate(self, platform):
        m = Module()
        if self._pipelined:
            return self._elaborate_pipelined(m)
        vw = self._divisor_width
        k = self._bits_per_cycle
        # The iteration runs over a quotient padded to a multiple of k bits; the padding bits are zero
        # whenever the quotient fits in quotient_width, which the overflow check guarantees.
        qe = self._steps * k

        rem = Signal(vw)              # partial remainder, always < divisor
        quo = Signal(qe)              # dividend bits still to bring down (top) / quotient bits (bottom)
        den = Signal(vw)
        ovf = Signal()
        count = Signal(range(self._steps + 1))
        busy = Signal()

        m.d.comb += self.i.ready.eq(~busy & (~self.o.valid | self.o.ready))
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        with m.If(self.i.valid & self.i.ready):
            r0, q0, d0, o0 = self._load(self.i.payload.dividend, self.i.payload.divisor)
            m.d.sync += [rem.eq(r0), quo.eq(q0), den.eq(d0), ovf.eq(o0), count.eq(self._steps), busy.eq(1)]

        # k restoring steps per cycle. Each step's results are named signals, so the k-step
        # expression stays linear in k.
        r, q = rem, quo
        for step in range(k):
            r, q = self._step(m, r, q, den, step)
        with m.If(busy):
            m.d.sync += [rem.eq(r), quo.eq(q), count.eq(count - 1)]
            with m.If(count == 1):
                m.d.sync += [busy.eq(0), self.o.valid.eq(1)]

        self._outputs(m, rem, quo, ovf)
        return m
