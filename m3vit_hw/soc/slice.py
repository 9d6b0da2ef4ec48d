"""Register slices: cut every combinational path through an AXI4 port.

:class:`SkidBuffer` (from :mod:`m3vit_hw.lib.skid`, re-exported here) is a two-entry stream register:
``o.valid``/``o.payload`` and ``i.ready`` all come from flip-flops, throughput is one transfer per cycle,
nothing is lost or duplicated.

:class:`AxiRegisterSlice` puts one :class:`SkidBuffer` on each of the five channels of an AXI4 port
(AW, W, AR towards the slave; R, B towards the master), so the accelerator's AXI ports start and end at
registers: the Zynq's HP ports and the interconnect see no logic depth from inside the accelerator, and
the accelerator sees none from them. Cost: one cycle of latency per channel direction.
"""

from amaranth.hdl import Cat, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..lib.skid import SkidBuffer
from .axi import AXI4Signature

__all__ = ["SkidBuffer", "AxiRegisterSlice"]


_FORWARD = ("aw", "w", "ar")
_BACKWARD = ("b", "r")


class AxiRegisterSlice(wiring.Component):
    """A register slice on all five channels of an AXI4 port.

    Parameters
    ----------
    signature : AXI4Signature
        The port's signature (both sides are the same).

    Interface attributes
    --------------------
    s : ``In(signature)``
        Towards the master (connect the master's ``Out`` port here).
    m : ``Out(signature)``
        Towards the slave.
    """

    def __init__(self, signature):
        if not isinstance(signature, AXI4Signature):
            raise TypeError(f"signature must be an AXI4Signature, not {signature!r}")
        self._sig = signature
        super().__init__({"s": In(signature), "m": Out(signature)})

    def _fields(self, ch):
        return [name for name in self._sig.members
                if name.startswith(ch) and name not in (ch + "valid", ch + "ready")]

    def elaborate(self, platform):
        m = Module()
        for ch in _FORWARD + _BACKWARD:
            src, dst = (self.s, self.m) if ch in _FORWARD else (self.m, self.s)
            names = self._fields(ch)
            width = sum(len(getattr(src, n)) for n in names)
            m.submodules[ch] = buf = SkidBuffer(width)
            m.d.comb += [
                buf.i.valid.eq(getattr(src, ch + "valid")),
                buf.i.payload.eq(Cat(*[getattr(src, n) for n in names])),
                getattr(src, ch + "ready").eq(buf.i.ready),
                getattr(dst, ch + "valid").eq(buf.o.valid),
                Cat(*[getattr(dst, n) for n in names]).eq(buf.o.payload),
                buf.o.ready.eq(getattr(dst, ch + "ready")),
            ]
        return m
