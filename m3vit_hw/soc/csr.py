"""``CsrBlock``: an AXI4-Lite slave whose address decode is generated from :data:`~.regmap.REGISTERS`.

Protocol: a write is taken when both AW and W are valid and no write response is pending (``awready``
and ``wready`` rise together, as AXI allows ready to depend on valid); the response follows one cycle
later. A read is taken when no read data is pending; the data is registered, one cycle later. Both
answer OKAY; unmapped addresses read 0 and ignore writes. ``wstrb`` selects the bytes written.

One port per register, named after it in lower case:

* ``rw``: ``Out(32)`` the register's value;
* ``ro``: ``In(32)`` the value the hardware shows;
* ``pulse``: ``Out(32)`` the bits written as 1, high for exactly one cycle;
* ``w1c``: ``Out(32)`` the value, and ``In(32)`` ``<name>_set`` whose 1 bits set it (a set in the
  same cycle as a clear wins, so no event is lost).
"""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from .axi import AXI_RESP_OKAY, AXI4LiteSignature
from .regmap import REGISTERS

__all__ = ["CsrBlock"]


class CsrBlock(wiring.Component):
    """The register block.

    Parameters
    ----------
    addr_width : int
        Width of ``s_axi``'s byte address (8..32); the map must fit.
    registers : tuple of Register
        The map (default: :data:`~.regmap.REGISTERS`).

    Interface attributes
    --------------------
    bus : ``In(AXI4LiteSignature(addr_width, 32))``
    <register ports> : see the module docstring.
    """

    def __init__(self, *, addr_width=12, registers=REGISTERS):
        _check_int("addr_width", addr_width, 8, 32)
        top = max(r.offset for r in registers) + 4
        if top > (1 << addr_width):
            raise ValueError(f"addr_width must cover the register map (0x{top:X} bytes), not {addr_width}")
        self._regs = tuple(registers)
        members = {"bus": In(AXI4LiteSignature(addr_width=addr_width, data_width=32))}
        for r in self._regs:
            n = r.name.lower()
            if r.access == "ro":
                members[n] = In(32)
            else:
                members[n] = Out(32)
            if r.access == "w1c":
                members[n + "_set"] = In(32)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        bus = self.bus

        # ---- writes ----------------------------------------------------------------------------
        bvalid = Signal()
        take_w = bus.awvalid & bus.wvalid & ~bvalid
        m.d.comb += [bus.awready.eq(take_w), bus.wready.eq(take_w),
                     bus.bvalid.eq(bvalid), bus.bresp.eq(AXI_RESP_OKAY)]
        with m.If(take_w):
            m.d.sync += bvalid.eq(1)
        with m.Elif(bus.bready):
            m.d.sync += bvalid.eq(0)
        wmask = Signal(32)
        m.d.comb += wmask.eq(sum(((bus.wstrb[i].replicate(8)) << (8 * i)) for i in range(4)))
        waddr = bus.awaddr[2:]
        for r in self._regs:
            port = getattr(self, r.name.lower())
            hit = take_w & (waddr == r.offset >> 2)
            if r.access == "rw":
                with m.If(hit):
                    m.d.sync += port.eq((port & ~wmask) | (bus.wdata & wmask))
            elif r.access == "pulse":
                m.d.sync += port.eq(0)
                with m.If(hit):
                    m.d.sync += port.eq(bus.wdata & wmask)
            elif r.access == "w1c":
                clear = Signal(32, name=f"{r.name.lower()}_clear")
                with m.If(hit):
                    m.d.comb += clear.eq(bus.wdata & wmask)
                m.d.sync += port.eq((port & ~clear) | getattr(self, r.name.lower() + "_set"))

        # ---- reads -----------------------------------------------------------------------------
        rvalid = Signal()
        rdata = Signal(32)
        take_r = bus.arvalid & ~rvalid
        m.d.comb += [bus.arready.eq(take_r), bus.rvalid.eq(rvalid), bus.rdata.eq(rdata),
                     bus.rresp.eq(AXI_RESP_OKAY)]
        with m.If(take_r):
            m.d.sync += [rvalid.eq(1), rdata.eq(0)]
            with m.Switch(bus.araddr[2:]):
                for r in self._regs:
                    if r.access == "pulse":
                        continue
                    with m.Case(r.offset >> 2):
                        m.d.sync += rdata.eq(getattr(self, r.name.lower()))
        with m.Elif(bus.rready):
            m.d.sync += rvalid.eq(0)
        return m
