"""Checkpoint loader: round trips through every layout, and one clear error for every kind of damage."""

import argparse
import os

import pytest
import torch

from reference.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from reference.inputs import synthetic_images
from reference.model import build_model
from reference.synthetic_weights import make_trained_like

TINY = ("tiny", "tiny-task-embedding")


@pytest.fixture(scope="module", params=TINY)
def trained(request):
    return make_trained_like(build_model(request.param, seed=1), seed=1)


@pytest.fixture
def tiny_file(tmp_path):
    """A valid single-file tiny checkpoint, as the raw dict ``torch.load`` returns."""
    path = tmp_path / "ckpt.pth"
    save_checkpoint(build_model("tiny", seed=2), path)
    return torch.load(path)["state_dict"]


def _assert_same_outputs(a, b):
    img = synthetic_images(a.cfg, 2, seed=9)
    with torch.no_grad():
        for task in a.cfg.tasks:
            ia = a(img, task, return_intermediates=True)
            ib = b(img, task, return_intermediates=True)
            assert torch.equal(ia["output"], ib["output"]), task
            assert all(torch.equal(ia["routing"][i], ib["routing"][i]) for i in ia["routing"]), task


def _error(path, cfg="tiny", **kwargs):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, cfg, **kwargs)
    msg = str(info.value)
    print(msg)
    return msg


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_round_trip(trained, tmp_path, ranks):
    path = tmp_path / ("ckpt.pth" if ranks == 1 else "ckpt")
    save_checkpoint(trained, path, ranks=ranks)
    if ranks > 1:
        assert sorted(os.listdir(path)) == [f"{r}.pth" for r in range(ranks)]
        shard = torch.load(path / "1.pth")["state_dict"]
        assert all(".mlp.experts." in k for k in shard)
        E = trained.cfg.experts
        assert shard["module.backbone.blocks.1.mlp.experts.htoh4.weight"].shape[0] == E // ranks
    loaded = load_checkpoint(path, trained.cfg)
    sa, sb = trained.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _assert_same_outputs(trained, loaded)


def test_accepted_variants(tmp_path, tiny_file):
    model = build_model("tiny", seed=2)
    bare = tmp_path / "bare.pth"
    torch.save(tiny_file, bare)
    wrapped = tmp_path / "model.pth"
    torch.save({"model": tiny_file, "epoch": 3}, wrapped)
    no_ddp = tmp_path / "no_ddp.pth"
    torch.save({k[len("module."):]: v for k, v in tiny_file.items()}, no_ddp)
    for path in (bare, wrapped, no_ddp):
        _assert_same_outputs(model, load_checkpoint(path, "tiny"))


def test_task_embedding_gate_alias(tmp_path):
    model = make_trained_like(build_model("tiny-task-embedding", seed=3), seed=3)
    save_checkpoint(model, tmp_path / "a.pth")
    sd = torch.load(tmp_path / "a.pth")["state_dict"]
    # The training code names the single shared gate mlp.gate.w_gate.
    renamed = {k.replace("mlp.gate.0.w_gate", "mlp.gate.w_gate"): v for k, v in sd.items()}
    assert "module.backbone.blocks.1.mlp.gate.w_gate" in renamed
    torch.save({"state_dict": renamed}, tmp_path / "b.pth")
    _assert_same_outputs(model, load_checkpoint(tmp_path / "b.pth", model.cfg))


def test_encoder_only(tmp_path, tiny_file):
    path = tmp_path / "enc.pth"
    torch.save({k: v for k, v in tiny_file.items() if k.startswith("module.backbone.")}, path)
    model = load_checkpoint(path, "tiny", encoder_only=True)
    img = synthetic_images(model.cfg, 1, seed=0)
    with torch.no_grad():
        assert torch.equal(model.encode(img, 0), build_model("tiny", seed=2).encode(img, 0))
    msg = _error(path)
    assert "missing key(s)" in msg and "module.decoders.semseg.conv_0.weight" in msg
    assert "module.decoders.depth.conv_4.weight (expected shape [1, 16, 1, 1])" in msg


def test_every_key_problem_in_one_error(tmp_path, tiny_file):
    sd = dict(tiny_file)
    del sd["module.backbone.cls_token"]
    del sd["module.decoders.depth.norm.bias"]
    sd["module.backbone.blocks.9.attn.qkv.weight"] = torch.zeros(3)
    sd["module.backbone.blocks.0.attn.qkv.weight"] = torch.zeros(96, 31)
    sd["module.backbone.blocks.1.mlp.experts.htoh4.weight"] = torch.zeros(5, 64, 32)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, path)
    msg = _error(path)
    assert str(path) in msg
    assert "2 missing key(s)" in msg
    assert "module.backbone.cls_token (expected shape [1, 1, 32])" in msg
    assert "module.decoders.depth.norm.bias (expected shape [32])" in msg
    assert "1 unexpected key(s)" in msg and "module.backbone.blocks.9.attn.qkv.weight (shape [3])" in msg
    assert "2 wrongly shaped key(s)" in msg
    assert "module.backbone.blocks.0.attn.qkv.weight: expected shape [96, 32], got [96, 31]" in msg
    assert "module.backbone.blocks.1.mlp.experts.htoh4.weight: expected shape [4, 64, 32], got [5, 64, 32]" in msg


def test_missing_key(tmp_path, tiny_file):
    del tiny_file["module.backbone.blocks.3.mlp.gate.1.w_gate"]
    torch.save(tiny_file, tmp_path / "a.pth")
    msg = _error(tmp_path / "a.pth")
    assert "1 missing key(s)" in msg and "module.backbone.blocks.3.mlp.gate.1.w_gate (expected shape [32, 4])" in msg


def test_unexpected_key(tmp_path, tiny_file):
    tiny_file["module.backbone.norm.weight"] = torch.ones(32)
    torch.save(tiny_file, tmp_path / "a.pth")
    msg = _error(tmp_path / "a.pth")
    assert "1 unexpected key(s)" in msg and "module.backbone.norm.weight (shape [32])" in msg


def test_wrong_shape(tmp_path, tiny_file):
    tiny_file["module.backbone.pos_embed"] = torch.zeros(1, 17, 32)
    torch.save(tiny_file, tmp_path / "a.pth")
    msg = _error(tmp_path / "a.pth")
    assert "module.backbone.pos_embed: expected shape [1, 9, 32], got [1, 17, 32]" in msg


def test_config_mismatch_lists_all_expert_tensors(tmp_path, tiny_file):
    torch.save(tiny_file, tmp_path / "a.pth")
    msg = _error(tmp_path / "a.pth", cfg=build_model("tiny").cfg.with_(experts=8))
    # 2 MoE blocks x 4 expert tensors + 2 MoE blocks x 2 task gates.
    assert "12 wrongly shaped key(s)" in msg
    assert "module.backbone.blocks.3.mlp.experts.h4toh.bias: expected shape [8, 32], got [4, 32]" in msg


def test_missing_rank_file(tmp_path):
    save_checkpoint(build_model("tiny"), tmp_path / "ck", ranks=4)
    os.remove(tmp_path / "ck" / "1.pth")
    msg = _error(tmp_path / "ck")
    assert "missing rank file(s) 1.pth" in msg and "0.pth, 2.pth, 3.pth" in msg


def test_missing_last_rank_file_is_caught_by_expert_count(tmp_path):
    save_checkpoint(build_model("tiny"), tmp_path / "ck", ranks=2)
    os.remove(tmp_path / "ck" / "1.pth")
    msg = _error(tmp_path / "ck")
    assert ("module.backbone.blocks.1.mlp.experts.htoh4.weight: expert slices of 1 rank file(s) "
            "concatenate to 2 experts, expected E=4 (0.pth [2, 64, 32])") in msg
    assert "missing key" not in msg


def test_empty_directory(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("x")
    msg = _error(tmp_path / "ck")
    assert "holds no rank files" in msg and "notes.txt" in msg


def test_nonexistent_path(tmp_path):
    msg = _error(tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in msg and "does not exist" in msg


@pytest.mark.parametrize("content, expected", [
    ("text", "cannot be read as a torch checkpoint"),
    ([1, 2, 3], "holds a list, expected a state dict"),
    ({}, "holds an empty state dict"),
    ({"module.backbone.cls_token": torch.zeros(1, 1, 32), "epoch": 3}, "'epoch' (int)"),
])
def test_bad_file_content(tmp_path, content, expected):
    path = tmp_path / "bad.pth"
    if content == "text":
        path.write_text("this is not a checkpoint\n")
    else:
        torch.save(content, path)
    msg = _error(path)
    assert str(path) in msg and expected in msg


def test_pickled_objects_need_trusted(tmp_path, tiny_file):
    path = tmp_path / "with_args.pth"
    torch.save({"state_dict": tiny_file, "args": argparse.Namespace(lr=0.1)}, path)
    msg = _error(path)
    assert "pass trusted=True" in msg
    _assert_same_outputs(build_model("tiny", seed=2), load_checkpoint(path, "tiny", trusted=True))


def test_bad_rank_file_is_named(tmp_path):
    save_checkpoint(build_model("tiny"), tmp_path / "ck", ranks=2)
    (tmp_path / "ck" / "1.pth").write_bytes(b"\x00garbage")
    msg = _error(tmp_path / "ck")
    assert str(tmp_path / "ck" / "1.pth") in msg and "cannot be read" in msg


def test_mismatched_expert_slices(tmp_path):
    save_checkpoint(build_model("tiny"), tmp_path / "ck", ranks=2)
    r1 = tmp_path / "ck" / "1.pth"
    shard = torch.load(r1)["state_dict"]
    key_n = "module.backbone.blocks.1.mlp.experts.htoh4.weight"
    key_t = "module.backbone.blocks.3.mlp.experts.h4toh.weight"
    key_m = "module.backbone.blocks.3.mlp.experts.h4toh.bias"
    shard[key_n] = torch.zeros(3, 64, 32)  # 2 + 3 experts != E = 4
    shard[key_t] = torch.zeros(2, 32, 63)  # trailing dims differ from rank 0's
    del shard[key_m]
    shard["module.backbone.blocks.1.mlp.experts.extra.weight"] = torch.zeros(2, 1)
    torch.save({"state_dict": shard}, r1)
    msg = _error(tmp_path / "ck")
    assert "4 other problem(s)" in msg
    assert f"{key_n}: expert slices of 2 rank file(s) concatenate to 5 experts, expected E=4 " \
           f"(0.pth [2, 64, 32], 1.pth [3, 64, 32])" in msg
    assert f"{key_t}: expert slices do not concatenate along dim 0 (0.pth [2, 32, 64], 1.pth [2, 32, 63])" in msg
    assert f"{r1}: missing expert slice {key_m}" in msg
    assert f"{r1}: unexpected expert slice module.backbone.blocks.1.mlp.experts.extra.weight" in msg
    assert "missing key" not in msg


def test_unequal_but_complete_slices_load(tmp_path):
    model = build_model("tiny", seed=4)
    save_checkpoint(model, tmp_path / "ck", ranks=2)
    s0 = torch.load(tmp_path / "ck" / "0.pth")["state_dict"]
    s1 = torch.load(tmp_path / "ck" / "1.pth")["state_dict"]
    # Move one expert from rank 1 to rank 0: 3 + 1 still concatenates to the same 4 experts.
    for k in s1:
        s0[k] = torch.cat([s0[k], s1[k][:1]])
        s1[k] = s1[k][1:].clone()
    torch.save({"state_dict": s0}, tmp_path / "ck" / "0.pth")
    torch.save({"state_dict": s1}, tmp_path / "ck" / "1.pth")
    sd = read_checkpoint(tmp_path / "ck", "tiny")
    assert torch.equal(sd["backbone.blocks.1.mlp.experts.htoh4.weight"],
                       model.state_dict()["backbone.blocks.1.mlp.experts.htoh4.weight"])


def test_save_argument_checks(tmp_path):
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"ranks=3 must divide the number of experts E=4"):
        save_checkpoint(model, tmp_path / "ck", ranks=3)
    with pytest.raises(ValueError, match="ranks must be a positive integer, not 0"):
        save_checkpoint(model, tmp_path / "ck", ranks=0)
    save_checkpoint(model, tmp_path / "ck", ranks=2)
    with pytest.raises(FileExistsError, match="already holds rank files"):
        save_checkpoint(model, tmp_path / "ck", ranks=4)
