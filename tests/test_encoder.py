# amaranth: UnusedElaboratable=no
"""EncoderTop: programs from the compiler run through the sequencer and the shared datapath in pysim,
bit-exact against the program executor (partial programs) and the golden model (whole frames), with
random external-memory stalls."""

import numpy as np
import pytest

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.isa import Opcode
from m3vit_hw.encoder import EncoderTop
from m3vit_hw.model_config import ModelConfig
from sim.frame import make_job, run_frames

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _model(**kw):
    base = dict(name="enc", img_size=(8, 16), patch_size=4, dim=16, depth=1, heads=2, experts=2, top_k=1,
                mlp_hidden=32, tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
    base.update(kw)
    return ModelConfig(**base)


def _assert_ok(rep):
    fm = rep["first_mismatch"]
    assert rep["bit_exact"], (f"{rep['label']} task {rep['task']}: {rep['mismatches']} mismatches vs "
                              f"{rep['reference']}, error {rep['error']}; first: {fm}")


def test_partial_program_bit_exact():
    """LOAD_IMAGE, LAYERNORM x2, the dense MLP as GEMM tiles (fc1 GELU8 tiles, fc2 RESADD tiles) and
    STORE; D = 12 (3 words of 4 lanes: the store of 5 x 3 words ends on a half beat), hidden 40 (a
    ragged N tile)."""
    model = _model(dim=12, mlp_hidden=40, img_size=(8, 8))
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
    job = make_job(config, model, seed=3, task=1, drop=[Opcode.ATTENTION])
    ops = {op for op, _, _ in job.program.instructions}
    assert ops == {Opcode.LOAD_IMAGE, Opcode.LAYERNORM, Opcode.GEMM, Opcode.STORE, Opcode.END}
    rep = run_frames(config, [job], stall_prob=0.2, seed=3)[0]
    _assert_ok(rep)
    print(f"partial program D=12: bit-exact, {rep['cycles']} cycles; {rep['cycles_per_op_class']}")


def test_diff_ladder_names_the_first_bad_op():
    """A fault in the second LayerNorm's parameter records (in the simulated memory only) must be
    reported by the diff ladder as that LAYERNORM instruction of block 0, on the ``h`` rows."""
    model = _model(img_size=(8, 8))
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
    job = make_job(config, model, seed=4, task=0, drop=[Opcode.ATTENTION])
    ln2 = job.program.layout.blocks[0].ln2
    job.rtl_patch = {ln2: job.program.image[ln2] ^ 0x40}       # gamma of channel 0
    rep = run_frames(config, [job], seed=4)[0]
    assert not rep["bit_exact"]
    fm = rep["first_mismatch"]
    index = [i for i, (op, f, _) in enumerate(job.program.instructions)
             if op is Opcode.LAYERNORM and f["param_addr"] == ln2][0]
    assert (fm["block"], fm["op"], fm["buffer"], fm["instructions"][1]) == (0, "LAYERNORM", "h", index), fm
    print(f"diff ladder: {fm}")


def test_refuses_bad_config():
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        EncoderTop(None)


def _frame_model(**kw):
    """Two blocks (dense, then MoE), two tasks, 4x4 patches of a small frame."""
    base = dict(depth=2, experts=4, top_k=2, expert_hidden=16)
    base.update(kw)
    return _model(**base)


def test_small_frame_bit_exact():
    """The whole encoder (LOAD_IMAGE, LN, ATTENTION, LN, dense GEMMs, LN, ATTENTION, LN, MOE, STORE)
    through the top, one task, memory stalls; 5 tokens."""
    model = _frame_model(img_size=(8, 8))
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
    rep = run_frames(config, [make_job(config, model, seed=21, task=1)], stall_prob=0.1, seed=21)[0]
    _assert_ok(rep)
    print(f"small frame T={model.tokens}: bit-exact vs golden, {rep['cycles']} cycles; {rep['cycles_per_op_class']}; "
          f"phases {rep['cycles_per_phase']}, PE busy {rep['pe_active_per_phase']}")
    _assert_phases(rep)


def test_w2_shaped_frame_bit_exact():
    """W2's device layout in small: head_dim 4 on 8 columns (W2: 32 on 64), so two heads share a
    context word (``attn_head_pack`` 2); the B operand reads K and V from the Q|K|V copy; the main
    activation bank is split in two memories (``act_split_words``, W2: URAM + block RAM) with h
    below and Q|K|V, MoE hidden rows and dense hidden rows across the split. The whole encoder
    through the top, one task, memory stalls; 5 tokens."""
    model = _frame_model(img_size=(8, 8), heads=4)
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=8, act_split_words=64)
    assert config.attn_head_pack == 2 and config.act_buffer_words == 112
    rep = run_frames(config, [make_job(config, model, seed=23, task=0)], stall_prob=0.1, seed=23)[0]
    _assert_ok(rep)
    print(f"W2-shaped frame T={model.tokens}: bit-exact vs golden, {rep['cycles']} cycles")


def test_lane_split_frame_bit_exact():
    """``lane_split`` (W2's default): the residual bank of 32 int16 lanes is two memories, lanes 0-30
    (whole 72-bit URAM columns) and lane 31, sharing every address and enable. The whole encoder
    through the top, one task, memory stalls, head_dim 32 on 32 columns (pysim cannot compile the
    64-column design, where the int8 banks split too: ``tests/test_verilator_frame.py``)."""
    model = _frame_model(img_size=(8, 8), dim=64, heads=2, mlp_hidden=128, expert_hidden=64)
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=32, lane_split=True)
    assert (config.lane_split_at(8), config.lane_split_at(16)) == (None, 31)
    rep = run_frames(config, [make_job(config, model, seed=23, task=0)], stall_prob=0.1, seed=23)[0]
    _assert_ok(rep)
    print(f"lane-split frame T={model.tokens}, 4x32: bit-exact vs golden, {rep['cycles']} cycles")


@pytest.mark.slow
@pytest.mark.parametrize("data_bytes", [32, 64, 128])
def test_small_frame_wide_beats(data_bytes):
    """The small frame of :func:`test_small_frame_bit_exact` with 32, 64 and 128-byte memory beats
    (64: two instructions in a beat, every weight, parameter, image and store burst on 512-bit beats),
    memory stalls; bit-exact against the golden model."""
    model = _frame_model(img_size=(8, 8))
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4, mem_data_bytes=data_bytes)
    rep = run_frames(config, [make_job(config, model, seed=21, task=1)], stall_prob=0.1, seed=21)[0]
    _assert_ok(rep)
    print(f"small frame, {data_bytes}-byte beats: bit-exact vs golden, {rep['cycles']} cycles; "
          f"{rep['bytes_read']} bytes read")


def _assert_phases(rep):
    """The phase counters lie inside their op class's counters and are not empty (one attention
    sub-layer per block and one MoE block run)."""
    ops, pe = rep["cycles_per_op_class"], rep["pe_active_per_op_class"]
    ph, php = rep["cycles_per_phase"], rep["pe_active_per_phase"]
    for name, op in (("attn_core", "attention"), ("softmax", "attention"), ("moe_router", "moe")):
        assert 0 < ph[name] < ops[op], f"phase {name}: {ph[name]} cycles, op class {op}: {ops[op]}"
        assert php[name] <= min(ph[name], pe[op]), f"phase {name}: {php[name]} PE-busy cycles, " \
            f"{ph[name]} cycles, op class {op} PE-busy {pe[op]}"
    # The router's gate GEMMs run on the array; the attention core's QK^T and AV do.
    assert php["moe_router"] > 0 and php["attn_core"] > 0, php


@pytest.mark.slow
def test_small_frame_every_task():
    """The small model (2 blocks, one MoE, 2 tasks, 9 tokens) for every task, one after another on one
    simulated top (the task register alone selects the gates); the outputs must differ by task."""
    model = _frame_model()
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
    jobs = [make_job(config, model, seed=5, task=t, label=f"task{t}") for t in range(model.num_tasks)]
    assert not np.array_equal(jobs[0].expected, jobs[1].expected), "the tasks must route differently"
    for rep in run_frames(config, jobs, stall_prob=0.15, seed=5, latency=12):
        _assert_ok(rep)
        print(f"{rep['label']}: bit-exact, {rep['cycles']} cycles; {rep['cycles_per_op_class']}; "
              f"PE busy {rep['pe_active_per_op_class']}")


@pytest.mark.slow
def test_odd_model_bit_exact():
    """D = 12 (not a power of two; one and a half 8-lane words), head_dim 6, 3 experts (odd) of hidden
    8 < D, top-2, dense hidden 20, 3 tasks, a 8x12 frame (7 tokens), 4x8 PEs; every task."""
    model = _model(img_size=(8, 12), dim=12, heads=2, depth=2, experts=3, top_k=2, expert_hidden=8,
                   mlp_hidden=20, tasks=("a", "b", "c"), task_channels=(1, 1, 1))
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=8)
    jobs = [make_job(config, model, seed=9, task=t, label=f"odd task{t}") for t in range(3)]
    for rep in run_frames(config, jobs, stall_prob=0.1, seed=9):
        _assert_ok(rep)
        print(f"{rep['label']}: bit-exact, {rep['cycles']} cycles")


@pytest.mark.slow
def test_one_design_runs_two_models():
    """One elaborated EncoderTop (sized for model A: 2 blocks, dense hidden 32, E=4 top-2 experts of
    hidden 16, 2 heads) runs model A (task 0) and then model B (4 blocks: two dense of hidden 24, two
    MoE with E=3 top-1 experts of hidden 12; 4 heads of 4; task 1) in one simulation, both bit-exact
    against the golden model.
    What differs at run time: depth and block order, the dense hidden width and its token tiling (GEMM
    instructions carry every shape field), the MoE experts, top-k and expert hidden (MOE's run-time
    shape fields: the image's gate is padded to the design's 4 experts, the expert plan is a table),
    the attention heads (ATTENTION.dims), the task, every parameter and address. What may not differ
    (elaborated into the units): image size and patch, D (LayerNorm, patch embedding), and the maxima
    (experts, top-k, expert hidden, head width, context width, buffers)."""
    a = _frame_model()
    b = _frame_model(name="enc-b", depth=4, mlp_hidden=24, experts=3, top_k=1, expert_hidden=12, heads=4)
    config = AcceleratorConfig(model=a, pe_rows=4, pe_cols=4)
    jobs = [make_job(config, a, seed=31, task=0, label="A: depth 2, hidden 32, E4 top-2 h16"),
            make_job(config, b, seed=32, task=1, label="B: depth 4, hidden 24, E3 top-1 h12, 4 heads")]
    lay = jobs[1].program.layout
    assert lay.moe_hw is config and lay.attn_hw is config, "model B must use the run-time shapes"
    for rep in run_frames(config, jobs, stall_prob=0.1, seed=31):
        _assert_ok(rep)
        print(f"{rep['label']}: bit-exact, {rep['instructions']} instructions, {rep['cycles']} cycles")
