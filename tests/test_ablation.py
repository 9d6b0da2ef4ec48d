"""The fake-quantized encoder of reference/ablation.py: float when every site is restored, close to the
integer golden model when none is, and each switch acts."""

import numpy as np
import pytest
import torch

from reference import ablation as A
from reference import golden_model
from reference.inputs import synthetic_images
from reference.model import build_model
from reference.quantize import quantize, quantize_image
from reference.synthetic_weights import make_weights


@pytest.fixture(scope="module", params=["tiny", "tiny-task-embedding"])
def setup(request):
    m = make_weights(build_model(request.param, seed=0), "realistic", 0).eval()
    qm = quantize(m, synthetic_images(m.cfg, 2, seed=1000))
    return m, qm, synthetic_images(m.cfg, 2, seed=0)


def test_every_site_restored_is_the_float_model(setup):
    m, qm, imgs = setup
    for t in range(m.cfg.num_tasks):
        for im in imgs:
            r = A.run(m, A.FakeQuant(qm, "all"), im, t)
            with torch.no_grad():
                f = m.encode(im[None], t, return_intermediates=True)
            assert np.abs(r["blocks"][-1] - f["tokens"][0].double().numpy()).max() < 1e-4
            for i, e in f["routing"].items():
                assert np.array_equal(r["routing"][i], np.sort(e[0].numpy(), axis=1)), f"block {i}"


def test_no_site_restored_tracks_the_golden_model(setup):
    """Same grids as the integer model: its output is far closer to the golden model than either is to
    the float model, and both sit at the same distance from float."""
    m, qm, imgs = setup
    for t in range(m.cfg.num_tasks):
        for im in imgs:
            ref = A.run(m, A.FakeQuant(qm, "all"), im, t)["blocks"][-1]
            fq = A.run(m, A.FakeQuant(qm), im, t)["blocks"][-1]
            g = golden_model.encode(qm, quantize_image(im, qm.img_scale), t) * qm.res_scale
            assert A._sqnr(g, fq) > 30.0, f"task {t}: fake quant vs golden {A._sqnr(g, fq):.1f} dB"
            assert abs(A._sqnr(ref, fq) - A._sqnr(ref, g)) < 2.0


def test_each_site_switch_changes_the_result(setup):
    m, qm, imgs = setup
    base = A.run(m, A.FakeQuant(qm), imgs[0], 0)["blocks"][-1]
    for s in A.SITES:
        if s in ("w_gate", "router") and not m.cfg.moe_blocks:
            continue
        got = A.run(m, A.FakeQuant(qm, [s]), imgs[0], 0)["blocks"][-1]
        assert not np.array_equal(got, base), f"restoring {s} changed nothing"


def test_forced_float_routing_reproduces_the_float_choice(setup):
    m, qm, imgs = setup
    ref = A.run(m, A.FakeQuant(qm, "all"), imgs[0], 1)
    got = A._run_forced(m, A.FakeQuant(qm), imgs[0], 1, ref)
    for i in ref["routing"]:
        assert np.array_equal(got["routing"][i], ref["routing"][i])


def test_ablate_reports_per_block_branches(setup):
    m, qm, imgs = setup
    res = A.ablate(m, qm, imgs[:1], {"base": {}, "all": {"restore": "all"}}, forced=True)
    depth = m.cfg.depth
    for key in ("attn", "mlp", "block", "stream"):
        assert len(res["base"][key]) == depth
    assert res["all"]["worst_block"] == float("inf") and res["all"]["routing_agreement"] == 1.0
    assert np.isfinite(res["base"]["worst_block"]) and "forced" in res["base"]


def test_bad_site_is_rejected(setup):
    _, qm, _ = setup
    with pytest.raises(ValueError, match="restore sites"):
        A.FakeQuant(qm, ["lnx"])


def test_cli_rejects_a_bad_preset(capsys):
    assert A.main(["--preset", "nope"]) == 2
    assert "--preset" in capsys.readouterr().err


def test_cli_rejects_bad_counts(capsys):
    assert A.main(["--preset", "tiny", "--images", "0"]) == 2
    assert "--images" in capsys.readouterr().err


def test_cli_rejects_bad_seeds(capsys):
    assert A.main(["--preset", "tiny", "--seeds", "0,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
