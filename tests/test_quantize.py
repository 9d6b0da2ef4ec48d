"""The quantizer and the integer encoder: calibration walk, determinism, tiling, task switching."""

import time

import numpy as np
import pytest
import torch

from reference import golden_model
from reference.inputs import synthetic_images
from reference.model import build_model
from reference.quantize import DEFAULTS, calibrate, quantize, quantize_image
from reference.synthetic_weights import make_weights


def _model(name, seed=0, profile="realistic"):
    return make_weights(build_model(name, seed=seed), profile, seed)


@pytest.mark.parametrize("name", ["tiny", "tiny-task-embedding"])
def test_calibration_walk_reproduces_the_float_encoder(name):
    """The calibration walk re-traces the encoder to observe inner values; it must compute the same thing."""
    m = _model(name)
    imgs = synthetic_images(m.cfg, 2, seed=5)
    _, finals = calibrate(m, imgs)
    for task, x in enumerate(finals):
        with torch.no_grad():
            ref = m.encode(imgs, task)
        assert torch.allclose(x, ref, atol=1e-5, rtol=1e-5), f"task {task}: max diff {(x - ref).abs().max()}"


def _quantized(name, seed=0):
    m = _model(name, seed)
    return m, quantize(m, synthetic_images(m.cfg, 2, seed=seed + 1000))


@pytest.mark.parametrize("name", ["tiny", "tiny-task-embedding"])
def test_same_seed_gives_same_integers(name):
    _, qa = _quantized(name)
    _, qb = _quantized(name)
    img = synthetic_images(qa.cfg, 1, seed=3)[0]
    for task in range(qa.cfg.num_tasks):
        a = golden_model.encode(qa, quantize_image(img, qa.img_scale), task)
        b = golden_model.encode(qb, quantize_image(img, qb.img_scale), task)
        assert a.dtype == np.int64 and np.array_equal(a, b)
        assert a.min() >= -32768 and a.max() <= 32767


def test_query_tiled_encoder_is_bit_identical():
    m, qm = _quantized("tiny")
    img_q = quantize_image(synthetic_images(m.cfg, 1, seed=4)[0], qm.img_scale)
    full = golden_model.encode(qm, img_q, 0)
    for q_tile in (1, 4, 7):
        assert np.array_equal(full, golden_model.encode(qm, img_q, 0, q_tile=q_tile))


def test_task_embedding_router_becomes_a_per_task_logit_bias():
    m, qm = _quantized("tiny-task-embedding")
    for i in m.cfg.moe_blocks:
        qe = qm.blocks[i].mlp
        assert len(qe.gates) == 1 and qe.gates[0].shape == (m.cfg.dim, m.cfg.experts)
        assert qe.task_bias.shape == (m.cfg.num_tasks, m.cfg.experts)
        assert not np.array_equal(qe.task_bias[0], qe.task_bias[1])


def test_parameters_fit_their_formats():
    from m3vit_hw import numerics
    _, qm = _quantized("tiny")
    for qb in qm.blocks:
        for ln in (qb.ln1, qb.ln2):
            assert np.abs(ln.gamma_mult).max() < 1 << (numerics.LN_GAMMA_BITS - 1)
            assert 0 <= ln.eps_int < 1 << numerics.LN_EPS_BITS
        for lin in (qb.attn.qkv, qb.attn.proj, qb.mlp.fc1, qb.mlp.fc2):
            assert np.abs(lin.w).max() <= 127
            assert lin.mult.min() >= 0 and lin.mult.max() < 1 << numerics.MULT_BITS
            assert 0 <= lin.shift <= numerics.SHIFT_MAX
        assert 0 < qb.attn.c_mult < 1 << numerics.SOFTMAX_MULT_BITS
        assert 0 < qb.attn.out_mult < 1 << numerics.AV_OUT_MULT_BITS


def test_w1_golden_frame_time():
    """One W1 frame through the golden model, against a generous budget.

    The foundation issue budgets 10 s per frame; measured here: 1.4 s wall on a quiet machine, 4.3 s
    CPU / 15 s wall on a loaded shared 2-core one. The assertion is on CPU time (this process, all
    threads), which neighbours disturb far less than wall time, with a 30 s limit: it catches a
    regression of the kind that matters (an op falling back to per-element Python), not noise. Both
    figures are printed."""
    m = _model("vit-tiny-cityscapes")
    qm = quantize(m, synthetic_images(m.cfg, 1, seed=1000))
    img_q = quantize_image(synthetic_images(m.cfg, 1, seed=0)[0], qm.img_scale)
    t0, c0 = time.perf_counter(), time.process_time()
    out = golden_model.encode(qm, img_q, "semseg")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"W1 golden frame: {cpu:.3f} s CPU, {wall:.3f} s wall (issue budget 10 s; asserted < 30 s CPU)")
    assert out.shape == (m.cfg.tokens, m.cfg.dim)
    assert cpu < 30.0, f"W1 golden frame took {cpu:.2f} s of CPU time, over the 30 s limit"


def test_bad_image_is_rejected():
    _, qm = _quantized("tiny")
    with pytest.raises(ValueError, match="shape"):
        golden_model.encode(qm, np.zeros((3, 8, 8), dtype=np.int64), 0)
    with pytest.raises(ValueError, match="int8"):
        golden_model.encode(qm, np.full((3, *qm.cfg.img_size), 300), 0)
    with pytest.raises(ValueError, match="task"):
        golden_model.encode(qm, np.zeros((3, *qm.cfg.img_size), dtype=np.int64), "nope")


def _float_ref(m, img, task):
    with torch.no_grad():
        return m.encode(img[None], task)[0].double().numpy()


def test_exact_rewrites_keep_the_float_model():
    """Dropping the k bias and SmoothQuant migration are exact in real arithmetic: the quantizer's float
    copy computes what the original does (to float32 rounding), and the original is left untouched."""
    from reference.quantize import calibrate as cal
    m = _model("tiny")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    imgs = synthetic_images(m.cfg, 2, seed=6)
    import copy
    m2 = copy.deepcopy(m)
    D = m.cfg.dim
    for blk in m2.backbone.blocks:
        blk.attn.qkv.bias.data[D:2 * D] = 0.0
    from reference.quantize import _smooth
    ranges, _ = cal(m2, imgs)
    with torch.no_grad():
        _smooth(m2, ranges, 0.5)
    for task in range(m.cfg.num_tasks):
        with torch.no_grad():
            a, b = m.encode(imgs, task), m2.encode(imgs, task)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    quantize(m, imgs, smooth_alpha=0.5)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pixel_input_is_p_minus_128_and_tracks_the_float_model():
    m = _model("tiny")
    px = quantize(m, synthetic_images(m.cfg, 2, seed=1000))
    sym = quantize(m, synthetic_images(m.cfg, 2, seed=1000), pixel_input=False)
    from reference.inputs import synthetic_pixels, normalize_pixels
    p = synthetic_pixels(m.cfg, 1, seed=2)[0]
    img = normalize_pixels(p)
    v = quantize_image(img, px.img_scale)
    assert np.array_equal(v, p.numpy().astype(np.int64) - 128)
    assert np.array_equal(quantize_image(p, px.img_scale), v)
    ref = _float_ref(m, img, 0)
    for qm in (px, sym):
        out = golden_model.encode(qm, quantize_image(img, qm.img_scale), 0) * qm.res_scale
        cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
        print(f"pixel_input={qm.scales['options']['pixel_input']}: cosine {cos:.5f}")
        assert cos > 0.99


@pytest.mark.parametrize("option", [dict(gelu_bits=16), dict(router_h_bits=16), dict(calib="p99.9"),
                                    dict(weight_clip="mse"), dict(calib="max"), dict(ln_bits=16),
                                    dict(ln_bits=16, gelu_bits=16), dict(gelu_bits=10), dict(gelu_code="s8")])
def test_measured_options_run_and_track_the_float_model(option):
    m = _model("tiny")
    qm = quantize(m, synthetic_images(m.cfg, 2, seed=1000), **option)
    img = synthetic_images(m.cfg, 1, seed=2)[0]
    out = golden_model.encode(qm, quantize_image(img, qm.img_scale), 0) * qm.res_scale
    ref = _float_ref(m, img, 0)
    cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    print(f"{option}: cosine {cos:.5f}")
    assert cos > 0.99


def test_bad_quantize_options():
    m = _model("tiny")
    imgs = synthetic_images(m.cfg, 1, seed=1000)
    for kw, needle in ((dict(gelu_bits=7), "gelu_bits"), (dict(weight_clip="x"), "weight_clip"),
                       (dict(calib="median"), "calibration method"), (dict(ln_bits=12), "ln_bits"),
                       (dict(gelu_code="u8", gelu_bits=16), "gelu_code"), (dict(gelu_bits=17), "gelu_bits")):
        with pytest.raises(ValueError, match=needle):
            quantize(m, imgs, **kw)


def test_16_bit_layernorm_output_is_the_8_bit_one_rounded_later():
    """ln_bits=16: same LayerNorm parameters, rounded 8 bits later, so the int8 output is the int16 one
    rounded by 2^8 (up to the final rounding tie) and the GEMMs reading it see a 256x finer step."""
    from reference import golden
    m = _model("tiny")
    imgs = synthetic_images(m.cfg, 2, seed=1000)
    q8, q16 = quantize(m, imgs), quantize(m, imgs, ln_bits=16)
    x = np.random.default_rng(0).integers(-3000, 3000, (5, m.cfg.dim))
    for a, b in ((q8.blocks[0].ln1, q16.blocks[0].ln1), (q8.blocks[1].ln2, q16.blocks[1].ln2)):
        assert b.out_bits == 16 and b.shift == a.shift - 8
        assert np.array_equal(a.gamma_mult, b.gamma_mult) and np.array_equal(a.beta_int, b.beta_int)
        y8 = golden.layernorm(x, a.eps_int, a.gamma_mult, a.beta_int, a.shift)
        y16 = golden.layernorm(x, b.eps_int, b.gamma_mult, b.beta_int, b.shift, b.out_bits)
        assert np.abs(np.clip(np.round(y16 / 256.0), -128, 127) - y8).max() <= 1
        assert np.abs(y16).max() > 127


def test_uint8_gelu_code_with_zero_point():
    """gelu_code='u8' (the default, the spec): the table holds uint8 codes u with s'(u - z) ~= gelu at the
    input grid, about twice as fine as the int8 table, and fc2's bias carries -z * sum(W) exactly."""
    import torch.nn.functional as F
    m = _model("tiny")
    imgs = synthetic_images(m.cfg, 2, seed=1000)
    q8, qu = quantize(m, imgs, gelu_code="s8"), quantize(m, imgs)
    assert DEFAULTS["gelu_code"] == "u8" and qu.scales["options"]["gelu_code"] == "u8"
    # Wider GELU outputs are signed: the default code follows gelu_bits.
    assert quantize(m, imgs, gelu_bits=10).scales["options"]["gelu_code"] == "s8"
    assert all(0 <= b.mlp.gelu_lut.min() and b.mlp.gelu_lut.max() <= 255 for b in qu.blocks)
    i = next(b for b in range(m.cfg.depth) if not m.cfg.is_moe(b))
    s_u, z = qu.scales[i]["gelu_u8"]
    lut = qu.blocks[i].mlp.gelu_lut
    assert lut.min() >= 0 and lut.max() <= 255 and 0 < z < 128
    x = torch.arange(-128, 128, dtype=torch.float64) * qu.scales[i]["pre"]
    ref = F.gelu(x).numpy()
    inside = ref <= (255 - z) * s_u
    assert np.abs(s_u * (lut - z) - ref)[inside].max() <= s_u / 2 + 1e-12
    assert s_u < 0.6 * q8.scales[i]["gelu"]
    fc2_8, fc2_u = q8.blocks[i].mlp.fc2, qu.blocks[i].mlp.fc2
    assert np.array_equal(fc2_8.w, fc2_u.w)
    # Same float bias at the new accumulator scale, minus the zero point's constant.
    # (float rounding of the scale product may move a bias by one LSB)
    acc_scale = s_u * (np.abs(m.backbone.blocks[i].mlp.fc2.weight.detach().double().numpy()).max(-1) / 127)
    b = np.round(m.backbone.blocks[i].mlp.fc2.bias.detach().double().numpy() / acc_scale)
    assert np.abs(fc2_u.bias - (b - z * fc2_u.w.sum(-1))).max() <= 1
