"""The weight path every sub-layer shares: the ping-pong weight and parameter buffers
(:class:`WeightBuffer`), the streamers that fill them from external memory (:class:`WeightStreamer`),
their wiring behind the read arbiter (:class:`WeightPath`), and the port through which a sub-layer's
sequencer drives the GEMM engine and this path (:class:`GemmClientSignature`). It sits below the
sub-layer packages (``moe``, ``attention``, ``dense``), which all use it."""

from .client import GemmClientSignature, connect_client, connect_weight_reads
from .weight_buffer import WeightBuffer
from .weight_path import WeightPath
from .weight_streamer import WeightStreamer

__all__ = ["GemmClientSignature", "connect_client", "connect_weight_reads", "WeightBuffer", "WeightPath",
           "WeightStreamer"]
