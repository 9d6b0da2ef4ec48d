"""Integer golden model: the per-operation numerics specification.

Every function here is integer-only (numpy int64 arrays in and out, no float math on data) and is the
executable form of one section of ``docs/numerics.md``. Each RTL unit is tested against exactly one of
these functions, with zero LSB difference. Formats and constants come from :mod:`m3vit_hw.numerics`.

Conventions
-----------
* ``round_shift(x, s)`` is round-half-up division by 2**s: ``(x + 2**(s-1)) >> s`` with an arithmetic
  (flooring) shift; ``s = 0`` is the identity. This is what a hardware adder + wire shift computes.
* ``sat(x, bits)`` clamps to the signed ``bits``-wide range.
* Integer GEMMs run as float64 BLAS products on integer-valued arrays: int8 x int8 products summed over
  any K we use stay far below 2**53, so the result is exact (see ``matmul``).

This module must not import torch: the simulation runners use it too.
"""

import numpy as np

from m3vit_hw import numerics

__all__ = [
    "round_shift", "sat", "matmul", "requantize", "gelu", "residual_add",
    "layernorm", "isqrt",
    "softmax_exp", "attention_weights", "attention_recip", "attention_normalize",
    "attention_head", "attention_head_tiled",
    "router_logits", "router_probs", "topk", "expert_queues", "moe_combine",
]

_I64 = np.int64


def _i(x):
    return np.asarray(x, dtype=_I64)


def _check_range(name, value, lo, hi):
    """Raise if any element of ``value`` lies outside [lo, hi]: the formats are part of the spec."""
    v = _i(value)
    if v.size and (v.min() < lo or v.max() > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got range [{v.min()}, {v.max()}]")


def round_shift(x, s):
    """Round-half-up arithmetic right shift by ``s`` (array or scalar ``s`` >= 0)."""
    x = _i(x)
    s = _i(s)
    if np.any(s < 0) or np.any(s > numerics.SHIFT_MAX):
        raise ValueError(f"shift must be in [0, {numerics.SHIFT_MAX}], not {s}")
    half = np.where(s > 0, np.left_shift(_I64(1), np.maximum(s - 1, 0)), 0)
    return np.right_shift(x + half, s)


def sat(x, bits):
    """Clamp to the signed ``bits``-wide range."""
    lo, hi = numerics.int_range(bits)
    return np.clip(_i(x), lo, hi)


def matmul(a, b):
    """Exact integer product ``a @ b`` (int64 result).

    Runs as a float64 BLAS product, which is exact while every partial sum stays below 2**53; that is
    checked here from the operand magnitudes rather than assumed.
    """
    a = _i(a)
    b = _i(b)
    k = a.shape[-1]
    bound = int(np.abs(a).max(initial=0)) * int(np.abs(b).max(initial=0)) * k
    if bound >= (1 << 53):
        raise OverflowError(f"matmul bound {bound} exceeds 2**53; operands too wide for exact float64")
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(_I64)


def requantize(acc, bias, mult, shift, out_bits):
    """GEMM epilogue requantization: ``sat(round_shift((acc + bias) * mult, shift), out_bits)``.

    ``bias`` and ``mult`` broadcast along the output columns (per output channel) or, for the AV
    product, along rows (per query row). ``mult`` is unsigned, below ``2**MULT_BITS``.
    """
    mult = _i(mult)
    if np.any(mult < 0) or np.any(mult >= (1 << numerics.MULT_BITS)):
        raise ValueError(f"requantization multiplier must be in [0, 2**{numerics.MULT_BITS}), not {mult}")
    return sat(round_shift((_i(acc) + _i(bias)) * mult, shift), out_bits)


def gelu(x, lut):
    """GELU as a 256-entry table: ``lut[x + 128]`` for an int8 input ``x``.

    The spec's table (docs/numerics.md §3) holds uint8 codes (``numerics.GELU_CODE_BITS``, zero point folded
    into fc2's bias), which fc2 reads as uint8; the golden-only options of docs/numerics.md §9 put int8
    (``gelu_code="s8"``) or int16 (``gelu_bits=16``) values here. The function is the lookup for all.

    The table is built at quantization time from the input and output scales; at run time GELU is a
    pure lookup, one ROM read per element.
    """
    lut = _i(lut)
    if lut.shape != (1 << numerics.ACT_BITS,):
        raise ValueError(f"GELU table must have {1 << numerics.ACT_BITS} entries, not shape {lut.shape}")
    x = _i(x)
    lo, hi = numerics.int_range(numerics.ACT_BITS)
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError("GELU input must be int8")
    return lut[x - lo]


def residual_add(res, branch):
    """Residual stream update: ``sat(res + branch, RES_BITS)``. Both operands are at the residual scale."""
    return sat(_i(res) + _i(branch), numerics.RES_BITS)


def isqrt(n):
    """Elementwise floor(sqrt(n)) for non-negative int64 (exact, no float rounding at the edges)."""
    n = _i(n)
    if np.any(n < 0):
        raise ValueError("isqrt of a negative number")
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(_I64)
    # float sqrt can be off by one near 2**52; correct both ways.
    r = np.where(r * r > n, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= n, r + 1, r)
    return r


def layernorm(x, eps_int, gamma_mult, beta_int, shift, out_bits=numerics.ACT_BITS):
    """Integer LayerNorm over the last axis: int16 residual rows in, int8 out (``out_bits`` wide).

    For a row of D values x::

        S1 = sum(x)                 S2 = sum(x*x)
        var_n = D*S2 - S1**2 + eps_int        (= D**2 * (variance + eps) in integer units)
        den = max(1, isqrt(var_n))
        inv = floor(2**LN_INV_BITS / den)
        z = round_shift((D*x - S1) * inv, LN_INV_BITS - LN_Z_FRAC)   # (x - mean)/std, Q.LN_Z_FRAC
        y = sat8(round_shift(z * gamma_mult[c] + beta_int[c], shift))

    A zero-variance row gives z = 0 and y = sat8(round_shift(beta_int, shift)).
    """
    x = _i(x)
    _check_range("layernorm input", x, *numerics.int_range(numerics.RES_BITS))
    _check_range("eps_int", eps_int, 0, (1 << numerics.LN_EPS_BITS) - 1)
    _check_range("gamma_mult", gamma_mult, *numerics.int_range(numerics.LN_GAMMA_BITS))
    _check_range("beta_int", beta_int, *numerics.int_range(numerics.LN_BETA_BITS))
    d = x.shape[-1]
    s1 = x.sum(-1, keepdims=True)
    s2 = (x * x).sum(-1, keepdims=True)
    var_n = d * s2 - s1 * s1 + _I64(eps_int)
    den = np.maximum(1, isqrt(var_n))
    inv = np.floor_divide(_I64(1) << numerics.LN_INV_BITS, den)
    z = round_shift((d * x - s1) * inv, numerics.LN_INV_BITS - numerics.LN_Z_FRAC)
    return sat(round_shift(z * _i(gamma_mult) + _i(beta_int), shift), out_bits)


def softmax_exp(scores, c_mult, c_shift):
    """Base-2 exponent of each score relative to its row maximum: e16 in [0, 2**EXP_LUT_BITS].

    ::

        t = ((max(row) - s) * c_mult) >> c_shift      # log2 distance, EXP_FRAC_BITS fraction bits
        i, f = t >> EXP_FRAC_BITS, t & (2**EXP_FRAC_BITS - 1)
        e16 = exp2_lut[f] >> i   if i < EXP_ZERO_INT else 0

    ``c_mult * 2**-c_shift`` is the score scale times log2(e) times 2**EXP_FRAC_BITS. The row maximum
    always gets e16 = 2**EXP_LUT_BITS. The shift is a floor (truncating) shift, like a barrel shifter.
    """
    s = _i(scores)
    _check_range("softmax input", s, *numerics.int_range(numerics.ACC_BITS))
    _check_range("c_mult", c_mult, 0, (1 << numerics.SOFTMAX_MULT_BITS) - 1)
    m = s.max(-1, keepdims=True)
    t = np.right_shift((m - s) * _I64(c_mult), _I64(c_shift))
    i = np.right_shift(t, numerics.EXP_FRAC_BITS)
    f = t & ((1 << numerics.EXP_FRAC_BITS) - 1)
    lut = numerics.exp2_lut()
    return np.where(i < numerics.EXP_ZERO_INT, np.right_shift(lut[f], np.minimum(i, numerics.EXP_ZERO_INT)), 0)


def attention_weights(scores, c_mult, c_shift):
    """Unnormalised 8-bit attention weights and their row sum: (e8, l).

    ``e8 = min(255, round_shift(e16, EXP_LUT_BITS - ATTN_P_BITS))``; the row max maps to 255, so
    ``l = sum(e8) >= 255``. The weights feed the AV product as *unsigned* 8-bit operands; normalisation by
    ``l`` is deferred to the AV epilogue, so a row can be processed as it streams.
    """
    e16 = softmax_exp(scores, c_mult, c_shift)
    e8 = np.minimum((1 << numerics.ATTN_P_BITS) - 1, round_shift(e16, numerics.EXP_LUT_BITS - numerics.ATTN_P_BITS))
    return e8, e8.sum(-1)


def attention_recip(l, out_mult):
    """Per-row multiplier of the AV epilogue: ``floor(out_mult * 2**AV_RECIP_BITS / l)``."""
    l = _i(l)
    if np.any(l <= 0):
        raise ValueError("attention row sum must be positive")
    _check_range("out_mult", out_mult, 0, (1 << numerics.AV_OUT_MULT_BITS) - 1)
    return np.floor_divide(_I64(out_mult) << numerics.AV_RECIP_BITS, l)


def attention_normalize(acc, recip, out_shift):
    """AV epilogue: ``sat8(round_shift(acc * recip[row], out_shift + AV_RECIP_BITS))``."""
    return requantize(acc, 0, _i(recip)[..., None], out_shift + numerics.AV_RECIP_BITS, numerics.ACT_BITS)


def attention_head(q, k, v, c_mult, c_shift, out_mult, out_shift):
    """One head of attention on int8 q, k, v [T, hd] -> int8 [T, hd].

    scores = q @ k.T (int32); (e8, l) = attention_weights(scores); acc = e8 @ v;
    out = attention_normalize(acc, attention_recip(l, out_mult), out_shift).
    """
    scores = matmul(q, _i(k).T)
    e8, l = attention_weights(scores, c_mult, c_shift)
    acc = matmul(e8, v)
    return attention_normalize(acc, attention_recip(l, out_mult), out_shift)


def attention_head_tiled(q, k, v, c_mult, c_shift, out_mult, out_shift, q_tile):
    """``attention_head`` computed in query tiles of ``q_tile`` rows.

    Every operation after ``q @ k.T`` is row-wise, so a tile of queries needs only its own score rows
    (q_tile x T), never the full T x T matrix; the result is bit-identical to the untiled form. This is
    the form the hardware runs for long sequences (W2: T = 1201).
    """
    if q_tile < 1:
        raise ValueError(f"q_tile must be >= 1, not {q_tile}")
    q = _i(q)
    return np.concatenate([attention_head(q[r:r + q_tile], k, v, c_mult, c_shift, out_mult, out_shift)
                           for r in range(0, q.shape[0], q_tile)], axis=0)


def router_logits(x, w_gate, task_bias=None):
    """Gate logits: ``x @ w_gate`` (+ the per-task logit bias of the task-embedding router), int32.

    The gate weights share one scale, so logits of different experts are directly comparable.
    """
    logits = matmul(x, w_gate)
    if task_bias is not None:
        logits = logits + _i(task_bias)
    return logits


def router_probs(logits, c_mult, c_shift):
    """Softmax over all experts as unsigned Q0.15 combine weights (1.0 = 2**15).

    ``e16 = softmax_exp(logits)``; ``R = floor(2**ROUTER_RECIP_BITS / sum(e16))``;
    ``p = round_shift(e16 * R, ROUTER_RECIP_BITS - ROUTER_P_FRAC)``.
    """
    e16 = softmax_exp(logits, c_mult, c_shift)
    recip = np.floor_divide(_I64(1) << numerics.ROUTER_RECIP_BITS, e16.sum(-1, keepdims=True))
    return round_shift(e16 * recip, numerics.ROUTER_RECIP_BITS - numerics.ROUTER_P_FRAC)


def topk(logits, k):
    """Indices of the k largest logits per row, best first; ties go to the lowest expert index.

    Selection uses the integer logits (softmax is monotonic, and logits have fewer ties than the
    quantized probabilities).
    """
    logits = _i(logits)
    e = logits.shape[-1]
    if not 1 <= k <= e:
        raise ValueError(f"top_k must be in [1, {e}], not {k}")
    # Stable sort on the negated logits keeps lower indices first among equals.
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


def expert_queues(top_idx, probs, experts):
    """Per-expert token queues, as the reordering controller builds them by counting.

    Returns ``(queues, active)``: ``queues[e]`` is a list of ``(token, weight)`` in ascending token
    order; ``active`` lists the experts with at least one token, ascending.
    """
    top_idx = _i(top_idx)
    probs = _i(probs)
    queues = [[] for _ in range(experts)]
    for t in range(top_idx.shape[0]):
        for e in top_idx[t]:
            queues[int(e)].append((t, int(probs[t, e])))
    return queues, [e for e in range(experts) if queues[e]]


def moe_combine(res, expert_out, weight):
    """One weighted scatter-accumulate step into the residual stream.

    ``res = sat16(res + round_shift(expert_out * weight, ROUTER_P_FRAC))``; ``expert_out`` is the
    expert's fc2 result already requantized to the residual scale (int16), ``weight`` the Q0.15
    combine weight. The layer applies these steps in ascending expert order (the order the reordering
    controller processes experts), which defines the result when saturation occurs.
    """
    return residual_add(res, round_shift(_i(expert_out) * _i(weight), numerics.ROUTER_P_FRAC))
