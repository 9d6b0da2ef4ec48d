"""Measure how close the integer golden model stays to the float M³ViT.

    python -m reference.fidelity --preset vit-tiny-cityscapes [--seed S] [--task T] --json FILE

Builds the float model (trained-like synthetic weights by default, or a checkpoint), calibrates the
quantizer on images drawn from seed ``S + 1000``, evaluates on images from seed ``S`` (disjoint), and
compares the golden encoder with the float encoder:

* ``cosine`` and ``sqnr_db`` at the encoder output (golden dequantized with the residual scale);
* ``per_layer_sqnr_db``: the same SQNR after every block;
* ``per_layer_branch_sqnr_db``: SQNR of what each block *adds* to the residual stream (the block output
  minus its input). The residual stream carries the embedding through every block, so whole-stream
  SQNR can flatter a block; the branch SQNR shows each block's own error.
* ``routing_agreement``: share of (token, MoE layer) pairs whose top-k expert *set* is identical in the
  golden and float models, plus the same per MoE layer.

Without ``--task`` every task is measured; the top-level figures are then the worst task's.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from m3vit_hw.checks import check_output_path
from m3vit_hw.model_config import PRESETS
from . import golden_model
from .inputs import synthetic_images
from .model import build_model
from .quantize import quantize, quantize_image
from .synthetic_weights import make_trained_like

__all__ = ["measure", "main"]

#: Targets from the foundation issue (W1): reported next to the measured figures.
TARGET_COSINE = 0.99
TARGET_ROUTING = 0.95


def _sqnr_db(ref, test):
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def _cosine(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _measure_task(model, qm, images, task):
    cfg = model.cfg
    ref_out, q_out = [], []
    ref_layers = [[] for _ in range(cfg.depth)]
    q_layers = [[] for _ in range(cfg.depth)]
    ref_branch = [[] for _ in range(cfg.depth)]
    q_branch = [[] for _ in range(cfg.depth)]
    agree = {i: [] for i in cfg.moe_blocks}
    golden_seconds = []
    for b in range(images.shape[0]):
        with torch.no_grad():
            fl = model.encode(images[b:b + 1], task, return_intermediates=True)
        img_q = quantize_image(images[b], qm.img_scale)
        t0 = time.perf_counter()
        gi = golden_model.encode(qm, img_q, task, return_intermediates=True)
        golden_seconds.append(time.perf_counter() - t0)
        prev_f = fl["embed"][0].double().numpy()
        prev_q = gi["embed"] * qm.res_scale
        for i in range(cfg.depth):
            f = fl["blocks"][i][0].double().numpy()
            q = gi["blocks"][i] * qm.res_scale
            ref_layers[i].append(f)
            q_layers[i].append(q)
            ref_branch[i].append(f - prev_f)
            q_branch[i].append(q - prev_q)
            prev_f, prev_q = f, q
        ref_out.append(fl["tokens"][0].double().numpy())
        q_out.append(gi["tokens"] * qm.res_scale)
        for i in cfg.moe_blocks:
            g_set = np.sort(gi["routing"][i]["experts"], axis=1)
            f_set = np.sort(fl["routing"][i][0].numpy(), axis=1)
            agree[i].append((g_set == f_set).all(axis=1))
    ref_out, q_out = np.stack(ref_out), np.stack(q_out)
    per_layer_routing = {str(i): float(np.concatenate(a).mean()) for i, a in agree.items()}
    all_agree = np.concatenate([np.concatenate(a) for a in agree.values()]) if agree else np.ones(1)
    return {
        "cosine": _cosine(ref_out, q_out),
        "sqnr_db": _sqnr_db(ref_out, q_out),
        "per_layer_sqnr_db": [_sqnr_db(np.stack(r), np.stack(q)) for r, q in zip(ref_layers, q_layers)],
        "per_layer_branch_sqnr_db": [_sqnr_db(np.stack(r), np.stack(q))
                                     for r, q in zip(ref_branch, q_branch)],
        "routing_agreement": float(all_agree.mean()),
        "per_layer_routing_agreement": per_layer_routing,
        "routed_pairs": int(all_agree.size),
        "golden_seconds_per_frame": float(np.mean(golden_seconds)),
    }


def measure(preset, seed=0, task=None, images=2, calib_images=4, weights="trained-like", checkpoint=None):
    """Run the comparison and return the report dict (see the module docstring for the keys)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
    if images < 1 or calib_images < 1:
        raise ValueError("images and calib_images must be >= 1")
    cfg = PRESETS[preset]
    if checkpoint is not None:
        from .checkpoint import load_checkpoint
        model = load_checkpoint(checkpoint, cfg)
        weights = f"checkpoint:{checkpoint}"
    else:
        model = build_model(cfg, seed=seed)
        if weights == "trained-like":
            make_trained_like(model, seed=seed)
        elif weights != "init":
            raise ValueError(f"weights must be 'trained-like' or 'init', not {weights!r}")
    model.eval()
    tasks = list(range(cfg.num_tasks)) if task is None else [cfg.task_id(task)]
    calib = synthetic_images(cfg, calib_images, seed=seed + 1000)
    evals = synthetic_images(cfg, images, seed=seed)
    t0 = time.perf_counter()
    qm = quantize(model, calib)
    quant_seconds = time.perf_counter() - t0
    per_task = {cfg.tasks[t]: _measure_task(model, qm, evals, t) for t in tasks}
    worst = min(per_task.values(), key=lambda r: r["cosine"])
    report = {
        "preset": preset,
        "seed": seed,
        "task": cfg.tasks[tasks[0]] if task is not None else "all",
        "weights": weights,
        "eval_images": images,
        "calib_images": calib_images,
        "calib_seed": seed + 1000,
        "cosine": min(r["cosine"] for r in per_task.values()),
        "sqnr_db": min(r["sqnr_db"] for r in per_task.values()),
        "per_layer_sqnr_db": worst["per_layer_sqnr_db"],
        "per_layer_branch_sqnr_db": worst["per_layer_branch_sqnr_db"],
        "routing_agreement": min(r["routing_agreement"] for r in per_task.values()),
        "golden_seconds_per_frame": max(r["golden_seconds_per_frame"] for r in per_task.values()),
        "quantize_seconds": quant_seconds,
        "targets": {"cosine": TARGET_COSINE, "routing_agreement": TARGET_ROUTING},
        "per_task": per_task,
    }
    report["meets_targets"] = (report["cosine"] >= TARGET_COSINE
                               and report["routing_agreement"] >= TARGET_ROUTING)
    return report


def format_report(r):
    """A table a person can read."""
    lines = [f"fidelity: golden (integer) vs float M³ViT — preset {r['preset']}, weights {r['weights']}, "
             f"seed {r['seed']} ({r['eval_images']} eval images; calibrated on {r['calib_images']} "
             f"images of seed {r['calib_seed']})"]
    for name, t in r["per_task"].items():
        lines.append(f"  task {name:<8} cosine {t['cosine']:.5f}  SQNR {t['sqnr_db']:6.2f} dB  "
                     f"routing agreement {t['routing_agreement']:.4f} ({t['routed_pairs']} token-layer pairs)  "
                     f"golden {t['golden_seconds_per_frame']:.2f} s/frame")
        lines.append("    block          " + " ".join(f"{i:>6d}" for i in range(len(t["per_layer_sqnr_db"]))))
        lines.append("    stream SQNR dB " + " ".join(f"{v:6.1f}" for v in t["per_layer_sqnr_db"]))
        lines.append("    branch SQNR dB " + " ".join(f"{v:6.1f}" for v in t["per_layer_branch_sqnr_db"]))
        if t["per_layer_routing_agreement"]:
            lines.append("    routing agree  " + " ".join(
                f"{int(k):>3d}:{v:.3f}" for k, v in t["per_layer_routing_agreement"].items()))
    ok = "meets" if r["meets_targets"] else "MISSES"
    lines.append(f"worst task: cosine {r['cosine']:.5f} (target >= {TARGET_COSINE}), routing agreement "
                 f"{r['routing_agreement']:.4f} (target >= {TARGET_ROUTING}): {ok} the targets")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, help="task name or index (default: every task)")
    p.add_argument("--images", type=int, default=2, help="evaluation images (default 2)")
    p.add_argument("--calib-images", type=int, default=4, help="calibration images (default 4)")
    p.add_argument("--weights", default="trained-like", choices=["trained-like", "init"])
    p.add_argument("--checkpoint", default=None, help="load weights from a training checkpoint instead")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    args = p.parse_args(argv)
    task = args.task
    if task is not None and task.isdigit():
        task = int(task)
    try:
        check_output_path(args.json, "--json")
        report = measure(args.preset, args.seed, task, args.images, args.calib_images, args.weights,
                         args.checkpoint)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
