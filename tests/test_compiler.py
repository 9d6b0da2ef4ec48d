"""The program compiler and its image, checked by the Python program executor against the golden model."""

import numpy as np
import pytest

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.compiler import compile_model, fit_config
from m3vit_hw.control.isa import Opcode
from m3vit_hw.control.onchip import XCZU7EV, budget, buffer_report, fits
from m3vit_hw.model_config import ModelConfig
from reference import golden_model
from reference.random_qparams import random_quantized
from sim import compile_program
from sim.program_executor import run_program


def _image(cfg, seed, extremes=False):
    rng = np.random.default_rng(seed)
    H, W = cfg.img_size
    if extremes:
        return rng.choice(np.array([0, 255], dtype=np.uint8), (H, W, cfg.in_chans))
    return rng.integers(0, 256, (H, W, cfg.in_chans)).astype(np.uint8)


def _golden(qm, img, task):
    return golden_model.encode(qm, img.astype(np.int64).transpose(2, 0, 1) - 128, task)


def _check_all_tasks(program, qm, img):
    outs = []
    for task in range(qm.cfg.num_tasks):
        got, res = run_program(program, img, task)
        want = _golden(qm, img, task)
        bad = np.argwhere(got != want)
        assert not len(bad), (f"executor, task {task}: {len(bad)} mismatches, first token {bad[0][0]} channel "
                              f"{bad[0][1]}: expected {want[tuple(bad[0])]}, got {got[tuple(bad[0])]}")
        assert res.counts["END"] == 1
        outs.append(got)
    return outs


def _odd_model():
    # dim 24 (not a power of two, 3 words of 8 lanes), head_dim 12 (padded to 16), 3 experts, 3 tasks,
    # expert hidden 20 < dim and dense hidden 40 (neither a multiple of dim).
    return ModelConfig(name="odd", img_size=(32, 48), dim=24, depth=3, heads=2, experts=3, top_k=2,
                       expert_hidden=20, mlp_hidden=40,
                       tasks=("a", "b", "c"), task_channels=(1, 1, 1), decoder_channels=8)


def test_small_model_every_task_bit_exact():
    cfg = AcceleratorConfig.from_preset("tiny", depth=2)
    assert cfg.model.moe_blocks and cfg.model.num_tasks >= 2
    qm = random_quantized(cfg.model, 1)
    program = compile_model(cfg, qm)
    outs = _check_all_tasks(program, qm, _image(cfg.model, 2))
    # The task register must matter (different gates), or the test proves nothing about it.
    assert not np.array_equal(outs[0], outs[1])
    _check_all_tasks(program, qm, _image(cfg.model, 3, extremes=True))


def test_odd_model_bit_exact():
    model = _odd_model()
    cfg = AcceleratorConfig(model=model, pe_rows=4, pe_cols=8)
    qm = random_quantized(model, 5)
    _check_all_tasks(compile_model(cfg, qm), qm, _image(model, 6))


def test_task_embedding_router_bit_exact():
    cfg = AcceleratorConfig.from_preset("tiny-task-embedding", depth=2)
    qm = random_quantized(cfg.model, 7)
    _check_all_tasks(compile_model(cfg, qm), qm, _image(cfg.model, 8))


def test_one_config_two_models():
    hw = AcceleratorConfig.from_preset("tiny", depth=2)
    other = ModelConfig(name="other", img_size=(32, 32), dim=20, depth=3, heads=2, experts=3, top_k=1,
                        tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
    for model, seed in ((hw.model, 11), (other, 12)):
        qm = random_quantized(model, seed)
        program = compile_model(hw, qm)
        assert program.isa.words == 8 and program.config is hw
        _check_all_tasks(program, qm, _image(model, seed))


def test_refuses_a_model_that_does_not_fit():
    hw = AcceleratorConfig.from_preset("tiny", depth=2)
    big = hw.model.with_(dim=64, heads=2)
    with pytest.raises(ValueError, match=r"needs a residual buffer of \d+ bytes"):
        compile_model(hw, random_quantized(big, 0))
    more_tokens = hw.model.with_(img_size=(64, 64))
    with pytest.raises(ValueError, match=r"token_capacity"):
        fit_config(hw, more_tokens)
    # A model whose dense hidden layer needs a larger activation buffer than the accelerator has.
    wide = hw.model.with_(mlp_hidden=8192)
    with pytest.raises(ValueError, match=r"does not fit .*act_buffer_bytes must be >= \d+ \(dense MLP"):
        compile_model(hw, random_quantized(wide, 0))


def test_program_and_image_contract():
    cfg = AcceleratorConfig.from_preset("tiny", depth=2)
    qm = random_quantized(cfg.model, 1)
    p = compile_model(cfg, qm)
    lay = p.layout
    # The program in the image decodes to the instruction list; it ends with STORE, END.
    raw = p.image[lay.program_addr:lay.program_addr + lay.program_bytes]
    words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
    assert words == p.words
    n = p.isa.words
    decoded = [p.isa.decode(words[i:i + n]) for i in range(0, len(words), n)]
    assert [(op, f, w) for op, f, w in decoded] == p.instructions
    assert [op for op, _, _ in p.instructions][-2:] == [Opcode.STORE, Opcode.END]
    # Sections do not overlap and lie inside the image.
    spans = sorted(lay.sections.values())
    for (a, la), (b, _) in zip(spans, spans[1:]):
        assert a + la <= b
    assert spans[-1][0] + spans[-1][1] <= lay.image_bytes == len(p.image)
    # The executor reads weights only from the image: corrupt one expert weight byte of the MoE block.
    img = _image(cfg.model, 2)
    good, _ = run_program(p, img, 0)
    blk = lay.blocks[1]
    at = blk.mlp + lay.moe_layout.experts_offset
    for e in range(cfg.model.experts):
        p.image[at + e * lay.moe_layout.expert_stride] ^= 0x40
    bad, _ = run_program(p, img, 0)
    assert not np.array_equal(good, bad)


def test_w1_w2_buffers_fit_xczu7ev():
    """W1's and W2's default (device-sized) buffers fit within 80 % of the xczu7ev's BRAM36 and of
    its URAM, and W1's small ones too. W2's fit rests on one read port of the activation main bank
    (the B operand reads K and V from a copy of only the Q|K|V region), two heads of 32 a context
    word, the bank split URAM + block RAM, the lanes split to fill whole URAM columns and a one-panel
    weight half; W2's small (32x32) buffers
    do not fit within 80 %."""
    part = budget(XCZU7EV, 0.8)
    for name, sizing, want in (("vit-tiny-cityscapes", "default", True), ("vit-tiny-cityscapes", "small", True),
                               ("vit-small-nyud", "default", True), ("vit-small-nyud", "small", False)):
        cfg = AcceleratorConfig.from_preset(name, sizing=sizing)
        fit_config(cfg, cfg.model)
        bufs = buffer_report(cfg, part)
        bram, uram, ok = fits(bufs, part)
        print(name, sizing, bram, "BRAM36", uram, "URAM", sum(b.bytes * b.copies for b in bufs), "bytes:",
              ", ".join(f"{b.name} {b.bram36 or b.uram}{' URAM' if b.uram else ''}" for b in bufs))
        assert all(b.copies == 1 for b in bufs)
        assert ok == want, (name, sizing, bram, uram)
    w2 = AcceleratorConfig.from_preset("vit-small-nyud")
    names = [b.name for b in buffer_report(w2, part)]
    assert names[:5] == ["activation (lower bank) lanes 0-62", "activation (lower bank) lane 63",
                         "activation (upper bank)", "activation Q|K|V copy lanes 0-62", "activation Q|K|V copy lane 63"]


def test_build_balances_w2_memories_like_onchip():
    """The build's estimate (build.memories.pack_all) places W2's device datapath buffers (each
    1W+1R) within 80 % of the part's BRAM36 and URAM, as control.onchip does: per memory the
    smaller share alone would put the Q|K|V copy, the weight buffer and the row table in URAM
    (87 URAM, 91 %); the balancing moves them back to block RAM."""
    from m3vit_hw.build.flow import XCZU7EV as PART
    from m3vit_hw.build.memories import MemoryInfo, pack_all
    cfg = AcceleratorConfig.from_preset("vit-small-nyud")
    bufs = buffer_report(cfg, budget())
    mems = []
    for b in bufs:
        mem = MemoryInfo("datapath", b.name, b.width, b.depth)
        mem.sync_reads, mem.writes = 1, 1
        mems.append(mem)
    total, rows = pack_all(mems, PART)
    bram = total["RAMB36"] + total["RAMB18"] / 2
    print(total, bram, [(r["memory"], r["rule"]) for r in rows])
    assert bram <= 0.8 * PART["RAMB36"] and total["URAM"] <= 0.8 * PART["URAM"]
    assert total["URAM"] == fits(bufs)[1]


def test_onchip_lutram_thresholds_match_the_build():
    from m3vit_hw.build import memories
    from m3vit_hw.control import onchip
    assert (onchip.LUTRAM_DEPTH, onchip.MIN_BITS) == (memories.LUTRAM_DEPTH, memories.MIN_BITS)


def test_onchip_counts_memories_like_the_build():
    """control.onchip and the build's estimate (build.memories) place the activation buffer, a
    1W+2R memory, in the same number of URAMs (one copy per read port)."""
    from m3vit_hw.build.flow import XCZU7EV as PART
    from m3vit_hw.build.memories import MemoryInfo, pack_memory
    cfg = AcceleratorConfig.from_preset("vit-small-nyud", sizing="small")
    act = next(b for b in buffer_report(cfg) if b.name == "activation")
    mem = MemoryInfo("datapath", "act", act.width, act.depth)
    mem.sync_reads, mem.writes = 1, 1
    part = dict(PART, URAM=10 ** 6)     # a part with URAM to spare, so the rule picks URAM
    assert pack_memory(mem, part)["URAM"] == act.uram_blocks
    # A 1W+2R memory: one copy per read port, in both.
    mem.sync_reads = 2
    assert pack_memory(mem, part)["URAM"] == 2 * act.uram_blocks
    # Block RAM (a part without URAM): RAMB36, or RAMB18 in pairs, whichever is fewer, for every
    # buffer of W2's device datapath.
    mem.sync_reads = 1
    for b in buffer_report(AcceleratorConfig.from_preset("vit-small-nyud")):
        if b.lutram:
            continue
        mem = MemoryInfo("datapath", b.name, b.width, b.depth)
        mem.sync_reads, mem.writes = 1, 1
        p = pack_memory(mem, dict(PART, URAM=1e-9))     # URAM too scarce to pick
        assert p["RAMB36"] + -(-p["RAMB18"] // 2) == b.bram36_blocks, (b, p)


def test_compile_cli(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert compile_program.main(["--preset", "tiny", "--out", str(out), "--check-task", "1"]) == 0
    text = capsys.readouterr().out
    assert "program:" in text and "bit-exact" in text
    assert (out / "image.bin").stat().st_size > 0 and (out / "summary.json").exists()
    assert compile_program.main(["--preset", "tiny", "--out", str(tmp_path / "no" / "dir")]) == 2
    assert "parent directory does not exist" in capsys.readouterr().err


def test_wider_memory_beat_bit_exact():
    cfg = AcceleratorConfig.from_preset("tiny", depth=2, mem_data_bytes=64)
    qm = random_quantized(cfg.model, 21)
    program = compile_model(cfg, qm)
    assert program.layout.data_bytes == 64 and all(
        off % 64 == 0 for off, _ in program.layout.sections.values())
    _check_all_tasks(program, qm, _image(cfg.model, 22))


@pytest.mark.parametrize("preset, sizing, groups", [("vit-tiny-cityscapes", "small", [1, 6, 36, 5]),
                                                    ("vit-tiny-cityscapes", "default", None),
                                                    ("tiny", "default", None)])
def test_dense_block_waits_once_and_splits_its_first_tile(preset, sizing, groups):
    """In every dense block only the first GEMM waits (the executor orders the hidden slot); the
    waiting fc1 tile is split into panel groups that cover the layout's tile exactly once (weight,
    parameter and destination addresses continue panel by panel), each group at most the growth
    factor times the one before."""
    from m3vit_hw.dense.dense_layout import plan_dense
    cfg = AcceleratorConfig.from_preset(preset, sizing=sizing)
    p = compile_model(cfg, random_quantized(cfg.model, 0))
    view = p.model_config
    C, tile = view.pe_cols, plan_dense(view).tiles[0]
    runs, cur = [], None
    for op, f, w in p.instructions:
        if op == Opcode.GEMM:
            if cur is None:
                cur = []
                runs.append(cur)
            cur.append((f, w))
        else:
            cur = None
    assert len(runs) == sum(1 for b in range(cfg.model.depth) if not cfg.model.is_moe(b)) > 0
    for run in runs:
        assert [w for _, w in run] == [True] + [False] * (len(run) - 1)
        lead = [f for f, _ in run if f["w_addr"] - run[0][0]["w_addr"] < tile.w_bytes and f["k"] == tile.k
                and f["a_base"] == 0]
        sizes = [-(-f["n"] // C) for f in lead]
        assert sum(sizes) == tile.panels, (sizes, tile.panels)
        if groups is not None:
            assert sizes == groups, sizes
        grow = max(2, -(-lead[0]["m"] // view.pe_rows) * view.mem_data_bytes // C)
        assert sizes[0] == 1 and all(b <= grow * a for a, b in zip(sizes, sizes[1:])), sizes
        p0 = 0
        for f, n in zip(lead, sizes):
            assert f["w_addr"] == run[0][0]["w_addr"] + p0 * tile.k * C
            assert f["p_addr"] == run[0][0]["p_addr"] + p0 * view.param_word_bytes
            assert f["dst_base"] == run[0][0]["dst_base"] + p0
            p0 += n
    print(preset, "dense runs:", [len(r) for r in runs], "lead groups", sizes)
