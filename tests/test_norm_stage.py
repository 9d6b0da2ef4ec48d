# amaranth: UnusedElaboratable=no
"""NormStage (the LayerNorm sub-layer over memory ports) against ``reference.golden.layernorm``.

The stage reads int16 residual rows from a buffer the harness owns, fetches the layer's gain/bias
records from external memory (stalling at random) and writes int8 rows into the activation buffer.
"""

import numpy as np
import pytest
from amaranth.back import verilog

from m3vit_hw import numerics
from m3vit_hw.dense.norm_stage import NormStage, norm_lanes, pack_norm_params
from sim.dense_layer import dense_config
from sim.norm_stage import NormHarness, NormStageSim, make_norm_workload

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _check(res, label):
    bad = np.argwhere(res["h"] != res["want"])
    if len(bad):
        t, c = bad[0]
        pytest.fail(f"NormStage {label}: h[{t}, {c}] expected {res['want'][t, c]}, got {res['h'][t, c]} "
                    f"({len(bad)} mismatches)")
    print(f"NormStage {label}: bit-exact, {res['cycles']} cycles")


@pytest.mark.parametrize("dim, tokens, pe_cols, stall, db, burst", [
    (16, 9, 4, 0.0, 16, 16),    # lanes = C: one residual word per cycle
    (12, 7, 8, 0.3, 16, 16),    # D not a power of two nor a multiple of C: 2 beats a word, short last word
    (10, 5, 4, 0.3, 16, 16),    # lanes = gcd(4, 10) = 2
    (12, 5, 4, 0.3, 4, 3),      # 32-byte records of 8 beats over 3-beat bursts: 4 requests of 2 a record
])
def test_bit_exact(dim, tokens, pe_cols, stall, db, burst):
    cfg = dense_config(dim=dim, tokens=tokens, hidden=dim, pe_cols=pe_cols, mem_data_bytes=db,
                       mem_max_burst=burst)
    wl = make_norm_workload(dim, tokens, seed=dim)
    sim = NormStageSim(cfg, stall_prob=stall, seed=dim, latency=11, mem_bytes_per_cycle=db)
    _check(sim.run(wl["x"], wl["qln"]), f"D{dim} T{tokens} C{pe_cols} lanes {sim.stage.lanes} "
                                        f"{db} B beats, bursts <= {burst}")


def test_extremes_and_strided_destination():
    """Range-end residuals, a zero-variance row, the largest gains and biases (saturating both ways),
    written with a row pitch wider than the row (as into a strided region)."""
    cfg = dense_config(dim=12, tokens=6, hidden=12)
    wl = make_norm_workload(12, 6, seed=4, extremes=True)
    sim = NormStageSim(cfg, stall_prob=0.2, seed=4)
    res = sim.run(wl["x"], wl["qln"], dst_base=2, dst_stride=cfg.row_words + 1)
    _check(res, "extremes")
    lo, hi = numerics.int_range(numerics.ACT_BITS)
    assert (res["want"] == lo).any() and (res["want"] == hi).any(), "extremes must saturate both ways"


def test_record_layout_and_errors():
    cfg = dense_config(dim=12, tokens=5, hidden=12, pe_cols=8)
    assert norm_lanes(cfg) == 4
    wl = make_norm_workload(12, 5, seed=9)
    q = wl["qln"]
    assert cfg.norm_record_bytes == 32
    recs = pack_norm_params(q, cfg)
    assert len(recs) == 3 * 32
    r1 = recs[32:64]
    assert list(np.frombuffer(r1[:8], "<i2")) == list(q.gamma_mult[4:8])
    assert list(np.frombuffer(r1[8:24], "<i4")) == list(q.beta_int[4:8])
    assert int.from_bytes(r1[24:28], "little") == q.eps_int and r1[28] == q.shift
    with pytest.raises(ValueError, match="gamma_mult and beta_int of 10 channels"):
        pack_norm_params(q, dense_config(dim=10, tokens=5, hidden=10))
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        NormStage("tiny")



def test_verilog():
    cfg = dense_config(dim=8, tokens=5, hidden=8)
    text = verilog.convert(NormHarness(NormStage(cfg)), name="norm_top")
    assert "module norm_top" in text
