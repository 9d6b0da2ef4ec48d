"""SoC integration: AXI4/AXI4-Lite signatures, the register map, the AXI top level around the encoder.

* :mod:`.axi`: AXI4 and AXI4-Lite signatures, the write-port signature, :class:`AxiMaster`;
* :mod:`.datapath`: burst splitter, width converter, read interleaver;
* :mod:`.regmap`: the register map, described once (RTL decode, C header, docs), and the config ID;
* :mod:`.csr`: the AXI4-Lite register block generated from it;
* :mod:`.top`: :class:`AcceleratorTop` (the :class:`~m3vit_hw.encoder.EncoderTop` behind AXI) and its
  Xilinx-named Verilog wrapper.

The memory image is the compiler's (:mod:`m3vit_hw.control.image_layout`).
"""

from .axi import AXI4LiteSignature, AXI4Signature, AxiMaster, WritePortSignature
from .csr import CsrBlock
from .regmap import config_id
from .top import AcceleratorTop, XilinxTop, xilinx_ports

__all__ = ["AXI4Signature", "AXI4LiteSignature", "WritePortSignature", "AxiMaster", "CsrBlock",
           "config_id", "AcceleratorTop", "XilinxTop", "xilinx_ports"]
