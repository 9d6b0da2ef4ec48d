"""cocotb tests of the AXI top around the encoder (run through :func:`sim.soc_cocotb.run`, not collected
by pytest).

DDR is cocotbext-axi's ``AxiRam`` (one per AXI master, all sharing one memory), the CPU its
``AxiLiteMaster``. Every channel of every AXI port gets random pauses (``SOC_PARAMS["pause"]``, the
probability of a pause cycle), which on AR/AW/W are backpressure and on R/B random latency. The
protocol checker around the top (:mod:`sim.axi_checker`) must count zero violations.

A frame is a compiled random encoder and its reference tokens (:mod:`sim.soc_frames`).

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

from m3vit_hw.control.image_layout import output_row_bytes
from m3vit_hw.control.isa import Opcode
from m3vit_hw.driver import Accelerator, AcceleratorError, ConfigMismatch, unpack_tokens
from m3vit_hw.soc.regmap import COUNTED_OPS, FIELDS, OFFSETS, REGMAP_VERSION, config_id
from sim.axi_checker import CHANNELS
from sim.soc_cocotb import CocotbBackend, case_config
from sim.soc_frames import core_units, expected_tokens, make_frame, random_image

PARAMS = json.loads(os.environ.get("SOC_PARAMS", "{}"))
CASE = os.environ.get("SOC_CASE", "enc")


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
        self.config, self.masters = case_config(CASE)
        self.data_bytes = self.config.mem_data_bytes
        self.cid = config_id(self.config, axi_masters=self.masters)
        self.units = core_units(self.config)

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

    async def wait_done(self, limit=200_000):
        done = FIELDS[("STATUS", "DONE")].mask
        for _ in range(limit):
            if (await self.rd("STATUS")) & done:
                return
            await ClockCycles(self.dut.aclk, 64)
        raise TimeoutError("no STATUS.DONE")

    async def set_bases(self, bases):
        for name, a in bases.items():
            await self.wr(f"{name}_BASE_LO", a & 0xFFFFFFFF)
            await self.wr(f"{name}_BASE_HI", a >> 32)

    def protocol(self):
        v = int(self.dut.violations.value)
        code = int(self.dut.violation_code.value)
        where = CHANNELS(self.masters).get(code >> 8, "?")
        return v, f"channel {where} rule {code & 0xFF}" if v else "none"

    def check_protocol(self):
        v, first = self.protocol()
        assert v == 0, f"AXI protocol: {v} violations, first: {first}"


async def _error_run(b, bases, task=0):
    """Start with the given bases; return the ERROR register and the number of interrupts it raised."""
    await b.set_bases(bases)
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
    """ID, version, config, RW with byte strobes, W1C interrupt; UNALIGNED, BAD_TASK, BAD_PROGRAM (and
    NO_UNIT when the top lacks a unit the compiled program uses)."""
    b = Bench(dut)
    await b.start()
    cfg = b.config
    got = await b.rd("ID")
    assert got == b.cid, f"csr: ID expected 0x{b.cid:08X}, got 0x{got:08X}"
    got = await b.rd("VERSION")
    assert got == REGMAP_VERSION[0] << 16 | REGMAP_VERSION[1], f"csr: VERSION got 0x{got:X}"
    got = await b.rd("CONFIG0")
    assert got == cfg.pe_rows | cfg.pe_cols << 16, f"csr: CONFIG0 got 0x{got:X}"
    want = cfg.mem_data_bytes | b.masters << 8 | cfg.token_capacity << 16
    got = await b.rd("CONFIG1")
    assert got == want, f"csr: CONFIG1 expected 0x{want:X}, got 0x{got:X}"
    await b.wr("PARAM_BASE_LO", 0x11223344)
    await b.wr("PARAM_BASE_LO", 0xAA, offset=2, nbytes=1)      # wstrb = 0b0100
    got = await b.rd("PARAM_BASE_LO")
    assert got == 0x11AA3344, f"csr: byte-strobed write expected 0x11AA3344, got 0x{got:08X}"
    got = await b.rd("STATUS")
    assert got == 0, f"csr: STATUS after reset expected 0, got 0x{got:X}"

    program, _, _ = make_frame(cfg, seed=5)          # the whole program, every opcode
    base = 0x0010_0000
    ok = {"PROGRAM": base + program.program_addr, "PARAM": base, "OUTPUT": 0x0080_0000, "IMAGE": base}
    err_bits = {f: FIELDS[("ERROR", f)].mask for f in ("UNALIGNED", "BAD_TASK", "BAD_PROGRAM", "NO_UNIT")}
    seen = {}
    err, irqs = await _error_run(b, {**ok, "OUTPUT": ok["OUTPUT"] + cfg.mem_data_bytes // 2})
    assert err == err_bits["UNALIGNED"], f"top: unaligned OUTPUT base: ERROR expected " \
        f"0x{err_bits['UNALIGNED']:X}, got 0x{err:X}"
    assert irqs == 1, f"top: one interrupt per run expected, saw {irqs}"
    seen["UNALIGNED"] = err
    err, _ = await _error_run(b, ok, task=cfg.model.num_tasks)
    assert err == err_bits["BAD_TASK"], f"top: bad task: ERROR got 0x{err:X}"
    seen["BAD_TASK"] = err
    # An opcode value outside the instruction set as the first instruction.
    bad = bytearray(program.image)
    bad[program.program_addr] = (bad[program.program_addr] & 0xF0) | 0xF
    b.ram.write(base, bytes(bad))
    err, _ = await _error_run(b, ok)
    assert err == err_bits["BAD_PROGRAM"], f"top: bad opcode: ERROR got 0x{err:X}"
    seen["BAD_PROGRAM"] = err
    missing = sorted({op.name for op, _, _ in program.instructions
                      if op not in b.units and op not in (Opcode.END, Opcode.SYNC)})
    if missing:
        # The compiled program uses a unit this top lacks: the sequencer stops with NO_UNIT.
        b.ram.write(base, bytes(program.image))
        err, _ = await _error_run(b, ok)
        assert err == err_bits["NO_UNIT"], f"top: opcode {missing[0]} without a unit: ERROR got 0x{err:X}"
        seen["NO_UNIT"] = err
    b.check_protocol()
    _record("registers", {"violations": b.protocol()[0], "errors_seen": seen, "missing_units": missing})


@cocotb.test()
async def test_frame(dut):
    """Whole frames through AXI, bit-exact against the reference, one run per task."""
    b = Bench(dut)
    await b.start()
    cfg = b.config
    seed = int(PARAMS.get("seed", 1))
    program, qm, drop = make_frame(cfg, seed, units=b.units)
    view = program.model_config
    lay = program.layout
    T, D = view.model.tokens, view.model.dim
    # The image sits one beat past a 4 KiB page, so the core's bursts must respect page boundaries
    # wherever they fall; the output likewise.
    param = int(PARAMS.get("param_base", 0x0001_0000 + cfg.mem_data_bytes))
    out = int(PARAMS.get("output_base", 0x0200_0000 + 4096 - cfg.mem_data_bytes))
    b.ram.write(param, bytes(program.image))
    out_bytes = T * output_row_bytes(view)
    runs = int(PARAMS.get("runs", view.model.num_tasks))
    results = []
    for r in range(runs):
        task = r % view.model.num_tasks
        img = random_image(view.model, seed * 100 + r)
        if r % 2 == 0:
            # The frame in the image's input section.
            image_base = param
            b.ram.write(param + lay.input_addr, img.tobytes())
        else:
            # The frame in a buffer of its own, one beat past a page; the input section holds stale bytes.
            frame = 0x0300_0000 + cfg.mem_data_bytes
            image_base = (frame - lay.input_addr) % (1 << 64)
            b.ram.write(frame, img.tobytes())
            b.ram.write(param + lay.input_addr, bytes(255 - img.reshape(-1)))
        # Sentinel bytes after the output: the strobes must leave them alone.
        b.ram.write(out, b"\xA5" * (out_bytes + 64))
        await b.set_bases({"PROGRAM": param + lay.program_addr, "PARAM": param, "OUTPUT": out,
                           "IMAGE": image_base})
        await b.wr("TASK", task)
        await b.wr("IRQ_ENABLE", 1)
        await b.wr("CTRL", 1)
        await b.wait_done()
        err = await b.rd("ERROR")
        assert err == 0, f"top: run {r} ERROR=0x{err:X}"
        got = unpack_tokens(b.ram.read(out, out_bytes), view)
        tail = b.ram.read(out + out_bytes, 64)
        assert tail == b"\xA5" * 64, "top: bytes after the output were overwritten (strobes)"
        want, ref = expected_tokens(program, qm, drop, img, task)
        bad = np.argwhere(got != want)
        if len(bad):
            t, d = bad[0]
            raise AssertionError(f"axi top / encoder: run {r} task {task}: {len(bad)} mismatches vs {ref}, "
                                 f"first token[{t}, {d}]: expected {want[t, d]}, got {got[t, d]}")
        counters = {"cycles": await b.rd("CYCLES_LO"), "insn_count": await b.rd("INSN_COUNT")}
        for op in COUNTED_OPS:
            counters[f"op_{op.name.lower()}"] = await b.rd(f"OP_CYCLES_{op.name}")
            counters[f"pe_{op.name.lower()}"] = await b.rd(f"PE_CYCLES_{op.name}")
        assert counters["insn_count"] == len(program.instructions), (
            f"top: INSN_COUNT expected {len(program.instructions)}, got {counters['insn_count']}")
        await b.wr("IRQ_STATUS", 1)
        results.append(dict(task=task, reference=ref, frame="own buffer" if r % 2 else "input section",
                            **counters))
        dut._log.info(f"run {r} task {task}: bit-exact vs {ref}, {counters}")
    b.check_protocol()
    _record("frame", {"runs": results, "irqs": b.irq_seen, "violations": b.protocol()[0], "T": T, "D": D,
                      "dropped": sorted(op.name for op in drop), "instructions": len(program.instructions)})


@cocotb.test()
async def test_driver(dut):
    """The host driver (m3vit_hw.driver.Accelerator) runs frames on the simulated top, bit-exact."""
    b = Bench(dut)
    await b.start()
    cfg = b.config
    seed = int(PARAMS.get("seed", 1)) + 100
    program, qm, drop = make_frame(cfg, seed, units=b.units)
    backend = CocotbBackend(b.axil, b.ram)
    acc = Accelerator(cfg, backend, axi_masters=b.masters)
    acc.load(program)
    out = []
    for task in range(cfg.model.num_tasks):
        img = random_image(cfg.model, seed + task)
        res = await acc.run_async(img, task)
        want, ref = expected_tokens(program, qm, drop, img, task)
        bad = np.argwhere(res.tokens != want)
        assert not len(bad), (f"driver / encoder: task {task}: {len(bad)} mismatches vs {ref}, first at "
                              f"{tuple(bad[0])}: expected {want[tuple(bad[0])]}, got {res.tokens[tuple(bad[0])]}")
        out.append(dict(task=task, reference=ref, **res.counters))
    # A driver built for another config must refuse to run.
    other = Accelerator(cfg, backend, axi_masters=b.masters + 1)
    other.load(program)
    try:
        await other.run_async(random_image(cfg.model, 0), 0)
    except ConfigMismatch:
        refused = True
    else:
        refused = False
    assert refused, "driver: a config-ID mismatch was not detected"
    b.check_protocol()
    _record("driver", {"runs": out, "violations": b.protocol()[0], "config_mismatch_refused": refused})


__all__ = ["test_registers", "test_frame", "test_driver", "AcceleratorError"]
