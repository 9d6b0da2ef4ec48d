"""Layers of any size: hidden widths that are not multiples of D, and narrower than D, end to end.

The model takes ``mlp_hidden`` and ``expert_hidden`` directly; the quantizer, the golden model, the
MoE-layer RTL and the CLI accept any positive width.
"""

import numpy as np

from m3vit_hw.model_config import preset
from reference import golden_model
from reference.inputs import synthetic_images
from reference.model import build_model
from reference.quantize import quantize, quantize_image
from reference.synthetic_weights import make_trained_like
from sim.moe_layer import run_moe_layer


def test_golden_encoder_with_narrow_hidden_layers():
    """h = 20 < D = 32 and a 24-wide dense MLP: the quantized golden encoder tracks the float one."""
    cfg = preset("tiny", expert_hidden=20, mlp_hidden=24)
    model = make_trained_like(build_model(cfg, seed=0), seed=0)
    qm = quantize(model, synthetic_images(cfg, 2, seed=1000))
    image = synthetic_images(cfg, 1, seed=0)
    got = golden_model.encode(qm, quantize_image(image[0], qm.img_scale), 0)
    assert got.shape == (cfg.tokens, cfg.dim)
    want = model.encode(image, 0).detach().numpy()[0]
    # The golden output is the int16 residual stream; its scale is the encoder-wide residual scale.
    a, b = want.ravel(), got.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(f"tiny with h=20, mlp=24: golden vs float cosine {cosine:.5f}")
    assert cosine >= 0.99


def test_moe_layer_rtl_with_hidden_narrower_than_dim():
    """The MoE layer RTL with h = 6 < D = 10 (not a multiple, not a whole word): bit-exact, and only the
    active experts' bytes are fetched."""
    rep = run_moe_layer(experts=3, top_k=2, dim=10, hidden=6, tokens=7, tasks=2, task=1, seed=2,
                        stall_prob=0.2)
    print(f"MoE D=10 h=6: bit_exact={rep['bit_exact']}, {rep['cycles']} cycles, fetched "
          f"{rep['weight_bytes_fetched']} of minimum {rep['weight_bytes_minimum']}")
    assert rep["bit_exact"], rep["first_mismatch"]
    assert rep["weight_bytes_fetched"] == rep["weight_bytes_minimum"]
