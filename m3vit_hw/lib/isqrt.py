"""Sequential integer square root with stream ports.

LayerNorm needs ``den = isqrt(D*S2 - S1**2 + eps_int)`` once per row (``reference/golden.py::isqrt``).
The digit-by-digit (restoring) method produces one root bit per step from a compare-subtract of
about half the operand width, so a row's root costs a few tens of cycles of one narrow subtractor
instead of a multiplier-based Newton iteration.
"""

from amaranth import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ISqrt"]


class ISqrt(wiring.Component):
    """Floor square root: ``root = floor(sqrt(value))``, ``remainder = value - root**2``.

    Parameters
    ----------
    width : int
        Width of the unsigned operand, >= 1. The root has ``ceil(width / 2)`` bits.
    bits_per_cycle : int
        Root bits produced per cycle, in [1, 8]. Each is a compare-subtract of about
        ``width / 2 + 2`` bits chained combinationally.

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
      transfers, so back-to-back roots are :attr:`period` cycles apart.
    * ``o.valid`` does not depend on ``o.ready``; the result holds until it transfers.
    """

    def __init__(self, width, *, bits_per_cycle=1):
        if not isinstance(width, int) or isinstance(width, bool):
            raise TypeError(f"width must be an integer, not {width!r}")
        if width < 1:
            raise ValueError(f"width must be an integer >= 1, not {width}")
        if not isinstance(bits_per_cycle, int) or isinstance(bits_per_cycle, bool):
            raise TypeError(f"bits_per_cycle must be an integer, not {bits_per_cycle!r}")
        if not 1 <= bits_per_cycle <= 8:
            raise ValueError(f"bits_per_cycle must be in [1, 8], not {bits_per_cycle}")
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

    @property
    def latency(self):
        """Cycles from the operand transfer to ``o.valid``: ``ceil(root_width / bits_per_cycle) + 1``.

        One cycle loads the operands; each of the following ``ceil(root_width / bits_per_cycle)``
        cycles retires ``bits_per_cycle`` bits.
        """
        return self._steps + 1

    @property
    def period(self):
        """Minimum cycles between operand transfers when ``o`` never stalls (equal to :attr:`latency`:
        the next operand loads in the cycle the previous result transfers)."""
        return self._steps + 1

    def elaborate(self, platform):
        m = Module()
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
            # Bring down two operand bits; the next root bit is 1 iff 4*root + 1 fits.
            r4 = Cat(x[2 * ne - 2:], r)
            trial = Cat(Const(1, 2), q)
            fits = r4 >= trial
            r_next = Signal(rw, name=f"rem_{step}")
            q_next = Signal(ne, name=f"root_{step}")
            m.d.comb += [r_next.eq(Mux(fits, r4 - trial, r4)[:rw]), q_next.eq(Cat(fits, q)[:ne])]
            r, q = r_next, q_next
            x = Cat(Const(0, 2), x)[:2 * ne]
        with m.If(busy):
            m.d.sync += [rem.eq(r), root.eq(q), xs.eq(x), count.eq(count - 1)]
            with m.If(count == 1):
                m.d.sync += [busy.eq(0), self.o.valid.eq(1)]

        m.d.comb += [
            self.o.payload.root.eq(root[:self._root_width]),
            self.o.payload.remainder.eq(rem[:self._root_width + 1]),
        ]
        return m
