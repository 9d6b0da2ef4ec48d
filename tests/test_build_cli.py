"""``python -m m3vit_hw.build``: outputs, bad input, the E-independence of the weight buffer."""

import json
import subprocess
import sys

import pytest

from m3vit_hw.build.__main__ import main
from m3vit_hw.build.flow import fits, vivado_tcl
from m3vit_hw.config import AcceleratorConfig


def test_bad_flag_is_one_line(capsys):
    assert main(["--experts", "16", "--bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bogus" in err


def test_impossible_config_is_one_line(capsys):
    assert main(["--experts", "16", "--axi-masters", "5", "--no-synth", "--out", "/tmp/never"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "axi_masters must be in [1, 4], not 5" in err
    assert main(["--experts", "16", "--top-k", "17", "--no-synth"]) == 2
    assert "top_k" in capsys.readouterr().err


def test_out_path_checked_before_work(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--experts", "4", "--preset", "tiny", "--out", str(f), "--no-synth"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_weight_buffer_independent_of_experts():
    a = AcceleratorConfig.from_preset("vit-tiny-cityscapes", experts=16)
    b = AcceleratorConfig.from_preset("vit-tiny-cityscapes", experts=64)
    print("weight buffer bytes", a.weight_buffer_bytes, b.weight_buffer_bytes)
    assert a.weight_buffer_bytes == b.weight_buffer_bytes


def test_tcl_wires_every_master_to_an_hp_port():
    tcl = vivado_tcl(axi_masters=3, clock_mhz=250, data_bytes=16, part="xczu7ev-ffvc1156-2-e")
    for k in range(3):
        assert f"S_AXI_HP{k}_FPD" in tcl and f"m_axi{k}" in tcl and f"PSU__USE__S_AXI_GP{k + 2} {{1}}" in tcl
    assert "S_AXI_HP3_FPD" not in tcl
    assert "pl_ps_irq0" in tcl and "ipx::package_project" in tcl and "FREQMHZ {250}" in tcl
    assert "M_AXI_HPM0_FPD" in tcl and "m3vit.hwh" in tcl


def test_fits():
    ok, share = fits({"LUT": 1000, "FF": 10, "DSP48E2": 1729, "RAMB36": 0, "URAM": 0})
    assert not ok and share["DSP48E2"] > 1


@pytest.mark.slow
def test_tiny_build_writes_everything(tmp_path):
    """A tiny-preset build with three masters, in a fresh process without torch importable."""
    code = ("import sys; sys.modules['torch'] = None; from m3vit_hw.build.__main__ import main; "
            f"sys.exit(main(['--experts', '4', '--preset', 'tiny', '--axi-masters', '3', '--no-synth', "
            f"'--out', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("m3vit_accel.sv", "m3vit_accel.xdc", "build.tcl", "m3vit_accel.h", "registers.md",
                 "report.json", "summary.txt", "zcu104_heartbeat.xdc"):
        assert (tmp_path / name).exists(), name
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["axi"]["masters"] == 3
    sv = (tmp_path / "m3vit_accel.sv").read_text()
    assert "m_axi2_araddr" in sv and "s_axi_awaddr" in sv and "interrupt" in sv
    print(proc.stdout[-600:])


@pytest.mark.slow
def test_failed_estimate_still_writes_the_report(tmp_path, monkeypatch):
    """yosys failing (as it does on W1 in the WebAssembly build) leaves the outputs and a report saying so."""
    import m3vit_hw.build.flow as flow

    def broken(*args, **kwargs):
        raise RuntimeError("yosys failed (1): thrown Wasm exception")
    monkeypatch.setattr(flow, "synth_estimate", broken)
    cfg = AcceleratorConfig.from_preset("tiny", experts=4)
    rep = flow.run_build(cfg, axi_masters=1, out_dir=tmp_path, synth=True, log=lambda s: None)
    assert rep["fits"] is None and "Wasm" in rep["synth_error"]
    assert "FAILED" in (tmp_path / "summary.txt").read_text()
    assert (tmp_path / "m3vit_accel.sv").exists() and (tmp_path / "report.json").exists()
