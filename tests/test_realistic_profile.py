"""The realistic weight profile reproduces the statistics measured on the real W1 weights (issue 8)."""

import numpy as np
import pytest
import torch

from reference.inputs import normalize_pixels, synthetic_images, synthetic_pixels
from reference.model import build_model
from reference.synthetic_weights import make_weights, profile_statistics, PROFILES


@pytest.fixture(scope="module")
def w1_stats():
    m = make_weights(build_model("vit-tiny-cityscapes", seed=0), "realistic", 0)
    return m, profile_statistics(m, synthetic_images(m.cfg, 2, seed=0))


def test_dense_weights_have_the_measured_std_and_tails(w1_stats):
    _, st = w1_stats
    std, kurt = np.array(st["dense_weight_std"]), np.array(st["dense_weight_kurtosis"])
    print(f"dense weight std {std.min():.4f}-{std.max():.4f}, excess kurtosis {kurt.min():.2f}-{kurt.max():.2f}")
    assert std.min() >= 0.047 * 0.98 and std.max() <= 0.057 * 1.02
    assert kurt.min() >= -0.2 and kurt.max() <= 6.5


def test_block9_layernorm_gain_and_k_bias(w1_stats):
    _, st = w1_stats
    print(f"block 9 norm2 gain median {st['ln2_gain_median'][9]:.2f} max {st['ln2_gain_max'][9]:.2f}; "
          f"LN2 output absmax {st['ln2_out_absmax'][9]:.1f}; k bias absmax {st['k_bias_absmax']:.1f}")
    assert 11.5 <= st["ln2_gain_median"][9] <= 13.0
    assert 14.5 <= st["ln2_gain_max"][9] <= 16.5
    assert st["ln2_out_absmax"][9] >= 40
    assert 45 <= st["k_bias_absmax"] <= 52


def test_gelu_crest_factor_of_block0(w1_stats):
    _, st = w1_stats
    print(f"block 0 GELU crest {st['gelu_crest'][0]:.1f}, rms {st['gelu_rms'][0]:.3f}")
    assert 24 <= st["gelu_crest"][0] <= 34
    assert 0.12 <= st["gelu_rms"][0] <= 0.25


def test_routers_are_undecisive_except_the_one_hot_layer(w1_stats):
    _, st = w1_stats
    print("router logit std", {k: round(v, 2) for k, v in st["router_logit_std"].items()})
    print(f"block 1 2nd-3rd gap median {st['gap23_median'][1]:.3f}, within 0.1: {st['gap23_within_0_1'][1]:.2f}; "
          f"block 9 top-1 prob median {st['top1_prob_median'][9]:.3f}")
    for i, s in st["router_logit_std"].items():
        if i == 9:
            assert 7.5 <= s <= 15
        else:
            assert 1.0 <= s <= 2.2, (i, s)
    assert 0.07 <= st["gap23_median"][1] <= 0.18
    assert 0.3 <= st["gap23_within_0_1"][1] <= 0.6
    assert 0.85 <= st["top1_prob_median"][9] <= 0.99


def test_block9_moe_branch_dominates_the_residual(w1_stats):
    _, st = w1_stats
    print(f"block 9 branch rms {st['branch_rms'][9]:.2f}, residual rms {st['residual_rms'][9]:.2f}")
    assert 1.0 <= st["residual_rms"][9] <= 2.5
    assert 2.0 <= st["branch_rms"][9] / st["residual_rms"][9] <= 3.5


def test_profiles_are_deterministic_and_named():
    a = make_weights(build_model("tiny", seed=1), "realistic", 1)
    b = make_weights(build_model("tiny", seed=1), "realistic", 1)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert PROFILES[0] == "realistic" and "trained-like" in PROFILES and "init" in PROFILES
    with pytest.raises(ValueError, match="realistic"):
        make_weights(build_model("tiny"), "nope", 0)


def test_synthetic_images_are_uint8_pixels():
    cfg = build_model("tiny").cfg
    p = synthetic_pixels(cfg, 2, seed=4)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (2, cfg.in_chans, *cfg.img_size)
    x = synthetic_images(cfg, 2, seed=4, dtype=torch.float64)
    assert torch.equal(x, normalize_pixels(p, torch.float64))
    # Every float value sits on the 1/255 pixel grid.
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, 3, 1, 1)
    back = (x * std + mean) * 255
    assert torch.allclose(back, back.round(), atol=1e-9)
