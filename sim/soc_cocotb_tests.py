"""cocotb tests of the AXI top (run through :func:`sim.soc_cocotb.run`, not collected by pytest).

DDR is cocotbext-axi's ``AxiRam`` (one per AXI master, all sharing one memory), the CPU its
``AxiLiteMaster``. Every channel of every AXI port gets random pauses (``SOC_PARAMS["pause"]``, the
probability of a pause cycle), which on AR/AW/W are backpressure and on R/B random latency. The
protocol checker around the top (:mod:`sim.axi_checker`) must count zero violations.

Each test writes its measured figures into the JSON file ``SOC_RESULT``.
"""

import json
import logging
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from m3vit_hw.driver import Accelerator, AcceleratorError, ConfigMismatch
from m3vit_hw.moe.expert_layout import pack_moe
from m3vit_hw.soc.image import ImageLayout, config_id, pack_image, pack_program, unpack_output
from m3vit_hw.soc.regmap import FIELDS, OFFSETS, REGMAP_VERSION
from sim.axi_checker import CHANNELS
from sim.moe_workload import golden_moe, make_moe_workload
from sim.soc_cocotb import CocotbBackend, case_config

PARAMS = json.loads(os.environ.get("SOC_PARAMS", "{}"))
CASE = os.environ.get("SOC_CASE", "tiny")


def _record(name, value):
    path = os.environ.get("SOC_RESULT")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data[name] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=int)


def _pauses(rng, p):
    while True:
        yield rng.random() < p


class Bench:
    """Clock, reset, the RAMs and the CPU around ``m3vit_check_top``."""

    def __init__(self, dut):
        self.dut = dut
        self.config, self.masters, self.wl = case_config(CASE)
        self.data_bytes = self.config.mem_data_bytes
        self.cid = config_id(self.config, axi_masters=self.masters)
        self.layout = ImageLayout(self.config)

    async def start(self):
        dut = self.dut
        cocotb.start_soon(Clock(dut.aclk, 10, unit="ns").start())
        dut.aresetn.value = 0
        self.rams = []
        ram0 = None
        for k in range(self.masters):
            bus = AxiBus.from_prefix(dut, f"m_axi{k}")
            ram = AxiRam(bus, dut.aclk, dut.aresetn, reset_active_level=False, size=2 ** 32,
                         mem=None if ram0 is None else ram0.mem)
            ram0 = ram0 or ram
            self.rams.append(ram)
        self.ram = ram0
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi"), dut.aclk, dut.aresetn,
                                  reset_active_level=False)
        for model in self.rams + [self.axil]:
            for part in (model.write_if, model.read_if):
                part.log.setLevel(logging.WARNING)
        p = float(PARAMS.get("pause", 0.3))
        rng = random.Random(int(PARAMS.get("seed", 1)))
        if p > 0:
            for ram in self.rams:
                for ch in (ram.write_if.aw_channel, ram.write_if.w_channel, ram.write_if.b_channel,
                           ram.read_if.ar_channel, ram.read_if.r_channel):
                    ch.set_pause_generator(_pauses(random.Random(rng.random()), p))
            for ch in (self.axil.write_if.aw_channel, self.axil.write_if.w_channel,
                       self.axil.write_if.b_channel, self.axil.read_if.ar_channel,
                       self.axil.read_if.r_channel):
                ch.set_pause_generator(_pauses(random.Random(rng.random()), p))
        self.irq_seen = 0
        cocotb.start_soon(self._irq_monitor())
        await ClockCycles(dut.aclk, 8)
        dut.aresetn.value = 1
        await ClockCycles(dut.aclk, 4)

    async def _irq_monitor(self):
        prev = 0
        while True:
            await RisingEdge(self.dut.aclk)
            v = int(self.dut.interrupt.value)
            if v and not prev:
                self.irq_seen += 1
            prev = v

    async def rd(self, name):
        return int.from_bytes((await self.axil.read(OFFSETS[name], 4)).data, "little")

    async def wr(self, name, value, *, offset=0, nbytes=4):
        data = int(value).to_bytes(nbytes, "little")
        await self.axil.write(OFFSETS[name] + offset, data)

    async def wait_done(self, limit=100_000):
        done = FIELDS[("STATUS", "DONE")].mask
        for _ in range(limit):
            if (await self.rd("STATUS")) & done:
                return
            await ClockCycles(self.dut.aclk, 32)
        raise TimeoutError("no STATUS.DONE")

    def protocol(self):
        v = int(self.dut.violations.value)
        code = int(self.dut.violation_code.value)
        where = CHANNELS(self.masters).get(code >> 8, "?")
        return v, f"channel {where} rule {code & 0xFF}" if v else "none"

    def check_protocol(self):
        v, first = self.protocol()
        assert v == 0, f"AXI protocol: {v} violations, first: {first}"


async def _error_run(b, bases, task=0, program=None):
    """Start with the given bases; return the ERROR register and whether the interrupt rose."""
    if program is not None:
        b.ram.write(bases["PROGRAM"], program)
    for name, a in bases.items():
        await b.wr(f"{name}_BASE_LO", a)
        await b.wr(f"{name}_BASE_HI", 0)
    await b.wr("TASK", task)
    await b.wr("IRQ_ENABLE", 1)
    seen = b.irq_seen
    await b.wr("CTRL", 1)
    await b.wait_done()
    await ClockCycles(b.dut.aclk, 2)
    err = await b.rd("ERROR")
    assert int(b.dut.interrupt.value) == 1, "interrupt not high after done with IRQ_ENABLE set"
    await b.wr("IRQ_STATUS", 1)
    await ClockCycles(b.dut.aclk, 2)
    assert int(b.dut.interrupt.value) == 0, "interrupt still high after write-1-to-clear"
    return err, b.irq_seen - seen


@cocotb.test()
async def test_registers(dut):
    """ID, version, config, RW with byte strobes, W1C interrupt; UNALIGNED, BAD_TASK, BAD_PROGRAM errors."""
    b = Bench(dut)
    await b.start()
    got = await b.rd("ID")
    assert got == b.cid, f"csr: ID expected 0x{b.cid:08X}, got 0x{got:08X}"
    got = await b.rd("VERSION")
    assert got == REGMAP_VERSION[0] << 16 | REGMAP_VERSION[1], f"csr: VERSION got 0x{got:X}"
    got = await b.rd("CONFIG0")
    assert got == b.config.pe_rows | b.config.pe_cols << 16, f"csr: CONFIG0 got 0x{got:X}"
    await b.wr("IMAGE_BASE_LO", 0x11223344)
    await b.wr("IMAGE_BASE_LO", 0xAA, offset=2, nbytes=1)      # wstrb = 0b0100
    got = await b.rd("IMAGE_BASE_LO")
    assert got == 0x11AA3344, f"csr: byte-strobed write expected 0x11AA3344, got 0x{got:08X}"
    got = await b.rd("STATUS")
    assert got == 0, f"csr: STATUS after reset expected 0, got 0x{got:X}"

    ok = {"PROGRAM": 0x1000, "WEIGHTS": 0x2000, "IMAGE": 0x3000, "OUTPUT": 0x4000}
    err_bits = {f: FIELDS[("ERROR", f)].mask for f in ("UNALIGNED", "BAD_TASK", "BAD_PROGRAM")}
    err, irqs = await _error_run(b, {**ok, "OUTPUT": 0x4008})
    assert err == err_bits["UNALIGNED"], f"top: unaligned OUTPUT base: ERROR expected " \
        f"0x{err_bits['UNALIGNED']:X}, got 0x{err:X}"
    assert irqs == 1, f"top: one interrupt per run expected, saw {irqs}"
    err, _ = await _error_run(b, ok, task=b.config.model.num_tasks)
    assert err == err_bits["BAD_TASK"], f"top: bad task: ERROR got 0x{err:X}"
    wl = make_moe_workload(**b.wl, seed=3)
    prog = bytearray(pack_program(wl["qmoe"], b.layout, wl["tokens"], b.cid))
    prog[0] ^= 0xFF
    err, _ = await _error_run(b, ok, program=bytes(prog))
    assert err == err_bits["BAD_PROGRAM"], f"top: bad magic: ERROR got 0x{err:X}"
    prog = pack_program(wl["qmoe"], b.layout, wl["tokens"], b.cid ^ 1)
    err, _ = await _error_run(b, ok, program=prog)
    assert err == err_bits["BAD_PROGRAM"], f"top: wrong config id: ERROR got 0x{err:X}"
    b.check_protocol()
    _record("registers", {"violations": b.protocol()[0]})


@cocotb.test()
async def test_moe_run(dut):
    """The MoE-layer stand-in through AXI, bit-exact against the golden model, one run per task."""
    b = Bench(dut)
    await b.start()
    runs = int(PARAMS.get("runs", b.config.model.num_tasks))
    wl = make_moe_workload(**b.wl, seed=int(PARAMS.get("seed", 1)), skew=PARAMS.get("skew", "none"))
    qmoe = wl["qmoe"]
    T, D = wl["h"].shape
    weights, _ = pack_moe(qmoe, b.config)
    # Bases straddle 4 KiB pages on purpose (aligned to the beat only), so bursts must be split.
    bases = {"PROGRAM": 0x0001_0FF0, "WEIGHTS": 0x0002_0FD0, "IMAGE": 0x0100_0FE0, "OUTPUT": 0x0200_0FF0}
    bases.update(PARAMS.get("bases", {}))
    b.ram.write(bases["WEIGHTS"], weights)
    results = []
    for r in range(runs):
        task = r % b.config.model.num_tasks
        x = wl["x"] if r == 0 else results[-1]["x_in_next"]
        b.ram.write(bases["PROGRAM"], pack_program(qmoe, b.layout, T, b.cid))
        b.ram.write(bases["IMAGE"], pack_image(wl["h"], x, b.layout))
        # Sentinel bytes after the output: the strobes must leave them alone.
        out_bytes = T * b.config.row_words * b.config.pe_cols * 2
        b.ram.write(bases["OUTPUT"], b"\xA5" * (b.layout.output_bytes(T) + 64))
        for name, a in bases.items():
            await b.wr(f"{name}_BASE_LO", a)
        await b.wr("TASK", task)
        await b.wr("IRQ_ENABLE", 1)
        await b.wr("CTRL", 1)
        await b.wait_done()
        err = await b.rd("ERROR")
        assert err == 0, f"top: run {r} ERROR=0x{err:X}"
        got = unpack_output(b.ram.read(bases["OUTPUT"], out_bytes), b.layout, T)
        tail = b.ram.read(bases["OUTPUT"] + out_bytes, 64)
        assert tail == b"\xA5" * 64, "top: bytes after the output were overwritten (strobes)"
        wl_run = dict(wl, x=x)
        expected, _ = golden_moe(wl_run, task)
        bad = np.argwhere(got != expected)
        if len(bad):
            _record("mismatch", {"run": r, "task": task, "got": got.tolist(), "expected": expected.tolist()})
            t, d = bad[0]
            raise AssertionError(f"axi top / moe_layer: run {r} task {task}: {len(bad)} mismatches, first "
                                 f"x[{t}, {d}]: expected {expected[t, d]}, got {got[t, d]}")
        counters = {n.lower(): await b.rd(n) for n in ("CYCLES_LO", "LOAD_CYCLES", "LAYER_CYCLES",
                                                        "COMPUTE_CYCLES", "STORE_CYCLES", "EXPERT_BYTES",
                                                        "GATE_BYTES", "ACTIVE_EXPERTS")}
        await b.wr("IRQ_STATUS", 1)
        results.append(dict(task=task, counters=counters, x_in_next=got))
        dut._log.info(f"run {r} task {task}: bit-exact, {counters}")
    b.check_protocol()
    _record("moe_run", {"runs": [dict(task=r["task"], **r["counters"]) for r in results],
                        "irqs": b.irq_seen, "violations": b.protocol()[0], "T": T, "D": D})


@cocotb.test()
async def test_driver(dut):
    """The host driver (m3vit_hw.driver.Accelerator) runs the layer on the simulated top, bit-exact."""
    b = Bench(dut)
    await b.start()
    wl = make_moe_workload(**b.wl, seed=int(PARAMS.get("seed", 1)) + 100)
    backend = CocotbBackend(b.axil, b.ram)
    acc = Accelerator(b.config, backend, axi_masters=b.masters)
    acc.load(wl["qmoe"])
    out = []
    for task in range(b.config.model.num_tasks):
        res = await acc.run_async(wl["h"], wl["x"], task)
        expected, _ = golden_moe(wl, task)
        bad = np.argwhere(res.x != expected)
        assert not len(bad), (f"driver / moe_layer: task {task}: {len(bad)} mismatches, first at "
                              f"{tuple(bad[0])}: expected {expected[tuple(bad[0])]}, got {res.x[tuple(bad[0])]}")
        out.append(dict(task=task, **res.counters))
    # A driver built for another config must refuse to run.
    other = Accelerator(b.config, backend, axi_masters=b.masters + 1)
    other.load(wl["qmoe"])
    try:
        await other.run_async(wl["h"], wl["x"], 0)
    except ConfigMismatch:
        refused = True
    else:
        refused = False
    assert refused, "driver: a config-ID mismatch was not detected"
    b.check_protocol()
    _record("driver", {"runs": out, "violations": b.protocol()[0], "config_mismatch_refused": refused})


__all__ = ["test_registers", "test_moe_run", "test_driver", "AcceleratorError"]
