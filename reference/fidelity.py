"""Measure how close the integer golden model stays to the float M³ViT.

    python -m reference.fidelity --preset vit-tiny-cityscapes [--seed S] [--task T] [--image FILE]
                                 [--calib DIR] --json FILE

Builds the float model (the realistic synthetic weight profile by default, or a checkpoint, which may
lack decoder weights), calibrates the quantizer on images drawn from seed ``S + 1000`` (or on ``--calib
DIR``), evaluates on images from seed ``S`` (disjoint; or on ``--image FILE``), and compares the golden
encoder with the float encoder:

* ``cosine`` and ``sqnr_db`` at the encoder output (golden dequantized with the residual scale);
* ``per_layer_sqnr_db``: the same SQNR after every block;
* ``per_layer_branch_sqnr_db``: SQNR of what each block *adds* to the residual stream (the block output
  minus its input). The residual stream carries the embedding through every block, so whole-stream
  SQNR can flatter a block; the branch SQNR shows each block's own error.
* ``routing_agreement``: share of (token, MoE layer) pairs whose top-k expert *set* is identical in the
  golden and float models, plus the same per MoE layer.

* ``worst_branch_sqnr_db``: the lowest per-block branch SQNR over blocks and tasks;
* ``per_layer_branch_sqnr_forced_routing_db`` / ``worst_branch_sqnr_forced_routing_db``: the same with
  the integer model run on the float model's expert choice (diagnostic: the rounding error without the
  routing flips, which carry most of the late blocks' error on the realistic profile);
* ``float_precisions``: the float model run in bf16 and fp16 against fp32 (cosine, SQNR, routing
  agreement, worst branch SQNR), so the integer model can be read next to what a GPU would give.

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
from .inputs import image_files, load_image, normalize_pixels, synthetic_images
from .model import build_model
from .quantize import quantize, quantize_image
from .synthetic_weights import PROFILES, make_weights

__all__ = ["measure", "main"]

#: Targets from the foundation issue (W1): reported next to the measured figures.
TARGET_COSINE = 0.99
TARGET_ROUTING = 0.95
#: Issue 8: worst per-block branch SQNR (bar; the goal is 25 dB).
TARGET_BRANCH_SQNR = 20.0

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _sqnr_db(ref, test):
    noise = float(((ref - test) ** 2).sum())
    signal = float((ref ** 2).sum())
    return float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise))


def _cosine(a, b):
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _measure_task(model, qm, images, task):
    cfg = model.cfg
    ref_out, q_out = [], []
    ref_layers = [[] for _ in range(cfg.depth)]
    q_layers = [[] for _ in range(cfg.depth)]
    ref_branch = [[] for _ in range(cfg.depth)]
    q_branch = [[] for _ in range(cfg.depth)]
    f_branch = [[] for _ in range(cfg.depth)]
    agree = {i: [] for i in cfg.moe_blocks}
    golden_seconds = []
    for b in range(images.shape[0]):
        with torch.no_grad():
            fl = model.encode(images[b:b + 1], task, return_intermediates=True)
        img_q = quantize_image(images[b], qm.img_scale)
        t0 = time.perf_counter()
        gi = golden_model.encode(qm, img_q, task, return_intermediates=True)
        golden_seconds.append(time.perf_counter() - t0)
        # The same integer model on the float model's expert choice: its branch error without the
        # routing flips (a diagnostic; identical to the above when there are no MoE blocks).
        gf = gi if not cfg.moe_blocks else golden_model.encode(
            qm, img_q, task, return_intermediates=True,
            force_experts={i: fl["routing"][i][0].numpy() for i in cfg.moe_blocks})
        prev_f = fl["embed"][0].double().numpy()
        prev_q = gi["embed"] * qm.res_scale
        prev_g = prev_q
        for i in range(cfg.depth):
            f = fl["blocks"][i][0].double().numpy()
            q = gi["blocks"][i] * qm.res_scale
            qf = gf["blocks"][i] * qm.res_scale
            ref_layers[i].append(f)
            q_layers[i].append(q)
            ref_branch[i].append(f - prev_f)
            q_branch[i].append(q - prev_q)
            f_branch[i].append(qf - prev_g)
            prev_f, prev_q, prev_g = f, q, qf
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
        "per_layer_branch_sqnr_forced_routing_db": [_sqnr_db(np.stack(r), np.stack(q))
                                                    for r, q in zip(ref_branch, f_branch)],
        "routing_agreement": float(all_agree.mean()),
        "per_layer_routing_agreement": per_layer_routing,
        "routed_pairs": int(all_agree.size),
        "golden_seconds_per_frame": float(np.mean(golden_seconds)),
    }


def _float_precision(model, images, tasks, dtype):
    """The float model run in ``dtype`` against fp32: cosine at the encoder output and routing agreement
    (identical top-k sets), per task. What a GPU running M³ViT in that precision would give."""
    import copy
    low = copy.deepcopy(model).to(dtype)
    cfg = model.cfg
    out = {}
    for t in tasks:
        ref, got, agree = [], [], []
        br_ref, br_got = [[] for _ in range(cfg.depth)], [[] for _ in range(cfg.depth)]
        for b in range(images.shape[0]):
            with torch.no_grad():
                f = model.encode(images[b:b + 1], t, return_intermediates=True)
                g = low.encode(images[b:b + 1].to(dtype), t, return_intermediates=True)
            ref.append(f["tokens"][0].double().numpy())
            got.append(g["tokens"][0].double().numpy())
            for i in range(cfg.depth):
                pf = f["embed"] if i == 0 else f["blocks"][i - 1]
                pg = g["embed"] if i == 0 else g["blocks"][i - 1]
                br_ref[i].append((f["blocks"][i] - pf)[0].double().numpy())
                br_got[i].append((g["blocks"][i].double() - pg.double())[0].numpy())
            for i in cfg.moe_blocks:
                agree.append((np.sort(f["routing"][i][0].numpy(), axis=1)
                              == np.sort(g["routing"][i][0].numpy(), axis=1)).all(axis=1))
        ref, got = np.stack(ref), np.stack(got)
        out[cfg.tasks[t]] = {"cosine": _cosine(ref, got), "sqnr_db": _sqnr_db(ref, got),
                             "routing_agreement": float(np.concatenate(agree).mean()) if agree else 1.0,
                             "worst_branch_sqnr_db": min(_sqnr_db(np.stack(a), np.stack(b))
                                                         for a, b in zip(br_ref, br_got))}
    return {"cosine": min(r["cosine"] for r in out.values()),
            "sqnr_db": min(r["sqnr_db"] for r in out.values()),
            "worst_branch_sqnr_db": min(r["worst_branch_sqnr_db"] for r in out.values()),
            "routing_agreement": min(r["routing_agreement"] for r in out.values()), "per_task": out}


def measure(preset, seed=0, task=None, images=2, calib_images=4, weights="realistic", checkpoint=None,
            quant=None, image=None, calib_dir=None, float_dtypes=("bf16", "fp16")):
    """Run the comparison and return the report dict (see the module docstring for the keys).

    ``quant``: keyword options of :func:`reference.quantize.quantize` (default: its ``DEFAULTS``).
    ``image``: evaluate on this image file instead of synthetic images (:func:`reference.inputs.load_image`);
    ``calib_dir``: calibrate on the images of this directory instead of synthetic ones.
    ``float_dtypes``: also measure the float model in these precisions against fp32 (``bf16``, ``fp16``).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
    if images < 1 or calib_images < 1:
        raise ValueError("images and calib_images must be >= 1")
    cfg = PRESETS[preset]
    if checkpoint is not None:
        from .checkpoint import read_checkpoint
        # Only the encoder is measured, so a checkpoint without decoder weights is fine.
        state = read_checkpoint(checkpoint, cfg, encoder_only=True)
        has_decoders = any(k.startswith("decoders.") for k in state)
        model = build_model(cfg, seed=0)
        model.load_state_dict(state, strict=False)
        weights = f"checkpoint:{checkpoint}" + ("" if has_decoders else
                                                " (no decoder weights: only the encoder is measured)")
    else:
        if weights not in PROFILES:
            raise ValueError(f"weights must be one of {', '.join(PROFILES)}, not {weights!r}")
        model = make_weights(build_model(cfg, seed=seed), weights, seed)
    model.eval()
    tasks = list(range(cfg.num_tasks)) if task is None else [cfg.task_id(task)]
    for name in float_dtypes:
        if name not in _DTYPES:
            raise ValueError(f"float dtype must be one of {', '.join(_DTYPES)}, not {name!r}")
    if calib_dir is not None:
        calib_files = image_files(calib_dir)
        calib = normalize_pixels(torch.stack([load_image(f, cfg) for f in calib_files]))
        calib_images = len(calib_files)
    else:
        calib = synthetic_images(cfg, calib_images, seed=seed + 1000)
    if image is not None:
        evals = normalize_pixels(load_image(image, cfg)[None])
        images = 1
    else:
        evals = synthetic_images(cfg, images, seed=seed)
    t0 = time.perf_counter()
    qm = quantize(model, calib, **(quant or {}))
    quant_seconds = time.perf_counter() - t0
    per_task = {cfg.tasks[t]: _measure_task(model, qm, evals, t) for t in tasks}
    worst = min(per_task.values(), key=lambda r: r["cosine"])
    floats = {name: _float_precision(model, evals, tasks, _DTYPES[name]) for name in float_dtypes}
    report = {
        "preset": preset,
        "seed": seed,
        "task": cfg.tasks[tasks[0]] if task is not None else "all",
        "weights": weights,
        "eval_images": images,
        "calib_images": calib_images,
        "calib_seed": seed + 1000,
        "eval_source": str(image) if image is not None else f"synthetic seed {seed}",
        "calib_source": str(calib_dir) if calib_dir is not None else f"synthetic seed {seed + 1000}",
        "quant_options": qm.scales["options"],
        "float_precisions": floats,
        "cosine": min(r["cosine"] for r in per_task.values()),
        "sqnr_db": min(r["sqnr_db"] for r in per_task.values()),
        "per_layer_sqnr_db": worst["per_layer_sqnr_db"],
        "per_layer_branch_sqnr_db": worst["per_layer_branch_sqnr_db"],
        "routing_agreement": min(r["routing_agreement"] for r in per_task.values()),
        "golden_seconds_per_frame": max(r["golden_seconds_per_frame"] for r in per_task.values()),
        "quantize_seconds": quant_seconds,
        "worst_branch_sqnr_db": min(min(r["per_layer_branch_sqnr_db"]) for r in per_task.values()),
        "worst_branch_sqnr_forced_routing_db": min(min(r["per_layer_branch_sqnr_forced_routing_db"])
                                                   for r in per_task.values()),
        "targets": {"cosine": TARGET_COSINE, "routing_agreement": TARGET_ROUTING,
                    "worst_branch_sqnr_db": TARGET_BRANCH_SQNR},
        "per_task": per_task,
    }
    report["meets_targets"] = (report["cosine"] >= TARGET_COSINE
                               and report["routing_agreement"] >= TARGET_ROUTING
                               and report["worst_branch_sqnr_db"] >= TARGET_BRANCH_SQNR)
    return report


def format_report(r):
    """A table a person can read."""
    lines = [f"fidelity: golden (integer) vs float M³ViT — preset {r['preset']}, weights {r['weights']}, "
             f"seed {r['seed']} ({r['eval_images']} eval image(s): {r['eval_source']}; calibrated on "
             f"{r['calib_images']} image(s): {r['calib_source']})",
             "  quantization: " + ", ".join(f"{k}={v}" for k, v in r["quant_options"].items())]
    for name, t in r["per_task"].items():
        lines.append(f"  task {name:<8} cosine {t['cosine']:.5f}  SQNR {t['sqnr_db']:6.2f} dB  "
                     f"routing agreement {t['routing_agreement']:.4f} ({t['routed_pairs']} token-layer pairs)  "
                     f"golden {t['golden_seconds_per_frame']:.2f} s/frame")
        lines.append("    block          " + " ".join(f"{i:>6d}" for i in range(len(t["per_layer_sqnr_db"]))))
        lines.append("    stream SQNR dB " + " ".join(f"{v:6.1f}" for v in t["per_layer_sqnr_db"]))
        lines.append("    branch SQNR dB " + " ".join(f"{v:6.1f}" for v in t["per_layer_branch_sqnr_db"]))
        lines.append("    float routing  " + " ".join(f"{v:6.1f}" for v in t["per_layer_branch_sqnr_forced_routing_db"]))
        if t["per_layer_routing_agreement"]:
            lines.append("    routing agree  " + " ".join(
                f"{int(k):>3d}:{v:.3f}" for k, v in t["per_layer_routing_agreement"].items()))
    for name, f in r["float_precisions"].items():
        lines.append(f"  float {name} vs fp32 (what a GPU gives): " + "  ".join(
            f"{t}: cosine {v['cosine']:.5f} routing agreement {v['routing_agreement']:.4f} "
            f"worst branch {v['worst_branch_sqnr_db']:.1f} dB"
            for t, v in f["per_task"].items()))
    ok = "meets" if r["meets_targets"] else "MISSES"
    lines.append(f"worst task: cosine {r['cosine']:.5f} (target >= {TARGET_COSINE}), routing agreement "
                 f"{r['routing_agreement']:.4f} (target >= {TARGET_ROUTING}), worst branch SQNR "
                 f"{r['worst_branch_sqnr_db']:.1f} dB (target >= {TARGET_BRANCH_SQNR}; "
                 f"{r['worst_branch_sqnr_forced_routing_db']:.1f} dB on the float model's routing): {ok} the targets")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", default=None, help="task name or index (default: every task)")
    p.add_argument("--images", type=int, default=2, help="evaluation images (default 2)")
    p.add_argument("--calib-images", type=int, default=4, help="calibration images (default 4)")
    p.add_argument("--weights", default="realistic", choices=list(PROFILES),
                   help="synthetic weight profile (default realistic: the statistics of the real W1 weights)")
    p.add_argument("--checkpoint", default=None, help="load weights from a training checkpoint instead")
    p.add_argument("--image", default=None,
                   help="evaluate on this image (PNG/JPEG, or .npy uint8 HWC), resized and centre-cropped to the preset")
    p.add_argument("--calib", default=None, metavar="DIR",
                   help="calibrate on the images (.png/.jpg/.jpeg/.npy) of this directory")
    p.add_argument("--float-dtypes", default="bf16,fp16",
                   help="float precisions to compare with fp32 next to the integer model (default bf16,fp16; '' for none)")
    p.add_argument("--json", default=None, help="write the report as JSON to this file")
    args = p.parse_args(argv)
    task = args.task
    if task is not None and task.isdigit():
        task = int(task)
    dtypes = tuple(d for d in args.float_dtypes.split(",") if d)
    try:
        check_output_path(args.json, "--json")
        report = measure(args.preset, args.seed, task, args.images, args.calib_images, args.weights,
                         args.checkpoint, image=args.image, calib_dir=args.calib, float_dtypes=dtypes)
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
