# amaranth: UnusedElaboratable=no
"""DenseLayer end to end against the golden model: ``x + fc2(gelu(fc1(h)))`` bit for bit.

Each case elaborates one DenseLayer (small configs) and runs it with the external memory and every
external stream (load, start, read-back) stalling at random. The expected residual stream comes from
``reference.golden_model.dense_mlp``; a mismatch names the run, token, channel, expected and got.
Cycles and MAC/cycle are printed, not asserted.
"""

import dataclasses
import json

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.dense import DenseLayer, dense_buffer_map, pack_dense, plan_dense
from m3vit_hw.moe.expert_layout import unpack_params
from reference import golden_model
from sim.dense_layer import DenseLayerSim, dense_config, make_dense_workload
from sim.testbench import EmbeddingHarness

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _check(sim, runs, results, label):
    assert len(results) == len(runs), f"{label}: {len(results)} runs finished, expected {len(runs)}"
    for n, ((h, x), res) in enumerate(zip(runs, results)):
        want = golden_model.dense_mlp(x, h, sim.qdense)
        got = res["x"]
        assert got.shape == want.shape, f"{label} run {n}: read back {got.shape}, expected {want.shape}"
        bad = np.argwhere(got != want)
        if len(bad):
            t, c = bad[0]
            pytest.fail(f"DenseLayer {label} run {n}: x[{t}, {c}] expected {want[t, c]}, got {got[t, c]} "
                        f"({len(bad)} mismatches)")
        macs = 2 * h.shape[0] * h.shape[1] * sim.layout.hidden
        print(f"DenseLayer {label} run {n}: T={h.shape[0]} bit-exact; {res['cycles']} cycles, "
              f"{macs / res['cycles']:.2f} MAC/cycle (peak {sim.config.pe_rows * sim.config.pe_cols}), "
              f"PE beats {res['compute_cycles']}, phases {res['phase_cycles']}, waiting {res['wait_cycles']}")
    return want


def test_bit_exact_token_tiled_two_runs_with_stalls():
    """D=16, hidden=64, T=9: two token tiles of 8 (the hidden matrix never whole); then T=5 on the same
    design; memory and streams stalling."""
    cfg = dense_config(dim=16, tokens=9, hidden=64)
    wl = make_dense_workload(16, 64, 9, seed=1)
    # The config's act buffer also holds the attention map and the patch slots, so it would fit all 9
    # tokens' hidden rows: the token tile is chosen here.
    sim = DenseLayerSim(cfg, wl["qdense"], token_tile=8, mem_bytes_per_cycle=6, latency=9, stall_prob=0.25,
                        seed=1)
    assert sim.dut.buffer_map.token_tile == 8
    runs = [(wl["h"], wl["x"]), (wl["h"][:5], wl["x"][:5])]
    _check(sim, runs, sim.run(runs), "D16 h64")


def test_bit_exact_odd_config():
    """D=12 (not a power of two), hidden=8 < D, T=7 in token tiles of 3 (not a multiple of pe_rows=4)."""
    cfg = dense_config(dim=12, tokens=7, hidden=8)
    wl = make_dense_workload(12, 8, 7, seed=2)
    sim = DenseLayerSim(cfg, wl["qdense"], token_tile=3, mem_bytes_per_cycle=4, latency=13, stall_prob=0.3,
                        seed=2)
    _check(sim, [(wl["h"], wl["x"])], sim.run([(wl["h"], wl["x"])]), "D12 h8 tile3")


def test_bit_exact_many_weight_tiles_rectangular_array():
    """pe_rows=2 x pe_cols=4, D=12, hidden=40 (a K tail), 11 tokens; small weight halves: several fc1
    and fc2 tiles per token tile."""
    cfg = dense_config(dim=12, tokens=11, hidden=40, pe_rows=2, pe_cols=4, weight_buffer_bytes=512)
    wl = make_dense_workload(12, 40, 11, seed=5)
    sim = DenseLayerSim(cfg, wl["qdense"], stall_prob=0.3, seed=5)
    assert len(sim.layout.tiles) >= 4
    _check(sim, [(wl["h"], wl["x"])], sim.run([(wl["h"], wl["x"])]), "2x4 D12 h40")


def test_extremes_saturate():
    """Operands at their range ends: fc1 and fc2 saturate and the residual add clips; 4x2 array."""
    cfg = dense_config(dim=12, tokens=6, hidden=24, pe_rows=4, pe_cols=2)
    wl = make_dense_workload(12, 24, 6, seed=3, extremes=True)
    sim = DenseLayerSim(cfg, wl["qdense"], token_tile=5, stall_prob=0.2, seed=3)
    want = _check(sim, [(wl["h"], wl["x"])], sim.run([(wl["h"], wl["x"])]), "extremes 4x2")
    lo, hi = numerics.int_range(numerics.RES_BITS)
    assert (want == lo).any() and (want == hi).any(), "the extreme case must saturate both ways"


def test_layout_reproduces_golden_operands():
    """Unpacking the image gives back the GELU table, fc1 and fc2 (panels and parameter words); tiles fit
    a half."""
    cfg = dense_config(dim=12, tokens=5, hidden=40, weight_buffer_bytes=512)
    q = make_dense_workload(12, 40, 5, seed=7)["qdense"]
    image, lay = pack_dense(q, cfg)
    C = cfg.pe_cols
    got = {"fc1": np.zeros((12, 40), dtype=np.int64), "fc2": np.zeros((40, 12), dtype=np.int64)}
    bias = {"fc1": np.zeros(40, dtype=np.int64), "fc2": np.zeros(12, dtype=np.int64)}
    mult = {k: v.copy() for k, v in bias.items()}
    for t in lay.tiles:
        assert t.w_bytes <= lay.weight_half_bytes and t.panels <= lay.param_half_words
        words = np.frombuffer(image[t.w_offset:t.w_offset + t.panels * t.k * C], dtype=np.int8)
        panels = words.reshape(t.panels, t.k, C).transpose(1, 0, 2).reshape(t.k, t.panels * C)
        got[t.kind][:, t.n0:t.n0 + t.n] = panels[:, :t.n]
        b, mu = unpack_params(image[t.p_offset:t.p_offset + t.p_bytes], t.n, C)
        bias[t.kind][t.n0:t.n0 + t.n], mult[t.kind][t.n0:t.n0 + t.n] = b, mu
    for kind in ("fc1", "fc2"):
        qk = getattr(q, kind)
        assert np.array_equal(got[kind], qk.w.T), f"layout: {kind} weights differ"
        assert np.array_equal(bias[kind], qk.bias) and np.array_equal(mult[kind], qk.mult), \
            f"layout: {kind} parameters differ"
    assert [t.kind for t in lay.tiles].index("fc2") == next(t.index for t in lay.tiles if t.first_fc2)
    assert np.array_equal(np.frombuffer(image[:256], dtype=np.uint8), q.gelu_lut), "layout: GELU table (uint8 codes)"
    assert lay.tiles[0].w_offset == lay.lut_bytes
    # fc2 reads the table's bytes as uint8 codes: a signed (s8) table is refused, not misread.
    signed = dataclasses.replace(q, gelu_lut=q.gelu_lut - 128)
    with pytest.raises(ValueError, match=r"gelu_lut must be 256 uint8 codes in \[0, 255\].*range \[-128, "):
        pack_dense(signed, cfg)


def test_buffer_map_token_tile():
    """The default token tile is the largest multiple of pe_rows the act buffer leaves room for."""
    cfg = dense_config(dim=16, tokens=9, hidden=256)     # wide hidden rows: the buffer forces tiling
    bm = dense_buffer_map(cfg)
    assert bm.token_tile < 9, "the default act buffer must force token tiling here"
    assert bm.token_tile % cfg.pe_rows == 0 and bm.act_words <= cfg.act_buffer_words
    assert bm.hid_base + (bm.token_tile + cfg.pe_rows) * bm.hw > cfg.act_buffer_words
    big = cfg.with_(act_buffer_bytes=64 * cfg.act_buffer_bytes)
    assert dense_buffer_map(big).token_tile == 12, "capped at the token capacity rounded to pe_rows"


def test_bad_parameters_are_refused():
    cfg = dense_config(dim=16, tokens=9, hidden=64)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        DenseLayer("tiny")
    with pytest.raises(ValueError, match="token_tile must be in"):
        DenseLayer(cfg, token_tile=10)
    with pytest.raises(ValueError, match="hidden must be in"):
        DenseLayer(cfg, hidden=10_000)
    # The config sizes the act buffer for h plus pe_rows hidden rows (and refuses less, naming the
    # dense MLP); a config that validates elaborates.
    small = dense_config(dim=8, tokens=2, hidden=256)
    need = small.act_buffer_needs["dense"][0]
    assert small.act_buffer_bytes == need == (4 * 2 + 4 * 64) * 4      # the largest user here
    Fragment.get(DenseLayer(small), None)
    with pytest.raises(ValueError, match=rf"act_buffer_bytes must be >= {need} \(dense MLP: "):
        small.with_(act_buffer_bytes=need - small.act_word_bytes)
    # A hidden other than the model's is the caller's: refused by the layer, naming the buffer.
    with pytest.raises(ValueError, match="act_buffer_bytes must be >= .* for the dense MLP"):
        DenseLayer(AcceleratorConfig(model=small.model.with_(mlp_hidden=32, expert_hidden=256), pe_rows=4,
                                     pe_cols=4), hidden=256)
    with pytest.raises(ValueError, match=r"counter_width must be in \[16, 64\], not 8"):
        cfg.with_(counter_width=8)
    with pytest.raises(ValueError, match="mem_data_bytes must be a power of two"):
        dense_config(dim=16, tokens=9, hidden=64, mem_data_bytes=3)


def test_verilog_and_embedding():
    """The layer converts to Verilog alone and embeds through its signature."""
    cfg = dense_config(dim=8, tokens=5, hidden=16)
    text = verilog.convert(EmbeddingHarness(DenseLayer(cfg)), name="dense_top")
    assert "module dense_top" in text


def test_cli_reports_and_refuses(tmp_path, capsys):
    from sim.dense_layer import main
    out = tmp_path / "r.json"
    assert main(["--dim", "8", "--hidden", "12", "--tokens", "5", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["bit_exact"] and rep["mismatches"] == 0 and set(rep["phase_cycles"]) == {"FC1", "FC2"}
    assert main(["--dim", "0"]) == 2
    assert "--dim must be >= 1" in capsys.readouterr().err
    assert main(["--json", str(tmp_path / "no" / "r.json")]) == 2
