# amaranth: UnusedElaboratable=no
"""MoELayer end to end against reference.golden_model.moe_layer: bit-exact for E in {1, 2, 3, 16, 64}.

Each case elaborates one MoELayer (4x4 PEs, D=16, h=32, two tasks) and runs two or three layers on it
back to back: different tasks (one of them skewed: ``hot`` = one expert takes every token's first slot,
``sparse`` = only k experts get tokens), different token data and uneven token counts. The external
memory and every external stream (load, start, read-back) stall randomly. Each run must be bit-exact,
its per-expert token counts must equal the golden routing, and the bytes fetched must be exactly the
active experts' bytes (idle experts never fetched) plus one gate record.
"""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment, Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.lib.mem_port import ReadPortSignature
from m3vit_hw.moe.moe_layer import LoadLayout, MoELayer
from m3vit_hw.moe.reorder_controller import LayerStartLayout
from reference import golden_model
from sim.moe_layer import MoELayerSim, moe_config
from sim.moe_workload import make_moe_workload

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

D, H = 16, 32


def _check_runs(sim, runs, results, label):
    """Bit-exact, routing counts and fetch accounting of every run; prints the measured figures."""
    qmoe, k = sim.qmoe, sim.config.model.top_k
    lay = sim.layout
    assert len(results) == len(runs), f"{label}: {len(results)} runs finished, expected {len(runs)}"
    for n, ((h, x, task), res) in enumerate(zip(runs, results)):
        # One gate for several tasks is the task-embedding router's form (shared gate + task bias).
        multi_gate = len(qmoe.gates) == sim.config.model.num_tasks
        want, routing = golden_model.moe_layer(x, h, qmoe, task, k, multi_gate=multi_gate)
        got = res["x"]
        assert got.shape == want.shape, f"{label} run {n}: read back {got.shape}, expected {want.shape}"
        bad = np.argwhere(got != want)
        if len(bad):
            t, c = bad[0]
            pytest.fail(f"MoELayer {label} run {n} (task {task}): x[{t}, {c}] expected {want[t, c]}, "
                        f"got {got[t, c]} ({len(bad)} mismatches)")
        active = [int(e) for e in routing["active"]]
        counts = {e: int(np.sum(routing["experts"] == e)) for e in active}
        assert res["expert_tokens"] == counts, (
            f"MoELayer {label} run {n}: expert token counts expected {counts}, got {res['expert_tokens']}")
        assert res["active_experts"] == len(active)
        minimum = sum(lay.weight_bytes(e) for e in active)
        assert res["expert_bytes"] == minimum, (
            f"MoELayer {label} run {n}: fetched {res['expert_bytes']} expert bytes, minimum {minimum}")
        assert res["gate_bytes"] == lay.gate_bytes, (
            f"MoELayer {label} run {n}: fetched {res['gate_bytes']} gate bytes, one record is {lay.gate_bytes}")
        assert not res["overflow"]
        print(f"MoELayer {label} run {n}: task {task}, T={h.shape[0]}, {len(active)} active "
              f"{counts}, bit-exact; {res['cycles']} cycles, compute {res['compute_cycles']}, "
              f"fetched {res['expert_bytes']} = minimum {minimum} B (+{res['gate_bytes']} gate B)")


# (E, k, [(task skew, tokens) per run][, seed]); every case has two tasks, task 0 unskewed.
CASES = [
    (1, 1, [("none", 8), ("hot", 5)]),
    (2, 1, [("none", 12), ("sparse", 9)]),
    (2, 2, [("none", 10), ("hot", 7)]),
    (3, 1, [("hot", 11), ("none", 6)]),
    (3, 2, [("sparse", 9), ("none", 13), ("sparse", 4)]),
    # Regression: with this seed the router's softmax back-pressures the last token's beat; the router
    # once raised ``drained`` (handing the bias port back to the engine) before that beat was forked.
    (3, 2, [("none", 24), ("hot", 17)], 100),
    (16, 1, [("none", 16), ("sparse", 10)]),
    (16, 2, [("none", 12), ("hot", 9)]),
    (16, 4, [("none", 8), ("sparse", 6)]),
    (64, 1, [("none", 10), ("hot", 5)]),
    (64, 2, [("none", 8), ("sparse", 6)]),
    (64, 4, [("none", 7), ("hot", 5)]),
]


def _case(E, k, plan, seed, *, stall=0.2, bandwidth=5.0, weight_buffer_bytes=None):
    """One design, one parameter image (task 0 = ``none``, task 1 = the plan's skew), several runs."""
    skews = {s for s, _ in plan} - {"none"}
    assert len(skews) <= 1, "a plan uses one skewed task"
    skew1 = skews.pop() if skews else "none"
    cap = max(t for _, t in plan)
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=cap, tasks=2,
                     weight_buffer_bytes=weight_buffer_bytes)
    base = make_moe_workload(E, k, D, H, cap, tasks=2, seed=seed, skew=("none", skew1))
    runs = []
    for n, (skew, tokens) in enumerate(plan):
        data = make_moe_workload(E, k, D, H, tokens, tasks=2, seed=seed + 1000 * (n + 1))
        runs.append((data["h"], data["x"], 0 if skew == "none" else 1))
    sim = MoELayerSim(cfg, base["qmoe"], mem_bytes_per_cycle=bandwidth, latency=9, stall_prob=stall,
                      seed=seed)
    return sim, runs


@pytest.mark.parametrize("case", CASES, ids=[f"E{c[0]}-k{c[1]}" + (f"-seed{c[3]}" if len(c) > 3 else "")
                                             for c in CASES])
def test_bit_exact_with_stalls(case):
    E, k, plan = case[:3]
    sim, runs = _case(E, k, plan, seed=case[3] if len(case) > 3 else E * 31 + k)
    results = sim.run(runs)
    _check_runs(sim, runs, results, f"E={E} k={k}")


def test_bit_exact_experts_in_several_tiles():
    """A weight buffer of 2 x 128 B: each expert streams as 4 fc1 tiles (2 panels each) and 4 fc2
    tiles (1 panel each), so N-chunked fc1 writes the hidden region in column blocks and fc2
    accumulates into the residual in column blocks."""
    sim, runs = _case(5, 2, [("none", 10), ("hot", 7)], seed=77, weight_buffer_bytes=256)
    assert len(sim.layout.tiles) == 8
    _check_runs(sim, runs, sim.run(runs), "E=5 k=2 in 8 tiles")


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("E, k", [(3, 2), (16, 2), (16, 4), (64, 4)])
def test_bit_exact_more_seeds(E, k, seed):
    """More seeds, longer layers, lower bandwidth and heavier stalls (slow)."""
    for n, plan in enumerate(([("none", 24), ("hot", 17)], [("sparse", 21), ("none", 9)])):
        sim, runs = _case(E, k, plan, seed=100 + 10 * seed + n, stall=0.35, bandwidth=2.5)
        _check_runs(sim, runs, sim.run(runs), f"E={E} k={k} seed={seed}")


def test_extremes_saturation_and_ties():
    """Saturating residuals (x at the int16 limits, fc2 outputs pushed to saturation, so the ascending
    expert order matters), a zero row of h (all logits tie: experts 0..k-1, equal weights) and rows at
    the int8 limits."""
    E, k, T = 4, 2, 8
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T)
    wl = make_moe_workload(E, k, D, H, T, seed=11)
    q = wl["qmoe"]
    q.fc2.mult = np.minimum(q.fc2.mult * 64, (1 << 24) - 1)       # fc2 results saturate int16
    h, x = wl["h"].copy(), wl["x"].copy()
    h[0] = 0
    h[1] = 127
    h[2] = -128
    x[3:5] = 32767
    x[5] = -32768
    x[6, ::2] = 32000
    sim = MoELayerSim(cfg, q, mem_bytes_per_cycle=4, latency=9, stall_prob=0.2, seed=11)
    runs = [(h, x, 0)]
    results = sim.run(runs)
    _check_runs(sim, runs, results, "extremes")
    want, routing = golden_model.moe_layer(x, h, q, 0, k, multi_gate=True)
    assert list(routing["experts"][0]) == list(range(k)), "a zero row should tie to experts 0..k-1"
    sat = int(np.sum(np.abs(want) >= 32767))
    print(f"MoELayer extremes: {sat} saturated outputs, bit-exact")
    assert sat > 0


def test_task_switch_without_reelaboration():
    """One elaborated design, one parameter image with two tasks' gates: task 0, task 1, task 0 again
    (the same tokens) are each bit-exact, and the two tasks route differently."""
    E, k, T = 6, 2, 10
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T, tasks=2)
    wl = make_moe_workload(E, k, D, H, T, tasks=2, seed=5)
    sim = MoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=4, latency=9, stall_prob=0.15, seed=5)
    runs = [(wl["h"], wl["x"], 0), (wl["h"], wl["x"], 1), (wl["h"], wl["x"], 0)]
    results = sim.run(runs)
    _check_runs(sim, runs, results, "task switch")
    assert results[0]["expert_tokens"] != results[1]["expert_tokens"], "the two tasks should route differently"
    assert results[0]["expert_tokens"] == results[2]["expert_tokens"]
    assert np.array_equal(results[0]["x"], results[2]["x"])


def test_task_embedding_router_shared_gate():
    """The task-embedding router: one shared gate matrix plus a per-task logit bias (the folded task
    representation). Both tasks, on one elaborated design, are bit-exact and route differently."""
    E, k, T = 8, 2, 12
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T, tasks=2)
    wl = make_moe_workload(E, k, D, H, T, tasks=2, seed=7, router="task_embedding")
    assert len(wl["qmoe"].gates) == 1
    sim = MoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=4, latency=9, stall_prob=0.15, seed=7)
    runs = [(wl["h"], wl["x"], 0), (wl["h"], wl["x"], 1)]
    results = sim.run(runs)
    _check_runs(sim, runs, results, "task-embedding router")
    assert results[0]["expert_tokens"] != results[1]["expert_tokens"], "the two tasks should route differently"


def test_weight_buffer_is_independent_of_experts():
    """At the same D, h and PE array, E=2 and E=64 get the same weight buffer (one expert per half)."""
    sizes = {}
    for E in (2, 64):
        cfg = moe_config(experts=E, top_k=2, dim=D, hidden=H, tokens=16)
        layer = MoELayer(cfg)
        sizes[E] = (cfg.weight_buffer_bytes, 2 * layer.wbuf.half_bytes, layer.layout.expert_stride)
    print(f"MoELayer weight buffer: E=2 {sizes[2][0]} B, E=64 {sizes[64][0]} B "
          f"(expert image {sizes[2][2]} B each)")
    assert sizes[2] == sizes[64]
    assert sizes[2][0] == sizes[2][1]


def test_weight_buffer_does_not_grow_with_the_gate():
    """Issue 7: at D=40, h=24 the E=64 gate (16 panels of 160 B) is larger than one expert half
    (1920 B), yet the default weight buffer is the same as at E=2: the gate streams in N-chunks."""
    sizes = {}
    for E in (2, 16, 64):
        cfg = moe_config(experts=E, top_k=2, dim=40, hidden=24, tokens=23, tasks=3)
        sizes[E] = (cfg.weight_buffer_bytes, cfg.param_buffer_words, cfg.gate_chunks)
    print(f"D=40 h=24 4x4 PEs: (weight buffer B, param words, gate chunks) per E: {sizes}")
    assert sizes[2][:2] == sizes[16][:2] == sizes[64][:2]
    assert sizes[64][2] == (8, 8), "the E=64 gate should need two chunks at this buffer"
    assert 16 * 40 * 4 > sizes[64][0] // 2, "the whole E=64 gate would not fit one half"


def test_bit_exact_gate_in_chunks():
    """A gate four times larger than a weight half (E=64, D=16, h=8: 16 gate panels of 64 B, halves
    of one 256-byte expert): it runs in 4 chunks, two tasks back to back, with stalls; bit-exact,
    every active expert and the gate fetched exactly once, and the same buffers as E=2."""
    E, k, Dg, Hg = 64, 1, 16, 8
    cfg = moe_config(experts=E, top_k=k, dim=Dg, hidden=Hg, tokens=6, tasks=2)
    assert cfg.weight_buffer_bytes == moe_config(experts=2, top_k=k, dim=Dg, hidden=Hg, tokens=6,
                                                 tasks=2).weight_buffer_bytes
    assert cfg.gate_chunks == (4, 4, 4, 4), cfg.gate_chunks
    base = make_moe_workload(E, k, Dg, Hg, 6, tasks=2, seed=5, skew=("none", "sparse"))
    runs = []
    for n, (task, tokens) in enumerate(((0, 6), (1, 5))):
        data = make_moe_workload(E, k, Dg, Hg, tokens, tasks=2, seed=5 + 1000 * (n + 1))
        runs.append((data["h"], data["x"], task))
    sim = MoELayerSim(cfg, base["qmoe"], mem_bytes_per_cycle=5.0, latency=9, stall_prob=0.2, seed=5)
    assert len(sim.layout.gate_tiles) == 4
    _check_runs(sim, runs, sim.run(runs), f"E={E} gate in 4 chunks")


@pytest.mark.slow
def test_e64_d40_h24_gate_chunks_bit_exact():
    """The issue's shape (E=64, top-2, D=40, h=24, T=23, task 2 of 3) at the E=2 default buffer, with
    stalls: bit-exact, fetched bytes == minimum (about 70 s in pysim)."""
    from sim.moe_layer import run_moe_layer
    rep = run_moe_layer(experts=64, top_k=2, dim=40, hidden=24, tokens=23, tasks=3, task=2, seed=0,
                        stall_prob=0.2)
    e2 = moe_config(experts=2, top_k=2, dim=40, hidden=24, tokens=23, tasks=3)
    print(f"E=64 D=40 h=24: {rep['cycles']} cycles, weight buffer {rep['weight_buffer_bytes']} B "
          f"(E=2: {e2.weight_buffer_bytes} B), gate in {rep['gate_chunks']} chunks, fetched "
          f"{rep['weight_bytes_fetched']} of minimum {rep['weight_bytes_minimum']} B")
    assert rep["bit_exact"], rep["first_mismatch"]
    assert rep["weight_buffer_bytes"] == e2.weight_buffer_bytes
    assert rep["gate_chunks"] == 2
    assert rep["weight_bytes_fetched"] == rep["weight_bytes_minimum"]
    assert rep["gate_bytes_fetched"] == rep["gate_bytes_minimum"]


def test_verilog_and_embedding():
    """The MoELayer converts alone, and embeds in an outer design through wiring.connect."""
    cfg = moe_config(experts=3, top_k=2, dim=8, hidden=16, tokens=6)
    text = verilog.convert(MoELayer(cfg), name="moe_layer")
    assert "module moe_layer" in text

    class Outer(wiring.Component):
        """A host-facing shell: the layer's streams and memory port, re-exported."""

        def __init__(self):
            self.layer = MoELayer(cfg)
            super().__init__({
                "start": In(stream.Signature(LayerStartLayout(cfg))),
                "load": In(stream.Signature(LoadLayout(cfg))),
                "mem": Out(ReadPortSignature()),
                "done": Out(1),
            })

        def elaborate(self, platform):
            m = Module()
            m.submodules.layer = layer = self.layer
            wiring.connect(m, wiring.flipped(self.start), layer.start)
            wiring.connect(m, wiring.flipped(self.load), layer.load)
            wiring.connect(m, layer.mem, wiring.flipped(self.mem))
            m.d.comb += [self.done.eq(layer.done), layer.rd_data.ready.eq(1)]
            return m

    assert "module outer" in verilog.convert(Outer(), name="outer")


def test_bad_config():
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig, not 3"):
        MoELayer(3)


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(counter_width=8), ValueError, r"counter_width must be in \[16, 64\], not 8"),
    (dict(mem_data_bytes=6), ValueError, "mem_data_bytes must be a power of two"),
    (dict(arbiter_depth=0), ValueError, r"arbiter_depth must be in \[1, 256\], not 0"),
    (dict(weight_buffer_bytes=64), ValueError, r"weight_buffer_bytes must be >= 256 \(each half must "
                                               r"hold one weight panel of largest_weight_k=32"),
])
def test_sizes_the_layer_cannot_use_are_refused_by_the_config(kwargs, exc, words):
    """What the layer needs is checked when its config is built: a config that validates elaborates."""
    base = moe_config(experts=kwargs.pop("experts", 4), top_k=2, dim=D, hidden=H, tokens=8)
    with pytest.raises(exc, match=words) as info:
        base.with_(**kwargs)
    print(info.value)


@pytest.mark.parametrize("name, sizing", [(n, "small") for n in ("tiny", "tiny-task-embedding",
                                                                  "vit-tiny-cityscapes", "vit-small-nyud")]
                         + [pytest.param("vit-tiny-cityscapes", "default", marks=pytest.mark.slow)])
def test_every_preset_elaborates(name, sizing):
    """Each preset's config validates, so a MoELayer for it must elaborate (W2 included: its
    activation buffer is sized for the MoE layer's h rows and hidden region, T x (D + h)). W1's
    default is device-sized (32 x 64): slow."""
    cfg = AcceleratorConfig.from_preset(name, sizing=sizing)
    layer = MoELayer(cfg)
    Fragment.get(layer, None)
    print(f"{name}: act buffer {cfg.act_buffer_bytes} B, weight buffer {cfg.weight_buffer_bytes} B, "
          f"{len(layer.layout.tiles)} tiles per expert")


@pytest.mark.slow
def test_w1_shaped_layer_zero_overhead():
    """W1's routing shape (E=16, top-2, T=129 tokens) at reduced widths (D=64, h=128) on an 8x8 array,
    above the compute-balance bandwidth: bit-exact, every active expert fetched exactly once, and the
    non-compute cycles within the first tile's load plus 2% of the compute cycles. About 100 s."""
    from sim.moe_layer import run_moe_layer
    rep = run_moe_layer(experts=16, top_k=2, dim=64, hidden=128, tokens=129, tasks=2, task=0, seed=1,
                        mem_bytes_per_cycle=16.0, pe_rows=8, pe_cols=8)
    print(f"W1-shaped MoE layer: {rep['cycles']} cycles, compute {rep['compute_cycles']}, overhead "
          f"{rep['overhead_cycles']} <= {rep['overhead_bound']}; {rep['mac_per_cycle']} MAC/cycle of "
          f"{rep['peak_mac_per_cycle']}; fetched {rep['weight_bytes_fetched']} of minimum "
          f"{rep['weight_bytes_minimum']} B")
    assert rep["bit_exact"], rep["first_mismatch"]
    assert rep["weight_bytes_fetched"] == rep["weight_bytes_minimum"]
    assert rep["within_bound"], (rep["overhead_cycles"], rep["overhead_bound"])


@pytest.mark.parametrize("data_bytes", [pytest.param(4, marks=pytest.mark.slow), 16,
                                        pytest.param(64, marks=pytest.mark.slow)])
def test_router_record_and_gelu_table_from_memory(data_bytes):
    """The client's own table fetch (the encoder's MOE instruction path): no GELU table through
    ``load`` and ``c_mult = c_shift = 0`` in ``start``; the client reads each task's router record and
    the GELU table through its ``mem`` port (the wrapper's third arbiter master). Two tasks back to back
    with memory and stream stalls, at memory beats narrower than, equal to and wider than a record."""
    E, k = 5, 2
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=9, tasks=2).with_(mem_data_bytes=data_bytes)
    base = make_moe_workload(E, k, D, H, 9, tasks=2, seed=21, skew=("none", "hot"))
    runs = []
    for n, (task, tokens) in enumerate(((1, 9), (0, 7))):
        data = make_moe_workload(E, k, D, H, tokens, tasks=2, seed=21 + 1000 * (n + 1))
        runs.append((data["h"], data["x"], task))
    sim = MoELayerSim(cfg, base["qmoe"], mem_bytes_per_cycle=4, latency=9, stall_prob=0.2, seed=21,
                      tables_from_memory=True)
    assert sim.start_fields(1, 9)["c_mult"] == 0 and sim.start_fields(1, 9)["lut_fetch"] == 1
    _check_runs(sim, runs, sim.run(runs), f"tables from memory, {data_bytes}-byte beats")


def _check_model_runs(sim, runs, results, label):
    """Bit-exact and fetch accounting of runs ``(h, x, task, model)`` of several models on one design."""
    for n, ((h, x, task, model), res) in enumerate(zip(runs, results)):
        md = sim.models[model]
        q, k, lay = md["qmoe"], md["top_k"], md["layout"]
        multi_gate = len(q.gates) == lay.tasks
        want, routing = golden_model.moe_layer(x, h, q, task, k, multi_gate=multi_gate)
        bad = np.argwhere(res["x"] != want)
        if len(bad):
            t, c = bad[0]
            pytest.fail(f"MoELayer {label} run {n} (model {model}, task {task}): x[{t}, {c}] expected "
                        f"{want[t, c]}, got {res['x'][t, c]} ({len(bad)} mismatches)")
        active = [int(e) for e in routing["active"]]
        counts = {e: int(np.sum(routing["experts"] == e)) for e in active}
        assert res["expert_tokens"] == counts, (
            f"MoELayer {label} run {n}: expert token counts expected {counts}, got {res['expert_tokens']}")
        minimum = sum(lay.weight_bytes(e) for e in active)
        assert res["expert_bytes"] == minimum, (
            f"MoELayer {label} run {n}: fetched {res['expert_bytes']} expert bytes, minimum {minimum}")
        assert res["gate_bytes"] == lay.gate_bytes
        print(f"MoELayer {label} run {n}: model {model} (E={lay.experts} top-{k} h={lay.hidden}, "
              f"{len(lay.tiles)} tiles), task {task}, T={h.shape[0]}, active {counts}, bit-exact; "
              f"{res['cycles']} cycles, compute {res['compute_cycles']}")


@pytest.mark.parametrize("E, k, small, weight_buffer_bytes, tables_from_memory", [
    (4, 2, (3, 1, 24), None, False),
    pytest.param(4, 2, (3, 1, 24), None, True, marks=pytest.mark.slow),
    (5, 2, (2, 2, 12), 256, False),
])
def test_one_design_runs_two_models(E, k, small, weight_buffer_bytes, tables_from_memory):
    """Run-time model shape: ONE elaborated design (E experts, top-k, D=16, h=32, two tasks) runs its
    own model and a smaller one (fewer experts: a padded gate; its own k from the start; a narrower
    expert hidden: its expert plan table fetched at start) back to back, alternating, with memory
    and stream stalls; every run bit-exact against reference.golden_model.moe_layer with that model's
    parameters, and each model's active experts fetched exactly once. With a 256-byte weight buffer
    the design's plan has 8 tiles and the small model's 4 (a padded plan table)."""
    T = 10
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T, tasks=2,
                     weight_buffer_bytes=weight_buffer_bytes)
    big = make_moe_workload(E, k, D, H, T, tasks=2, seed=31)
    small = make_moe_workload(*small[:2], D, small[2], T, tasks=2, seed=32, skew=("none", "hot"))
    runs = []
    for n, (model, task, tokens) in enumerate(((1, 0, 10), (0, 1, 9), (1, 1, 8), (0, 0, 10))):
        data = make_moe_workload(E, k, D, H, tokens, tasks=2, seed=40 + n)
        runs.append((data["h"], data["x"], task, model))
    sim = MoELayerSim(cfg, big["qmoe"], mem_bytes_per_cycle=4, latency=9, stall_prob=0.2, seed=31,
                      tables_from_memory=tables_from_memory, models=[(small["qmoe"], small["top_k"])])
    lay = sim.models[1]["layout"]
    assert lay.hidden < H and lay.gate_cols == E and lay.experts < E
    _check_model_runs(sim, runs, sim.run(runs), "two models" + (" (tables from memory)" if tables_from_memory else ""))


def test_run_time_shape_is_checked():
    """A smaller model must fit the design: hidden, experts and tasks at most the design's, and a
    padded gate only with a router scale that gives padded experts probability exactly 0."""
    from m3vit_hw.moe.expert_layout import pack_moe, pack_plan, plan_moe, start_fields
    cfg = moe_config(experts=4, top_k=2, dim=D, hidden=H, tokens=8, tasks=2)
    with pytest.raises(ValueError, match=r"hidden must be in \[1, 32\], not 33"):
        plan_moe(cfg, hidden=H + 1)
    with pytest.raises(ValueError, match=r"experts must be in \[1, 4\], not 5"):
        plan_moe(cfg, experts=5)
    with pytest.raises(ValueError, match=r"tasks must be in \[1, 2\], not 3"):
        plan_moe(cfg, tasks=3)
    lay = plan_moe(cfg, hidden=20, experts=3)
    assert len(pack_plan(lay, cfg)) == len(plan_moe(cfg).tiles) * 32
    small = make_moe_workload(3, 1, D, 20, 8, tasks=2, seed=3)["qmoe"]
    with pytest.raises(ValueError, match="top_k must be in"):
        start_fields(small, 0, 8, lay, top_k=4, plan_addr=0)
    small.router_c_mult = np.zeros_like(np.asarray(small.router_c_mult))
    with pytest.raises(ValueError, match="too small for a padded gate"):
        pack_moe(small, cfg, layout=lay)
