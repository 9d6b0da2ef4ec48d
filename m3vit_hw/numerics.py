"""Integer number formats shared by the golden model (``reference/golden.py``) and the RTL.

Every width, fraction length and lookup table of the integer datapath is defined here once. The golden
model computes with these constants; the RTL generators size their ports and ROMs from them. The
prose specification is ``docs/numerics.md``.

Pure Python + numpy: the generator must not need torch.
"""

import numpy as np

__all__ = [
    "ACT_BITS", "GELU_CODE_BITS", "WEIGHT_BITS", "ACC_BITS", "RES_BITS", "BIAS_BITS",
    "MULT_BITS", "SHIFT_MAX", "SHIFT_BITS", "COMBINE_WEIGHT_BITS",
    "EXP_FRAC_BITS", "EXP_LUT_BITS", "EXP_OUT_BITS", "ATTN_P_BITS", "EXP_ZERO_INT",
    "ROUTER_P_FRAC", "ROUTER_RECIP_BITS", "AV_RECIP_BITS",
    "SOFTMAX_MULT_BITS", "AV_OUT_MULT_BITS",
    "LN_INV_BITS", "LN_Z_FRAC", "LN_GAMMA_BITS", "LN_BETA_BITS", "LN_EPS_BITS",
    "PE_PRODUCT_MAX", "PE_PACK_SHIFT",
    "exp2_lut", "int_range",
]

#: Activations feeding a GEMM: signed int8 (attention probabilities are *unsigned* 8-bit, see ATTN_P_BITS).
ACT_BITS = 8
#: The GELU output (the fc2 / expert ``h4toh`` A operand) is an *unsigned* 8-bit code ``u`` with a zero point
#: ``z``, ``a = s'(u - z)``: GELU >= -0.17 needs only a few negative codes, so the step is about half the
#: int8 one. The GELU table maps an int8 input to ``u`` in ``[0, 2**GELU_CODE_BITS)``; fc2 reads ``u`` as
#: uint8 (the PE array's ``a_unsigned``) and ``-z * sum(w)`` is folded into its bias (docs/numerics.md §3).
GELU_CODE_BITS = 8
#: Weights: signed int8, symmetric, per output channel scale.
WEIGHT_BITS = 8
#: GEMM accumulators: signed int32. The config checks that K never lets a sum overflow.
ACC_BITS = 32
#: Biases are int32 at the accumulator's scale.
BIAS_BITS = 32
#: The residual stream: signed int16 at one encoder-wide scale. int8 cannot carry ViT residual outlier
#: channels (10-100x the typical magnitude) without crushing the ordinary channels; int16 keeps ~9 bits
#: for ordinary channels even next to a 100x outlier, and one scale makes every residual add a plain
#: saturating add.
RES_BITS = 16
#: Requantization multipliers are unsigned and below 2**MULT_BITS; shifts are in [0, SHIFT_MAX].
MULT_BITS = 24
SHIFT_MAX = 63
#: Width of every shift field (requantizer, LayerNorm output, softmax exponent scale): 0 .. SHIFT_MAX.
SHIFT_BITS = SHIFT_MAX.bit_length()

#: Softmax works in base 2: t = (max - s) * C >> S is a fixed-point log2 distance with EXP_FRAC_BITS
#: fraction bits; 2**-frac comes from a ROM of 2**EXP_FRAC_BITS entries, the integer part is a shift.
EXP_FRAC_BITS = 8
#: ROM entries hold round(2**EXP_LUT_BITS * 2**(-f / 2**EXP_FRAC_BITS)); entry 0 is exactly 2**EXP_LUT_BITS.
EXP_LUT_BITS = 15
#: Width of an exp value e16 (0 .. 2**EXP_LUT_BITS inclusive).
EXP_OUT_BITS = EXP_LUT_BITS + 1
#: Integer parts >= this give e16 = 0 (the shift has pushed every bit out).
EXP_ZERO_INT = EXP_OUT_BITS
#: Attention probabilities are unnormalised unsigned 8-bit weights e8 = min(255, round(e16 / 2**7));
#: the row maximum is always 255, normalisation happens after the AV product (deferred normalisation).
ATTN_P_BITS = 8
#: The AV epilogue's per-row multiplier is floor(M_o * 2**AV_RECIP_BITS / l), l = sum of e8 (>= 255).
AV_RECIP_BITS = 16
#: Largest magnitude of one PE-array product: uint8 attention weight 255 times int8 -128.
PE_PRODUCT_MAX = ((1 << ATTN_P_BITS) - 1) << (WEIGHT_BITS - 1)
#: Field offset of the DSP-packed PE array (``pe_pack = 2``): one multiplier computes
#: ``a * (b_hi * 2**PE_PACK_SHIFT + b_lo)``. The packed operand must fit the DSP48E2's 27-bit port
#: (and the DSP48E1's 25 bits, the xc7 proxy); the low field is tracked every cycle, which is exact
#: while one product is below ``2**(PE_PACK_SHIFT - 1)`` in magnitude: 16 bits for 32640.
PE_PACK_SHIFT = PE_PRODUCT_MAX.bit_length() + 1
#: Router combine weights are unsigned Q0.ROUTER_P_FRAC (1.0 = 2**15, inclusive).
ROUTER_P_FRAC = 15
#: Router probabilities, which become the MoE combine weights: unsigned Q0.ROUTER_P_FRAC with 1.0
#: inclusive, so one bit more than the fraction.
COMBINE_WEIGHT_BITS = ROUTER_P_FRAC + 1
#: Router normalisation: R = floor(2**ROUTER_RECIP_BITS / sum(e16)).
ROUTER_RECIP_BITS = 31

#: Softmax exponent multiplier c_mult (attention and router) is unsigned, below 2**SOFTMAX_MULT_BITS.
SOFTMAX_MULT_BITS = 16
#: The attention output multiplier out_mult (AV epilogue numerator) is unsigned, below 2**AV_OUT_MULT_BITS.
#: With l >= 255 the per-row multiplier floor(out_mult * 2**AV_RECIP_BITS / l) < 2**(15+16-7.99) fits
#: MULT_BITS; 16 bits would not (65535 * 2**16 / 255 > 2**24).
AV_OUT_MULT_BITS = 15

#: LayerNorm: inv = floor(2**LN_INV_BITS / den), z = (D*x - sum) * inv >> (LN_INV_BITS - LN_Z_FRAC).
LN_INV_BITS = 32
#: Fraction bits of the normalised value z (|z| <= sqrt(D) * 2**LN_Z_FRAC).
LN_Z_FRAC = 10
#: LayerNorm per-channel gamma multiplier: signed, LN_GAMMA_BITS wide.
LN_GAMMA_BITS = 16
#: LayerNorm per-channel beta (already scaled by 2**shift): signed, LN_BETA_BITS wide.
LN_BETA_BITS = 32
#: LayerNorm epsilon in integer units (D**2 * eps / s_res**2, rounded): unsigned, below 2**LN_EPS_BITS.
LN_EPS_BITS = 31


def int_range(bits, signed=True):
    """(min, max) of a ``bits``-wide integer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def exp2_lut():
    """The softmax ROM: ``lut[f] = round(2**EXP_LUT_BITS * 2**(-f / 2**EXP_FRAC_BITS))``.

    Computed once with float math *at generation time*; the forward pass only indexes it. Values are in
    (2**(EXP_LUT_BITS-1), 2**EXP_LUT_BITS], so entry 0 needs EXP_OUT_BITS bits.
    """
    f = np.arange(1 << EXP_FRAC_BITS, dtype=np.float64)
    return np.round((1 << EXP_LUT_BITS) * np.exp2(-f / (1 << EXP_FRAC_BITS))).astype(np.int64)
