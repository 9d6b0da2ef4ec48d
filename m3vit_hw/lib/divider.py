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
        Each stage's registers are only as wide as the values they can hold (the quotient bits retired so
        far, the dividend bits still to bring down, a remainder that grows by one bit per step up to
        ``divisor_width``): no register of the pipeline holds a constant.
    dividend_shift : int
        Known-zero low bits of the dividend, >= 0: the divider computes
        ``(i.payload.dividend << dividend_shift) // divisor``. Callers whose dividend is a multiple of a
        power of two (``2**32``, ``out_mult * 2**16``) pass only its high part, so the dividend's zero bits
        are never registers (a synthesizer otherwise removes such constant flip-flops one pipeline stage
        per ``opt`` iteration, which took about 1,000 s of the device build).

    Interface attributes
    --------------------
    i : In(stream.Signature(StructLayout({...})))
        Operands: ``dividend`` (``unsigned(dividend_width)``, the dividend's bits above its
        ``dividend_shift`` zero bits) and ``divisor`` (``unsigned(divisor_width)``).
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

    def __init__(self, dividend_width, divisor_width, quotient_width=None, *, bits_per_cycle=1, pipelined=False,
                 dividend_shift=0):
        _check_width("dividend_width", dividend_width)
        _check_width("divisor_width", divisor_width)
        _check_width("dividend_shift", dividend_shift, 0)
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
        self._dividend_shift = dividend_shift
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
    dividend_shift = property(lambda self: self._dividend_shift)

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

    def _step(self, m, r, q, den, name):
        """One restoring step of the iterative divider: bring down the next dividend bit (``q``'s top
        bit), subtract if it fits."""
        vw, qe = self._divisor_width, self._steps * self._bits_per_cycle
        shifted = Cat(q[qe - 1], r)    # 2*r + next bit, vw + 1 bits
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

    def _full_dividend(self):
        """The dividend with its ``dividend_shift`` zero bits appended below the port's bits."""
        sh = self._dividend_shift
        return Cat(Const(0, sh), self.i.payload.dividend) if sh else self.i.payload.dividend

    def _load(self, dividend, divisor):
        """The load stage's values: (rem, quo, den, ovf)."""
        qe = self._steps * self._bits_per_cycle
        # Overflow iff floor(dividend / 2**quotient_width) >= divisor (covers divisor == 0).
        return (dividend >> qe, dividend[:qe] if qe < len(dividend) else dividend, divisor,
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
        vw, n = self._divisor_width, self._steps
        dw, sh = self._dividend_width, self._dividend_shift
        # Stage s (the registers in front of step s) brings down dividend bit n - 1 - s, which is bit
        # n - 1 - s - sh of the port (a constant 0 outside [0, dw)). Every register below holds only
        # what can vary: the dividend's zero bits, quotient bits not yet retired and remainder bits
        # above the remainder's bound are not registers, so no flip-flop of the pipeline has a
        # constant input for a synthesizer to find (one stage per opt iteration).
        def port_idx(s):
            return n - 1 - s - sh

        def pending(s):
            # Port bits still to bring down after stage s's own bit: indices [0, pending(s)).
            return max(0, min(port_idx(s), dw))

        # Remainder width: the load's remainder is floor(dividend / 2**n) (it holds the port bits
        # above the quotient; wider only on overflow, where the result is replaced), and each step
        # adds at most one bit (2*r + bit < 2**(w + 1)), never more than the divisor's width (r < den).
        w = [min(vw, max(0, dw + sh - n))]
        for s in range(n):
            w.append(min(vw, w[-1] + 1))

        v = [Signal(name=f"v{s}") for s in range(n + 1)]
        rem = [Signal(w[s], name=f"rem{s}", reset_less=True) if w[s] else Const(0, 1) for s in range(n + 1)]
        # Quotient bits retired by the steps before stage s, MSB first (stage s has s of them).
        quo = [Signal(s, name=f"quo{s}", reset_less=True) if s else None for s in range(n + 1)]
        den = [Signal(vw, name=f"den{s}", reset_less=True) for s in range(n)]
        ovf = [Signal(name=f"ovf{s}", reset_less=True) for s in range(n + 1)]
        pend = [Signal(pending(s), name=f"pend{s}", reset_less=True) if pending(s) else None for s in range(n)]
        # The dividend bit each stage brings down, in a flip-flop of its own that stays on reset: the
        # reset-less pending-bit registers copy each dividend bit from stage to stage, and yosys turns
        # such chains into shift registers (SRLs), whose slow clock-to-out would otherwise start the
        # compare-subtract chain. With the reset this last register of each chain stays a flip-flop.
        nxt = [Signal(name=f"nxt{s}") if 0 <= port_idx(s) < dw else Const(0, 1) for s in range(n)]
        # The stages have no enable: every operand is counted in on input and out on output, and
        # input is taken only while the output FIFO has room for all in flight. So i.ready is a
        # register, and o.ready drives only the FIFO's read side.
        depth = self.latency + 1
        m.submodules.out_fifo = out_fifo = CreditFIFO(self.o.payload.shape(), depth)
        take = self.i.valid & out_fifo.room
        m.d.comb += [self.i.ready.eq(out_fifo.room), out_fifo.take.eq(take), out_fifo.w_en.eq(v[n])]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))

        port = self.i.payload.dividend
        full = self._full_dividend()
        m.d.sync += [v[0].eq(take), den[0].eq(self.i.payload.divisor),
                     ovf[0].eq((full >> self._quotient_width) >= self.i.payload.divisor)]
        if w[0]:
            m.d.sync += rem[0].eq(full >> n)
        if pend[0] is not None:
            m.d.sync += pend[0].eq(port[:pending(0)])
        if isinstance(nxt[0], Signal):
            m.d.sync += nxt[0].eq(port[port_idx(0)])
        for s in range(n):
            shifted = Cat(nxt[s], rem[s])            # 2*r + next bit
            # One subtraction gives both the trial remainder and, by its sign, whether it fits: a
            # single carry chain then a mux (a separate >= compare would be a second chain).
            diff = Signal(signed(max(len(shifted), vw) + 1), name=f"diff_{s}")
            m.d.comb += diff.eq(shifted - den[s])
            fits = ~diff[-1]
            m.d.sync += [v[s + 1].eq(v[s]), ovf[s + 1].eq(ovf[s]),
                         quo[s + 1].eq(Cat(fits, quo[s]) if quo[s] is not None else fits)]
            if w[s + 1]:
                m.d.sync += rem[s + 1].eq(Mux(fits, diff, shifted)[:w[s + 1]])
            if s + 1 < n:
                m.d.sync += den[s + 1].eq(den[s])
                if isinstance(nxt[s + 1], Signal):
                    # Stage s + 1's bit is the top pending bit of stage s.
                    m.d.sync += nxt[s + 1].eq(pend[s][port_idx(s + 1)])
                if pend[s + 1] is not None:
                    m.d.sync += pend[s + 1].eq(pend[s][:pending(s + 1)])
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
            r0, q0, d0, o0 = self._load(self._full_dividend(), self.i.payload.divisor)
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
