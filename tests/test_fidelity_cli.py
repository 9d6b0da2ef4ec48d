"""The fidelity CLI on real-image inputs: --image, --calib, encoder-only checkpoints, float precisions."""

import json

import numpy as np
import pytest
import torch

from reference import fidelity
from reference.inputs import load_image, synthetic_pixels
from reference.model import build_model
from m3vit_hw.model_config import PRESETS


def _write_png(path, arr):
    from PIL import Image
    Image.fromarray(arr, "RGB").save(path)


def _photo(h, w, seed):
    # A real-looking uint8 HWC frame at another size than the preset (tests the resize and crop).
    cfg = PRESETS["tiny"].with_(img_size=(h, w))
    return synthetic_pixels(cfg, 1, seed)[0].numpy().transpose(1, 2, 0).copy()


def test_load_image_resizes_and_centre_crops(tmp_path):
    cfg = PRESETS["tiny"]                       # 32 x 64
    arr = _photo(96, 256, 1)                    # 3x in height, 4x in width: covers, then crops width
    _write_png(tmp_path / "a.png", arr)
    np.save(tmp_path / "a.npy", arr)
    a = load_image(tmp_path / "a.png", cfg)
    b = load_image(tmp_path / "a.npy", cfg)
    assert a.dtype == torch.uint8 and tuple(a.shape) == (3, 32, 64)
    assert torch.equal(a, b)
    # Same size as the preset: taken as is.
    same = _photo(32, 64, 2)
    np.save(tmp_path / "s.npy", same)
    assert np.array_equal(load_image(tmp_path / "s.npy", cfg).numpy().transpose(1, 2, 0), same)
    np.save(tmp_path / "f.npy", same.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_image(tmp_path / "f.npy", cfg)
    with pytest.raises(ValueError, match="does not exist"):
        load_image(tmp_path / "nope.png", cfg)


def test_image_calib_and_float_precisions(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        _write_png(calib / f"{i}.png", _photo(64, 128, 10 + i))
    img = tmp_path / "eval.npy"
    np.save(img, _photo(48, 80, 3))
    out = tmp_path / "r.json"
    assert fidelity.main(["--preset", "tiny", "--image", str(img), "--calib", str(calib), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["eval_images"] == 1 and r["calib_images"] == 2
    assert r["eval_source"] == str(img) and r["calib_source"] == str(calib)
    for name in ("bf16", "fp16"):
        f = r["float_precisions"][name]
        assert set(f["per_task"]) == {"semseg", "depth"}
        assert 0.9 < f["cosine"] <= 1.0 and 0.0 <= f["routing_agreement"] <= 1.0
    # fp16 has 3 more mantissa bits than bf16.
    assert r["float_precisions"]["fp16"]["sqnr_db"] > r["float_precisions"]["bf16"]["sqnr_db"]
    print(f"tiny on a real-looking image: integer cosine {r['cosine']:.5f}, bf16 {r['float_precisions']['bf16']['cosine']:.5f}, "
          f"fp16 {r['float_precisions']['fp16']['cosine']:.5f}")


def test_checkpoint_without_decoders_measures_the_encoder(tmp_path, capsys):
    m = build_model("tiny", seed=0)
    sd = {f"module.{k}": v for k, v in m.state_dict().items() if k.startswith("backbone.")}
    torch.save(sd, tmp_path / "enc.pth")
    assert fidelity.main(["--preset", "tiny", "--checkpoint", str(tmp_path / "enc.pth"), "--images", "1",
                          "--float-dtypes", ""]) == 0
    assert "no decoder weights: only the encoder is measured" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "tiny", "--image", "/nonexistent.png"], "does not exist"),
    (["--preset", "tiny", "--calib", "/nonexistent_dir"], "calibration directory"),
    (["--preset", "tiny", "--float-dtypes", "fp8"], "float dtype"),
    (["--preset", "tiny", "--json", "/nonexistent_dir/r.json"], "does not exist"),
])
def test_bad_inputs_give_one_line(argv, needle, capsys):
    assert fidelity.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_forced_routing_diagnostic():
    """The integer model on an imposed expert choice: its own choice reproduces it bit for bit, another
    choice changes it; the report carries the forced-routing branch SQNR and bf16's worst branch."""
    from reference import golden_model
    from reference.inputs import synthetic_images
    from reference.quantize import quantize, quantize_image
    from reference.synthetic_weights import make_weights
    m = make_weights(build_model("tiny", seed=0), "realistic", 0).eval()
    qm = quantize(m, synthetic_images(m.cfg, 2, seed=1000))
    img_q = quantize_image(synthetic_images(m.cfg, 1, seed=0)[0], qm.img_scale)
    own = golden_model.encode(qm, img_q, 0, return_intermediates=True)
    forced = {i: r["experts"] for i, r in own["routing"].items()}
    assert np.array_equal(golden_model.encode(qm, img_q, 0, force_experts=forced), own["tokens"])
    i = m.cfg.moe_blocks[0]
    other = dict(forced)
    other[i] = (forced[i] + 1) % m.cfg.experts
    assert not np.array_equal(golden_model.encode(qm, img_q, 0, force_experts=other), own["tokens"])
    r = fidelity.measure("tiny", seed=3, images=1, calib_images=2)
    for t in r["per_task"].values():
        assert len(t["per_layer_branch_sqnr_forced_routing_db"]) == m.cfg.depth
    assert r["worst_branch_sqnr_forced_routing_db"] > 0
    assert r["float_precisions"]["bf16"]["worst_branch_sqnr_db"] < r["float_precisions"]["fp16"]["worst_branch_sqnr_db"]
