"""Per-operation tests of the integer golden model against exact integer math and against float.

Each float comparison states its tolerance and why it is what it is.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from m3vit_hw import numerics
from reference import golden as g


RNG = np.random.default_rng


# --- primitives --------------------------------------------------------------------------------------

@given(st.integers(-(1 << 50), 1 << 50), st.integers(0, 40))
def test_round_shift_is_round_half_up(x, s):
    want = x if s == 0 else math.floor(x / (1 << s) + 0.5) if abs(x) < (1 << 52) else None
    if want is None:
        want = (x + (1 << (s - 1))) // (1 << s)
    assert int(g.round_shift(x, s)) == want


def test_round_shift_rejects_bad_shift():
    with pytest.raises(ValueError, match="shift must be in"):
        g.round_shift(5, 64)


@given(st.integers(0, 1 << 62))
def test_isqrt_exact(n):
    assert int(g.isqrt(n)) == math.isqrt(n)


def test_matmul_exact_and_guarded():
    rng = RNG(1)
    a = rng.integers(-128, 128, (17, 768))
    b = rng.integers(-128, 128, (768, 9))
    assert np.array_equal(g.matmul(a, b), a.astype(object).dot(b.astype(object)).astype(np.int64))
    with pytest.raises(OverflowError):
        g.matmul(np.full((1, 4), 1 << 26), np.full((4, 1), 1 << 26))


# --- requantization ------------------------------------------------------------------------------------

def test_requantize_matches_exact_rational_rounding():
    rng = RNG(2)
    acc = rng.integers(-(1 << 31), 1 << 31, 5000)
    bias = rng.integers(-(1 << 20), 1 << 20, 5000)
    mult = rng.integers(0, 1 << numerics.MULT_BITS, 5000)
    shift = 37
    got = g.requantize(acc, bias, mult, shift, 16)
    v = [(int(a) + int(b)) * int(m) for a, b, m in zip(acc, bias, mult)]
    want = [max(-32768, min(32767, (x + (1 << (shift - 1))) >> shift)) for x in v]
    assert got.tolist() == want
    # Saturation both ways.
    assert g.requantize([1 << 30, -(1 << 30)], 0, (1 << numerics.MULT_BITS) - 1, 0, 8).tolist() == [127, -128]


def test_requantize_rejects_out_of_format_multiplier():
    with pytest.raises(ValueError, match="multiplier"):
        g.requantize(1, 0, 1 << numerics.MULT_BITS, 3, 8)


def test_requantize_close_to_float_scaling():
    """|int - float| <= 0.5 LSB (rounding) + the multiplier's own rounding error (< 2^-shift per unit)."""
    rng = RNG(3)
    real = rng.uniform(1e-4, 1e-2, 64)
    shift = int(math.floor(math.log2(((1 << numerics.MULT_BITS) - 1) / real.max())))
    mult = np.round(real * (1 << shift)).astype(np.int64)
    acc = rng.integers(-(1 << 16), 1 << 16, (100, 64))
    got = g.requantize(acc, 0, mult, shift, 16)
    ref = acc * real
    bound = 0.5 + np.abs(acc) * 0.5 / (1 << shift) + 1e-9
    assert np.all(np.abs(got - ref) <= bound)


# --- GELU ----------------------------------------------------------------------------------------------

def test_gelu_table_is_a_lookup_and_close_to_float():
    s_in, s_out = 0.05, 0.04
    x = np.arange(-128, 128)
    ref = torch.nn.functional.gelu(torch.tensor(x * s_in, dtype=torch.float64)).numpy() / s_out
    lut = np.clip(np.round(ref), -128, 127).astype(np.int64)
    got = g.gelu(x, lut)
    # Tolerance 0.5 LSB: the table is the rounded float GELU at every representable input.
    assert np.max(np.abs(got - np.clip(ref, -128, 127))) <= 0.5
    with pytest.raises(ValueError):
        g.gelu([200], lut)
    with pytest.raises(ValueError):
        g.gelu([0], lut[:10])


def test_residual_add_saturates():
    assert g.residual_add([32000, -32000, 5], [1000, -1000, -7]).tolist() == [32767, -32768, -2]


# --- LayerNorm -----------------------------------------------------------------------------------------

def _ln_params(gamma, beta, s_out, dim, s_res, eps=1e-6):
    gm = gamma / s_out
    shift = min(math.floor(math.log2(32767 / np.abs(gm).max())) + numerics.LN_Z_FRAC, 40)
    gamma_mult = np.round(gm * 2.0 ** (shift - numerics.LN_Z_FRAC)).astype(np.int64)
    beta_int = np.round(beta / s_out * 2.0 ** shift).astype(np.int64)
    eps_int = int(round(eps * dim * dim / s_res ** 2))
    return eps_int, gamma_mult, beta_int, shift


@pytest.mark.parametrize("dim", [32, 192, 384])
def test_layernorm_close_to_float(dim):
    """Within 1 LSB of float LayerNorm on the same integer input (output rounding + inv/z truncation)."""
    rng = RNG(dim)
    s_res, s_out = 1e-3, 0.03
    x = rng.integers(-3000, 3000, (64, dim))
    x[:, 3] *= 8                                        # an outlier channel
    gamma = rng.lognormal(0, 0.3, dim)
    beta = rng.normal(0, 0.2, dim)
    params = _ln_params(gamma, beta, s_out, dim, s_res)
    got = g.layernorm(x, *params)
    ref = torch.nn.functional.layer_norm(torch.tensor(x * s_res), (dim,), torch.tensor(gamma),
                                         torch.tensor(beta), eps=1e-6).numpy() / s_out
    err = np.abs(got - np.clip(ref, -128, 127))
    print(f"layernorm D={dim}: max |int - float| = {err.max():.3f} LSB")
    assert err.max() <= 1.0


def test_layernorm_zero_variance_row_and_zero_eps():
    dim = 48
    x = np.full((2, dim), 1234)
    x[1] = -32768
    beta_int = np.arange(dim) * 1000 - 20000
    got = g.layernorm(x, 0, np.full(dim, 30000), beta_int, 8)
    want = np.clip((beta_int + 128) >> 8, -128, 127)
    assert np.array_equal(got[0], want) and np.array_equal(got[1], want)


def test_layernorm_rejects_out_of_format_params():
    with pytest.raises(ValueError, match="gamma_mult"):
        g.layernorm(np.zeros((1, 4)), 0, np.full(4, 1 << 15), np.zeros(4), 4)
    with pytest.raises(ValueError, match="layernorm input"):
        g.layernorm(np.full((1, 4), 1 << 15), 0, np.ones(4), np.zeros(4), 4)


# --- softmax -------------------------------------------------------------------------------------------

def _c(scale):
    """c_mult, c_shift for a score scale."""
    real = scale * math.log2(math.e) * (1 << numerics.EXP_FRAC_BITS)
    shift = int(math.floor(math.log2(((1 << numerics.SOFTMAX_MULT_BITS) - 1) / real)))
    return int(round(real * (1 << shift))), shift


def test_softmax_exp_row_max_is_one_and_far_values_are_zero():
    c_mult, c_shift = _c(0.01)
    s = np.array([[5, 5, 5, -(1 << 31)], [0, 100, 99, 100]])
    e = g.softmax_exp(s, c_mult, c_shift)
    assert e[0, :3].tolist() == [1 << numerics.EXP_LUT_BITS] * 3 and e[0, 3] == 0
    assert e[1, 1] == e[1, 3] == 1 << numerics.EXP_LUT_BITS


def test_attention_weights_close_to_float_softmax():
    """e8/l vs float softmax: |diff| <= 2/l per element (e8 rounding of 0.5 + LUT/trunc error 1.5%)."""
    rng = RNG(5)
    scale = 0.004
    c_mult, c_shift = _c(scale)
    s = rng.integers(-3000, 3000, (32, 129))
    e8, l = g.attention_weights(s, c_mult, c_shift)
    assert np.all(e8.max(-1) == 255) and np.array_equal(l, e8.sum(-1))
    ref = torch.softmax(torch.tensor(s * scale), -1).numpy()
    err = np.abs(e8 / l[:, None] - ref)
    bound = 2.0 / l[:, None] + 0.02 * ref
    print(f"attention weights: max |int - float| = {err.max():.5f}")
    assert np.all(err <= bound)


def test_all_equal_softmax_row():
    e8, l = g.attention_weights(np.full((1, 10), -77), 40000, 20)
    assert e8.tolist() == [[255] * 10] and l.tolist() == [2550]
    p = g.router_probs(np.full((1, 16), 3), 40000, 20)
    assert p.tolist() == [[2048] * 16]


def test_router_probs_close_to_float():
    """|p/2^15 - softmax| <= 2^-8: the LUT and the truncating shift give < 0.4% relative error on e16."""
    rng = RNG(6)
    scale = 1e-4
    c_mult, c_shift = _c(scale)
    logits = rng.integers(-30000, 30000, (200, 16))
    p = g.router_probs(logits, c_mult, c_shift)
    ref = torch.softmax(torch.tensor(logits * scale), -1).numpy()
    err = np.abs(p / 32768 - ref)
    print(f"router probs: max |int - float| = {err.max():.6f}")
    assert err.max() <= 2 ** -8
    assert np.all(np.abs(p.sum(-1) - 32768) <= 16)


@pytest.mark.parametrize("heads_dim,T,q_tile", [(16, 37, 5), (32, 129, 16), (32, 64, 64)])
def test_tiled_attention_is_bit_identical(heads_dim, T, q_tile):
    rng = RNG(T)
    q, k, v = (rng.integers(-128, 128, (T, heads_dim)) for _ in range(3))
    args = (q, k, v, 30000, 22, 20000, 10)
    assert np.array_equal(g.attention_head(*args), g.attention_head_tiled(*args, q_tile))


def test_attention_head_close_to_float():
    """Within 2 LSB of float attention on the same int8 q/k/v (weights at 8 bits relative to the max)."""
    rng = RNG(8)
    T, hd = 129, 64
    s_q = s_k = 0.05
    s_v, s_o = 0.04, 0.02
    q, k, v = (rng.integers(-128, 128, (T, hd)) for _ in range(3))
    c_mult, c_shift = _c(s_q * s_k / math.sqrt(hd))
    o_shift = int(math.floor(math.log2(((1 << numerics.AV_OUT_MULT_BITS) - 1) / (s_v / s_o))))
    o_mult = int(round(s_v / s_o * (1 << o_shift)))
    got = g.attention_head(q, k, v, c_mult, c_shift, o_mult, o_shift)
    att = torch.softmax(torch.tensor(q * s_q) @ torch.tensor(k * s_k).T / math.sqrt(hd), -1)
    ref = (att @ torch.tensor(v * s_v)).numpy() / s_o
    err = np.abs(got - np.clip(ref, -128, 127))
    print(f"attention head: max |int - float| = {err.max():.3f} LSB, mean {err.mean():.3f}")
    assert err.max() <= 2.0


# --- routing -------------------------------------------------------------------------------------------

def test_topk_ties_go_to_lowest_index():
    logits = np.array([[3, 7, 7, 1, 7], [0, 0, 0, 0, 0]])
    assert g.topk(logits, 2).tolist() == [[1, 2], [0, 1]]
    assert g.topk(logits, 5).tolist()[1] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="top_k"):
        g.topk(logits, 6)


def test_expert_queues_match_brute_force():
    rng = RNG(9)
    E, T, k = 8, 50, 2
    logits = rng.integers(-100, 100, (T, E))
    logits[:, 3] += 1000                                 # expert 3 gets every token
    top = g.topk(logits, k)
    probs = rng.integers(0, 32769, (T, E))
    queues, active = g.expert_queues(top, probs, E)
    for e in range(E):
        want = [(t, int(probs[t, e])) for t in range(T) if e in top[t]]
        assert queues[e] == want
    assert active == sorted({int(e) for e in top.ravel()})
    assert len(queues[3]) == T


def test_moe_combine_rounds_and_saturates():
    res = np.array([100, 32767, -32768])
    y = np.array([1000, 1000, -1000])
    got = g.moe_combine(res, y, np.array([16384, 32768, 32768]))
    assert got.tolist() == [600, 32767, -32768]
