"""The Xilinx ZCU104 evaluation board (Zynq UltraScale+ XCZU7EV-2FFVC1156E) for Amaranth.

Only facts: the part, the PL clocks, the reset button and the user LEDs, buttons and DIP switches. The
pins follow the LiteX board file (litex-boards ``xilinx_zcu104.py``) and the board's user guide UG1267.
No amaranth-boards file exists for this board.

The accelerator itself is clocked by the processing system (``pl_clk0``) inside the Vivado block
design the build writes; these resources serve board-level designs and the XDC of LED/clock pins.
"""

from amaranth.build import Attrs, Clock, DiffPairs, Pins, Resource
from amaranth.vendor import XilinxPlatform

__all__ = ["ZCU104Platform"]


class ZCU104Platform(XilinxPlatform):
    """``XilinxPlatform`` for the ZCU104: device ``xczu7ev``, package ``ffvc1156``, speed ``-2``, ``-e`` grade.

    Resources: ``clk125`` (125 MHz, LVDS, F23/E23, the default clock), ``clk300`` (300 MHz,
    DIFF_SSTL12_DCI, AH18/AH17), ``cpu_reset`` (M11, active high), ``led`` 0-3 (D5, D6, A5, B5),
    ``button`` 0-3 (B4, C4, B3, C3) and ``switch`` 0-3 (E4, D4, F5, F4), all LVCMOS33.
    """

    device = "xczu7ev"
    package = "ffvc1156"
    speed = "2"
    grade = "e"
    default_clk = "clk125"
    default_rst = "cpu_reset"

    resources = [
        Resource("clk125", 0, DiffPairs("F23", "E23", dir="i"), Clock(125e6), Attrs(IOSTANDARD="LVDS")),
        Resource("clk300", 0, DiffPairs("AH18", "AH17", dir="i"), Clock(300e6),
                 Attrs(IOSTANDARD="DIFF_SSTL12_DCI")),
        Resource("cpu_reset", 0, Pins("M11", dir="i"), Attrs(IOSTANDARD="LVCMOS33")),
        *[Resource("led", i, Pins(p, dir="o"), Attrs(IOSTANDARD="LVCMOS33"))
          for i, p in enumerate(("D5", "D6", "A5", "B5"))],
        *[Resource("button", i, Pins(p, dir="i"), Attrs(IOSTANDARD="LVCMOS33"))
          for i, p in enumerate(("B4", "C4", "B3", "C3"))],
        *[Resource("switch", i, Pins(p, dir="i"), Attrs(IOSTANDARD="LVCMOS33"))
          for i, p in enumerate(("E4", "D4", "F5", "F4"))],
    ]
    connectors = []

    @property
    def part(self):
        """The Vivado part name, ``xczu7ev-ffvc1156-2-e``."""
        return f"{self.device}-{self.package}-{self.speed}-{self.grade}"
