"""``python -m sim compile``: compile a preset's encoder into a program and its external-memory image.

Prints (and with ``--out DIR`` writes) the program length, the image size by section and by content,
and the on-chip bytes of every buffer with its BRAM36/URAM mapping on the xczu7ev. The parameters are
:func:`reference.random_qparams.random_quantized` (the sizes, not the values, matter here); with
``--check-task`` the program also runs on the Python executor against the golden model (small
presets only: the executor is numpy, not fast).

Files written to ``DIR``: ``image.bin`` (the whole image, program included), ``program.txt`` (one
decoded instruction a line) and ``summary.json``.
"""

import argparse
import json
import os
import sys
import time

__all__ = ["main", "summarize"]


def summarize(program):
    """A JSON-ready dict: program length, image sections and breakdown, on-chip buffers and fit."""
    from m3vit_hw.control.onchip import XCZU7EV, budget, buffer_report, fits
    lay = program.layout
    # Placed within 80 % of the part's BRAM36 and URAM when possible (issue 12's margin).
    bufs = buffer_report(program.config, budget(XCZU7EV, 0.8))
    bram, uram, ok = fits(bufs)
    return {
        "model": program.model_config.model.name,
        "pe": [program.config.pe_rows, program.config.pe_cols],
        "token_capacity": program.config.token_capacity,
        "program": {"instructions": len(program.instructions), "words_per_instruction": program.isa.words,
                    "bytes": lay.program_bytes, "ops": program.op_counts()},
        "image": {"bytes": lay.image_bytes, "sections": {k: v[1] for k, v in lay.sections.items()},
                  "breakdown": dict(lay.breakdown), "input_addr": lay.input_addr,
                  "output_addr": lay.output_addr, "program_addr": lay.program_addr},
        "onchip": {"buffers": [{"name": b.name, "width_bits": b.width, "depth": b.depth, "bytes": b.bytes,
                                "bram36": b.bram36, "uram": b.uram, "lutram": b.lutram} for b in bufs],
                   "bytes": sum(b.bytes for b in bufs), "bram36": bram, "uram": uram,
                   "device": {"name": XCZU7EV.name, "bram36": XCZU7EV.bram36, "uram": XCZU7EV.uram},
                   "fits": ok, "fits_80_percent": fits(bufs, budget(XCZU7EV, 0.8))[2]},
    }


def _print(s, seconds):
    kib = 1024
    p, im, oc = s["program"], s["image"], s["onchip"]
    print(f"{s['model']}: {s['pe'][0]}x{s['pe'][1]} PEs, token capacity {s['token_capacity']} "
          f"(compiled in {seconds:.1f} s)")
    print(f"program: {p['instructions']} instructions x {p['words_per_instruction']} words = {p['bytes']} bytes; "
          + ", ".join(f"{k} {v}" for k, v in p["ops"].items()))
    print(f"image: {im['bytes']} bytes ({im['bytes'] / kib / kib:.2f} MiB)")
    print("  by section: " + ", ".join(f"{k} {v}" for k, v in im["sections"].items()))
    print("  by content: " + ", ".join(f"{k} {v}" for k, v in im["breakdown"].items()))
    print(f"on-chip buffers ({oc['bytes'] / kib:.1f} KiB):")
    for b in oc["buffers"]:
        prim = "LUTRAM" if b["lutram"] else f"{b['uram']} URAM" if b["uram"] else f"{b['bram36']} BRAM36"
        print(f"  {b['name']:<26} {b['width_bits']:>5} b x {b['depth']:>6} = {b['bytes'] / kib:8.1f} KiB  {prim}")
    d = oc["device"]
    print(f"  total {oc['bram36']} / {d['bram36']} BRAM36, {oc['uram']} / {d['uram']} URAM on {d['name']}: "
          f"{'fits' if oc['fits'] else 'DOES NOT FIT'}"
          f"{' (within 80 %)' if oc['fits_80_percent'] else (' (over 80 %)' if oc['fits'] else '')}")


def main(argv=None):
    from m3vit_hw.model_config import PRESETS
    ap = argparse.ArgumentParser(prog="python -m sim compile", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--out", help="directory for image.bin, program.txt, summary.json (created; its parent must exist)")
    for name, what in (("weight-buffer-bytes", "weight ping-pong, both halves"),
                       ("act-buffer-bytes", "activation buffer (raised to what the units need)"),
                       ("param-buffer-words", "column-parameter buffer, both halves"),
                       ("q-tile", "attention query tile rows")):
        ap.add_argument(f"--{name}", type=int, help=f"override the preset's {what}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random parameters")
    ap.add_argument("--check-task", type=int, action="append", default=[],
                    help="run the program on the Python executor for this task against the golden model")
    args = ap.parse_args(argv)
    if args.out:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            print(f"error: --out {args.out!r}: its parent directory does not exist", file=sys.stderr)
            return 2
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            print(f"error: --out {args.out!r} exists and is not a directory", file=sys.stderr)
            return 2
    import numpy as np
    from m3vit_hw.config import AcceleratorConfig
    from m3vit_hw.control.compiler import compile_model
    from reference.random_qparams import random_quantized
    try:
        over = {k: getattr(args, k) for k in ("weight_buffer_bytes", "act_buffer_bytes", "param_buffer_words",
                                                "q_tile") if getattr(args, k) is not None}
        config = AcceleratorConfig.from_preset(args.preset, **over)
        for t in args.check_task:
            if not 0 <= t < config.model.num_tasks:
                raise ValueError(f"--check-task must be in [0, {config.model.num_tasks - 1}], not {t}")
        t0 = time.time()
        qm = random_quantized(config.model, args.seed)
        program = compile_model(config, qm)
        seconds = time.time() - t0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = summarize(program)
    _print(s, seconds)
    if args.check_task:
        from reference import golden_model
        from sim.program_executor import run_program
        H, W = config.model.img_size
        img = np.random.default_rng(args.seed).integers(0, 256, (H, W, config.model.in_chans)).astype(np.uint8)
        s["check"] = {}
        for t in args.check_task:
            tok, _ = run_program(program, img, t)
            gold = golden_model.encode(qm, img.astype(np.int64).transpose(2, 0, 1) - 128, t)
            bad = int((tok != gold).sum())
            s["check"][t] = {"bit_exact": bad == 0, "mismatches": bad}
            print(f"task {t}: executor vs golden_model.encode: {'bit-exact' if bad == 0 else f'{bad} mismatches'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "image.bin"), "wb") as fh:
            fh.write(program.image)
        with open(os.path.join(args.out, "program.txt"), "w") as fh:
            for op, fields, wait in program.instructions:
                fh.write(f"{op.name:<10} {'wait ' if wait else ''}"
                         + " ".join(f"{k}={v}" for k, v in fields.items()) + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as fh:
            json.dump(s, fh, indent=2)
    return 0 if all(c["bit_exact"] for c in s.get("check", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
