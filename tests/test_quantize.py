"""The quantizer and the integer encoder: calibration walk, determinism, tiling, task switching."""

import time

import numpy as np
import pytest
import torch

from reference import golden_model
from reference.inputs import synthetic_images
from reference.model import build_model
from reference.quantize import calibrate, quantize, quantize_image
from reference.synthetic_weights import make_trained_like


def _model(name, seed=0):
    m = build_model(name, seed=seed)
    make_trained_like(m, seed=seed)
    return m.eval()


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
