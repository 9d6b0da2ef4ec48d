"""Integer parameters of a quantized M³ViT encoder (what the golden model and the accelerator consume).

Plain containers of numpy integer arrays, without torch, so that the simulation runners and the program
compiler can build and read them. :mod:`reference.quantize` fills them from a float model; the formats
are those of :mod:`m3vit_hw.numerics` and ``docs/numerics.md``.
"""

from dataclasses import dataclass, field

import numpy as np

__all__ = ["QLinear", "QLayerNorm", "QAttention", "QDenseMlp", "QMoE", "QBlock", "QuantizedEncoder"]


@dataclass
class QLinear:
    """An integer GEMM with its epilogue: ``requantize(x @ w.T, bias, mult, shift, out_bits)``.

    ``w`` int8 [..., out, in]; ``bias`` int32 and ``mult`` (unsigned, < 2**MULT_BITS) [..., out];
    ``shift`` one per GEMM (per expert layer: shared by all experts).
    """
    w: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: int
    out_bits: int


@dataclass
class QLayerNorm:
    """``golden.layernorm`` parameters. ``out_bits`` 16 (the measured-but-not-adopted ``ln_bits=16``
    option of ``reference.quantize``): the output is rounded 8 bits later (``shift`` already includes
    it) and the GEMMs that read it take a 16-bit A operand."""
    eps_int: int
    gamma_mult: np.ndarray
    beta_int: np.ndarray
    shift: int
    out_bits: int = 8


@dataclass
class QAttention:
    qkv: QLinear
    c_mult: int
    c_shift: int
    out_mult: int
    out_shift: int
    proj: QLinear


@dataclass
class QDenseMlp:
    fc1: QLinear
    gelu_lut: np.ndarray
    fc2: QLinear


@dataclass
class QMoE:
    """One MoE layer. ``gates[g]`` int8 [D, E] (one per task, or one shared); ``task_bias[t]`` int32 [E]
    is the task-embedding router's constant logit offset (zeros for ``multi_gate``).

    ``router_h_shift``: 0, the router reads the int8 LN2 output; 8, it reads the 16-bit LN2 output
    ``layernorm(..., shift - 8, out_bits=16)`` (an option measured in docs/numerics.md §9, not in the RTL)."""
    gates: list
    task_bias: np.ndarray
    router_c_mult: list
    router_c_shift: list
    fc1: QLinear
    gelu_lut: np.ndarray
    fc2: QLinear
    router_h_shift: int = 0


@dataclass
class QBlock:
    ln1: QLayerNorm
    attn: QAttention
    ln2: QLayerNorm
    mlp: object  # QDenseMlp or QMoE


@dataclass
class QuantizedEncoder:
    cfg: object
    img_scale: float
    res_scale: float
    patch: QLinear
    cls_int: np.ndarray
    pos_int: np.ndarray
    blocks: list
    scales: dict = field(default_factory=dict)
