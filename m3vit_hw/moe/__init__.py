"""Mixture of experts: router (gate GEMM, softmax, top-k), counting expert queues, the reordering
controller that streams active experts through the fixed weight double buffer (:mod:`m3vit_hw.weights`),
the MoE client of the shared datapath and the standalone MoE layer."""

from .expert_queues import ExpertQueues
from .moe_layer import MoELayer
from .moe_sequencer import MoEParamSignature, MoESequencer
from .reorder_controller import ReorderController
from .router import Router
from .topk import TopK

__all__ = ["ExpertQueues", "MoELayer", "MoEParamSignature", "MoESequencer", "ReorderController", "Router", "TopK"]
