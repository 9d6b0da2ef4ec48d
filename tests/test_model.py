"""Float reference model: shapes, gate semantics, determinism, W1 forward and trained-like weights."""

import math
import time

import pytest
import torch

from m3vit_hw.model_config import preset
from reference.inputs import synthetic_images
from reference.model import MoEMlp, build_model, route
from reference.synthetic_weights import make_trained_like

TINY = ("tiny", "tiny-task-embedding")


def _trained_tiny(name, seed=0):
    return make_trained_like(build_model(name, seed=seed), seed=seed)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _naive_moe(mlp, h, gate_in, gate_index):
    """Per-token reference: softmax over all experts, top-k by (-p, index), Σ p_k expert_k(x)."""
    w_gate = mlp.gate[gate_index].w_gate
    ex = mlp.experts
    outs, chosen = [], []
    for x, g in zip(h.reshape(-1, h.shape[-1]), gate_in.reshape(-1, gate_in.shape[-1])):
        logits = [float((g * w_gate[:, e]).sum()) for e in range(mlp.num_experts)]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        probs = [v / sum(exps) for v in exps]
        experts = sorted(range(mlp.num_experts), key=lambda e: (-probs[e], e))[:mlp.top_k]
        y = torch.zeros_like(x)
        for e in experts:
            hidden = _gelu(ex.htoh4.weight[e] @ x + ex.htoh4.bias[e])
            y = y + probs[e] * (ex.h4toh.weight[e] @ hidden + ex.h4toh.bias[e])
        outs.append(y)
        chosen.append(experts)
    return torch.stack(outs).reshape(h.shape), torch.tensor(chosen).reshape(*h.shape[:-1], -1)


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_intermediates(name):
    model = build_model(name)
    cfg = model.cfg
    img = synthetic_images(cfg, 2, seed=1)
    with torch.no_grad():
        for t, channels in zip(cfg.tasks, cfg.task_channels):
            out = model(img, t)
            assert out.shape == (2, channels, *cfg.img_size)
            assert torch.isfinite(out).all()
        inter = model(img, "depth", return_intermediates=True)
    T, D, E, k = cfg.tokens, cfg.dim, cfg.experts, cfg.top_k
    assert inter["embed"].shape == (2, T, D)
    assert len(inter["blocks"]) == cfg.depth
    assert all(b.shape == (2, T, D) for b in inter["blocks"])
    assert torch.equal(inter["tokens"], inter["blocks"][-1])
    assert inter["output"].shape == (2, 1, *cfg.img_size)
    assert sorted(inter["routing"]) == list(cfg.moe_blocks)
    for i in cfg.moe_blocks:
        experts, combine, probs = inter["routing"][i], inter["combine"][i], inter["gate_probs"][i]
        assert experts.dtype == torch.int64 and experts.shape == (2, T, k)
        assert probs.shape == (2, T, E) and inter["gate_logits"][i].shape == (2, T, E)
        assert torch.allclose(probs.sum(-1), torch.ones(2, T))
        # combine weights are the raw probabilities of the chosen experts, in top-k order.
        assert torch.equal(combine, probs.gather(-1, experts))
        assert (combine[..., :-1] >= combine[..., 1:]).all()
    if cfg.router == "task_embedding":
        assert inter["task_repr"].shape == (cfg.task_embed_dim,)
    else:
        assert inter["task_repr"] is None


@pytest.mark.parametrize("name", TINY)
def test_moe_matches_naive_per_token(name):
    model = _trained_tiny(name).double()
    cfg = model.cfg
    img = synthetic_images(cfg, 2, seed=5, dtype=torch.float64)
    bb = model.backbone
    checked = 0
    with torch.no_grad():
        for task in range(cfg.num_tasks):
            inter = model.encode(img, task, return_intermediates=True)
            for i in cfg.moe_blocks:
                blk = bb.blocks[i]
                x = inter["blocks"][i - 1] if i else inter["embed"]
                mid = x + blk.attn(blk.norm1(x))
                h = blk.norm2(mid)
                gate_in = blk.gate_input(h, bb.task_repr(task))
                gate_index = task if cfg.router == "multi_gate" else 0
                want, want_experts = _naive_moe(blk.mlp, h, gate_in, gate_index)
                err = (inter["blocks"][i] - (mid + want)).abs().max().item()
                print(f"{name} task {task} block {i}: max |model - naive| = {err:.2e}")
                assert err < 1e-12, f"block {i} task {task}: MoE output differs from naive by {err}"
                assert torch.equal(inter["routing"][i], want_experts)
                # Not renormalised: with E > k the kept probabilities sum to less than one.
                assert (inter["combine"][i].sum(-1) < 1).all()
                checked += h.shape[0] * h.shape[1]
    assert checked > 0


def test_topk_tie_break_goes_to_lowest_index():
    cfg = preset("tiny")  # E=4, k=2
    assert (cfg.experts, cfg.top_k) == (4, 2)
    torch.manual_seed(0)
    x = torch.randn(6, cfg.dim, dtype=torch.float64).abs() + 0.1
    v = torch.ones(cfg.dim, dtype=torch.float64)

    def experts_for(columns):
        w = torch.stack(columns, dim=1)
        return route(x, w, cfg.top_k).experts

    zero = torch.zeros(cfg.dim, dtype=torch.float64)
    # All four logits equal: the two lowest indices.
    assert (experts_for([zero, zero, zero, zero]) == torch.tensor([0, 1])).all()
    # Experts 1, 2, 3 tie above 0; the tie crosses the top-k boundary: 1 and 2 win, not 3.
    assert (experts_for([zero, v, v, v]) == torch.tensor([1, 2])).all()
    # Expert 3 is clearly best, 0 and 2 tie for second place: 0 wins.
    assert (experts_for([v, zero, v, 2 * v]) == torch.tensor([3, 0])).all()

    # The same decision inside the MoE module, and the output follows it.
    mlp = MoEMlp(cfg).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.1)
        mlp.gate[0].w_gate.copy_(torch.stack([zero, v, v, v], dim=1))
        h = x.reshape(2, 3, cfg.dim)
        out, r = mlp(h, h, 0, return_routing=True)
        want, want_experts = _naive_moe(mlp, h, h, 0)
    assert (r.experts == torch.tensor([1, 2])).all()
    assert torch.equal(r.experts, want_experts)
    assert (out - want).abs().max().item() < 1e-12


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model("tiny", seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "build_model advanced the global RNG"
    b = build_model("tiny", seed=7)
    c = build_model("tiny", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.blocks.0.attn.qkv.weight"], sc["backbone.blocks.0.attn.qkv.weight"])
    img = synthetic_images(a.cfg, 1, seed=0)
    with torch.no_grad():
        assert torch.equal(a(img, "semseg"), b(img, "semseg"))


def test_training_code_init():
    model = build_model("vit-tiny-cityscapes", seed=0)
    sd = model.state_dict()
    w = sd["backbone.blocks.1.mlp.experts.htoh4.weight"]
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max().item() <= 2.0
    assert torch.count_nonzero(sd["backbone.blocks.1.mlp.experts.htoh4.bias"]) == 0
    assert torch.equal(sd["backbone.blocks.0.norm1.weight"], torch.ones(192))
    g = sd["backbone.blocks.1.mlp.gate.0.w_gate"]
    # kaiming_uniform(a=sqrt(5)) on [D, E] uses fan_in = E: bound 1/sqrt(E).
    assert g.shape == (192, 16) and g.abs().max().item() <= 1 / math.sqrt(16) + 1e-6
    assert abs(sd["backbone.pos_embed"].std().item() - 0.02) < 0.002


def test_task_selection_and_input_checks():
    model = _trained_tiny("tiny")
    img = synthetic_images(model.cfg, 1, seed=2)
    with torch.no_grad():
        assert torch.equal(model(img, "depth"), model(img, 1))
        r0 = model.encode(img, 0, return_intermediates=True)["routing"]
        r1 = model.encode(img, 1, return_intermediates=True)["routing"]
    # Per-task gates: the two tasks must not route identically everywhere.
    assert any(not torch.equal(r0[i], r1[i]) for i in r0)
    with pytest.raises(ValueError, match="task must be one of"):
        model(img, "normals")
    with pytest.raises(ValueError, match=r"img must have shape \[B, 3, 32, 64\]"):
        model(torch.zeros(1, 3, 32, 32), 0)


def test_synthetic_images_look_natural():
    cfg = preset("vit-tiny-cityscapes")
    a = synthetic_images(cfg, 3, seed=11)
    assert a.shape == (3, 3, 128, 256) and a.dtype == torch.float32
    assert torch.equal(a, synthetic_images(cfg, 3, seed=11))
    assert torch.equal(a[:2], synthetic_images(cfg, 2, seed=11))
    assert not torch.equal(a, synthetic_images(cfg, 3, seed=12))
    mean, std = a.mean(dim=(2, 3)), a.std(dim=(2, 3))
    # Neighbouring pixels of a photograph are strongly correlated; white noise would give ~0.
    corr = torch.corrcoef(torch.stack([a[..., :, :-1].reshape(-1), a[..., :, 1:].reshape(-1)]))[0, 1]
    rgb = torch.corrcoef(a.transpose(0, 1).reshape(3, -1))
    print(f"channel means {mean.abs().max():.2f} max, stds {std.min():.2f}..{std.max():.2f}, "
          f"neighbour corr {corr:.3f}, min RGB corr {rgb.min():.2f}")
    assert mean.abs().max() < 0.7 and 0.6 < std.min() and std.max() < 1.4
    assert corr > 0.8
    assert rgb.min() > 0.0


@pytest.fixture(scope="module")
def w1_trained():
    t0 = time.perf_counter()
    model = make_trained_like(build_model("vit-tiny-cityscapes", seed=0), seed=0)
    print(f"make_trained_like(W1): {time.perf_counter() - t0:.2f} s")
    return model


def test_w1_forward(w1_trained):
    model = w1_trained
    cfg = model.cfg
    img = synthetic_images(cfg, 1, seed=3)
    with torch.no_grad():
        model.encode(img, 0)  # warm-up: first-call allocations are not the model's cost
        t0 = time.perf_counter()
        tokens = model.encode(img, "semseg")
        t1 = time.perf_counter()
        out = model(img, "semseg")
        t2 = time.perf_counter()
    print(f"W1 float encoder: {1e3 * (t1 - t0):.1f} ms, encoder + PUP decoder: {1e3 * (t2 - t1):.1f} ms "
          f"({torch.get_num_threads()} threads)")
    assert tokens.shape == (1, 129, 192)
    assert out.shape == (1, 19, 128, 256)
    assert torch.isfinite(out).all()


def test_trained_like_weights_w1(w1_trained):
    model = w1_trained
    cfg = model.cfg
    img = synthetic_images(cfg, 2, seed=4)  # not the calibration images
    with torch.no_grad():
        inter = model.encode(img, "semseg", return_intermediates=True)
        xs = [inter["embed"]] + inter["blocks"]
        assert all(torch.isfinite(x).all() for x in xs)

        rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
        growth = rms(xs[-1]) / rms(img)
        ch = xs[-1].pow(2).mean(dim=(0, 1)).sqrt()
        outlier = (ch.max() / ch.median()).item()
        print(f"residual rms: input {rms(img):.2f}, embed {rms(xs[0]):.2f}, after {cfg.depth} blocks "
              f"{rms(xs[-1]):.2f} ({growth:.1f}x input); max/median channel rms {outlier:.1f}")
        assert growth < 100
        assert outlier > 5, "no outlier channels in the residual stream"

        log_t = math.log(cfg.tokens)
        for i, blk in enumerate(model.backbone.blocks):
            p = blk.attn.probs(blk.norm1(xs[i]))
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
            line = f"block {i:2d}: attention entropy {entropy:.2f} (log T = {log_t:.2f})"
            assert entropy < 0.85 * log_t, line
            if i in inter["routing"]:
                top = inter["gate_probs"][i].sort(dim=-1, descending=True).values
                logit_std = inter["gate_logits"][i].std(dim=-1).median().item()
                gap = (top[..., 0] - top[..., 2]).median().item()
                used = int(torch.bincount(inter["routing"][i].reshape(-1), minlength=cfg.experts).gt(0).sum())
                line += (f"; gate logit std {logit_std:.2f}, median p1-p3 {gap:.3f}, "
                         f"experts used {used}/{cfg.experts}")
                assert 1.0 <= logit_std <= 3.5, line
                assert gap > 0.1, line
                assert used >= cfg.experts // 2, line
            print(line)

    sd = model.state_dict()
    for key in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.attn.proj.weight",
                "blocks.1.mlp.experts.htoh4.weight", "blocks.1.mlp.experts.h4toh.weight"):
        w = sd["backbone." + key].double()
        std = w.std().item()
        kurt = ((w - w.mean()) ** 4).mean().item() / std ** 4
        print(f"{key}: std {std:.4f}, kurtosis {kurt:.1f}, max/std {w.abs().max().item() / std:.1f}")
        assert 0.015 < std < 0.06 and kurt > 4.5, key
    gamma = sd["backbone.blocks.3.norm2.weight"]
    assert gamma.std() > 0.1 and sd["backbone.blocks.3.norm2.bias"].abs().mean() > 0.01
    assert sd["backbone.blocks.3.attn.qkv.bias"].abs().mean() > 0.005


def test_trained_like_is_deterministic():
    a, b = _trained_tiny("tiny-task-embedding", 3), _trained_tiny("tiny-task-embedding", 3)
    c = _trained_tiny("tiny-task-embedding", 4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.blocks.1.mlp.gate.0.w_gate"], sc["backbone.blocks.1.mlp.gate.0.w_gate"])
