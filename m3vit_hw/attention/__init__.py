"""Attention on the shared GEMM engine: the external-memory layout, the sequencer (a client of the shared
datapath) and the standalone attention sub-layer."""

from .attn_layout import AttnLayout, AttnTile, BufferMap, pack_attention, plan_attention, start_fields
from .attn_sequencer import AttnSequencer
from .attention_layer import (AttentionLayer, AttnLoadLayout, AttnLoadTarget, AttnStartLayout, Phase,
                              connect_operand_reads, connect_qkv_copy)

__all__ = ["AttnLayout", "AttnTile", "BufferMap", "pack_attention", "plan_attention", "start_fields",
           "AttnSequencer", "AttentionLayer", "AttnLoadLayout", "AttnLoadTarget", "AttnStartLayout", "Phase",
           "connect_operand_reads", "connect_qkv_copy"]
