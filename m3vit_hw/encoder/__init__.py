"""The encoder top: one shared datapath, the program sequencer and the units it dispatches to.

============================  ============================================================================
module                        contents
============================  ============================================================================
``mux``                       :func:`mux_interfaces`: one active client onto a shared port
``datapath``                  :class:`SharedDatapath`: engine, buffers, row table, weight path, read arbiter
``sequencer``                 :class:`ProgramSequencer`: program fetch (bursts), decode, dispatch, counters
``gemm_exec``                 :class:`GemmExecutor`: the ``GEMM`` instruction's client
``store``                     :class:`StoreDma`: ``STORE``, residual words to the external write port
``top``                       :class:`EncoderTop`: all of it behind one read port and one write port
============================  ============================================================================
"""

from .mux import mux_interfaces
from .datapath import SharedDatapath
from .sequencer import ProgramSequencer, SeqError, SeqStartLayout
from .gemm_exec import GemmExecutor, GemmJobLayout
from .store import StoreDma, StoreLayout
from .top import COUNTER_PHASES, CounterPhase, EncoderTop

__all__ = ["mux_interfaces", "SharedDatapath", "ProgramSequencer", "SeqError", "SeqStartLayout",
           "GemmExecutor", "GemmJobLayout", "StoreDma", "StoreLayout", "EncoderTop",
           "CounterPhase", "COUNTER_PHASES"]
