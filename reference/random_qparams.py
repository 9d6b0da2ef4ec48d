"""Random but well-scaled integer parameters of an encoder (numpy only, no torch).

:func:`random_quantized` fills a :class:`reference.qparams.QuantizedEncoder` for any
:class:`~m3vit_hw.model_config.ModelConfig` with values in every format's range and shifts chosen so
that activations use a good part of their range (not all saturated, not all zero). It is for tests and
for compiling programs of sizes no checkpoint exists for (the W1/W2 image sizes); it is not a trained
network.
"""

import math

import numpy as np

from m3vit_hw import numerics
from .qparams import QAttention, QBlock, QDenseMlp, QLayerNorm, QLinear, QMoE, QuantizedEncoder

__all__ = ["random_quantized"]

_W = 48          # weight magnitude bound (int8)
_X = 40          # typical |activation| of an int8 input


def _linear(rng, n_out, n_in, out_bits, *, lead=(), target=None):
    """A QLinear whose output has a std of about ``target`` (default: a quarter of the range)."""
    target = target or (1 << (out_bits - 1)) / 4
    w = rng.integers(-_W, _W + 1, (*lead, n_out, n_in))
    acc_std = _X * _W / math.sqrt(3) * math.sqrt(n_in)
    mult = rng.integers(1 << (numerics.MULT_BITS - 2), 1 << (numerics.MULT_BITS - 1), (*lead, n_out))
    shift = int(round(math.log2(acc_std * (3 << (numerics.MULT_BITS - 3)) / target)))
    shift = min(max(shift, 0), numerics.SHIFT_MAX)
    bias = rng.integers(-int(acc_std), int(acc_std) + 1, (*lead, n_out))
    return QLinear(w, bias, mult, shift, out_bits)


def _ln(rng, d):
    gamma = rng.integers(1 << 9, 1 << 12, d) * rng.choice([-1, 1], d)
    beta = rng.integers(-(1 << 16), 1 << 16, d)
    # z ~ 2**LN_Z_FRAC, gamma ~ 2**11: shift 16 gives |y| ~ 32.
    return QLayerNorm(int(rng.integers(0, 1 << 12)), gamma, beta, 16)


def _lut(rng):
    """A GELU-like table of uint8 codes (``numerics.GELU_CODE_BITS``) with a zero point of 16."""
    x = np.arange(-128, 128)
    return np.clip(np.where(x > 0, 2 * x, x // 8) + 16 + rng.integers(-2, 3, 256), 0, 255)


def _softmax_scale(k_len, in_mag):
    """(c_mult, c_shift) spreading scores of |q.k| ~ in_mag**2 * sqrt(k_len) over a few octaves."""
    spread = in_mag * in_mag * math.sqrt(k_len)
    real = 4 * (1 << numerics.EXP_FRAC_BITS) / spread
    shift = 0
    while real * (1 << (shift + 1)) < (1 << numerics.SOFTMAX_MULT_BITS) - 1 and shift < 40:
        shift += 1
    return int(real * (1 << shift)), shift


def random_quantized(cfg, seed=0):
    """A random :class:`QuantizedEncoder` of ``cfg`` (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    D, T = cfg.dim, cfg.tokens
    res_lo, res_hi = numerics.int_range(numerics.RES_BITS)
    patch = _linear(rng, D, cfg.patch_dim, numerics.RES_BITS, target=3000)
    cls_int = rng.integers(-3000, 3000, D)
    pos_int = rng.integers(-3000, 3000, (T, D))
    assert res_lo < -3000 and res_hi > 3000
    blocks = []
    for i in range(cfg.depth):
        c_mult, c_shift = _softmax_scale(cfg.head_dim, 32)
        attn = QAttention(_linear(rng, 3 * D, D, numerics.ACT_BITS), c_mult, c_shift,
                          int(rng.integers(1 << 12, 1 << 14)), 13,
                          _linear(rng, D, D, numerics.RES_BITS, target=1500))
        if cfg.is_moe(i):
            E, h = cfg.experts, cfg.expert_hidden
            gates = [rng.integers(-_W, _W + 1, (D, E)) for _ in range(cfg.num_tasks if cfg.router == "multi_gate" else 1)]
            rc = [_softmax_scale(D, 32) for _ in gates]
            task_bias = (rng.integers(-20000, 20000, (cfg.num_tasks, E)) if cfg.router != "multi_gate"
                         else np.zeros((cfg.num_tasks, E), dtype=np.int64))
            mlp = QMoE(gates, task_bias, [c for c, _ in rc], [s for _, s in rc],
                       _linear(rng, h, D, numerics.ACT_BITS, lead=(E,)), _lut(rng),
                       _linear(rng, D, h, numerics.RES_BITS, lead=(E,), target=1500))
        else:
            hid = cfg.mlp_hidden
            mlp = QDenseMlp(_linear(rng, hid, D, numerics.ACT_BITS), _lut(rng),
                            _linear(rng, D, hid, numerics.RES_BITS, target=1500))
        blocks.append(QBlock(_ln(rng, D), attn, _ln(rng, D), mlp))
    return QuantizedEncoder(cfg, 1.0 / 128, 1.0 / 256, patch, cls_int, pos_int, blocks)
