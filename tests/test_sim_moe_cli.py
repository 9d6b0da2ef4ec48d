"""``python -m sim moe-layer``: report, JSON keys, bandwidth sweep, and one-line errors for bad flags."""

import json
import subprocess
import sys

import pytest

from sim import __main__ as sim_main
from sim import moe_layer

SMALL = ["--experts", "3", "--top-k", "2", "--dim", "8", "--expert-hidden", "16", "--tokens", "6"]


def test_module_entry_point_runs_bit_exact(tmp_path):
    """The real command line, end to end: exit 0, readable summary, JSON with the promised keys."""
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, "-m", "sim", "moe-layer", *SMALL, "--stall-prob", "0.2",
                           "--seed", "3", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert "BIT-EXACT" in proc.stdout
    rep = json.loads(out.read_text())
    for key in ("bit_exact", "mismatches", "cycles", "compute_cycles", "weight_bytes_fetched",
                "weight_bytes_minimum", "weight_buffer_bytes", "active_experts", "expert_tokens",
                "gate_bytes_fetched", "config", "mac_per_cycle"):
        assert key in rep, f"moe-layer JSON lacks {key!r}"
    assert rep["bit_exact"] is True and rep["mismatches"] == 0
    assert rep["weight_bytes_fetched"] == rep["weight_bytes_minimum"]
    assert sum(rep["expert_tokens"].values()) == 6 * 2
    assert rep["config"]["experts"] == 3 and rep["config"]["tokens"] == 6


def test_task_and_skew_flags(tmp_path, capsys):
    out = tmp_path / "t.json"
    code = moe_layer.main([*SMALL, "--tasks", "2", "--task", "1", "--skew", "hot", "--pe-rows", "2",
                           "--json", str(out)])
    assert code == 0
    rep = json.loads(out.read_text())
    assert rep["task"] == 1 and rep["bit_exact"]
    assert rep["expert_tokens"]["0"] == 6, "hot skew: expert 0 takes every token"


def test_sweep_mem(tmp_path, capsys):
    """--sweep-mem prints and writes cycles vs bytes/cycle; cycles fall as bandwidth rises."""
    out = tmp_path / "sweep.json"
    code = moe_layer.main([*SMALL, "--sweep-mem", "1,16", "--json", str(out)])
    text = capsys.readouterr().out
    print(text)
    assert code == 0
    assert "cycles vs memory bandwidth" in text
    rep = json.loads(out.read_text())
    pts = rep["sweep"]
    assert rep["knee_bytes_per_cycle"] in (1.0, 16.0)
    assert "memory-bound below" in text
    assert [p["mem_bytes_per_cycle"] for p in pts] == [1.0, 16.0]
    assert all(p["bit_exact"] for p in pts)
    assert pts[0]["cycles"] > pts[1]["cycles"]


@pytest.mark.parametrize("argv, words", [
    (["--top-k", "5", "--experts", "4"], "--top-k must be <= --experts (4), not 5"),
    (["--experts", "0"], "--experts must be >= 1, not 0"),
    (["--task", "2", "--tasks", "2"], r"--task must be in [0, 1], not 2"),
    (["--expert-hidden", "0"], "--expert-hidden must be >= 1, not 0"),
    (["--json", "/no/such/dir/r.json"], "--json /no/such/dir/r.json: directory /no/such/dir does not exist"),
    (["--mem-bytes-per-cycle", "0"], "--mem-bytes-per-cycle must be > 0, not 0.0"),
    (["--stall-prob", "1.5"], "--stall-prob must be in [0, 1), not 1.5"),
    (["--sweep-mem", "1,x"], "--sweep-mem must be a comma-separated list of numbers"),
    (["--weight-buffer-bytes", "64"], "weight_buffer_bytes must be >= "),
])
def test_bad_flags_one_line_error(argv, words, capsys):
    code = moe_layer.main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: "), f"expected one error line, got {err!r}"
    assert words in err


def test_argparse_errors_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as exc:
        moe_layer.main(["--experts", "four"])
    assert exc.value.code != 0
    assert "invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        moe_layer.main(["--skew", "lukewarm"])
    assert exc.value.code != 0


def test_dispatcher(capsys):
    assert sim_main.main([]) == 2
    assert "moe-layer" in capsys.readouterr().out
    assert sim_main.main(["no-such"]) == 2
    assert "unknown command 'no-such'" in capsys.readouterr().err
