"""A lane-array memory stored as two memories, split between lanes, so that a build can fill whole
URAM columns.

An UltraScale+ URAM288 is 72 bits wide. A 64-lane int8 word (512 bits) cascades over eight of them,
the last one holding only 8 of its 72 bits; a 64-lane int16 word (1,024 bits) over fifteen, the last
holding 16. :class:`LaneMemory` keeps the first ``split`` lanes (63: 504 bits in seven URAMs, or
1,008 bits in fourteen) in one memory and the rest in another, which a build places in block RAM
(one RAMB36 per 4,096 words at 9 bits, two at 18). Both halves share every address and enable, so
the split costs no logic: only wires. W2's activation, Q|K|V-copy and residual banks drop from 78
URAMs to 70 this way (``AcceleratorConfig.lane_split``).

It offers the part of :class:`amaranth.lib.memory.Memory`'s interface the datapath uses:
:meth:`read_port` and :meth:`write_port` (lane-granular writes) create ports that the memory wires
to both halves at elaboration, and :func:`peek_word` reads a word back in simulation.
"""

from amaranth.hdl import Cat, Elaboratable, Module
from amaranth.lib import data, memory

from ..checks import check_int

__all__ = ["LaneMemory", "peek_word"]


class LaneMemory(Elaboratable):
    """``depth`` words of ``lanes`` x ``lane_shape``, as memory ``lo`` (lanes ``[0, split)``) and
    memory ``hi`` (lanes ``[split, lanes)``).

    Parameters
    ----------
    lane_shape : shape-like
        One lane (``signed(8)``, ``signed(16)``).
    lanes : int
        Lanes of a word, >= 2.
    split : int
        Lanes in the first memory, in ``[1, lanes - 1]``.
    depth : int
        Words, >= 1.

    Attributes
    ----------
    shape : ArrayLayout
        The word, ``ArrayLayout(lane_shape, lanes)`` (the ports' data shape).
    lo, hi : Memory
        The two memories (no initial contents: a URAM has none).
    """

    def __init__(self, *, lane_shape, lanes, split, depth):
        check_int("lanes", lanes, 2)
        check_int("split", split, 1, lanes - 1)
        check_int("depth", depth, 1)
        self.shape = data.ArrayLayout(lane_shape, lanes)
        self.depth = depth
        self.split = split
        self.lo = memory.Memory(shape=data.ArrayLayout(lane_shape, split), depth=depth, init=[])
        self.hi = memory.Memory(shape=data.ArrayLayout(lane_shape, lanes - split), depth=depth, init=[])
        self._reads, self._writes = [], []

    def _addr_width(self):
        return max(0, (self.depth - 1).bit_length())

    def read_port(self, *, domain="sync"):
        """A synchronous read port (data one cycle after ``addr`` with ``en``, held while ``en`` is low)."""
        sig = memory.ReadPort.Signature(addr_width=self._addr_width(), shape=self.shape)
        port = memory.ReadPort(sig, memory=None, domain=domain)
        self._reads.append(port)
        return port

    def write_port(self, *, granularity=1, domain="sync"):
        """A write port with one enable per lane (``granularity=1``, the only one supported)."""
        if granularity != 1:
            raise ValueError(f"LaneMemory write ports have one enable per lane: granularity must be 1, "
                             f"not {granularity!r}")
        sig = memory.WritePort.Signature(addr_width=self._addr_width(), shape=self.shape, granularity=1)
        port = memory.WritePort(sig, memory=None, domain=domain)
        self._writes.append(port)
        return port

    def elaborate(self, platform):
        m = Module()
        m.submodules.lo = self.lo
        m.submodules.hi = self.hi
        s = self.split
        for port in self._reads:
            lo, hi = (mem.read_port(domain=port.domain) for mem in (self.lo, self.hi))
            m.d.comb += [lo.addr.eq(port.addr), hi.addr.eq(port.addr), lo.en.eq(port.en), hi.en.eq(port.en),
                         port.data.eq(Cat(lo.data.as_value(), hi.data.as_value()))]
        for port in self._writes:
            lo, hi = (mem.write_port(granularity=1, domain=port.domain) for mem in (self.lo, self.hi))
            raw, cut = port.data.as_value(), self.lo.shape.size
            m.d.comb += [lo.addr.eq(port.addr), hi.addr.eq(port.addr),
                         lo.data.eq(raw[:cut]), hi.data.eq(raw[cut:]),
                         lo.en.eq(port.en[:s]), hi.en.eq(port.en[s:])]
        return m


def peek_word(ctx, mem, index):
    """Word ``index`` of ``mem`` (a :class:`~amaranth.lib.memory.Memory` or a :class:`LaneMemory`) as
    one unsigned integer, lane 0 in the low bits, in an Amaranth simulation testbench ``ctx``."""
    if isinstance(mem, LaneMemory):
        lo = ctx.get(mem.lo.data[index]).as_value().value
        hi = ctx.get(mem.hi.data[index]).as_value().value
        return lo | hi << mem.lo.shape.size
    return ctx.get(mem.data[index]).as_value().value
