"""Generic hardware pieces that know nothing about transformers: a pipelined divider, an integer
square root, the external-memory ports, their arbiter and burst requester, a skid buffer, a credit-counted FIFO,
a lane-split memory."""

from .burst_requester import BurstRequester
from .credit_fifo import CreditFIFO
from .divider import Divider
from .host_access import connect_host_writes, connect_read_back
from .isqrt import ISqrt
from .lane_memory import LaneMemory, peek_word
from .mem_arbiter import ReadArbiter
from .mem_port import ReadPortSignature
from .skid import SkidBuffer

__all__ = ["BurstRequester", "CreditFIFO", "Divider", "connect_host_writes", "connect_read_back", "ISqrt", "LaneMemory", "peek_word", "ReadArbiter", "ReadPortSignature", "SkidBuffer"]
