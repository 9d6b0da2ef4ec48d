"""The program compiler: (accelerator config, quantized parameters) -> instructions + one image.

:func:`compile_model` lays out the external-memory image with :mod:`~m3vit_hw.control.image_layout`
and emits one instruction sequence that serves every task (the task is a run-time register that
selects the MoE gate and router records)::

    LOAD_IMAGE                                     (patch embedding, cls + pos into the residual)
    per block i:
      LAYERNORM ln1   ATTENTION   LAYERNORM ln2
      MOE                                           (MoE block)
      or, per token tile: GEMM fc1 tiles (GELU8 into the hidden slot), GEMM fc2 tiles (RESADD)
    STORE                                          (the residual rows -> the output tokens)
    END

On-chip placement: the residual stream at residual word 0 (pitch ``row_words``); LayerNorm output
``h`` at activation word 0 (pitch ``row_words``), where the attention and MoE units read it; a dense
block's hidden slot at ``dense_buffer_map(...).hid_base``.

The model may differ from the one the accelerator was sized for (``config.model``): the compiler
checks it against the config's buffers and fields and raises ValueError naming the buffer (or field)
and the size it needs when it does not fit. No torch.
"""

from dataclasses import dataclass, replace

from ..config import AcceleratorConfig
from ..attention.attn_layout import buffer_map
from ..dense.dense_layout import dense_buffer_map
from ..dense.embed_layout import embed_buffer_map
from ..gemm.epilogue import EpilogueMode
from .image_layout import attn_dims, pack_image, plan_image
from .isa import InstructionSet, Opcode

__all__ = ["Program", "compile_model", "fit_config"]


@dataclass
class Program:
    """A compiled encoder.

    Attributes
    ----------
    config : AcceleratorConfig
        The accelerator (its ISA decodes ``words``).
    model_config : AcceleratorConfig
        ``config``'s buffers with the compiled model (what the layouts were planned for).
    isa : InstructionSet
    instructions : list of (Opcode, dict, bool)
        ``(opcode, fields, wait)`` in program order.
    words : list of int
        The encoded program, 32-bit words.
    layout : image_layout.ImageLayout
    image : bytearray
        The external-memory image (program included; input and output regions zero).
    """

    config: AcceleratorConfig
    model_config: AcceleratorConfig
    isa: InstructionSet
    instructions: list
    words: list
    layout: object
    image: bytearray

    @property
    def program_addr(self):
        return self.layout.program_addr

    @property
    def input_addr(self):
        return self.layout.input_addr

    @property
    def output_addr(self):
        return self.layout.output_addr

    def op_counts(self):
        """``{opcode name: count}``."""
        out = {}
        for op, _, _ in self.instructions:
            out[op.name] = out.get(op.name, 0) + 1
        return out


def fit_config(config, model):
    """``config``'s buffers and array with ``model``: the config the layouts are planned for.

    Raises ValueError naming the buffer and the size it needs when ``model`` does not fit.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    if model == config.model:
        view = config
    else:
        try:
            # Every size of the accelerator stays; only the model changes.
            view = replace(config, model=model)
        except ValueError as e:
            raise ValueError(f"model {model.name!r} does not fit the accelerator sized for "
                             f"{config.model.name!r}: {e}") from None
        if view.res_buffer_words > config.res_buffer_words:
            raise ValueError(f"model {model.name!r} needs a residual buffer of {view.res_buffer_bytes} bytes "
                             f"({model.tokens} tokens x {view.row_words} words), the accelerator has "
                             f"{config.res_buffer_bytes}")
        if view.rowtab_entries > config.rowtab_entries:
            raise ValueError(f"model {model.name!r} needs row tables of {view.rowtab_entries} entries "
                             f"(top_k={model.top_k}), the accelerator has {config.rowtab_entries}")
    # The per-unit on-chip maps: each raises ValueError naming the buffer and the size it needs.
    buffer_map(view)
    dense_buffer_map(view)
    embed_buffer_map(view)
    return view


def compile_model(config, qm):
    """Compile the quantized encoder ``qm`` for the accelerator ``config``.

    Parameters
    ----------
    config : AcceleratorConfig
        The accelerator (buffer sizes, PE array, instruction field widths).
    qm : reference.qparams.QuantizedEncoder
        The integer parameters; ``qm.cfg`` is the model (it may differ from ``config.model`` if it fits).

    Returns
    -------
    Program

    Raises
    ------
    TypeError, ValueError
        On a bad argument; ValueError naming the buffer (or instruction field) and the size it needs
        when the model does not fit the config.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    model = qm.cfg
    view = fit_config(config, model)
    isa = InstructionSet(config)
    layout = plan_image(view, hw=config)
    insns = _emit(view, qm, layout, attn_dims(view, config))
    words = []
    for op, fields, wait in insns:
        words += isa.encode(op, wait=wait, **fields)
    program = b"".join(w.to_bytes(4, "little") for w in words)
    first = layout
    layout = plan_image(view, program_bytes=len(program), hw=config)
    # The program is the image's last section: nothing the instructions address may have moved.
    assert first.blocks == layout.blocks and first.output_addr == layout.output_addr, "program moved the image"
    image = pack_image(qm, layout, program)
    return Program(config=config, model_config=view, isa=isa, instructions=insns, words=words,
                   layout=layout, image=image)


def _moe_shape(model, layout):
    """The MOE instruction's run-time shape fields: all 0 for the elaborated model's shape, else the
    model's top-k, the plan table and the expert stride (``image_layout.runtime_moe``)."""
    if layout.moe_hw is None:
        return dict(top_k=0, plan_fetch=0, plan_addr=0, expert_stride=0)
    return dict(top_k=model.top_k, plan_fetch=1, plan_addr=layout.moe_plan,
                expert_stride=layout.moe_layout.expert_stride)


def _first_tile_groups(view, tile, rows):
    """``[(first panel, panels)]``: a waiting GEMM tile split so that its weight fetch hides behind
    its own compute. A group of ``g`` panels computes ``ceil(rows / pe_rows) * g * k`` beats while
    the next one streams ``g' * k * pe_cols`` bytes at up to one beat a cycle, so each group may be
    ``ceil(rows / pe_rows) * mem_data_bytes / pe_cols`` times the one before (at least twice, the
    ping-pong buffer's two halves); the first is one panel. Splits land only where the panel's
    weight and parameter offsets are whole memory beats (the executor's addresses are beat-aligned);
    otherwise the tile stays whole."""
    C, db = view.pe_cols, view.mem_data_bytes
    if (tile.k * C) % db or view.param_word_bytes % db:
        return [(0, tile.panels)]
    grow = max(2, -(-rows // view.pe_rows) * db // C)
    groups, p0, g = [], 0, 1
    while p0 < tile.panels:
        count = min(g, tile.panels - p0)
        groups.append((p0, count))
        p0 += count
        g *= grow
    return groups


def _emit(view, qm, layout, dims=0):
    """The instruction list ``[(Opcode, fields, wait)]`` (addresses from ``layout``)."""
    m = view.model
    T = m.tokens
    rw = view.row_words
    C = view.pe_cols
    out = [(Opcode.LOAD_IMAGE, dict(img_addr=layout.input_addr, img_rows=m.img_size[0], img_cols=m.img_size[1],
                                    param_addr=layout.embed, shift=int(qm.patch.shift)), True)]
    for b, qb in zip(layout.blocks, qm.blocks):
        out.append((Opcode.LAYERNORM, dict(res_base=0, act_base=0, tokens=T, param_addr=b.ln1,
                                           shift=int(qb.ln1.shift)), True))
        a = qb.attn
        out.append((Opcode.ATTENTION, dict(tokens=T, param_addr=b.attn, c_mult=int(a.c_mult),
                                           c_shift=int(a.c_shift), out_mult=int(a.out_mult),
                                           out_shift=int(a.out_shift), qkv_shift=int(a.qkv.shift),
                                           proj_shift=int(a.proj.shift), dims=dims), True))
        out.append((Opcode.LAYERNORM, dict(res_base=0, act_base=0, tokens=T, param_addr=b.ln2,
                                           shift=int(qb.ln2.shift)), True))
        if b.kind == "moe":
            ml = layout.moe_layout
            out.append((Opcode.MOE, dict(tokens=T, gate_addr=b.mlp + ml.gate_offset, gate_stride=ml.gate_stride,
                                         expert_addr=b.mlp + ml.experts_offset, router_addr=b.router,
                                         lut_addr=b.lut, fc1_shift=int(qb.mlp.fc1.shift),
                                         fc2_shift=int(qb.mlp.fc2.shift), **_moe_shape(m, layout)), True))
            continue
        dl = layout.dense_layout
        bm = dense_buffer_map(view)
        # Only the block's first GEMM waits (for the LayerNorm's h). The GEMM executor issues a
        # command only after the previous one's results are written, which orders the hidden slot
        # (fc1 -> fc2, fc2 -> the next token tile's fc1) by itself; a ``wait`` there would only hold
        # the next tile's weight fetch until the engine drained (measured: 74 % PE busy on W1).
        for t0 in range(0, T, bm.token_tile):
            rows = min(bm.token_tile, T - t0)
            for tile in dl.tiles:
                if tile.kind == "fc1":
                    f = dict(a_base=t0 * rw, a_stride=rw, dst_base=bm.hid_base + tile.n0 // C,
                             dst_stride=bm.hw, shift=int(qb.mlp.fc1.shift), mode=EpilogueMode.GELU8.value,
                             lut_addr=b.mlp, a_unsigned=0)
                    # The hidden slot is overwritten while the previous token tile's fc2 reads it:
                    # the GEMM executor orders that itself (below), so only the block's first GEMM waits.
                    wait = tile.index == 0 and t0 == 0
                else:
                    f = dict(a_base=bm.hid_base, a_stride=bm.hw, dst_base=t0 * rw + tile.n0 // C,
                             dst_stride=rw, shift=int(qb.mlp.fc2.shift), mode=EpilogueMode.RESADD.value,
                             lut_addr=0, a_unsigned=1)       # the hidden slot holds uint8 GELU codes
                    # fc2 reads the hidden slot fc1 wrote: ordered by the executor, no wait.
                    wait = False
                g = dict(m=rows, k=tile.k, n=tile.n, w_addr=b.mlp + tile.w_offset, p_addr=b.mlp + tile.p_offset,
                         gather=0, scatter=0, **f)
                if not wait:
                    out.append((Opcode.GEMM, g, False))
                    continue
                # The block's first GEMM fetches its weights only once every unit is idle: split it into
                # growing panel groups, so the engine starts after the first small group arrives and
                # each later group streams while the one before computes.
                for i, (p0, count) in enumerate(_first_tile_groups(view, tile, rows)):
                    n0 = p0 * C
                    sub = dict(g, n=min(tile.n, n0 + count * C) - n0, w_addr=g["w_addr"] + p0 * tile.k * C,
                               p_addr=g["p_addr"] + p0 * view.param_word_bytes, dst_base=f["dst_base"] + p0)
                    out.append((Opcode.GEMM, sub, i == 0))
    out.append((Opcode.STORE, dict(res_base=0, words=T * rw, dst_addr=0), True))
    out.append((Opcode.END, {}, True))
    return out
