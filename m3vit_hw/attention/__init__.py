"""Attention on the shared GEMM engine: the external-memory layout and the attention sub-layer."""

from .attn_layout import AttnLayout, AttnTile, BufferMap, pack_attention, plan_attention, start_fields
from .attention_layer import AttentionLayer, AttnLoadLayout, AttnLoadTarget, AttnStartLayout, Phase

__all__ = ["AttnLayout", "AttnTile", "BufferMap", "pack_attention", "plan_attention", "start_fields",
           "AttentionLayer", "AttnLoadLayout", "AttnLoadTarget", "AttnStartLayout", "Phase"]
