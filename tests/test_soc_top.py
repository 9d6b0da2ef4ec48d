# amaranth: UnusedElaboratable=no
"""The AXI top and its pieces in Amaranth's simulator (quick; the third-party check is test_soc_axi.py)."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from m3vit_hw.soc.axi import AXI4LiteSignature, AXI4Signature, WritePortSignature
from m3vit_hw.soc.regmap import FIELDS
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.model_config import ModelConfig
from m3vit_hw.soc.top import AcceleratorTop, xilinx_ports
from sim.soc_frames import core_units, expected_tokens, make_frame, random_image
from sim.soc_pysim import run_top
from sim.testbench import Stalls, stream_get, stream_put


def _check_exact(got, expected, what):
    bad = np.argwhere(got != expected)
    assert not len(bad), (f"{what}: {len(bad)} mismatches, first token[{bad[0][0]}, {bad[0][1]}]: "
                          f"expected {expected[tuple(bad[0])]}, got {got[tuple(bad[0])]}")


def _tiny():
    """The smallest encoder the tests use (8x16 image of 4x4 patches, D=16, depth 2) on 4x4 PEs."""
    model = ModelConfig(name="soc-pysim", img_size=(8, 16), patch_size=4, dim=16, depth=2, heads=2, experts=2,
                        top_k=1, mlp_hidden=32, tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
    return AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)


@pytest.mark.slow
@pytest.mark.parametrize("masters,pause", [(1, 0.3), (3, 0.5)])
def test_top_frame_bit_exact(masters, pause):
    """Both tasks through the top (1 and 3 AXI masters), random pauses on every AXI channel; the program
    without the opcodes the top has no unit for (reference: the executor), else the golden model."""
    cfg = _tiny()
    program, qm, drop = make_frame(cfg, seed=7, units=core_units(cfg))
    frames = [(random_image(cfg.model, 7 + t), t) for t in range(cfg.model.num_tasks)]
    res = run_top(cfg, program, frames, axi_masters=masters, pause=pause, seed=7)
    for (img, task), r in zip(frames, res):
        want, ref = expected_tokens(program, qm, drop, img, task)
        _check_exact(r["tokens"], want, f"axi top ({masters} masters) / encoder task {task} vs {ref}")
        assert r["error"] == 0 and r["interrupt"] == 1 and r["interrupt_after_clear"] == 0
        assert r["tail"] == b"\xA5" * 16, "the write strobes let bytes after the output change"
        assert r["insn_count"] == len(program.instructions)
        print(masters, {k: v for k, v in r.items() if k not in ("tokens", "tail")})


@pytest.mark.slow
def test_top_wide_beat_over_hp_ports():
    """A 64-byte core beat through four 128-bit AXI masters (the ZCU104's HP0..HP3: one read and write
    downsizer each side, reads striped round-robin), random AXI pauses; bit-exact, one task."""
    cfg = _tiny().with_(mem_data_bytes=64)
    top = AcceleratorTop(cfg, axi_masters=4)
    assert top.axi_data_bytes == 16 and len(top.m_axi[0].rdata) == 128
    program, qm, drop = make_frame(cfg, seed=8, units=core_units(cfg))
    frames = [(random_image(cfg.model, 8), 1)]
    # Bases on the 64-byte beat but not on a page, so bursts still meet 4 KiB boundaries.
    res = run_top(cfg, program, frames, axi_masters=4, pause=0.3, seed=8,
                  bases={"PARAM": 0x0001_0040, "OUTPUT": 0x0200_0FC0})
    for (img, task), r in zip(frames, res):
        want, ref = expected_tokens(program, qm, drop, img, task)
        _check_exact(r["tokens"], want, f"axi top (64 B core, 4 x 16 B masters) task {task} vs {ref}")
        assert r["error"] == 0 and r["tail"] == b"\xA5" * 16
        print({k: v for k, v in r.items() if k not in ("tokens", "tail")})


def test_top_unaligned_base_is_an_error():
    cfg = _tiny()
    program, _, _ = make_frame(cfg, seed=1)
    (r,) = run_top(cfg, program, [(random_image(cfg.model, 1), 0)], bases={"OUTPUT": 0x1000_0004})
    assert r["error"] == FIELDS[("ERROR", "UNALIGNED")].mask, f"ERROR = 0x{r['error']:X}"
    assert r["interrupt"] == 1 and r["interrupt_after_clear"] == 0


def test_top_parameters_checked():
    cfg = _tiny()
    with pytest.raises(ValueError, match=r"axi_masters must be in \[1, 4\], not 5"):
        AcceleratorTop(cfg, axi_masters=5)
    with pytest.raises(ValueError, match=r"axi_data_bytes must be in \[1, 16\], not 32"):
        AcceleratorTop(cfg, axi_data_bytes=32)
    with pytest.raises(ValueError, match="axi_data_bytes must be a power of two dividing mem_data_bytes=16"):
        AcceleratorTop(cfg, axi_data_bytes=3)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        AcceleratorTop("tiny")


def test_xilinx_port_names():
    names = {n for n, _, _ in xilinx_ports(AcceleratorTop(_tiny(), axi_masters=2))}
    for want in ("m_axi0_araddr", "m_axi1_rdata", "m_axi0_wstrb", "s_axi_awaddr", "s_axi_rdata", "interrupt"):
        assert want in names
    assert not any("__" in n for n in names)


def test_signatures_compare_and_reject():
    assert AXI4Signature(addr_width=32, data_width=128) == AXI4Signature(addr_width=32, data_width=128)
    assert AXI4Signature(data_width=64) != AXI4Signature(data_width=128)
    assert "data_width=128" in repr(AXI4Signature())
    with pytest.raises(ValueError, match="data_width must be one of"):
        AXI4Signature(data_width=96)
    with pytest.raises(ValueError, match="data_width must be one of"):
        AXI4LiteSignature(data_width=128)
    with pytest.raises(ValueError, match="max_burst"):
        WritePortSignature(data_bytes=16, max_burst=512)


def test_skid_buffer_loses_nothing():
    """Random stalls on both sides: every payload once, in order."""
    from m3vit_hw.soc.slice import SkidBuffer
    dut = SkidBuffer(16)
    vals = [random.Random(i).randrange(1 << 16) for i in range(200)]
    got = []

    async def feed(ctx):
        st = Stalls(0.4, 1)
        for v in vals:
            await stream_put(ctx, dut.i, v, stalls=st)

    async def take(ctx):
        st = Stalls(0.4, 2)
        for _ in vals:
            got.append(await stream_get(ctx, dut.o, stalls=st))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed)
    sim.add_testbench(take)
    sim.run()
    assert got == vals


@pytest.mark.parametrize("db,mb,depth", [(16, 16, 4), (4, 5, 1), (64, 64, 2)])
def test_page_splitter_cuts_at_4k_and_keeps_last(db, mb, depth):
    """Random requests (some across a page, half of them within a burst of a page's end, and a
    max_burst that is not a power of two): downstream requests stay in a page, upstream sees every
    beat once, in order, with ``last`` only on each request's final beat."""
    from m3vit_hw.soc.datapath import PageSplitter
    dut = PageSplitter(addr_width=32, data_bytes=db, max_burst=mb, depth=depth)
    rng = random.Random(11 + mb)
    page = 4096 // db
    reqs = [(rng.randrange(0, 1 << 12) * db, rng.randint(1, mb)) for _ in range(20)]
    reqs += [((rng.randrange(1, 4) * page - rng.randint(1, mb)) * db, rng.randint(1, mb)) for _ in range(20)]
    reqs += [(0x2000 - db, 2), (0x3000 - mb * db, mb), (0x4000 - db, 1), (0x5000 - db, mb)]
    down, got = [], []

    async def feed(ctx):
        st = Stalls(0.3, 1)
        for a, n in reqs:
            await stream_put(ctx, dut.up.req, {"addr": a, "beats": n}, stalls=st)

    async def memory(ctx):
        # Takes requests and answers them in order (beat data = its byte address), with stalls.
        r = random.Random(2)
        pending = []
        while True:
            ctx.set(dut.down.req.ready, r.random() > 0.3)
            ctx.set(dut.down.resp.valid, 0)
            if pending and r.random() > 0.3:
                a, left = pending[0]
                ctx.set(dut.down.resp.valid, 1)
                ctx.set(dut.down.resp.payload, {"data": a, "last": int(left == 1)})
            _, _, rv, rr, qv, qa, qb, qr = await ctx.tick().sample(
                dut.down.resp.valid, dut.down.resp.ready, dut.down.req.valid, dut.down.req.payload.addr,
                dut.down.req.payload.beats, dut.down.req.ready)
            if rv and rr:
                a, left = pending[0]
                pending[0] = (a + db, left - 1)
                if left == 1:
                    pending.pop(0)
            if qv and qr:
                down.append((qa, qb))
                pending.append((qa, qb))

    async def take(ctx):
        st = Stalls(0.3, 3)
        for _ in range(sum(n for _, n in reqs)):
            p = await stream_get(ctx, dut.up.resp, stalls=st)
            got.append((int(p.data), int(p.last)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feed)
    sim.add_testbench(memory, background=True)
    sim.add_testbench(take)
    sim.run()
    for a, b in down:
        assert 1 <= b <= mb and a // 4096 == (a + db * b - 1) // 4096, f"request 0x{a:X} x {b} crosses 4 KiB"
    want = [(a + db * i, int(i == n - 1)) for a, n in reqs for i in range(n)]
    assert got == want, "page splitter: beats or last flags differ from the requests"
    assert len(down) > len(reqs), "no request was split (the test lost its point)"


def test_page_splitter_throughput():
    """With both sides always ready, requests that fit a page leave one per cycle (one cycle after
    they are taken) and a split request's second part one idle cycle after its first."""
    from m3vit_hw.soc.datapath import PageSplitter
    dut = PageSplitter(addr_width=32, data_bytes=16, max_burst=16, depth=16)
    reqs = [(0x100 * i, 4) for i in range(6)] + [(0x1FC0, 8), (0x3000, 2)]
    seen = []

    async def bench(ctx):
        ctx.set(dut.down.req.ready, 1)
        i, cycle = 0, 0
        while len(seen) < len(reqs) + 1:
            if i < len(reqs):
                ctx.set(dut.up.req.valid, 1)
                ctx.set(dut.up.req.payload, {"addr": reqs[i][0], "beats": reqs[i][1]})
            else:
                ctx.set(dut.up.req.valid, 0)
            _, _, uv, ur, qv, qa, qb = await ctx.tick().sample(
                dut.up.req.valid, dut.up.req.ready, dut.down.req.valid, dut.down.req.payload.addr,
                dut.down.req.payload.beats)
            cycle += 1
            if uv and ur:
                i += 1
            if qv:
                seen.append((cycle, qa, qb))
            assert cycle < 100, "page splitter: stuck"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    cycles = [c for c, _, _ in seen]
    assert [(a, b) for _, a, b in seen] == reqs[:6] + [(0x1FC0, 4), (0x2000, 4), (0x3000, 2)]
    gaps = [b - a for a, b in zip(cycles, cycles[1:])]
    print(f"page splitter: down requests at cycles {cycles}")
    # Six one-page requests back to back, the split's first part, an idle cycle, its second part, then
    # the next request right behind it.
    assert gaps == [1] * 6 + [2, 1], gaps


def test_top_program_errors():
    """An opcode outside the ISA is ERROR.BAD_PROGRAM; MOE on a build without an MoE unit (a model
    with no MoE block) is ERROR.NO_UNIT; both end the run with DONE and the interrupt."""
    from m3vit_hw.control.isa import InstructionSet, Opcode
    from m3vit_hw.soc.regmap import OFFSETS
    from sim.axi_pysim import AxiLiteCpu, SparseBytes, axi_memory
    cfg = AcceleratorConfig(model=_tiny().model.with_(depth=1), pe_rows=4, pe_cols=4)
    assert not cfg.model.moe_blocks
    isa = InstructionSet(cfg)
    zero = {f.name: 0 for f in isa.fields(Opcode.MOE)}

    def words(*insns):
        return b"".join(w.to_bytes(4, "little") for op, f in insns for w in isa.encode(op, **f))

    mem = SparseBytes()
    mem.write(0x1000, words((Opcode.MOE, zero), (Opcode.END, {})))
    bad = bytearray(words((Opcode.END, {}), (Opcode.END, {})))
    bad[0] = (bad[0] & 0xF0) | 0xF
    mem.write(0x2000, bytes(bad))
    top = AcceleratorTop(cfg)
    cpu = AxiLiteCpu(top.s_axi)
    got = []

    async def host(ctx):
        for program in (0x1000, 0x2000):
            await cpu.write(ctx, OFFSETS["PROGRAM_BASE_LO"], program)
            await cpu.write(ctx, OFFSETS["IRQ_ENABLE"], 1)
            await cpu.write(ctx, OFFSETS["CTRL"], 1)
            for _ in range(2000):
                if (await cpu.read(ctx, OFFSETS["STATUS"])) & 2:
                    break
            got.append((await cpu.read(ctx, OFFSETS["ERROR"]), ctx.get(top.interrupt)))
            await cpu.write(ctx, OFFSETS["IRQ_STATUS"], 1)

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(axi_memory(top.m_axi[0], mem, data_bytes=top.data_bytes, pause=0.2, seed=1),
                      background=True)
    sim.add_testbench(host)
    sim.run()
    assert got == [(FIELDS[("ERROR", "NO_UNIT")].mask, 1), (FIELDS[("ERROR", "BAD_PROGRAM")].mask, 1)], got
