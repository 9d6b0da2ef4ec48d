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
    STORE; D = 12 (3 words of 4 lanes: the store ends on a half beat), hidden 40 (a ragged N tile)."""
    model = _model(dim=12, mlp_hidden=40)
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
    job = make_job(config, model, seed=3, task=1, drop=[Opcode.ATTENTION])
    ops = {op for op, _, _ in job.program.instructions}
    assert ops == {Opcode.LOAD_IMAGE, Opcode.LAYERNORM, Opcode.GEMM, Opcode.STORE, Opcode.END}
    rep = run_frames(config, [job], stall_prob=0.2, seed=3)[0]
    _assert_ok(rep)
    print(f"partial program D=12: bit-exact, {rep['cycles']} cycles; {rep['cycles_per_op_class']}")


def test_refuses_bad_config():
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        EncoderTop(None)
