"""The one external-memory image of a compiled encoder: where every section lives.

This module owns the whole image. Each operation's bytes are laid out by its own layout module, and
this module only places those pieces and packs the few records that belong to no unit:

==============  ==============================================================================
section         contents (layout module)
==============  ==============================================================================
``embed``       residual initialisation (cls, pos) + patch-embedding tiles (``dense.embed_layout``)
``ln``          every LayerNorm's parameter records (``dense.norm_stage.pack_norm_params``)
``attn``        every block's attention tiles (``attention.attn_layout``)
``dense``       every dense block's GELU table + fc1/fc2 tiles (``dense.dense_layout``)
``moe``         every MoE block's gate records (one per task) + expert tiles (``moe.expert_layout``)
``tables``      per MoE block: the experts' GELU table and the per-task router records
``input``       the uint8 camera image, row-major HWC (written by the driver each frame)
``output``      the encoder tokens: ``T`` rows of ``row_words`` int16 words (``pe_cols`` lanes, LE)
``program``     the instructions (:class:`~m3vit_hw.control.isa.InstructionSet` words, little-endian)
==============  ==============================================================================

Every address is a byte offset from the image base (the sequencer's ``param_base`` register); every
piece starts on an ``align``-byte boundary (a power of two, at least one memory beat and one LayerNorm
record, so each unit's alignment rule holds). The program comes last so that no address an
instruction carries depends on the program's length. Pure Python + numpy, no torch.
"""

from dataclasses import dataclass, field

import numpy as np

from .. import numerics
from ..config import AcceleratorConfig
from ..attention.attn_layout import pack_attention, plan_attention
from ..attention.attn_sequencer import AttnShapeLayout
from ..dense.dense_layout import pack_dense, plan_dense
from ..dense.embed_layout import pack_embed, plan_embed
from ..dense.norm_stage import norm_lanes, norm_record_bytes, pack_norm_params
from ..moe.expert_layout import PLAN_ENTRY_BYTES, pack_moe, pack_plan, plan_moe
from .isa import ROUTER_RECORD_BYTES

__all__ = ["BlockAddrs", "ImageLayout", "plan_image", "pack_image", "pack_router_table",
           "output_row_bytes", "SECTIONS", "runtime_moe", "moe_layout_for", "runtime_attention",
           "attn_layout_for", "attn_dims"]

#: Section names, in image order.
SECTIONS = ("embed", "ln", "attn", "dense", "moe", "tables", "input", "output", "program")

_LUT_BYTES = 1 << numerics.ACT_BITS


def _round_up(a, b):
    return -(-a // b) * b


def runtime_moe(config, hw):
    """Whether ``config.model``'s MoE layers run on the design elaborated for ``hw`` with a *run-time
    shape* (:class:`~m3vit_hw.moe.moe_sequencer.MoESequencer`'s ``top_k`` / plan table / expert stride):
    the model has MoE blocks, the same ``D`` as ``hw.model``, and at most its experts, expert hidden,
    tasks and top-k, but not all the same. (A model of another ``D`` keeps its own layout: it runs only
    in the executor.)"""
    if hw is None or not config.model.moe_blocks:
        return False
    m, h = config.model, hw.model
    shape = lambda x: (x.experts, x.expert_hidden, x.num_tasks, x.top_k)
    return (m.dim == h.dim and shape(m) != shape(h)
            and all(a <= b for a, b in zip(shape(m), shape(h))))


def moe_layout_for(config, hw=None):
    """The MoE layout of ``config.model`` as the image holds it: on ``hw``'s design with a run-time
    shape (:func:`runtime_moe`: the gate padded to ``hw``'s experts, the expert tiles planned on its
    buffers), else ``plan_moe(config)``."""
    if runtime_moe(config, hw):
        m = config.model
        return plan_moe(hw, hidden=m.expert_hidden, experts=m.experts, tasks=m.num_tasks)
    return plan_moe(config)


def runtime_attention(config, hw):
    """Whether ``config.model``'s attention runs on the design elaborated for ``hw`` with a run-time
    shape (:class:`~m3vit_hw.attention.attn_sequencer.AttnSequencer`'s ``dims``): same ``D`` as
    ``hw.model`` (LayerNorm and the patch embedding are elaborated for it), another head count."""
    if hw is None:
        return False
    m, h = config.model, hw.model
    return m.dim == h.dim and m.heads != h.heads


def attn_layout_for(config, hw=None):
    """The attention layout of ``config.model`` as the image holds it: planned on ``hw``'s design
    with the model's heads (:func:`runtime_attention`), else ``plan_attention(config)``. Raises
    ValueError (from :func:`~m3vit_hw.attention.attn_layout.plan_attention`) if the heads do not fit
    the design."""
    if runtime_attention(config, hw):
        return plan_attention(hw, heads=config.model.heads)
    return plan_attention(config)


def attn_dims(config, hw=None):
    """The ``ATTENTION.dims`` field: 0 for the design's own shape, else the packed
    :meth:`~m3vit_hw.attention.attn_layout.AttnLayout.shape_fields` of :func:`attn_layout_for`."""
    if not runtime_attention(config, hw):
        return 0
    return AttnShapeLayout(hw).const(attn_layout_for(config, hw).shape_fields()).as_value().value


def output_row_bytes(config):
    """Bytes of one output token row: ``row_words`` int16 words of ``pe_cols`` lanes."""
    return config.row_words * config.pe_cols * numerics.RES_BITS // 8


@dataclass(frozen=True)
class BlockAddrs:
    """Byte addresses of one block's pieces. ``mlp`` is the dense image (``kind == "dense"``) or the
    MoE image (``"moe"``); ``lut`` and ``router`` are the MoE tables (0 for a dense block)."""

    index: int
    kind: str
    ln1: int
    attn: int
    ln2: int
    mlp: int
    lut: int = 0
    router: int = 0


@dataclass(frozen=True)
class ImageLayout:
    """Where everything lives (see the module docstring). ``sections`` maps a section name to
    ``(offset, bytes)``; ``breakdown`` splits the image by content (weights, column parameters, ...)."""

    config: AcceleratorConfig
    data_bytes: int
    align: int
    embed: int
    embed_layout: object
    attn_layout: object
    dense_layout: object
    moe_layout: object
    norm_lanes: int
    norm_bytes: int
    blocks: tuple
    program_addr: int
    program_bytes: int
    input_addr: int
    input_bytes: int
    output_addr: int
    output_bytes: int
    image_bytes: int
    sections: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    #: The expert plan table (run-time MoE shape, :func:`runtime_moe`), 0 if none.
    moe_plan: int = 0
    #: The design the MoE image is packed for (run-time MoE shape), or ``None``.
    moe_hw: object = None
    #: The design the attention images are packed for (run-time heads), or ``None``.
    attn_hw: object = None


def plan_image(config, *, program_bytes=0, hw=None):
    """The :class:`ImageLayout` of ``config``'s model (it depends on sizes only, not on values).

    ``hw`` is the accelerator the program runs on when ``config`` is a view of it with another model
    (:func:`~m3vit_hw.control.compiler.fit_config`): with a run-time MoE shape (:func:`runtime_moe`)
    the MoE layers are laid out for ``hw``'s design and a plan table joins the ``tables`` section.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, or when a unit's layout module refuses the config (the message names the
        buffer and the size it needs).
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    if not isinstance(program_bytes, int) or program_bytes < 0:
        raise ValueError(f"program_bytes must be an int >= 0, not {program_bytes!r}")
    m = config.model
    data_bytes = config.mem_data_bytes
    lanes = norm_lanes(config)
    align = max(data_bytes, norm_record_bytes(config))
    emb = plan_embed(config)
    att = attn_layout_for(config, hw)
    den = plan_dense(config) if m.depth > len(m.moe_blocks) else None
    moe = moe_layout_for(config, hw) if m.moe_blocks else None
    rt_moe = runtime_moe(config, hw)
    ln_bytes = _round_up(m.dim // lanes * norm_record_bytes(config), align)
    at = 0
    sections = {}

    def take(size):
        nonlocal at
        here = at
        at = _round_up(at + size, align)
        return here

    def section(name, start):
        sections[name] = (start, at - start)

    embed = take(emb.image_bytes)
    section("embed", embed)
    start = at
    lns = [(take(ln_bytes), take(ln_bytes)) for _ in range(m.depth)]
    section("ln", start)
    start = at
    atts = [take(att.image_bytes) for _ in range(m.depth)]
    section("attn", start)
    start = at
    mlps = {i: take(den.image_bytes) for i in range(m.depth) if not m.is_moe(i)}
    section("dense", start)
    start = at
    mlps.update({i: take(moe.image_bytes) for i in m.moe_blocks})
    section("moe", start)
    start = at
    tables = {i: (take(_LUT_BYTES), take(m.num_tasks * ROUTER_RECORD_BYTES)) for i in m.moe_blocks}
    moe_plan = take(len(plan_moe(hw).tiles) * PLAN_ENTRY_BYTES) if rt_moe else 0
    section("tables", start)
    inp_bytes = m.img_size[0] * m.img_size[1] * m.in_chans
    inp = take(inp_bytes)
    section("input", inp)
    out_bytes = m.tokens * output_row_bytes(config)
    out = take(out_bytes)
    section("output", out)
    # Last, so that no address an instruction carries depends on the program's length.
    program = take(program_bytes)
    section("program", program)
    blocks = tuple(BlockAddrs(i, "moe" if m.is_moe(i) else "dense", lns[i][0], atts[i], lns[i][1], mlps[i],
                              *tables.get(i, (0, 0))) for i in range(m.depth))

    # Content breakdown: the weight panels vs the column parameter words of every tile.
    def wp(tiles):
        return sum(t.w_bytes for t in tiles), sum(t.p_bytes for t in tiles)

    n_dense = m.depth - len(m.moe_blocks)
    n_moe = len(m.moe_blocks)
    ew, ep = wp(emb.tiles)
    aw, ap = wp(att.tiles)
    dw, dp = wp(den.tiles) if den else (0, 0)
    mw, mp = wp(moe.tiles) if moe else (0, 0)
    experts = m.experts if moe else 0
    breakdown = {
        "program": program_bytes,
        "weights": ew + m.depth * aw + n_dense * dw + n_moe * experts * mw,
        "column params": ep + m.depth * ap + n_dense * dp + n_moe * experts * mp,
        "gates": n_moe * m.num_tasks * moe.gate_stride if moe else 0,
        "layernorm": 2 * m.depth * m.dim // lanes * norm_record_bytes(config),
        "cls+pos": emb.res_bytes,
        "tables": n_dense * (den.lut_bytes if den else 0) + n_moe * (_LUT_BYTES + m.num_tasks * ROUTER_RECORD_BYTES),
        "input": inp_bytes,
        "output": out_bytes,
    }
    return ImageLayout(config=config, data_bytes=data_bytes, align=align, embed=embed, embed_layout=emb,
                       attn_layout=att, dense_layout=den, moe_layout=moe, norm_lanes=lanes, norm_bytes=ln_bytes,
                       blocks=blocks, program_addr=program, program_bytes=program_bytes, input_addr=inp,
                       input_bytes=inp_bytes, output_addr=out, output_bytes=out_bytes, image_bytes=at,
                       sections=sections, breakdown=breakdown, moe_plan=moe_plan,
                       moe_hw=hw if rt_moe else None, attn_hw=hw if runtime_attention(config, hw) else None)


def pack_router_table(qmoe, tasks):
    """The per-task router records of one MoE layer (``ROUTER_RECORD_BYTES`` each, see ``isa``)."""
    out = bytearray(tasks * ROUTER_RECORD_BYTES)
    for t in range(tasks):
        g = t if len(qmoe.gates) > 1 else 0
        c_mult, c_shift = int(qmoe.router_c_mult[g]), int(qmoe.router_c_shift[g])
        if not 0 <= c_mult < 1 << numerics.SOFTMAX_MULT_BITS or not 0 <= c_shift <= numerics.SHIFT_MAX:
            raise ValueError(f"router c_mult/c_shift of task {t} out of range: {c_mult}, {c_shift}")
        at = t * ROUTER_RECORD_BYTES
        out[at:at + 2] = c_mult.to_bytes(2, "little")
        out[at + 2] = c_shift
    return bytes(out)


def _lut_bytes(lut):
    lut = np.asarray(lut, dtype=np.int64)
    # uint8 codes: fc2 / h4toh read the GELU output with a_unsigned (docs/numerics.md §3).
    lo, hi = numerics.int_range(numerics.GELU_CODE_BITS, signed=False)
    if lut.shape != (_LUT_BYTES,) or lut.min() < lo or lut.max() > hi:
        raise ValueError(f"a GELU table must be {_LUT_BYTES} uint8 codes in [{lo}, {hi}], not shape {lut.shape} "
                         f"with range [{lut.min()}, {lut.max()}]")
    return lut.astype(np.uint8).tobytes()


def pack_image(qm, layout, program=b""):
    """The image bytes (``layout.image_bytes``): every unit's pieces at their addresses, the program,
    and zeroed input and output regions.

    ``qm`` is a :class:`reference.qparams.QuantizedEncoder` of ``layout.config.model``.
    """
    config = layout.config
    m = config.model
    if len(program) != layout.program_bytes:
        raise ValueError(f"program must be {layout.program_bytes} bytes (the layout's), not {len(program)}")
    if len(qm.blocks) != m.depth:
        raise ValueError(f"qm has {len(qm.blocks)} blocks, the model {m.depth}")
    image = bytearray(layout.image_bytes)
    db = layout.data_bytes

    def put(at, blob):
        image[at:at + len(blob)] = blob

    put(layout.embed, pack_embed(qm.patch, qm.cls_int, qm.pos_int, config)[0])
    for b, qb in zip(layout.blocks, qm.blocks):
        put(b.ln1, pack_norm_params(qb.ln1, config))
        put(b.ln2, pack_norm_params(qb.ln2, config))
        if layout.attn_hw is not None:
            put(b.attn, pack_attention(qb.attn, layout.attn_hw, heads=m.heads)[0])
        else:
            put(b.attn, pack_attention(qb.attn, config)[0])
        if b.kind == "moe":
            if layout.moe_hw is not None:
                put(b.mlp, pack_moe(qb.mlp, layout.moe_hw, layout=layout.moe_layout)[0])
            else:
                put(b.mlp, pack_moe(qb.mlp, config)[0])
            put(b.lut, _lut_bytes(qb.mlp.gelu_lut))
            put(b.router, pack_router_table(qb.mlp, m.num_tasks))
        else:
            put(b.mlp, pack_dense(qb.mlp, config)[0])
    if layout.moe_hw is not None:
        put(layout.moe_plan, pack_plan(layout.moe_layout, layout.moe_hw))
    put(layout.program_addr, program)
    return image
