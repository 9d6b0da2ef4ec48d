"""Host driver for the AXI accelerator: one session logic, several backends.

The driver's logic is a generator of small operations (register reads and writes, buffer allocation,
copies, waiting for done), so the same code runs synchronously on the board (:class:`PynqBackend`,
PYNQ imported only when constructed) and asynchronously inside a cocotb simulation
(``sim.soc_cocotb.CocotbBackend``). See :class:`Accelerator`.
"""

from .accelerator import Accelerator, AcceleratorError, ConfigMismatch, RunResult, unpack_tokens
from .pynq_backend import PynqBackend

__all__ = ["Accelerator", "AcceleratorError", "ConfigMismatch", "RunResult", "unpack_tokens", "PynqBackend"]
