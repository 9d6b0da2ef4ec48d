# amaranth: UnusedElaboratable=no
"""NormMlp: a LayerNorm stage and the dense MLP sharing one engine and one set of buffers (the encoder
top's composition pattern), against ``golden_model.dense_mlp(x, golden.layernorm(x))``."""

import numpy as np
import pytest
from amaranth.hdl import Fragment

from m3vit_hw.dense.norm_mlp import NormMlp
from reference import golden as g
from reference import golden_model
from sim.dense_layer import NormMlpSim, dense_config, make_dense_workload
from sim.norm_stage import make_norm_workload

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


@pytest.mark.parametrize("dim, hidden, tokens, R, C, tile, stall", [
    (12, 40, 9, 4, 4, 4, 0.25),     # D not a power of two, token tiles of 4
    (10, 8, 7, 2, 4, None, 0.25),   # hidden < D, D not a multiple of C (LayerNorm on 2 lanes)
])
def test_norm_then_mlp_bit_exact(dim, hidden, tokens, R, C, tile, stall):
    cfg = dense_config(dim=dim, tokens=tokens, hidden=hidden, pe_rows=R, pe_cols=C)
    wl = make_dense_workload(dim, hidden, tokens, seed=dim)
    ln = make_norm_workload(dim, tokens, seed=dim)
    x, qln = ln["x"], ln["qln"]
    sim = NormMlpSim(cfg, wl["qdense"], token_tile=tile, stall_prob=stall, seed=dim, latency=9)
    res = sim.run(x, qln)
    h = g.layernorm(x, qln.eps_int, qln.gamma_mult, qln.beta_int, qln.shift)
    want = golden_model.dense_mlp(x, h, wl["qdense"])
    bad = np.argwhere(res["x"] != want)
    if len(bad):
        t, c = bad[0]
        pytest.fail(f"NormMlp D{dim} h{hidden}: x[{t}, {c}] expected {want[t, c]}, got {res['x'][t, c]} "
                    f"({len(bad)} mismatches)")
    print(f"NormMlp D{dim} h{hidden} T{tokens} {R}x{C}: bit-exact; LayerNorm {res['norm_cycles']} cycles, "
          f"MLP {res['mlp_cycles']} cycles")


def test_refuses_bad_config():
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        NormMlp(None)
    with pytest.raises(ValueError, match=r"counter_width must be in \[16, 64\], not 4"):
        dense_config(dim=8, tokens=5, hidden=8).with_(counter_width=4)
    Fragment.get(NormMlp(dense_config(dim=8, tokens=5, hidden=8)), None)
