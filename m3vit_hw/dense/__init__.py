"""The encoder's dense sub-layers on the shared GEMM engine: the dense MLP (and its external-memory
layout), the LayerNorm stage, the patch embedding, and NormMlp (LayerNorm + MLP sharing one engine and
one set of buffers: the encoder top's composition pattern)."""

from .dense_layout import (DenseBufferMap, DenseLayout, DenseTile, dense_buffer_map, pack_dense, plan_dense,
                           start_fields)
from .norm_stage import NormStage, NormStartLayout, norm_lanes, norm_record_bytes, pack_norm_params
from .embed_layout import EmbedBufferMap, EmbedLayout, EmbedTile, embed_buffer_map, pack_embed, plan_embed
from .patch_loader import PatchLoader, PatchLoadLayout
from .patch_embed import EmbedSequencer, EmbedStartLayout, PatchEmbed
from .norm_mlp import NormMlp, NormMlpStartLayout
from .dense_layer import DenseLayer, DenseSequencer, DenseLoadLayout, DenseLoadTarget, DensePhase, DenseStartLayout

__all__ = ["DenseBufferMap", "DenseLayout", "DenseTile", "dense_buffer_map", "pack_dense", "plan_dense",
           "start_fields", "DenseLayer", "DenseLoadLayout", "DenseLoadTarget", "DensePhase", "DenseStartLayout",
           "NormStage", "NormStartLayout", "norm_lanes", "norm_record_bytes", "pack_norm_params",
           "EmbedBufferMap", "EmbedLayout", "EmbedTile", "embed_buffer_map", "pack_embed", "plan_embed",
           "PatchLoader", "PatchLoadLayout", "EmbedStartLayout", "PatchEmbed",
           "EmbedSequencer", "DenseSequencer",
           "NormMlp", "NormMlpStartLayout"]
