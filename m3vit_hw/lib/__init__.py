"""Generic hardware pieces that know nothing about transformers: a pipelined divider, an integer
square root, the external-memory ports, their arbiter and burst requester, a skid buffer, a credit-counted FIFO."""

from .burst_requester import BurstRequester
from .credit_fifo import CreditFIFO
from .divider import Divider
from .isqrt import ISqrt
from .mem_arbiter import ReadArbiter
from .mem_port import ReadPortSignature
from .skid import SkidBuffer

__all__ = ["BurstRequester", "CreditFIFO", "Divider", "ISqrt", "ReadArbiter", "ReadPortSignature", "SkidBuffer"]
