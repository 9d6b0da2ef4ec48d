# amaranth: UnusedElaboratable=no
"""AttentionLayer end to end against the golden model: ``x + proj(attention(h))`` bit for bit.

Each case elaborates one AttentionLayer (small configs, 4x4 PEs unless noted) and runs it with the
external memory and every external stream (load, start, read-back) stalling at random. The expected
residual stream comes from ``reference.golden_model.attention`` (query-tiled with the config's q_tile)
and ``golden_model.linear``; a mismatch names the run, token, channel, expected and got. The measured
cycles per phase and the PE-array utilization during attention are printed, not asserted.
"""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment
from amaranth.lib import wiring

from m3vit_hw import numerics
from m3vit_hw.attention import AttentionLayer, pack_attention, plan_attention
from m3vit_hw.attention.attn_layout import buffer_map
from reference import golden as g
from reference import golden_model
from sim.attention_layer import AttnLayerSim, attn_config, golden_attn, make_attn_workload
from sim.testbench import EmbeddingHarness

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _check(sim, runs, results, label):
    cfg = sim.config
    heads = cfg.model.heads
    assert len(results) == len(runs), f"{label}: {len(results)} runs finished, expected {len(runs)}"
    for n, (run, res) in enumerate(zip(runs, results)):
        h, x = run[:2]
        qattn, heads = sim.models[run[2] if len(run) > 2 else 0][:2]
        want = golden_attn(h, x, qattn, heads, cfg.q_tile)
        got = res["x"]
        assert got.shape == want.shape, f"{label} run {n}: read back {got.shape}, expected {want.shape}"
        bad = np.argwhere(got != want)
        if len(bad):
            t, c = bad[0]
            pytest.fail(f"AttentionLayer {label} run {n}: x[{t}, {c}] expected {want[t, c]}, got "
                        f"{got[t, c]} ({len(bad)} mismatches)")
        assert res["weight_bytes"] == res["image_bytes"], (
            f"AttentionLayer {label} run {n}: fetched {res['weight_bytes']} weight bytes, the image is "
            f"{res['image_bytes']} (each tile exactly once)")
        util = res["attn_compute_cycles"] / res["attn_cycles"] if res["attn_cycles"] else 0.0
        print(f"AttentionLayer {label} run {n}: D={h.shape[1]} heads={heads} T={h.shape[0]} bit-exact; {res['cycles']} cycles, "
              f"PE beats {res['compute_cycles']}, phases {res['phase_cycles']}, engine idle "
              f"{res['engine_idle_cycles']}, attention window {res['attn_cycles']} cycles at "
              f"{100 * util:.1f}% PE-busy, softmax busy {res['softmax_cycles']} "
              f"(overlapping PE work {res['overlap_cycles']})")


def _runs(wl, *counts):
    return [(wl["h"][:t], wl["x"][:t]) for t in counts]


def test_bit_exact_two_runs_with_stalls():
    """D=16, 2 heads, T=9 then T=6 on one elaborated design, everything stalling."""
    cfg = attn_config(dim=16, heads=2, tokens=9)
    wl = make_attn_workload(16, 2, 9, seed=1)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=6, latency=9, stall_prob=0.25, seed=1)
    runs = _runs(wl, 9, 6)
    _check(sim, runs, sim.run(runs), "D16 H2")


@pytest.mark.parametrize("dim,heads,pack", [(16, 4, 2), (16, 8, 4)])
def test_bit_exact_packed_heads(dim, heads, pack):
    """Heads of at most half a word share context words (W2's head_dim 32 on 64 columns, here
    head_dim 4 or 2 on 8 columns): the QKV GEMM puts a packed head's V at its lane offset, the AV runs
    from the group's highest lane down with N = (j + 1) * head_dim, the projection's K shrinks by
    ``pack``. Bit-exact with everything stalling; the Q|K|V copy is read by the B operand."""
    cfg = attn_config(dim=dim, heads=heads, tokens=9, pe_cols=8)
    assert cfg.attn_head_pack == pack and cfg.attn_proj_k == dim // (dim // heads * pack) * 8
    wl = make_attn_workload(dim, heads, 9, seed=7)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=6, latency=9, stall_prob=0.25, seed=7)
    runs = _runs(wl, 9, 5)
    _check(sim, runs, sim.run(runs), f"D{dim} H{heads} packed x{pack}")


def test_bit_exact_two_macs_per_dsp():
    """The same layer on the DSP-packed PE array (pe_pack=2): bit-identical, everything stalling."""
    cfg = attn_config(dim=16, heads=2, tokens=9, pe_pack=2)
    wl = make_attn_workload(16, 2, 9, seed=3)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=6, latency=9, stall_prob=0.25, seed=3)
    assert sim.dut.config.pe_pack == 2
    runs = _runs(wl, 9)
    _check(sim, runs, sim.run(runs), "D16 H2 pe_pack 2")


@pytest.mark.parametrize("lanes", [2, 1])
def test_bit_exact_narrow_softmax(lanes):
    """config.softmax_lanes below pe_cols: each score word is cut into C / L softmax beats (the row's
    last word into fewer: T=9 leaves one element in word 2, T=6 two) and the e8 words are gathered
    back, padding lanes zero. Everything stalling."""
    cfg = attn_config(dim=16, heads=2, tokens=9, softmax_lanes=lanes)
    assert cfg.attn_softmax_lanes == lanes
    wl = make_attn_workload(16, 2, 9, seed=5 + lanes)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=6, latency=9, stall_prob=0.25, seed=lanes)
    assert sim.dut.score.softmax.lanes == lanes
    runs = _runs(wl, 9, 6)
    _check(sim, runs, sim.run(runs), f"D16 H2 softmax lanes {lanes}")


def test_bit_exact_odd_config():
    """D=20 (not a power of two), 2 heads of 10 (not a multiple of the 4-lane word: padded heads),
    T=7 (not a multiple of the array) and q_tile=3 (not a multiple of pe_rows); then T=1 on the same
    design."""
    cfg = attn_config(dim=20, heads=2, tokens=7, q_tile=3)
    assert buffer_map(cfg).hw * cfg.pe_cols > cfg.model.head_dim
    wl = make_attn_workload(20, 2, 7, seed=2)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=8, latency=9, stall_prob=0.2, seed=2)
    runs = _runs(wl, 7, 1)
    _check(sim, runs, sim.run(runs), "D20 H2 q_tile 3")


def _shape_runs(wl_default, shapes, tokens, seed):
    """Models of other shapes (their own random workloads) and one run per model."""
    models, runs = [], [(wl_default["h"][:tokens[0]], wl_default["x"][:tokens[0]], 0)]
    for j, ((dim, heads), t) in enumerate(zip(shapes, tokens[1:])):
        wl = make_attn_workload(dim, heads, t, seed=seed + j + 1)
        models.append((wl["qattn"], heads))
        runs.append((wl["h"], wl["x"], j + 1))
    return models, runs


def test_two_models_one_design():
    """One elaborated design (D=32, 2 heads; weight halves small enough that the Q|K and projection
    parts take two tiles each) runs its own model, then D=28 with 2 heads (head_dim 14: padded head
    words; the projection's 7 panels in unequal tiles 4 + 3) and D=24 with 3 heads, chosen at run time
    by the start's ``dims``; every run bit-exact against the golden model with its own heads, with
    random stalls everywhere."""
    cfg = attn_config(dim=32, heads=2, tokens=9, weight_buffer_bytes=1024)
    fields = plan_attention(cfg, dim=28, heads=2).shape_fields()
    assert fields["proj"] == {"panels": 3, "extra": 1, "chunks": 2}, fields
    wl = make_attn_workload(32, 2, 9, seed=21)
    models, runs = _shape_runs(wl, [(28, 2), (24, 3)], [5, 5, 4], seed=21)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=8, latency=9, stall_prob=0.2, seed=21,
                       models=models)
    _check(sim, runs, sim.run(runs), "one design, three shapes")


@pytest.mark.slow
def test_more_models_one_design():
    """More run-time shapes on one design: the design's own shape given explicitly, D=20 with 2 heads,
    D=32 with 4 heads, D=12 with 1 head, D=16 with 4 heads (head_dim 4: one word), q_tile 3, with
    stalls."""
    cfg = attn_config(dim=32, heads=2, tokens=11, q_tile=3, weight_buffer_bytes=1024)
    wl = make_attn_workload(32, 2, 11, seed=31)
    shapes = [(32, 2), (20, 2), (32, 4), (12, 1), (16, 4)]
    models, runs = _shape_runs(wl, shapes, [11, 9, 11, 7, 10, 3], seed=31)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=4, latency=15, stall_prob=0.3, seed=31,
                       models=models)
    _check(sim, runs, sim.run(runs), "one design, more shapes")


def test_run_time_shape_limits():
    """A shape the design's buffers cannot hold is refused by the plan, naming the limit."""
    cfg = attn_config(dim=32, heads=2, tokens=9)
    with pytest.raises(ValueError, match=r"dim must be in \[1, 32\], not 36"):
        plan_attention(cfg, dim=36, heads=2)
    with pytest.raises(ValueError, match="head_dim=32 needs 8 words a head"):
        plan_attention(cfg, dim=32, heads=1)
    with pytest.raises(ValueError, match="heads must divide dim=30, not 4"):
        plan_attention(cfg, dim=30, heads=4)
    with pytest.raises(ValueError, match="heads=10 x 1 words need a context of 10 words"):
        plan_attention(cfg, dim=30, heads=10)


def _saturating_workload(dim, heads, tokens, seed):
    """Equal score rows (the K weights are zero: every key is the bias alone), a saturating AV epilogue
    (out_mult at its maximum, out_shift 0), saturating projection results and residual rows at the
    int16 limits, and h rows at the int8 limits."""
    wl = make_attn_workload(dim, heads, tokens, seed=seed)
    q = wl["qattn"]
    q.qkv.w[dim:2 * dim] = 0
    q.out_mult = (1 << numerics.AV_OUT_MULT_BITS) - 1
    q.out_shift = 0
    q.proj.mult = np.minimum(q.proj.mult * 64, (1 << numerics.MULT_BITS) - 1)
    h, x = wl["h"], wl["x"]
    h[0] = 127
    h[1] = -128
    x[2] = 32767
    x[3] = -32768
    return wl


def test_extremes_equal_rows_and_saturation():
    cfg = attn_config(dim=16, heads=2, tokens=8)
    wl = _saturating_workload(16, 2, 8, seed=3)
    q, h, x = wl["qattn"], wl["h"], wl["x"]
    # The workload really has the extremes (checked on the golden model's intermediates).
    qkv = golden_model.linear(h, q.qkv)
    k0 = qkv[:, 16:16 + 8]
    scores = g.matmul(qkv[:, :8], k0.T)
    assert np.all(scores == scores[:, :1]), "every score row should be constant"
    e8, _ = g.attention_weights(scores, q.c_mult, q.c_shift)
    assert np.all(e8 == 255)
    ctx = golden_model.attention(h, q, 2, cfg.q_tile)
    out = golden_attn(h, x, q, 2, cfg.q_tile)
    assert np.sum(np.abs(ctx) >= 127) > 0 and np.sum(np.abs(out) >= 32767) > 0
    sim = AttnLayerSim(cfg, q, mem_bytes_per_cycle=8, latency=9, stall_prob=0.2, seed=3)
    runs = [(h, x)]
    _check(sim, runs, sim.run(runs), "equal rows + saturation")


def test_extremes_one_hot_rows():
    """A steep softmax (c_mult at its maximum, no shift): rows are one-hot (e8 = 255 at the maximum and
    0 elsewhere) except for exact ties, so the AV reciprocal is at its largest."""
    cfg = attn_config(dim=16, heads=2, tokens=8)
    wl = make_attn_workload(16, 2, 8, seed=4)
    q = wl["qattn"]
    q.c_mult = (1 << numerics.SOFTMAX_MULT_BITS) - 1
    q.c_shift = 0
    qkv = golden_model.linear(wl["h"], q.qkv)
    e8, l = g.attention_weights(g.matmul(qkv[:, :8], qkv[:, 16:24].T), q.c_mult, q.c_shift)
    assert np.sum(e8 == 0) > e8.size // 2
    sim = AttnLayerSim(cfg, q, mem_bytes_per_cycle=8, latency=9, stall_prob=0.2, seed=4)
    runs = _runs(wl, 8)
    _check(sim, runs, sim.run(runs), "one-hot rows")


@pytest.mark.slow
@pytest.mark.parametrize("dim, heads, tokens, q_tile, pe_rows, seed", [
    (24, 2, 13, None, 4, 5), (32, 4, 20, None, 4, 6), (16, 2, 11, 8, 4, 7), (16, 2, 10, 4, 2, 8),
    (16, 2, 10, 5, 8, 9), (12, 3, 5, None, 4, 10), (20, 2, 17, 6, 4, 11),
])
def test_bit_exact_more_configs(dim, heads, tokens, q_tile, pe_rows, seed):
    """More shapes: longer sequences, more heads, q_tile above/below pe_rows, pe_rows != pe_cols."""
    cfg = attn_config(dim=dim, heads=heads, tokens=tokens, q_tile=q_tile, pe_rows=pe_rows)
    wl = make_attn_workload(dim, heads, tokens, seed=seed)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=4, latency=15, stall_prob=0.3, seed=seed)
    runs = _runs(wl, tokens, max(1, tokens - 3))
    _check(sim, runs, sim.run(runs), f"D{dim} H{heads} q_tile {cfg.q_tile} pe_rows {pe_rows}")


@pytest.mark.slow
def test_saturation_more_tiles():
    """The saturating workload with several query tiles and weight tiles (a small weight buffer)."""
    cfg = attn_config(dim=16, heads=2, tokens=14, weight_buffer_bytes=512)
    assert len(plan_attention(cfg).tiles) > 3
    wl = _saturating_workload(16, 2, 14, seed=12)
    sim = AttnLayerSim(cfg, wl["qattn"], mem_bytes_per_cycle=4, latency=9, stall_prob=0.3, seed=12)
    runs = [(wl["h"], wl["x"])]
    _check(sim, runs, sim.run(runs), "saturation, weight tiles")


def test_layout_reproduces_golden_operands():
    """Unpacking the image's panels gives back each head's Q|K|V columns and the projection (padded
    heads: D=20, hd=10 on 4 lanes), and each tile fits one weight-buffer half."""
    cfg = attn_config(dim=20, heads=2, tokens=7, weight_buffer_bytes=640)
    assert len(plan_attention(cfg).tiles) > 3
    q = make_attn_workload(20, 2, 7, seed=13)["qattn"]
    image, lay = pack_attention(q, cfg)
    C, hd, hw = cfg.pe_cols, 10, lay.hw
    got = {}
    for t in lay.tiles:
        assert t.w_bytes <= lay.weight_half_bytes
        words = np.frombuffer(image[t.w_offset:t.w_offset + t.panels * t.k * C], dtype=np.int8)
        panels = words.reshape(t.panels, t.k, C).transpose(1, 0, 2).reshape(t.k, t.panels * C)
        key = ("qkv", t.head) if t.kind == "qkv" else "proj"
        b = got.setdefault(key, np.zeros((t.k, 3 * hw * C if t.kind == "qkv" else 20), dtype=np.int64))
        b[:, t.n0:t.n0 + t.n] = panels[:, :t.n]
    for i in range(2):
        for s in range(3):
            want = q.qkv.w[s * 20 + i * hd: s * 20 + (i + 1) * hd].T
            cols = got[("qkv", i)][:, s * hw * C: s * hw * C + hd]
            assert np.array_equal(cols, want), f"layout: head {i} part {s} columns differ"
        rows = got["proj"][i * hw * C: i * hw * C + hd]
        assert np.array_equal(rows, q.proj.w[:, i * hd:(i + 1) * hd].T), f"layout: proj rows of head {i}"
        assert not got["proj"][i * hw * C + hd:(i + 1) * hw * C].any(), "layout: padding rows must be 0"


def test_bad_configs_are_refused():
    """The config refuses what the layer could not build (naming the buffer, its user and the size);
    a config that validates elaborates, e.g. a q_tile as large as the token capacity (the row table
    grows to two query-tile slots)."""
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        AttentionLayer("tiny")
    cfg = attn_config(dim=16, heads=2, tokens=9)
    need = cfg.act_buffer_needs["attention"][0]
    assert cfg.act_buffer_words >= buffer_map(cfg).act_words
    with pytest.raises(ValueError, match=rf"act_buffer_bytes must be >= {need} \(attention: "):
        cfg.with_(act_buffer_bytes=need - cfg.act_word_bytes)
    with pytest.raises(ValueError, match=r"counter_width must be in \[16, 64\], not 8"):
        cfg.with_(counter_width=8)
    big_q = attn_config(dim=16, heads=2, tokens=9, q_tile=9)
    assert big_q.rowtab_entries >= buffer_map(big_q).rowtab_words
    Fragment.get(AttentionLayer(big_q), None)


def test_verilog_and_embedding():
    """The layer converts to Verilog alone and embeds through its signature."""
    cfg = attn_config(dim=8, heads=2, tokens=5)
    text = verilog.convert(EmbeddingHarness(AttentionLayer(cfg)), name="attn_top")
    assert "module attn_top" in text


def test_sequencer_is_a_datapath_client():
    """AttnSequencer alone: the contract's ports (client, o, e8_wr, rt_wr, start/done/busy, counters)
    with the widths of the datapath it plugs into, it converts to Verilog alone and embeds through its
    signature, and the wrapper's sequencer is one (so every bit-exact test above proves it)."""
    from m3vit_hw.attention import AttnSequencer
    from m3vit_hw.weights.client import GemmClientSignature
    cfg = attn_config(dim=20, heads=2, tokens=7, q_tile=3)
    layer = AttentionLayer(cfg)
    seq = layer.sequencer
    assert isinstance(seq, AttnSequencer)
    members = seq.signature.members
    assert members["client"] == wiring.Out(GemmClientSignature(cfg))
    assert members["o"].signature == layer.engine.signature.members["o"].signature.flip()
    assert members["rt_wr"].signature.members["addr"].shape == cfg.rowtab_addr_bits
    assert members["e8_wr"].signature.members["addr"].shape == (layer.e8_buffer.depth - 1).bit_length()
    for name in ("start", "done", "busy", "cycles", "phase_cycles"):
        assert name in members, f"AttnSequencer: no {name} port"
    text = verilog.convert(EmbeddingHarness(AttnSequencer(cfg, layer.layout, layer.buffer_map)),
                           name="attn_seq")
    assert "module attn_seq" in text
    with pytest.raises(TypeError, match="layout must be an AttnLayout"):
        AttnSequencer(cfg, None, layer.buffer_map)


def test_cli_reports_and_refuses(tmp_path, capsys):
    from sim.attention_layer import main
    out = tmp_path / "r.json"
    assert main(["--dim", "8", "--heads", "2", "--tokens", "5", "--json", str(out)]) == 0
    import json
    rep = json.loads(out.read_text())
    assert rep["bit_exact"] and rep["mismatches"] == 0 and set(rep["phase_cycles"]) == {"QKV", "QK", "AV", "PROJ"}
    assert main(["--dim", "16", "--heads", "3"]) == 2
    assert "--heads must divide --dim" in capsys.readouterr().err
    assert main(["--json", str(tmp_path / "no" / "r.json")]) == 2
