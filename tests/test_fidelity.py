"""The fidelity CLI on a small preset."""

import json

import pytest

from reference import fidelity


def test_fidelity_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert fidelity.main(["--preset", "tiny", "--seed", "3", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cosine" in text and "routing agreement" in text
    r = json.loads(out.read_text())
    for key in ("cosine", "sqnr_db", "per_layer_sqnr_db", "routing_agreement", "preset", "seed", "task"):
        assert key in r, key
    assert r["preset"] == "tiny" and r["seed"] == 3 and r["task"] == "all"
    assert len(r["per_layer_sqnr_db"]) == 4
    assert 0.0 <= r["routing_agreement"] <= 1.0
    print(f"tiny fidelity: cosine {r['cosine']:.5f}, SQNR {r['sqnr_db']:.1f} dB, routing {r['routing_agreement']:.3f}")
    # A small model with trained-like weights must still be a faithful integer copy.
    assert r["cosine"] > 0.99


def test_fidelity_cli_single_task(tmp_path):
    out = tmp_path / "f.json"
    assert fidelity.main(["--preset", "tiny-task-embedding", "--task", "depth", "--images", "1",
                          "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["task"] == "depth" and list(r["per_task"]) == ["depth"]


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "preset must be one of"),
    (["--preset", "tiny", "--task", "nope"], "task must be one of"),
    (["--preset", "tiny", "--images", "0"], "images"),
])
def test_fidelity_cli_bad_arguments_give_one_line(argv, needle, capsys):
    assert fidelity.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
