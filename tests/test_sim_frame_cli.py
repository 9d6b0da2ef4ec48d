"""``python -m sim frame``: bad arguments give one clear line on stderr and exit code 2 before any
simulation."""

import re

import pytest

from sim.frame import main


@pytest.mark.parametrize("argv, message", [
    (["--image", "8by16"], "--image must be HxW"),
    (["--json", "/nonexistent/dir/x.json"], "--json: the directory of"),
    (["--tasks", "2", "--task", "5"], r"--task must be in \[0, 1\], not 5"),
    (["--backend", "spice"], "--backend must be pysim or verilator, not 'spice'"),
    (["--plot", "/nonexistent/dir/x.png"], "--plot: the directory of"),
    (["--mem-bytes-per-cycle", "0"], "--mem-bytes-per-cycle must be > 0"),
    (["--drop", "nosuchop"], "--drop: unknown opcode"),
    (["--preset", "nope"], "--preset must be one of"),
    (["--stall-prob", "1.5"], r"--stall-prob must be in \[0, 1\)"),
    (["--mem-data-bytes", "256"], "mem_data_bytes"),
    (["--accel-set", "pe_rowz=4"], "--accel-set must be FIELD=INT"),
    (["--accel-set", "pe_rows=four"], "--accel-set pe_rows: 'four' is not an integer"),
    (["--sizing", "device"], "--sizing device needs a --preset with an accelerator preset"),
    (["--mem-data-bytes", "3"], "mem_data_bytes"),
])
def test_bad_arguments(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err

    assert re.search(message, err[0]), err[0]
