"""The performance report: utilization, latency at an assumed clock, where the cycles go, weight traffic.

:func:`make_report` turns a *counters* dict (a frame or a layer: ``cycles``, ``breakdown`` by op class,
``macs``, ``weight_bytes_fetched``, ``weight_bytes_minimum``, ``projected``) and an
:class:`~m3vit_hw.config.AcceleratorConfig` into the report of issue 11:

* ``macs``, ``peak_mac_per_cycle`` (``pe_rows * pe_cols``), ``utilization`` = macs / (cycles x peak);
* ``clock_mhz_assumed`` (the config's ``clock_mhz`` unless given) and ``latency_ms`` at that clock;
* ``breakdown``: cycles per op class (:data:`sim.perf_model.OP_CLASSES`: patch embedding, LayerNorm,
  QKV and proj, attention matmuls, softmax, dense MLP, router, experts, store, exposed memory stalls,
  idle) and ``breakdown_fraction``;
* ``weight_bytes_fetched`` against ``weight_bytes_minimum``;
* ``projected``: True when the figures come from :mod:`sim.perf_model` and no RTL ran.

Counters come from three places: the analytic model (:func:`sim.perf_model.project_frame` and the
``*_cycles`` functions), a per-layer runner's JSON report (:func:`from_runner`), and the frame runner's
JSON (:func:`from_frame`, the naming in ``/work/reports/encoder_counters.txt``: ``cycles``,
``cycles_per_op_class`` and ``pe_active_per_op_class`` keyed by lower-case opcode names).
:func:`summary` is the readable text, :func:`plot_breakdown` the stacked bar (like the paper's latency
breakdown figure) and :func:`plot_sweep` cycles against memory bandwidth.

``python -m sim perf --preset P`` projects a frame (or one layer with ``--layer``) and prints the
report; ``--mem-bytes-per-cycle 2,4,8,16`` sweeps the bandwidth; ``--from-json FILE`` reports a
runner's or the frame runner's JSON instead; ``--plot FILE.png`` and ``--json FILE`` write the figure
and the report.
"""

import argparse
import json
import sys
import textwrap

from sim.perf_model import OP_CLASSES
from m3vit_hw.soc.top import HP_PORT_BYTES, HP_PORTS, hp_ports_needed

__all__ = ["hp_ports_needed", "HP_PORT_BYTES", "HP_PORTS",
           "make_report", "from_runner", "from_frame", "summary", "plot_breakdown", "plot_sweep",
           "sweep_knee", "main", "LABELS"]

#: Readable names of the op classes (legend and summary).
LABELS = {
    "patch_embed": "patch embedding", "layernorm": "LayerNorm", "qkv_proj": "QKV + proj",
    "attn_matmul": "attention matmuls", "softmax": "softmax", "dense_mlp": "dense MLP",
    "router": "router / gate", "experts": "experts", "store": "store",
    "memory_stall": "exposed memory stalls", "idle": "idle (fill, drain, hand-off)",
}

_COLORS = {
    "patch_embed": "#8c564b", "layernorm": "#bcbd22", "qkv_proj": "#1f77b4", "attn_matmul": "#17becf",
    "softmax": "#9edae5", "dense_mlp": "#2ca02c", "router": "#ff7f0e", "experts": "#d62728",
    "store": "#7f7f7f", "memory_stall": "#000000", "idle": "#c7c7c7",
}


def make_report(counters, config, *, clock_mhz=None):
    """The report dict of ``counters`` on ``config`` (see the module docstring).

    Raises ValueError if ``cycles`` is not positive or the breakdown names an unknown op class.
    """
    cycles = float(counters["cycles"])
    if not cycles > 0:
        raise ValueError(f"counters['cycles'] must be > 0, not {counters['cycles']!r}")
    clock = float(config.clock_mhz if clock_mhz is None else clock_mhz)
    if not clock > 0:
        raise ValueError(f"clock_mhz must be > 0, not {clock_mhz!r}")
    bd = {k: 0.0 for k in OP_CLASSES}
    for k, v in (counters.get("breakdown") or {}).items():
        if k not in bd:
            raise ValueError(f"breakdown op class must be one of {', '.join(OP_CLASSES)}, not {k!r}")
        bd[k] += float(v)
    rest = cycles - sum(bd.values())
    if abs(rest) > 1e-6 * cycles:
        bd["idle"] += rest          # cycles no class claims
    peak = config.pe_rows * config.pe_cols
    macs = int(counters.get("macs", 0))
    rep = {
        "projected": bool(counters.get("projected", False)),
        "cycles": round(cycles, 1),
        "macs": macs,
        "peak_mac_per_cycle": peak,
        "utilization": round(macs / (cycles * peak), 4),
        "clock_mhz_assumed": clock,
        "latency_ms": round(cycles / (clock * 1e3), 4),
        "breakdown": {k: round(v, 1) for k, v in bd.items()},
        "breakdown_fraction": {k: round(v / cycles, 4) for k, v in bd.items()},
        "weight_bytes_fetched": counters.get("weight_bytes_fetched"),
        "weight_bytes_minimum": counters.get("weight_bytes_minimum"),
    }
    for key in ("config", "source", "mem_bytes_per_cycle", "latency", "routing", "bit_exact"):
        if key in counters:
            rep[key] = counters[key]
    bw = rep.get("mem_bytes_per_cycle")
    if isinstance(bw, (int, float)) and bw > 0:
        # The memory models serve at most one beat a cycle, whatever bandwidth was asked for.
        rep["mem_bytes_per_cycle_effective"] = min(float(bw), float(config.mem_data_bytes))
    return rep


def from_runner(rep):
    """Counters from a per-layer runner's JSON report (``python -m sim moe-layer|attention-layer|
    dense-layer|patch-embed --json``), simulated (``projected`` False).

    The op classes come from the runner's own counters: the MoE layer's timing (start .. first expert
    GEMM: gate and router), the attention and dense phase counters, the embedding's wait counters; the
    cycles no counter attributes are ``idle``."""
    cyc = rep["cycles"]
    bd = {}
    if "expert_tokens" in rep:                                        # moe-layer
        t = rep.get("timing", {})
        first = t.get("t_first_expert_gemm") or 0
        bd["router"] = first
        bd["experts"] = rep["compute_cycles"] - (rep["compute_cycles"] and 0)
        bd["experts"] = min(cyc - first, rep["compute_cycles"])
        fetched = rep["weight_bytes_fetched"] + rep.get("gate_bytes_fetched", 0)
        minimum = rep["weight_bytes_minimum"] + rep.get("gate_bytes_minimum", 0)
        source = "moe-layer"
    elif "phase_cycles" in rep and "QKV" in rep["phase_cycles"]:     # attention-layer
        ph = rep["phase_cycles"]
        bd["qkv_proj"] = ph["QKV"] + ph["PROJ"]
        bd["attn_matmul"] = ph["QK"] + ph["AV"]
        bd["softmax"] = max(0, rep["softmax_cycles"] - rep["softmax_overlap_cycles"])
        fetched = minimum = rep["weight_bytes_fetched"]
        source = "attention-layer"
    elif "phase_cycles" in rep:                                       # dense-layer
        bd["dense_mlp"] = sum(rep["phase_cycles"].values())
        bd["memory_stall"] = rep["wait_cycles"]
        fetched, minimum = rep["bytes_fetched"], None
        source = "dense-layer"
    elif "patch_wait_cycles" in rep:                                  # patch-embed
        bd["patch_embed"] = rep["gemm_cycles"]
        bd["memory_stall"] = rep["patch_wait_cycles"] + rep["weight_wait_cycles"]
        fetched, minimum = rep["bytes_fetched"], None
        source = "patch-embed"
    else:
        raise ValueError("not a runner report: expected the JSON of moe-layer, attention-layer, "
                         "dense-layer or patch-embed")
    over = sum(bd.values()) - cyc
    if over > 0:                      # overlapping counters: trim the last-listed class
        k = list(bd)[-1]
        bd[k] -= over
    return {"cycles": cyc, "breakdown": bd, "macs": rep["macs"], "weight_bytes_fetched": fetched,
            "weight_bytes_minimum": minimum, "projected": False, "source": source,
            "bit_exact": rep.get("bit_exact")}


#: Frame op classes (``/work/reports/encoder_counters.txt``: lower-case opcode names) -> report classes.
FRAME_CLASSES = {"load_image": "patch_embed", "layernorm": "layernorm", "gemm": "dense_mlp",
                 "store": "store"}


def from_frame(frame, config, *, split=None):
    """Counters from the frame runner's JSON (``python -m sim frame --json``).

    With the encoder's phase counters (``cycles_per_phase`` / ``pe_active_per_phase``,
    :class:`~m3vit_hw.encoder.top.CounterPhase`) the ``attention`` and ``moe`` cycles are split by the
    hardware: ``attn_matmul`` = PE-busy cycles of the attention core (QK^T, AV), ``softmax`` = the
    core's cycles with the PE array idle (waits for the score path, fills and drains), ``qkv_proj`` =
    the rest of the attention unit's cycles; ``router`` = the MoE router phase, ``experts`` = the rest.
    Without them (older JSON) the split follows the proportions of ``split`` (a
    :func:`sim.perf_model.project_frame` result for the same config; default: computed). The split used
    is named in ``source``."""
    cyc = frame["cycles"]
    per = frame.get("cycles_per_op_class") or {}
    bd = {}
    for k, v in per.items():
        if k in FRAME_CLASSES:
            bd[FRAME_CLASSES[k]] = bd.get(FRAME_CLASSES[k], 0) + v
    ph, php = frame.get("cycles_per_phase"), frame.get("pe_active_per_phase")
    if ph and php:
        core, core_pe = ph["attn_core"], php["attn_core"]
        if "attention" in per:
            bd.update(qkv_proj=per["attention"] - core, attn_matmul=core_pe, softmax=core - core_pe)
        if "moe" in per:
            bd.update(router=ph["moe_router"], experts=per["moe"] - ph["moe_router"])
        return {"cycles": cyc, "breakdown": bd, "macs": frame.get("macs", 0),
                "weight_bytes_fetched": frame.get("weight_bytes_fetched"),
                "weight_bytes_minimum": frame.get("weight_bytes_minimum"), "projected": False,
                "bit_exact": frame.get("bit_exact"), "mem_bytes_per_cycle": frame.get("mem_bytes_per_cycle"),
                "source": "frame (attention and moe split by the encoder's phase counters)"}
    if split is None and ("attention" in per or "moe" in per):
        from sim.perf_model import project_frame
        split = project_frame(config, routing="uniform")
    for k, classes in (("attention", ("qkv_proj", "attn_matmul", "softmax")), ("moe", ("router", "experts"))):
        if k not in per:
            continue
        weights = [split["breakdown"][c] for c in classes]
        tot = sum(weights) or 1.0
        for c, w in zip(classes, weights):
            bd[c] = bd.get(c, 0) + per[k] * w / tot
    return {"cycles": cyc, "breakdown": bd, "macs": frame.get("macs", 0),
            "weight_bytes_fetched": frame.get("weight_bytes_fetched"),
            "weight_bytes_minimum": frame.get("weight_bytes_minimum"), "projected": False,
            "bit_exact": frame.get("bit_exact"), "mem_bytes_per_cycle": frame.get("mem_bytes_per_cycle"),
            "source": "frame (attention and moe split by the analytic model's proportions)"}


# HP_PORT_BYTES, HP_PORTS and hp_ports_needed are the SoC's (m3vit_hw.soc.top), re-exported here.


def summary(rep, title=None):
    """The readable summary (a few lines)."""
    tag = "PROJECTED (analytic model, no RTL ran)" if rep["projected"] else "simulated"
    lines = [f"{title or 'performance report'} [{tag}]"]
    lines.append(f"  cycles          {rep['cycles']:,.0f}  ->  {rep['latency_ms']:.3f} ms at "
                 f"{rep['clock_mhz_assumed']:g} MHz (assumed)")
    bw = rep.get("mem_bytes_per_cycle_effective")
    if bw:
        n = hp_ports_needed(bw)
        gbs = bw * rep["clock_mhz_assumed"] / 1e3
        ports = (f"{n} x 128-bit HP port{'s' if n > 1 else ''} at full rate" if n else
                 f"more than the {HP_PORTS} HP ports give")
        capped = "" if bw == rep["mem_bytes_per_cycle"] else \
            f" ({rep['mem_bytes_per_cycle']:g} asked; one memory beat a cycle at most)"
        lines.append(f"  memory          {bw:g} B/cycle{capped} = {gbs:.1f} GB/s: {ports} "
                     f"(PS DDR4 peak 19.2 GB/s)")
    lines.append(f"  MACs            {rep['macs']:,}  on {rep['peak_mac_per_cycle']} MAC/cycle peak: "
                 f"utilization {100 * rep['utilization']:.1f} %")
    if rep.get("weight_bytes_fetched") is not None:
        mn = rep.get("weight_bytes_minimum")
        extra = "" if not mn else f" (minimum {mn:,}; x{rep['weight_bytes_fetched'] / mn:.3f})"
        lines.append(f"  weight bytes    fetched {rep['weight_bytes_fetched']:,}{extra}")
    lines.append("  breakdown:")
    for k in OP_CLASSES:
        v = rep["breakdown"][k]
        if v:
            lines.append(f"    {LABELS[k]:<30} {v:>14,.0f}  {100 * rep['breakdown_fraction'][k]:5.1f} %")
    return "\n".join(lines)


def plot_breakdown(reports, path, *, title="latency breakdown"):
    """A stacked bar per report (``[(label, report)]``): milliseconds per op class at each report's
    assumed clock, projected bars hatched and labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(reports) + 3), 4.8))
    names = [lab + ("\n(projected)" if r["projected"] else "") for lab, r in reports]
    bottoms = [0.0] * len(reports)
    for k in OP_CLASSES:
        vals = [r["breakdown"][k] / (r["clock_mhz_assumed"] * 1e3) for _, r in reports]
        if not any(vals):
            continue
        ax.bar(names, vals, bottom=bottoms, color=_COLORS[k], label=LABELS[k], edgecolor="white",
               hatch=None)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for i, (_, r) in enumerate(reports):
        ax.text(i, bottoms[i], f"{r['latency_ms']:.2f} ms\n{100 * r['utilization']:.0f} % util",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("latency (ms) at the assumed clock")
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=9)
    ax.set_ylim(0, max(bottoms) * 1.18 if max(bottoms) > 0 else 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep_knee(points, within=0.05):
    """The lowest bandwidth whose cycles are within ``within`` of the fastest point: below it the
    design is memory-bound."""
    fastest = min(p["cycles"] for p in points)
    return min(p["mem_bytes_per_cycle"] for p in points if p["cycles"] <= (1 + within) * fastest)


def plot_sweep(points, path, *, title="cycles vs memory bandwidth", compute=None):
    """Cycles against bytes/cycle (log-log), with the compute-only cycles and the knee marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4.2))
    bws = [p["mem_bytes_per_cycle"] for p in points]
    ax.plot(bws, [p["cycles"] for p in points], "o-", label="cycles" + (
        " (projected)" if any(p.get("projected") for p in points) else ""))
    if compute:
        ax.axhline(compute, color="gray", ls="--", label="compute-bound floor")
    knee = sweep_knee(points)
    ax.axvline(knee, color="red", ls=":", label=f"memory-bound below ~{knee:g} B/cycle")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("external memory bytes / cycle")
    ax.set_ylabel("cycles")
    ax.set_title("\n".join(textwrap.wrap(title, 56)), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI ------------------------------------------------------------------------------------------

_LAYERS = ("frame", "moe", "attention", "dense", "norm", "embed")


def _estimate(config, layer, task, routing, bw, latency, seed):
    """Counters of a projected ``layer`` (or the whole frame) at bandwidth ``bw``."""
    from sim import perf_model as pm
    if layer == "frame":
        return pm.project_frame(config, task=task, seed=seed, routing=routing, bytes_per_cycle=bw,
                                latency=latency)
    kw = dict(bytes_per_cycle=bw, latency=latency)
    if layer == "moe":
        est = pm.moe_cycles(config, pm.uniform_counts(config), **kw)
    elif layer == "attention":
        est = pm.attention_cycles(config, **kw)
    elif layer == "dense":
        est = pm.dense_cycles(config, **kw)
    elif layer == "norm":
        est = pm.norm_cycles(config, **kw)
    else:
        est = pm.embed_cycles(config, **kw)
    return {"cycles": est.cycles, "breakdown": est.breakdown, "macs": est.macs,
            "weight_bytes_fetched": est.weight_bytes, "projected": True,
            "mem_bytes_per_cycle": bw, "latency": latency}


def _parser():
    from m3vit_hw.config import SIZINGS
    from m3vit_hw.model_config import PRESETS
    p = argparse.ArgumentParser(prog="python -m sim perf", description=(
        "Performance report: utilization, latency at the assumed clock, the per-op-class breakdown and "
        "weight traffic, projected by the analytic cycle model (sim/perf_model.py) or read from a "
        "runner's JSON."))
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), help="workload preset (vit-tiny-cityscapes = W1, "
      "vit-small-nyud = W2, tiny, ...)")
    a("--sizing", choices=tuple(SIZINGS), default="default",
      help="accelerator sizing of the preset (default: W1 and W2 device-sized, the test presets small; small: "
           "W1 16x16, W2 32x32; device: the xczu7ev-sized PE array, W1/W2 only)")
    a("--pe-rows", type=int, help="override the preset's PE rows")
    a("--pe-cols", type=int, help="override the preset's PE columns")
    a("--mem-data-bytes", type=int, help="override the memory beat (port width in bytes; the model "
      "delivers at most one beat a cycle)")
    a("--arrays", metavar="RxC[,RxC...]", help="project several PE arrays (e.g. 16x16,32x32,64x64): "
      "one report and one bar each (overrides --pe-rows/--pe-cols)")
    a("--clock-mhz", type=float, help="assumed clock (default: the config's clock_mhz)")
    a("--layer", choices=_LAYERS, default="frame", help="what to project (default: a whole frame)")
    a("--task", type=int, default=0, help="task of the frame (default 0)")
    a("--routing", choices=("golden", "uniform"), default="golden",
      help="expert counts from the golden model on a random image, or uniform (default golden)")
    a("--seed", type=int, default=0, help="seed of the random parameters and image (default 0)")
    a("--mem-bytes-per-cycle", default="16", metavar="B[,B2,...]",
      help="external memory bandwidth; a comma-separated list sweeps it (default 16)")
    a("--latency", type=int, default=20, help="external memory latency in cycles (default 20)")
    a("--from-json", metavar="FILE", help="report a runner's JSON (moe-layer, attention-layer, "
      "dense-layer, patch-embed) or the frame runner's JSON instead of projecting; needs --preset "
      "for the frame's config, the layer runners' configs are read from their JSON")
    a("--plot", metavar="FILE.png", help="write the breakdown bar (or, with a sweep, cycles vs bandwidth)")
    a("--json", metavar="FILE", help="write the report(s) as JSON")
    return p


def _config(args):
    from m3vit_hw.config import AcceleratorConfig
    over = {k: getattr(args, k) for k in ("pe_rows", "pe_cols", "mem_data_bytes") if getattr(args, k) is not None}
    return AcceleratorConfig.from_preset(args.preset, sizing=args.sizing, **over)


def _runner_config(rep):
    """The AcceleratorConfig a runner's JSON was simulated on (from its ``config`` block)."""
    c = rep["config"]
    if "expert_tokens" in rep:
        from sim.moe_layer import moe_config
        return moe_config(experts=c["experts"], top_k=c["top_k"], dim=c["dim"], hidden=c["expert_hidden"],
                          tokens=c["tokens"], tasks=c["tasks"], pe_rows=c["pe_rows"], pe_cols=c["pe_cols"])
    if "phase_cycles" in rep and "QKV" in rep["phase_cycles"]:
        from sim.attention_layer import attn_config
        return attn_config(dim=c["dim"], heads=c["heads"], tokens=c["tokens"], q_tile=c["q_tile"],
                           pe_rows=c["pe_rows"], pe_cols=c["pe_cols"])
    if "phase_cycles" in rep:
        from sim.dense_layer import dense_config
        return dense_config(dim=c["dim"], tokens=c["tokens"], hidden=c["hidden"], pe_rows=c["pe_rows"],
                            pe_cols=c["pe_cols"])
    from sim.patch_embed import embed_config
    return embed_config(img=tuple(c["img"]), patch=c["patch"], dim=c["dim"], in_chans=c["in_chans"],
                        pe_rows=c["pe_rows"], pe_cols=c["pe_cols"])


def _parse_arrays(text):
    out = []
    for item in text.split(","):
        try:
            r, c = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"--arrays must be a list of RxC (e.g. 16x16,32x32), not {text!r}") from None
        out.append((r, c))
    return out


def _arrays(args, bws):
    """``--arrays``: one projected report per PE array (the first bandwidth of the list)."""
    from m3vit_hw.config import AcceleratorConfig
    arrays = _parse_arrays(args.arrays)
    reps = []
    for r, c in arrays:
        over = {} if args.mem_data_bytes is None else {"mem_data_bytes": args.mem_data_bytes}
        config = AcceleratorConfig.from_preset(args.preset, pe_rows=r, pe_cols=c, **over)
        counters = _estimate(config, args.layer, args.task, args.routing, bws[0], args.latency, args.seed)
        rep = make_report(counters, config, clock_mhz=args.clock_mhz)
        rep["pe_array"] = f"{r}x{c}"
        reps.append(rep)
        print(summary(rep, f"{config.model.name} {args.layer} on {r}x{c}, {bws[0]:g} B/cycle"))
    if args.plot:
        plot_breakdown([(f"{a['pe_array']}", a) for a in reps], args.plot,
                       title=f"{args.preset} {args.layer}: PE arrays at {bws[0]:g} B/cycle (projected)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reports": reps}, f, indent=2)
    return 0


def main(argv=None):
    """``python -m sim perf``: returns the process exit code."""
    from m3vit_hw.checks import check_output_path
    args = _parser().parse_args(argv)
    try:
        try:
            bws = [float(b) for b in str(args.mem_bytes_per_cycle).split(",")]
        except ValueError:
            raise ValueError(f"--mem-bytes-per-cycle must be a number or a comma-separated list, "
                             f"not {args.mem_bytes_per_cycle!r}") from None
        if not bws or min(bws) <= 0:
            raise ValueError(f"--mem-bytes-per-cycle values must be > 0, not {args.mem_bytes_per_cycle!r}")
        if args.latency < 0:
            raise ValueError(f"--latency must be >= 0, not {args.latency}")
        if args.clock_mhz is not None and not args.clock_mhz > 0:
            raise ValueError(f"--clock-mhz must be > 0, not {args.clock_mhz}")
        if args.plot is not None:
            if not str(args.plot).endswith(".png"):
                raise ValueError(f"--plot must name a .png file, not {args.plot!r}")
            check_output_path(args.plot, "--plot")
        check_output_path(args.json, "--json")
        if args.from_json:
            with open(args.from_json) as f:
                data = json.load(f)
            if "cycles_per_op_class" in data:
                if args.preset is None:
                    raise ValueError("--from-json with a frame report needs --preset (its config)")
                config = _config(args)
                counters = from_frame(data, config)
            else:
                counters = from_runner(data)
                config = _runner_config(data)
            rep = make_report(counters, config, clock_mhz=args.clock_mhz)
            print(summary(rep, f"{counters['source']} from {args.from_json}"))
            if args.plot:
                plot_breakdown([(counters["source"], rep)], args.plot)
            out = rep
        else:
            if args.preset is None:
                raise ValueError("--preset is required (or --from-json)")
            if args.arrays:
                return _arrays(args, bws)
            config = _config(args)
            if not 0 <= args.task < config.model.num_tasks:
                raise ValueError(f"--task must be in [0, {config.model.num_tasks - 1}], not {args.task}")
            reps = []
            for bw in bws:
                counters = _estimate(config, args.layer, args.task, args.routing, bw, args.latency, args.seed)
                reps.append(make_report(counters, config, clock_mhz=args.clock_mhz))
            name = (f"{config.model.name} {args.layer} on {config.pe_rows}x{config.pe_cols}, "
                    f"task {args.task}, {args.routing} routing")
            if len(bws) == 1:
                print(summary(reps[0], f"{name}, {bws[0]:g} B/cycle latency {args.latency}"))
                if args.plot:
                    plot_breakdown([(f"{config.model.name}\n{config.pe_rows}x{config.pe_cols}", reps[0])],
                                   args.plot, title=f"{name} (projected)")
                out = reps[0]
            else:
                points = [{"mem_bytes_per_cycle": bw, "cycles": r["cycles"], "latency_ms": r["latency_ms"],
                           "utilization": r["utilization"], "memory_stall": r["breakdown"]["memory_stall"],
                           "projected": True} for bw, r in zip(bws, reps)]
                knee = sweep_knee(points)
                print(f"{name}: cycles vs memory bandwidth (PROJECTED, latency {args.latency})")
                print(f"  {'B/cycle':>8} {'cycles':>12} {'ms':>9} {'util':>7} {'mem stall':>12}")
                for pt in points:
                    print(f"  {pt['mem_bytes_per_cycle']:>8g} {pt['cycles']:>12,.0f} {pt['latency_ms']:>9.3f} "
                          f"{100 * pt['utilization']:>6.1f}% {pt['memory_stall']:>12,.0f}")
                print(f"  memory-bound below ~{knee:g} B/cycle (within 5 % of the fastest from there up)")
                compute = min(r["cycles"] - r["breakdown"]["memory_stall"] for r in reps)
                if args.plot:
                    plot_sweep(points, args.plot, title=f"{name} (projected)", compute=compute)
                out = {"sweep": points, "knee_bytes_per_cycle": knee, "reports": reps}
    except (TypeError, ValueError, OSError, KeyError) as exc:
        msg = str(exc) if not isinstance(exc, KeyError) else f"missing key {exc} in --from-json file"
        print(f"error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
