"""Mixture of experts: router (gate GEMM, softmax, top-k), counting expert queues, the reordering
controller that streams active experts through a fixed weight double buffer, and the MoE layer top."""

from .expert_queues import ExpertQueues
from .moe_layer import MoELayer
from .moe_sequencer import MoEParamSignature, MoESequencer
from .reorder_controller import ReorderController
from .router import Router
from .topk import TopK
from .weight_buffer import WeightBuffer
from .weight_streamer import WeightStreamer

__all__ = ["ExpertQueues", "MoELayer", "MoEParamSignature", "MoESequencer", "ReorderController", "Router", "TopK", "WeightBuffer",
           "WeightStreamer"]
