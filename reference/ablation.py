"""Which quantization site limits the integer encoder: single-site float-restore ablations.

    python -m reference.ablation --preset vit-tiny-cityscapes --seeds 0,1,2 [--weights realistic] [--json FILE]

The integer golden model (:mod:`reference.golden_model`) cannot run one site in float. This module
therefore re-runs the float encoder in float64 with *fake quantization*: at every quantization site of
the integer pipeline (``docs/numerics.md``) the value is rounded to the same grid, with the same scale
and clipping, that the quantizer (:func:`reference.quantize.quantize`) chose, and the softmax and router
use the same base-2 exponent table and 8-bit attention weights. With every site on, it tracks the
integer golden model closely (``tests/test_ablation.py`` checks the per-block stream SQNR); with one site
off (restored to float) the change in fidelity is what that site costs.

Sites (each may be restored in every block or in one block):

=========  ======================================================================================
``w_patch`` patch-embedding weights (block -1)
``ln1``    LayerNorm 1 output, int8 at ``scales[i]["ln1"]``
``w_qkv``  qkv weights, int8 per output channel
``q k v``  qkv outputs, int8 per tensor
``softmax`` attention weights: base-2 exponent table (8 fraction bits), unsigned 8-bit ``e8``
``ctx``    attention context (AV output before ``proj``), int8
``w_proj`` proj weights
``res``    the int16 residual stream (and every branch result requantized to it)
``ln2``    LayerNorm 2 output, int8 (also the router's input)
``w_fc1``  fc1 / expert htoh4 weights
``pre``    fc1 output (GELU input), int8 with the negative side clipped
``gelu``   GELU output: the uint8 code with its zero point (int8 / ``gelu_bits`` on the s8 options)
``w_fc2``  fc2 / expert h4toh weights
``w_gate`` router weights, int8 one scale per gate
``router`` router probabilities (Q0.15 combine weights through the exponent table)
=========  ======================================================================================

Metrics per block: SQNR of the attention branch (what ``x += proj(...)`` adds), of the MLP/MoE branch,
of the whole block's addition (the fidelity report's ``per_layer_branch_sqnr_db``), of the stream, and
routing agreement; all end to end, against the float64 model (every site restored).
"""

import argparse
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from m3vit_hw.checks import check_output_path
from m3vit_hw.model_config import PRESETS
from .synthetic_weights import PROFILES

__all__ = ["SITES", "FakeQuant", "run", "metrics", "ablate", "input_means", "default_variants", "main"]

SITES = ("w_patch", "ln1", "w_qkv", "q", "k", "v", "softmax", "ctx", "w_proj", "res", "ln2", "w_fc1", "pre", "gelu",
         "w_fc2", "w_gate", "router")

_LOG2E = math.log2(math.e)
#: The exponent table of docs/numerics.md §6.1 (entry f: round(2^15 * 2^(-f/256))).
_EXP2_LUT = torch.round(32768.0 * torch.pow(2.0, -torch.arange(256, dtype=torch.float64) / 256.0))


def _q(x, s, bits=8, lo=None):
    """Round ``x`` to the signed ``bits`` grid of step ``s`` (saturating)."""
    hi = (1 << (bits - 1)) - 1
    lo = -(1 << (bits - 1)) if lo is None else lo
    return torch.clamp(torch.round(x / s), lo, hi) * s


def _qw_rows(w, bits=8):
    """Symmetric weights, one scale per row (last axis reduced), as :func:`reference.quantize._quant_weight`."""
    lim = (1 << (bits - 1)) - 1
    s = w.abs().amax(-1, keepdim=True).clamp_min(1e-12) / lim
    return torch.clamp(torch.round(w / s), -lim, lim) * s


def _qw_tensor(w):
    s = max(float(w.abs().max()), 1e-12) / 127.0
    return torch.clamp(torch.round(w / s), -127, 127) * s


def _exp2_e16(t):
    """e16 of §6.1 from the (non-negative) exponent ``t`` in 1/256 units of log2, floored to an integer."""
    t = torch.floor(t).clamp_min(0)
    i = torch.div(t, 256, rounding_mode="floor")
    f = (t - 256 * i).long()
    e = torch.floor(_EXP2_LUT[f] / torch.pow(2.0, i.clamp(max=40)))
    return torch.where(i < 16, e, torch.zeros_like(e))


class FakeQuant:
    """Fake-quantization settings: which sites are restored to float, in which blocks.

    Parameters
    ----------
    qm : QuantizedEncoder
        Supplies every activation scale (``qm.scales``), the residual scale and the options
        (``gelu_bits``, ``drop_k_bias``, ``pixel_input``).
    restore : iterable of str
        Sites kept in float (see ``SITES``); ``"all"`` restores every site (the float64 model).
    blocks : iterable of int or None
        Restore only in these blocks (``None``: every block). ``res`` and weights of the patch
        embedding count as block -1.
    overrides : dict
        ``{site: bits}`` to raise one site's precision instead of restoring it (e.g. ``{"gelu": 16}``),
        keeping its range (step ``scale / 2^(bits-8)``).
    """

    def __init__(self, qm, restore=(), blocks=None, overrides=None, wcorr=None, record=None, gelu_avg=False):
        restore = set(SITES) if restore == "all" else set(restore)
        bad = restore - set(SITES)
        if bad:
            raise ValueError(f"restore sites must be among {', '.join(SITES)}, not {sorted(bad)}")
        self.qm = qm
        self.restore = restore
        self.blocks = None if blocks is None else set(blocks)
        self.overrides = dict(overrides or {})
        #: GEMM input means {key: [K] tensor} for weight-error bias correction (``b -= (Wq - W) @ mu``).
        self.wcorr = wcorr
        #: When a dict, every GEMM input is accumulated into it: {key: [sum [K], count]}.
        self.record = record
        #: GELU output = the mean of GELU over the input's rounding bin (a table made with the average).
        self.gelu_avg = gelu_avg
        #: {block: [T, k] experts}: use this routing (e.g. the float model's) instead of the own top-k.
        self.forced = None

    def on(self, site, block):
        if site not in self.restore:
            return True
        return self.blocks is not None and block not in self.blocks

    def act(self, x, site, block, lo=None):
        if not self.on(site, block):
            return x
        bits = self.overrides.get(site, 8)
        s = self.qm.scales[block][site] / (1 << (bits - 8))
        return _q(x, s, bits, None if lo is None else lo)

    def res(self, x, block):
        return _q(x, self.qm.res_scale, 16) if self.on("res", block) else x


@torch.no_grad()
def run(model, fq, img, task):
    """The encoder on one normalised image [3,H,W] with fake quantization ``fq``; float64.

    Returns a dict: ``embed``, ``mid`` (after the attention residual add) and ``blocks`` (after the
    MLP), lists of [T, D] arrays, and ``routing`` (block -> [T, k] expert sets, sorted).
    """
    enc = model.backbone
    cfg = enc.cfg
    qm = fq.qm
    opts = qm.scales["options"]
    gelu_bits = opts.get("gelu_bits", 8)
    task = cfg.task_id(task)
    dt = torch.float64
    x_img = img.to(dt)[None]
    w_pe = enc.patch_embed.proj.weight.to(dt)
    if fq.on("w_patch", -1):
        w2 = w_pe.reshape(cfg.dim, -1)
        if opts.get("pixel_input", False):
            from .inputs import pixel_normalization
            _, std = pixel_normalization(cfg.in_chans)
            col = (255.0 * std.reshape(-1).to(dt)).repeat_interleave(cfg.patch_size ** 2)
            w2 = _qw_rows(w2 / col, fq.overrides.get("w_patch", 8)) * col
        else:
            w2 = _qw_rows(w2)
            x_img = _q(x_img, qm.img_scale, 8, -127)
        w_pe = w2.reshape(w_pe.shape)
    x = F.conv2d(x_img, w_pe, enc.patch_embed.proj.bias.to(dt), stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([enc.cls_token.to(dt).expand(1, -1, -1), x], dim=1) + enc.pos_embed.to(dt)
    x = fq.res(x[0], -1)
    task_repr = enc.task_repr(task)
    out = {"embed": x.numpy(), "mid": [], "blocks": [], "routing": {}}
    D, H = cfg.dim, cfg.heads
    hd = D // H
    for i, blk in enumerate(enc.blocks):
        def w(t, site):
            t = t.to(dt)
            return _qw_rows(t, fq.overrides.get(site, 8)) if fq.on(site, i) else t

        def gemm(xin, wt, b, site, key):
            wf = wt.to(dt)
            wq = w(wf, site)
            y = xin @ wq.T + (0.0 if b is None else b.to(dt))
            if fq.record is not None:
                acc = fq.record.setdefault(key, [0.0, 0])
                acc[0] = acc[0] + xin.sum(0)
                acc[1] += xin.shape[0]
            if fq.wcorr is not None and key in fq.wcorr:
                y = y - (wq - wf) @ fq.wcorr[key]
            return y

        h = F.layer_norm(x, (D,), blk.norm1.weight.to(dt), blk.norm1.bias.to(dt), cfg.ln_eps)
        h = fq.act(h, "ln1", i)
        b_qkv = blk.attn.qkv.bias.to(dt).clone()
        if opts.get("drop_k_bias", False):
            b_qkv[D:2 * D] = 0.0
        qkv = gemm(h, blk.attn.qkv.weight, b_qkv, "w_qkv", ("qkv", i))
        q, k, v = (fq.act(qkv[:, s * D:(s + 1) * D], n, i) for s, n in enumerate("qkv"))
        ctx = torch.empty_like(h)
        for hh in range(H):
            sl = slice(hh * hd, (hh + 1) * hd)
            s = (q[:, sl] @ k[:, sl].T) * hd ** -0.5
            if fq.on("softmax", i):
                t = (s.amax(-1, keepdim=True) - s) * _LOG2E * 256.0
                e8 = torch.clamp(torch.floor((_exp2_e16(t) + 64) / 128), max=255)
                p = e8 / e8.sum(-1, keepdim=True)
            else:
                p = s.softmax(-1)
            ctx[:, sl] = p @ v[:, sl]
        ctx = fq.act(ctx, "ctx", i)
        y = gemm(ctx, blk.attn.proj.weight, blk.attn.proj.bias, "w_proj", ("proj", i))
        x = fq.res(x + fq.res(y, i), i)
        out["mid"].append(x.numpy())
        h = F.layer_norm(x, (D,), blk.norm2.weight.to(dt), blk.norm2.bias.to(dt), cfg.ln_eps)
        h = fq.act(h, "ln2", i)
        s_pre_lo = None

        def mlp(hx, w1, b1, w2, b2, e=None):
            pre = gemm(hx, w1, b1, "w_fc1", ("fc1", i, e))
            pre_q = fq.act(pre, "pre", i, s_pre_lo)
            if fq.gelu_avg and fq.on("pre", i):
                # The mean of GELU over the rounding bin of the int8 input (a table property).
                sp = qm.scales[i]["pre"] / (1 << (fq.overrides.get("pre", 8) - 8))
                off = (torch.arange(16, dtype=dt) + 0.5) / 16 - 0.5
                a = F.gelu(pre_q[..., None] + off * sp).mean(-1)
            else:
                a = F.gelu(pre_q)
            if fq.on("gelu", i):
                bits = fq.overrides.get("gelu", gelu_bits)
                u8 = qm.scales[i].get("gelu_u8")
                if u8 is not None and bits == 8:
                    # The spec's uint8 code: step s', zero point z, codes 0..255 (quantize.gelu_code).
                    su, z = u8
                    a = _q(a, su, 9, lo=-z)
                    a = torch.clamp(a, max=(255 - z) * su)
                else:
                    a = _q(a, qm.scales[i]["gelu"] / (1 << (bits - 8)), bits)
            return gemm(a, w2, b2, "w_fc2", ("fc2", i, e))

        if not blk.moe:
            y = mlp(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
            x = fq.res(x + fq.res(y, i), i)
        else:
            gate = blk.mlp.gate[task if cfg.router == "multi_gate" else 0].w_gate.to(dt)
            w_tok = _qw_tensor(gate[:D]) if fq.on("w_gate", i) else gate[:D]
            logits = h @ w_tok
            key = ("gate", i, task if cfg.router == "multi_gate" else 0)
            if fq.record is not None:
                acc = fq.record.setdefault(key, [0.0, 0])
                acc[0] = acc[0] + h.sum(0)
                acc[1] += h.shape[0]
            if fq.wcorr is not None and key in fq.wcorr:
                logits = logits - fq.wcorr[key] @ (w_tok - gate[:D])
            if task_repr is not None:
                logits = logits + task_repr.to(dt) @ gate[D:]
            if fq.on("router", i):
                t = (logits.amax(-1, keepdim=True) - logits) * _LOG2E * 256.0
                e16 = _exp2_e16(t)
                r = torch.floor(2.0 ** 31 / e16.sum(-1, keepdim=True))
                probs = torch.floor((e16 * r + 32768) / 65536) / 32768.0
            else:
                probs = logits.softmax(-1)
            order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :cfg.top_k]
            if fq.forced is not None:
                order = torch.from_numpy(fq.forced[i])
            ex = blk.mlp.experts
            acc = torch.zeros_like(x)
            for e in order.unique().tolist():
                toks = (order == e).any(-1)
                ye = fq.res(mlp(h[toks], ex.htoh4.weight[e], ex.htoh4.bias[e], ex.h4toh.weight[e],
                                ex.h4toh.bias[e], e), i)
                acc[toks] += fq.res(ye * probs[toks, e:e + 1], i)
            x = fq.res(x + acc, i)
            out["routing"][i] = np.sort(order.numpy(), axis=1)
        out["blocks"].append(x.numpy())
    return out


def input_means(model, qm, images):
    """Mean of every GEMM's input over ``images`` and every task, in the float model (the keys
    :class:`FakeQuant` ``wcorr`` takes)."""
    cfg = model.backbone.cfg
    rec = {}
    for t in range(cfg.num_tasks):
        for im in images:
            run(model, FakeQuant(qm, "all", record=rec), im, t)
    return {k: v[0] / v[1] for k, v in rec.items()}


def _sqnr(ref, test):
    noise = float(((ref - test) ** 2).sum())
    return float("inf") if noise == 0 else 10.0 * math.log10(float((ref ** 2).sum()) / noise)


def metrics(refs, tests):
    """Per-block and worst figures of ``tests`` against ``refs`` (lists of :func:`run` outputs).

    Returns ``attn``, ``mlp``, ``block`` (branch SQNR per block, dB), ``stream`` (per block), ``routing``
    (agreement per MoE block), and the worsts ``worst_attn``, ``worst_mlp``, ``worst_block``,
    ``sqnr`` (encoder output), ``routing_agreement``.
    """
    depth = len(refs[0]["blocks"])

    def cat(runs, f):
        return np.concatenate([f(r) for r in runs])

    m = {"attn": [], "mlp": [], "block": [], "stream": [], "routing": {},
         "embed": _sqnr(cat(refs, lambda r: r["embed"]), cat(tests, lambda r: r["embed"]))}
    for i in range(depth):
        def prev(r):
            return r["embed"] if i == 0 else r["blocks"][i - 1]
        for key, f in (("attn", lambda r: r["mid"][i] - prev(r)), ("mlp", lambda r: r["blocks"][i] - r["mid"][i]),
                       ("block", lambda r: r["blocks"][i] - prev(r)), ("stream", lambda r: r["blocks"][i])):
            m[key].append(_sqnr(cat(refs, f), cat(tests, f)))
    for i in refs[0]["routing"]:
        m["routing"][i] = float(np.mean(np.concatenate(
            [(a["routing"][i] == b["routing"][i]).all(1) for a, b in zip(refs, tests)])))
    m["worst_attn"] = min(m["attn"])
    m["worst_mlp"] = min(m["mlp"])
    m["worst_block"] = min(m["block"])
    m["sqnr"] = m["stream"][-1]
    m["routing_agreement"] = float(np.mean(list(m["routing"].values()))) if m["routing"] else 1.0
    return m


def _setup(preset, seed, weights, images, calib_images, quant):
    from .inputs import synthetic_images
    from .model import build_model
    from .quantize import quantize
    from .synthetic_weights import make_weights
    cfg = PRESETS[preset]
    model = make_weights(build_model(cfg, seed=seed), weights, seed).eval()
    calib = synthetic_images(cfg, calib_images, seed=seed + 1000)
    evals = synthetic_images(cfg, images, seed=seed)
    qm = quantize(model, calib, **(quant or {}))
    return model, qm, evals


def _run_forced(model, fq, img, task, ref):
    fq.forced = ref["routing"]
    try:
        return run(model, fq, img, task)
    finally:
        fq.forced = None


def ablate(model, qm, evals, variants, tasks=None, forced=False):
    """Run each variant ``name -> dict(restore=..., blocks=..., overrides=...)`` on every image and task;
    return ``name -> metrics`` for the worst task (lowest worst-block branch SQNR), plus ``per_task``.

    ``forced``: also measure with the float model's expert choice imposed (``forced`` key: the
    quantization error without the routing flips' discontinuity).
    """
    cfg = model.backbone.cfg
    tasks = range(cfg.num_tasks) if tasks is None else tasks
    ref = {t: [run(model, FakeQuant(qm, "all"), im, t) for im in evals] for t in tasks}
    res = {}
    for name, kw in variants.items():
        per, per_f = {}, {}
        for t in tasks:
            tests = [run(model, FakeQuant(qm, **kw), im, t) for im in evals]
            per[cfg.tasks[t]] = metrics(ref[t], tests)
            if forced:
                tests = [_run_forced(model, FakeQuant(qm, **kw), im, t, r) for im, r in zip(evals, ref[t])]
                per_f[cfg.tasks[t]] = metrics(ref[t], tests)
        worst = min(per.values(), key=lambda m: m["worst_block"])
        res[name] = dict(worst, per_task=per)
        if forced:
            res[name]["forced"] = min(per_f.values(), key=lambda m: m["worst_block"])
    return res


def default_variants(depth):
    """Every site restored alone (in every block), the all-quantized baseline and weights/activations."""
    v = {"baseline (all quantized)": {}}
    for s in SITES:
        v[f"restore {s}"] = {"restore": [s]}
    v["restore all weights"] = {"restore": [s for s in SITES if s.startswith("w_")]}
    v["restore all activations"] = {"restore": [s for s in SITES if not s.startswith("w_")]}
    return v


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m reference.ablation", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit-tiny-cityscapes", help=f"one of {', '.join(sorted(PRESETS))}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--weights", default="realistic", choices=list(PROFILES))
    p.add_argument("--images", type=int, default=2, help="evaluation images per seed (seed S)")
    p.add_argument("--calib-images", type=int, default=4, help="calibration images (seed S + 1000)")
    p.add_argument("--json", default=None, help="write every variant's metrics to this file")
    args = p.parse_args(argv)
    try:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, not {args.preset!r}")
        check_output_path(args.json, "--json")
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, not {args.seeds!r}") from None
        if args.images < 1 or args.calib_images < 1:
            raise ValueError(f"--images and --calib-images must be >= 1, not {args.images}, {args.calib_images}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    report = {}
    for seed in seeds:
        model, qm, evals = _setup(args.preset, seed, args.weights, args.images, args.calib_images, None)
        res = ablate(model, qm, evals, default_variants(model.backbone.cfg.depth), forced=True)
        report[seed] = res
        base = res["baseline (all quantized)"]
        print(f"seed {seed}: {'variant':<28} {'worst attn':>10} {'worst mlp':>10} {'worst blk':>10} "
              f"{'SQNR':>6} {'routing':>8} {'float-routed worst blk':>23}")
        for name, m in res.items():
            print(f"        {name:<28} {m['worst_attn']:10.1f} {m['worst_mlp']:10.1f} {m['worst_block']:10.1f} "
                  f"{m['sqnr']:6.1f} {m['routing_agreement']:8.3f} {m['forced']['worst_block']:23.1f}")
        print("        baseline per block  attn " + " ".join(f"{v:5.1f}" for v in base["attn"]))
        print("                            mlp  " + " ".join(f"{v:5.1f}" for v in base["mlp"]))
        print("                            blk  " + " ".join(f"{v:5.1f}" for v in base["block"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
