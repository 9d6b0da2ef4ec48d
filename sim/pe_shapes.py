"""PE-array shape study: modelled utilization per GEMM class for candidate ``rows x cols`` shapes.

    python -m sim.pe_shapes [--preset vit-tiny-cityscapes] [--shape 32x64 ...]

A first-order model of :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine` built from the schedule its
docstring states (and ``sim.bench_gemm`` spot-checks): tiles run ``ceil(M/R) * ceil(N/C)`` times; each
tile walks ``ceil(K/C)`` blocks and a block takes ``max(R, C)`` cycles (the loader reads R A words and
C B words one per cycle; the array consumes C reduction steps, so a K tail and ``R > C`` both idle
the array); a tile with fewer beats than the previous tile's ``rows + 4`` waits for its drain
(:class:`~m3vit_hw.gemm.pe_array.PEArray` credits). Command overheads, the epilogue and everything
outside the GEMM engine (LayerNorm, softmax, weight streaming) are not counted: this ranks shapes by
how well their tiles fit the model's GEMMs, it is not a frame latency.

The GEMMs of one encoder frame, per class (T tokens, D dim, h heads, d head_dim):

- ``embed``: patch embedding, ``(patches, patch_dim, D)``;
- ``dense``: QKV, projection (K padded per head to whole words), the dense MLP;
- ``attention``: per head ``QK^T (T, d, T)`` and ``AV (T, T, d)``;
- ``gate``: the MoE gate ``(T, D, E)``;
- ``experts``: per expert ``(M_e, D, H)`` and ``(M_e, H, D)``, ``M_e`` tokens routed to expert e:
  ``balanced`` splits the ``T * top_k`` routed rows evenly (``ceil``/``floor``), ``skewed`` gives
  half of them to a quarter of the experts.
"""

import argparse
import sys

from m3vit_hw.model_config import PRESETS

__all__ = ["gemm_cycles", "frame_gemms", "shape_table", "main"]


def _cdiv(a, b):
    return -(-a // b)


def gemm_cycles(rows, cols, m, k, n):
    """Modelled GemmEngine cycles of one ``(m, k, n)`` GEMM on a ``rows x cols`` array."""
    if m == 0:
        return 0
    tiles = _cdiv(m, rows) * _cdiv(n, cols)
    per_tile = max(_cdiv(k, cols) * max(rows, cols), min(rows, m) + 4)
    return tiles * per_tile


def _expert_rows(model, routing):
    routed = model.tokens * model.top_k
    E = model.experts
    if routing == "balanced":
        base, extra = divmod(routed, E)
        return [base + (e < extra) for e in range(E)]
    hot = max(1, E // 4)
    half = routed // 2
    rows = [half // hot + (e < half % hot) for e in range(hot)]
    rest = routed - half
    cold = E - hot
    rows += [rest // cold + (e < rest % cold) for e in range(cold)]
    return rows


def frame_gemms(model, cols, routing="balanced"):
    """``{class: [(m, k, n), ...]}``: every GEMM of one encoder frame (one task)."""
    T, D, h, d = model.tokens, model.dim, model.heads, model.head_dim
    d_pad = _cdiv(d, cols) * cols
    out = {"embed": [(model.patches, model.patch_dim, D)], "dense": [], "attention": [],
           "gate": [], "experts": []}
    for blk in range(model.depth):
        out["dense"] += [(T, D, 3 * D), (T, h * d_pad, D)]
        out["attention"] += [(T, d, T), (T, T, d)] * h
        if model.is_moe(blk):
            out["gate"].append((T, model.gate_in_dim, model.experts))
            for me in _expert_rows(model, routing):
                out["experts"] += [(me, D, model.expert_hidden), (me, model.expert_hidden, D)]
        else:
            out["dense"] += [(T, D, model.mlp_hidden), (T, model.mlp_hidden, D)]
    return out


def shape_table(model, shapes, routing="balanced", clock_mhz=300):
    """Rows of ``(shape, {class: (utilization, cycles)}, total utilization, frame ms at clock)``."""
    rows = []
    for r, c in shapes:
        per = {}
        tot_c = tot_m = 0
        for cls, gemms in frame_gemms(model, c, routing).items():
            cyc = sum(gemm_cycles(r, c, *g) for g in gemms)
            macs = sum(m * k * n for m, k, n in gemms)
            per[cls] = (macs / (cyc * r * c) if cyc else 0.0, cyc)
            tot_c += cyc
            tot_m += macs
        rows.append(((r, c), per, tot_m / (tot_c * r * c), tot_c / clock_mhz / 1e3))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sim.pe_shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vit-tiny-cityscapes", choices=sorted(PRESETS))
    p.add_argument("--shape", action="append", default=None, help="ROWSxCOLS (repeatable)")
    p.add_argument("--routing", default="balanced", choices=["balanced", "skewed"])
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in
                  (args.shape or ["16x16", "32x32", "16x128", "32x64", "64x32", "8x256"])]
        if any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        print(f"error: --shape must be ROWSxCOLS with positive integers, not {args.shape}", file=sys.stderr)
        return 2
    model = PRESETS[args.preset]
    classes = list(frame_gemms(model, 16))
    print(f"{args.preset}, {args.routing} routing: modelled PE utilization per GEMM class "
          f"(GEMM engine schedule only; cycles at 300 MHz)")
    print("| shape | MAC/cycle | " + " | ".join(classes) + " | all GEMMs | GEMM ms/frame |")
    print("|" + " --- |" * (len(classes) + 4))
    for (r, c), per, util, ms in shape_table(model, shapes, args.routing):
        cells = " | ".join(f"{per[k][0] * 100:.0f} %" for k in classes)
        print(f"| {r}x{c} | {r * c} | {cells} | {util * 100:.1f} % | {ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
