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
        ``bits_per_cycle=1``. ``i.ready`` is a register.

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

    def _step(self, m, r, q, x, name, pair=None):
        """Bring down two operand bits (``x``'s top two unless ``pair`` is given); the next root bit
        is 1 iff 4*root + 1 fits."""
        ne = self._steps * self._bits_per_cycle
        rw = ne + 2
        r4 = Cat(x[2 * ne - 2:] if pair is None else pair, r)
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
        n = ne = self._steps
        rw = ne + 2
        v = [Signal(name=f"v{s}") for s in range(n + 1)]
        rem = [Signal(rw, name=f"rem{s}", reset_less=True) for s in range(n + 1)]
        root = [Signal(ne, name=f"root{s}", reset_less=True) for s in range(n + 1)]
        xs = [Signal(2 * ne, name=f"xs{s}", reset_less=True) for s in range(n)]
        # The operand bit pair each stage brings down, in flip-flops of their own that stay on reset:
        # the reset-less operand registers shift the pairs up two places per stage, and yosys turns
        # such chains into shift registers (SRLs), whose slow clock-to-out would otherwise start the
        # compare-subtract chain. With the reset these last registers stay flip-flops.
        pairs = [Signal(2, name=f"pair{s}") for s in range(n)]
        # The stages have no enable: every operand is counted in on input and out on output, and
        # input is taken only while the output FIFO has room for all in flight. So i.ready is a
        # register, and o.ready drives only the FIFO's read side.
        depth = self.latency + 1
        m.submodules.out_fifo = out_fifo = CreditFIFO(self.o.payload.shape(), depth)
        take = self.i.valid & out_fifo.room
        m.d.comb += [self.i.ready.eq(out_fifo.room), out_fifo.take.eq(take), out_fifo.w_en.eq(v[n])]
        wiring.connect(m, out_fifo.o, wiring.flipped(self.o))
        adv = 1
        with m.If(adv):
            m.d.sync += [v[0].eq(take), rem[0].eq(0), root[0].eq(0), xs[0].eq(self.i.payload),
                         pairs[0].eq(self.i.payload[2 * ne - 2:])]
            for s in range(n):
                r, q, x = self._step(m, rem[s], root[s], xs[s], s, pair=pairs[s])
                m.d.sync += [v[s + 1].eq(v[s]), rem[s + 1].eq(r), root[s + 1].eq(q)]
                if s + 1 < n:
                    m.d.sync += [xs[s + 1].eq(x), pairs[s + 1].eq(x[2 * ne - 2:])]
        result = Signal(self.o.payload.shape())
        m.d.comb += [
            result.root.eq(root[n][:self._root_width]),
            result.remainder.eq(rem[n][:self._root_width + 1]),
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
