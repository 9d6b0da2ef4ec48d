# amaranth: UnusedElaboratable=no
"""ProgramSequencer alone: burst fetch over a stalling memory, decode, dispatch order, ``wait`` and the
one-owner rule, SYNC/END, the error codes, and the counters -- against fake units with random busy
times."""

import random

import pytest
from amaranth.sim import Simulator

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.isa import InstructionSet, Opcode
from m3vit_hw.encoder import ProgramSequencer, SeqError
from sim.ext_memory import ExternalMemory
from sim.testbench import stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

UNITS = (Opcode.LOAD_IMAGE, Opcode.LAYERNORM, Opcode.GEMM, Opcode.STORE)


def _random_program(isa, rng, n):
    """``n`` random instructions of the unit opcodes (random fields and wait bits, a SYNC now and
    then), then END: ``[(op, fields, wait)]``."""
    prog = []
    for _ in range(n):
        op = rng.choice(UNITS + (Opcode.SYNC,))
        fields = {fl.name: rng.randrange(1 << fl.width) for fl in isa.fields(op)}
        prog.append((op, fields, rng.random() < 0.5))
    prog.append((Opcode.END, {}, True))
    return prog


def _run(config, words, *, stall, seed, base=0x440, max_cycles=20000, raw=None):
    isa = InstructionSet(config)
    seq = ProgramSequencer(config, units=UNITS)
    img = bytearray(base + 4 * len(words) + seq.fifo_beats * config.mem_data_bytes + 64)
    for i, w in enumerate(words):
        img[base + 4 * i:base + 4 * i + 4] = w.to_bytes(4, "little")
    mem = ExternalMemory(img, bytes_per_cycle=config.mem_data_bytes, latency=5, stall_prob=stall, seed=seed)
    sim = Simulator(seq)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(seq.mem), background=True)
    rng = random.Random(seed)
    got, violations = [], []
    busy_total = {}
    out = {}

    async def units(ctx):
        busy = {}                                    # op -> cycles left
        owner = None
        cycles = 0
        while not ctx.get(seq.done) and cycles < max_cycles:
            ready = rng.random() >= stall
            ctx.set(seq.insn.ready, int(ready))
            ctx.set(seq.unit_busy, sum(1 << op.value for op, left in busy.items() if left > 0))
            await ctx.delay(1e-9)                    # let the combinational valid settle
            valid = ctx.get(seq.insn.valid)
            if valid:
                op = Opcode(ctx.get(seq.insn.payload.op))
                bits = ctx.get(seq.insn.payload.bits)     # before the edge: it may change after a transfer
                wait = ctx.get(seq.insn.payload.wait)
                any_busy = any(left > 0 for left in busy.values())
                if wait and any_busy:
                    violations.append(f"cycle {cycles}: {op.name} with wait offered while a unit is busy")
                if owner is not None and op != owner and any_busy:
                    violations.append(f"cycle {cycles}: {op.name} offered while {owner.name} still owns")
            await ctx.tick()
            cycles += 1
            for unit in busy:
                if busy[unit] > 0:
                    busy[unit] -= 1
                    busy_total[unit] = busy_total.get(unit, 0) + 1
            if valid and ready:
                got.append((op, bits))
                owner = op
                busy[op] = rng.randrange(1, 12)
        out["cycles"] = cycles
        out["op_cycles"] = {op: ctx.get(seq.op_cycles[op.value]) for op in UNITS}
        out["insn_count"] = ctx.get(seq.insn_count)

    async def host(ctx):
        await stream_put(ctx, seq.start, {"task": 1, "program_base": base, "param_base": 0x100,
                                          "output_base": 0x200})

    sim.add_testbench(units)
    sim.add_testbench(host, background=True)
    sim.run()
    assert out["cycles"] < max_cycles, "sequencer never raised done"
    return out, got, violations, busy_total, mem


@pytest.mark.parametrize("stall, seed, data_bytes", [(0.0, 1, 16), (0.3, 2, 16), (0.3, 3, 64), (0.1, 4, 128)])
def test_dispatch_order_wait_and_counters(stall, seed, data_bytes):
    """16-byte beats (two make an instruction); 64 and 128-byte beats (two or four instructions in
    one beat; the 25-instruction program ends with END in the first half of its last beat, so the
    zero words after it must not be decoded)."""
    config = AcceleratorConfig.from_preset("tiny", depth=2, mem_data_bytes=data_bytes)
    isa = InstructionSet(config)
    rng = random.Random(seed)
    prog = _random_program(isa, rng, 24)
    words = []
    for op, f, w in prog:
        words += isa.encode(op, wait=w, **f)
    out, got, violations, busy_total, mem = _run(config, words, stall=stall, seed=seed, base=0x480)
    assert not violations, violations[0]
    want = []
    for op, f, w in prog:
        if op in UNITS:
            word = sum(v << (32 * i) for i, v in enumerate(isa.encode(op, wait=w, **f)))
            want.append((op, word))
    assert len(got) == len(want), f"dispatched {len(got)} instructions, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"instruction {i}: expected {w[0].name} {w[1]:#x}, got {g[0].name} {g[1]:#x}"
    assert out["insn_count"] == len(prog), f"insn_count {out['insn_count']}, program {len(prog)}"
    for op in UNITS:
        assert out["op_cycles"][op] == busy_total.get(op, 0), \
            f"op_cycles[{op.name}] = {out['op_cycles'][op]}, the unit was busy {busy_total.get(op, 0)} cycles"
    # Bursts, not word by word: every fetch request but the last few is a full burst.
    beats = [r.beats for r in mem.log]
    assert max(beats) > max(1, isa.bits // (8 * config.mem_data_bytes)), f"fetch bursts {beats}"


def _status(config, words, **kw):
    """Run and return (error, insn_count, dispatched ops)."""
    seq = ProgramSequencer(config, units=UNITS)
    base = 0x80
    img = bytearray(base + 4 * len(words) + seq.fifo_beats * config.mem_data_bytes + 64)
    for i, w in enumerate(words):
        img[base + 4 * i:base + 4 * i + 4] = w.to_bytes(4, "little")
    mem = ExternalMemory(img, bytes_per_cycle=config.mem_data_bytes, latency=3)
    sim = Simulator(seq)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(seq.mem), background=True)
    res = {}

    async def host(ctx):
        await stream_put(ctx, seq.start, {"task": 0, "program_base": base, "param_base": 0, "output_base": 0})
        ops = []
        for _ in range(2000):
            ctx.set(seq.insn.ready, 1)
            await ctx.delay(1e-9)
            if ctx.get(seq.insn.valid):
                ops.append(Opcode(ctx.get(seq.insn.payload.op)))
            await ctx.tick()
            if ctx.get(seq.done):
                break
        res.update(error=SeqError(ctx.get(seq.error)), count=ctx.get(seq.insn_count), ops=ops,
                   done=ctx.get(seq.done), cycles=ctx.get(seq.cycles))

    sim.add_testbench(host)
    sim.run()
    return res


@pytest.mark.parametrize("data_bytes", [16, 64])
def test_errors_stop_the_program(data_bytes):
    """At 64-byte beats the bad opcode is the second instruction of the first beat."""
    config = AcceleratorConfig.from_preset("tiny", depth=2, mem_data_bytes=data_bytes)
    isa = InstructionSet(config)
    ln = isa.encode(Opcode.LAYERNORM, res_base=0, act_base=0, tokens=3, param_addr=0, shift=1)
    bad = [0xF] + [0] * (isa.words - 1)                               # opcode 15 does not exist
    moe = isa.encode(Opcode.MOE, **{fl.name: 0 for fl in isa.fields(Opcode.MOE)})
    end = isa.encode(Opcode.END)
    r = _status(config, ln + bad + ln + end)
    assert r["done"] and r["error"] is SeqError.BAD_OPCODE and r["ops"] == [Opcode.LAYERNORM], r
    r = _status(config, ln + moe + end)
    assert r["done"] and r["error"] is SeqError.NO_UNIT and r["ops"] == [Opcode.LAYERNORM], r
    r = _status(config, ln + ln + end)
    assert r["done"] and r["error"] is SeqError.NONE and r["count"] == 3 and r["cycles"] > 0, r


def test_refuses_bad_arguments():
    config = AcceleratorConfig.from_preset("tiny", depth=2)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        ProgramSequencer(None)
    with pytest.raises(ValueError, match=r"fetch_burst must be an int in \[1, 16\], not 0"):
        ProgramSequencer(config, fetch_burst=0)
    # Every memory beat the port allows is a power of two (so is the instruction): each divides the
    # instruction or is a whole multiple of it; the rest are refused by the config, naming the field.
    with pytest.raises(ValueError, match="mem_data_bytes must be a power of two"):
        ProgramSequencer(config.with_(mem_data_bytes=48))
    with pytest.raises(ValueError, match="mem_data_bytes"):
        ProgramSequencer(config.with_(mem_data_bytes=256))
