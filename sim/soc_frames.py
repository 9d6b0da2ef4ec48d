# amaranth: UnusedElaboratable=no
"""Frames for the AXI-top tests: a compiled random encoder, a camera image, and the reference tokens.

When the top has a unit for every opcode of the program, the expected tokens are
``reference.golden_model.encode``; otherwise the program loses the opcodes without a unit
(:func:`strip`) and the expected tokens are :func:`sim.program_executor.run_program` of that same partial
program (the sequencer's Python twin, built from the per-op golden functions).
"""

import dataclasses

import numpy as np

from m3vit_hw.control.compiler import compile_model
from m3vit_hw.control.isa import Opcode
from m3vit_hw.encoder import EncoderTop
from reference import golden_model
from reference.random_qparams import random_quantized
from sim.program_executor import run_program

__all__ = ["core_units", "strip", "make_frame", "expected_tokens", "random_image"]


def core_units(config):
    """The opcodes the encoder top of ``config`` has a unit for."""
    core = EncoderTop(config)
    units = getattr(core, "units", None)
    if units is None:
        # The sequencer is told the top's units; EncoderTop has no public list of them yet.
        units = core.sequencer._units
    return frozenset(units)


def strip(program, drop):
    """``program`` without the instructions whose opcode is in ``drop`` (same image otherwise)."""
    isa = program.isa
    insns = [(op, f, w) for op, f, w in program.instructions if op not in drop]
    words = []
    for op, f, w in insns:
        words += isa.encode(op, wait=w, **f)
    image = bytearray(program.image)
    at = program.program_addr
    image[at:at + program.layout.program_bytes] = bytes(program.layout.program_bytes)
    image[at:at + 4 * len(words)] = b"".join(w.to_bytes(4, "little") for w in words)
    return dataclasses.replace(program, instructions=insns, words=words, image=image)


def make_frame(config, seed, *, units=None):
    """``(program, qm, drop)``: random quantized parameters for ``config.model`` (seed ``seed``), compiled,
    without the opcodes outside ``units`` (``drop``, empty when the top runs the whole program)."""
    qm = random_quantized(config.model, seed)
    program = compile_model(config, qm)
    drop = frozenset()
    if units is not None:
        drop = frozenset(op for op, _, _ in program.instructions
                         if op not in units and op not in (Opcode.END, Opcode.SYNC))
    if drop:
        program = strip(program, drop)
    return program, qm, drop


def expected_tokens(program, qm, drop, img, task):
    """The reference tokens: the golden model for a whole program, else the executor (see module doc)."""
    if not drop:
        return golden_model.encode(qm, img.astype(np.int64).transpose(2, 0, 1) - 128, task), "golden_model.encode"
    tokens, _ = run_program(program, img, task)
    return tokens, "program_executor"


def random_image(model, seed):
    rng = np.random.default_rng(seed)
    H, W = model.img_size
    return rng.integers(0, 256, (H, W, model.in_chans)).astype(np.uint8)
