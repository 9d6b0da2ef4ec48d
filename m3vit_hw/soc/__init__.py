"""SoC integration: AXI4/AXI4-Lite signatures, the register map, the AXI top level and its memory image.

* :mod:`.axi`: AXI4 and AXI4-Lite signatures, the write-port signature, :class:`AxiMaster`;
* :mod:`.datapath`: burst splitter, width converter, read interleaver;
* :mod:`.regmap`: the register map, described once (RTL decode, C header, docs);
* :mod:`.csr`: the AXI4-Lite register block generated from it;
* :mod:`.image`: the memory image of a run and the config ID;
* :mod:`.top`: :class:`AcceleratorTop` and its Xilinx-named Verilog wrapper.
"""

from .axi import AXI4LiteSignature, AXI4Signature, AxiMaster, WritePortSignature
from .csr import CsrBlock
from .image import ImageLayout, config_id
from .top import AcceleratorTop, XilinxTop, xilinx_ports

__all__ = ["AXI4Signature", "AXI4LiteSignature", "WritePortSignature", "AxiMaster", "CsrBlock",
           "ImageLayout", "config_id", "AcceleratorTop", "XilinxTop", "xilinx_ports"]
