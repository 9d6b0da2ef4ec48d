# amaranth: UnusedElaboratable=no
"""The performance report (:mod:`sim.perf_report`): arithmetic, summary, plots, CLI."""

import json

import pytest

from m3vit_hw.config import AcceleratorConfig
from sim import perf_report as pr
from sim.perf_model import OP_CLASSES


@pytest.fixture(scope="module")
def tiny():
    return AcceleratorConfig.from_preset("tiny")


def test_report_arithmetic(tiny):
    counters = {"cycles": 1000, "macs": 8000, "breakdown": {"experts": 500, "memory_stall": 100},
                "weight_bytes_fetched": 300, "weight_bytes_minimum": 200}
    rep = pr.make_report(counters, tiny, clock_mhz=250)
    assert rep["peak_mac_per_cycle"] == 16
    assert rep["utilization"] == 8000 / (1000 * 16)
    assert rep["latency_ms"] == 1000 / 250e3
    assert rep["breakdown"]["idle"] == 400           # what no class claims
    assert abs(sum(rep["breakdown"].values()) - 1000) < 1e-6
    assert set(rep["breakdown"]) == set(OP_CLASSES)
    assert rep["projected"] is False and rep["clock_mhz_assumed"] == 250
    assert pr.make_report(counters, tiny)["clock_mhz_assumed"] == tiny.clock_mhz


def test_memory_line_names_the_hp_ports(tiny):
    """The bandwidth a report assumes, capped at one beat a cycle, and the 128-bit HP ports it needs."""
    assert [pr.hp_ports_needed(b) for b in (8, 16, 17, 48, 64, 65)] == [1, 1, 2, 3, 4, None]
    wide = tiny.with_(mem_data_bytes=64)
    text = pr.summary(pr.make_report({"cycles": 10, "mem_bytes_per_cycle": 64}, wide, clock_mhz=300))
    assert "64 B/cycle = 19.2 GB/s: 4 x 128-bit HP ports at full rate" in text, text
    rep = pr.make_report({"cycles": 10, "mem_bytes_per_cycle": 64}, tiny, clock_mhz=300)
    assert rep["mem_bytes_per_cycle_effective"] == tiny.mem_data_bytes == 16
    assert "16 B/cycle (64 asked; one memory beat a cycle at most)" in pr.summary(rep)


def test_report_errors(tiny):
    with pytest.raises(ValueError, match="cycles"):
        pr.make_report({"cycles": 0}, tiny)
    with pytest.raises(ValueError, match="op class must be one of"):
        pr.make_report({"cycles": 10, "breakdown": {"gpu": 1}}, tiny)


def test_projected_frame_summary_and_plot(tmp_path, tiny):
    from sim.perf_model import project_frame
    rep = pr.make_report(project_frame(tiny), tiny)
    text = pr.summary(rep, "tiny")
    print(text)
    assert "PROJECTED" in text and "utilization" in text and "ms at 300 MHz" in text
    path = tmp_path / "b.png"
    pr.plot_breakdown([("tiny", rep), ("again", rep)], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_knee_and_plot(tmp_path):
    pts = [{"mem_bytes_per_cycle": b, "cycles": c} for b, c in ((1, 800), (2, 400), (4, 210), (8, 200))]
    assert pr.sweep_knee(pts) == 4
    pr.plot_sweep(pts, tmp_path / "s.png", compute=200)
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_from_runner_moe(tiny):
    """A MoE-layer runner report (pysim) becomes simulated counters with its own cycles."""
    from sim.moe_layer import run_moe_layer
    rep = run_moe_layer(experts=3, top_k=2, dim=8, hidden=16, tokens=6, pe_rows=2, pe_cols=2)
    c = pr.from_runner(json.loads(json.dumps(rep)))
    assert c["cycles"] == rep["cycles"] and c["projected"] is False and c["source"] == "moe-layer"
    assert c["breakdown"]["router"] == rep["timing"]["t_first_expert_gemm"]
    out = pr.make_report(c, pr._runner_config(rep))
    assert out["peak_mac_per_cycle"] == 4 and 0 < out["utilization"] <= 1
    with pytest.raises(ValueError, match="not a runner report"):
        pr.from_runner({"cycles": 5})


def test_from_frame_maps_op_classes(tiny):
    from sim.perf_model import project_frame
    split = project_frame(tiny, routing="uniform")
    frame = {"cycles": 1000, "macs": 5000, "bit_exact": True,
             "cycles_per_op_class": {"load_image": 100, "layernorm": 50, "attention": 300, "moe": 400,
                                     "gemm": 100, "store": 10}}
    c = pr.from_frame(frame, tiny, split=split)
    bd = c["breakdown"]
    assert bd["patch_embed"] == 100 and bd["dense_mlp"] == 100 and bd["store"] == 10
    assert abs(bd["qkv_proj"] + bd["attn_matmul"] + bd["softmax"] - 300) < 1e-6
    assert abs(bd["router"] + bd["experts"] - 400) < 1e-6
    rep = pr.make_report(c, tiny)
    assert rep["breakdown"]["idle"] == 40


def test_cli_projection_json_plot(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    assert pr.main(["--preset", "tiny", "--layer", "moe", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "PROJECTED" in out
    rep = json.loads(js.read_text())
    assert rep["projected"] is True and png.exists()


def test_cli_sweep(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert pr.main(["--preset", "tiny", "--layer", "moe", "--mem-bytes-per-cycle", "0.25,1,4,16",
                    "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "memory-bound below" in out and png.exists()


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "tiny", "--mem-bytes-per-cycle", "a,b"], "--mem-bytes-per-cycle must be"),
    (["--preset", "tiny", "--mem-bytes-per-cycle", "0"], "must be > 0"),
    (["--preset", "tiny", "--plot", "x.jpg"], "--plot must name a .png"),
    (["--preset", "tiny", "--plot", "/nonexistent/dir/x.png"], "--plot"),
    (["--preset", "tiny", "--task", "5"], "--task must be in"),
    (["--layer", "moe"], "--preset is required"),
    (["--preset", "tiny", "--arrays", "4by4"], "--arrays must be"),
])
def test_cli_errors_one_line(capsys, argv, msg):
    assert pr.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and err.count("\n") == 1
