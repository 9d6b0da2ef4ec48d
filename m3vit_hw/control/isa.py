"""The instruction format of the program-driven sequencer: one Python description, three outputs.

A *program* is a list of coarse instructions in external memory. The sequencer fetches them in order
and hands each to one unit (patch-embedding loader, LayerNorm, GEMM engine, attention, MoE layer,
store). :class:`InstructionSet` derives every field width from an
:class:`~m3vit_hw.config.AcceleratorConfig` (buffer address widths, token capacity, the GEMM command's
fields) and :mod:`m3vit_hw.numerics` (shifts, multipliers), and produces

* :meth:`InstructionSet.layout`: an Amaranth ``StructLayout`` per opcode, for the RTL decoder;
* :meth:`InstructionSet.encode` / :meth:`InstructionSet.decode`: the Python encoder the compiler uses
  (range-checked: a value outside its field raises ValueError naming the field, value and range);
* :meth:`InstructionSet.markdown` and :meth:`InstructionSet.c_header`: the documentation
  (``docs/isa.md``) and a C header for drivers and for firmware that patches programs.

Encoding
--------
Every instruction is ``words`` 32-bit little-endian words (:attr:`InstructionSet.words`, the widest
opcode rounded up to a power of two of words). Bit ``i`` of the instruction is bit ``i % 32`` of word
``i // 32``. Bits ``[0, 4)`` hold the :class:`Opcode`, bit 4 is ``wait`` (the instruction starts only
when every earlier instruction has finished), and the opcode's fields follow from bit 5 in the order
:meth:`InstructionSet.fields` lists them. Unused bits are zero.

Addresses: ``*_addr`` fields are external byte addresses relative to the program's *parameter base*
register (so one program runs wherever the loader put the image); ``act_*``, ``res_*`` are on-chip
word addresses. The task is a run-time register: ``MOE`` selects its gate record as
``gate_addr + task * gate_stride`` and its router softmax record as
``router_addr + task * ROUTER_RECORD_BYTES``.
"""

from dataclasses import dataclass

from amaranth.hdl import unsigned
from amaranth.lib import data, enum

from .. import numerics
from ..attention.attn_sequencer import AttnShapeLayout
from ..config import AcceleratorConfig
from ..checks import check_int as _check_int
# Bytes of one task's router record (``MOE.router_addr``): defined with the MoE layer's memory layout
# (moe.expert_layout), which the MoE client's record fetch reads; re-exported here for the compiler.
from ..moe.expert_layout import ROUTER_RECORD_BYTES

__all__ = ["Opcode", "Field", "InstructionSet", "OPCODE_BITS", "HEADER_BITS", "ROUTER_RECORD_BYTES",
           "OPCODE_DOC", "main"]

#: Width of the opcode field.
OPCODE_BITS = 4
#: Opcode + the ``wait`` flag.
HEADER_BITS = OPCODE_BITS + 1


#: One line per opcode, for the documentation.
OPCODE_DOC = {
    "END": "Finish the program: raise `done` once every unit is idle.",
    "LOAD_IMAGE": "Patch embedding from the uint8 HWC camera image: the loader unfolds patches by its "
                  "address pattern, the engine multiplies them by the patch weights, and the cls row and "
                  "position embedding enter the residual buffer.",
    "LAYERNORM": "LayerNorm of `tokens` residual rows into int8 activation rows.",
    "GEMM": "One GEMM on the engine (weights and column parameters streamed from external memory) with "
            "an epilogue mode: dense fc1 (GELU8), fc2 (RESADD), or any other tiled GEMM the compiler emits.",
    "ATTENTION": "The attention sub-layer `x += proj(attn(h))`, `h` at activation word 0 "
                 "(`attention.AttentionLayer`, its start fields).",
    "MOE": "The MoE layer `x += sum_k p_k expert_k(h)` with the task register's gate and router record "
           "(`moe.MoELayer`; its router softmax scale and GELU table come from `router_addr` and `lut_addr`).",
    "STORE": "Residual words to external memory (the encoder tokens).",
    "SYNC": "Barrier: wait until every unit is idle.",
}


class Opcode(enum.Enum, shape=OPCODE_BITS):
    """Instruction opcodes (coarse: one unit operation each)."""
    #: Finish the program: raise ``done`` once every unit is idle.
    END = 0
    #: Patch embedding from the uint8 HWC camera image: unfold patches by address pattern, GEMM with
    #: the patch weights, add cls and position embedding into the residual buffer.
    LOAD_IMAGE = 1
    #: LayerNorm of residual rows into int8 activation rows.
    LAYERNORM = 2
    #: One GEMM on the engine, its weights streamed from external memory, with an epilogue mode.
    GEMM = 3
    #: The attention sub-layer ``x += proj(attn(h))`` (:class:`~m3vit_hw.attention.AttentionLayer`).
    ATTENTION = 4
    #: The MoE layer ``x += sum_k p_k expert_k(h)`` for the task register's gate.
    MOE = 5
    #: Residual rows to external memory (the encoder tokens).
    STORE = 6
    #: Wait until every unit is idle (a barrier; ``wait`` on the next instruction does the same).
    SYNC = 7


@dataclass(frozen=True)
class Field:
    """One instruction field: ``name``, ``width`` in bits, where the width comes from (``source``) and
    what it means (``doc``)."""

    name: str
    width: int
    source: str
    doc: str


def _bits(n):
    """Bits of an unsigned field holding 0 .. n."""
    return max(1, int(n).bit_length())


class InstructionSet:
    """The instruction format for one accelerator configuration.

    Parameters
    ----------
    config : AcceleratorConfig
    mem_addr_width : int
        External byte-address width, in [16, 64].

    Raises
    ------
    TypeError, ValueError
        On a bad parameter.
    """

    def __init__(self, config, *, mem_addr_width=32):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        _check_int("mem_addr_width", mem_addr_width, 16, 64)
        self._config = config
        c = config
        A = mem_addr_width
        shift = (_bits(numerics.SHIFT_MAX), "numerics.SHIFT_MAX")
        tok = (_bits(c.token_capacity), "token_capacity")
        act = (c.act_addr_bits, "act_addr_bits")
        res = (c.res_addr_bits, "res_addr_bits")
        addr = (A, "mem_addr_width")
        soft = [
            Field("c_mult", numerics.SOFTMAX_MULT_BITS, "numerics.SOFTMAX_MULT_BITS", "softmax exponent multiplier"),
            Field("c_shift", shift[0], shift[1], "softmax exponent shift"),
        ]

        def f(name, spec, doc):
            return Field(name, spec[0], spec[1], doc)

        self._fields = {
            Opcode.END: [],
            Opcode.SYNC: [],
            Opcode.LOAD_IMAGE: [
                f("img_addr", addr, "the uint8 RGB image, row-major HWC"),
                f("img_rows", (_bits(c.model.img_size[0]), "model.img_size[0]"), "image height, pixels"),
                f("img_cols", (_bits(c.model.img_size[1]), "model.img_size[1]"), "image width, pixels"),
                f("param_addr", addr, "patch weights (panels), column parameters, cls and position rows"),
                f("shift", shift, "patch GEMM requantization shift"),
            ],
            Opcode.LAYERNORM: [
                f("res_base", res, "first residual row (word address)"),
                f("act_base", act, "first output row in the activation buffer (word address)"),
                f("tokens", tok, "rows"),
                f("param_addr", addr, "gamma multipliers, betas and eps"),
                f("shift", shift, "output shift"),
            ],
            Opcode.GEMM: [
                f("m", (_bits(c.largest_m), "largest_m"), "rows of A"),
                f("k", (_bits(c.largest_k), "largest_k"), "reduction length"),
                f("n", (_bits(c.largest_n), "largest_n"), "columns of B"),
                f("a_base", act, "A rows (activation word address)"),
                f("a_stride", act, "A row pitch, words"),
                f("dst_base", (c.dst_addr_bits, "dst_addr_bits"), "destination (activation or residual word)"),
                f("dst_stride", (c.dst_addr_bits, "dst_addr_bits"), "destination row pitch, words"),
                f("w_addr", addr, "weight panels (external)"),
                f("p_addr", addr, "column parameter words (external)"),
                f("lut_addr", addr, "the 256-byte GELU table (GELU8 mode; ignored otherwise)"),
                f("shift", shift, "requantization shift"),
                Field("mode", 3, "gemm.epilogue.EpilogueMode", "epilogue mode (ACT8, GELU8, RES16, RESADD, ...)"),
                Field("gather", 1, "-", "A rows through the row table"),
                Field("scatter", 1, "-", "output rows through the row table"),
                Field("a_unsigned", 1, "-", "A is uint8 (the GELU codes fc2 reads); int8 otherwise"),
            ],
            Opcode.ATTENTION: [
                f("tokens", tok, "T"),
                f("param_addr", addr, "the attention image (attention.attn_layout.pack_attention)"),
                *soft,
                Field("out_mult", numerics.AV_OUT_MULT_BITS, "numerics.AV_OUT_MULT_BITS", "AV numerator"),
                f("out_shift", shift, "AV output shift"),
                f("qkv_shift", shift, "QKV requantization shift"),
                f("proj_shift", shift, "projection requantization shift"),
                Field("dims", AttnShapeLayout(c).size, "attention.attn_sequencer.AttnShapeLayout",
                      "run-time shape (attn_layout.AttnLayout.shape_fields packed; 0: the elaborated model's)"),
            ],
            Opcode.MOE: [
                f("tokens", tok, "T"),
                f("gate_addr", addr, "task 0's gate record (moe.expert_layout)"),
                f("gate_stride", addr, "bytes between tasks' gate records"),
                f("expert_addr", addr, "the expert region"),
                f("router_addr", addr, "task 0's router record (softmax c_mult, c_shift); task t's at "
                                       "router_addr + t * ROUTER_RECORD_BYTES"),
                f("lut_addr", addr, "the experts' 256-byte GELU table"),
                f("fc1_shift", shift, "experts' fc1 shift"),
                f("fc2_shift", shift, "experts' fc2 shift"),
                f("top_k", (_bits(c.model.top_k), "model.top_k"),
                  "run-time shape: the layer's k (0: the elaborated model's)"),
                f("plan_fetch", (1, "-"), "run-time shape: fetch the expert tile plan from plan_addr"),
                f("plan_addr", addr, "run-time shape: the expert plan table (moe.expert_layout.pack_plan)"),
                f("expert_stride", addr, "run-time shape: bytes between experts (with plan_fetch)"),
            ],
            Opcode.STORE: [
                f("res_base", res, "first residual word"),
                f("words", (_bits(c.res_buffer_words), "res_buffer_words"), "residual words to store"),
                f("dst_addr", addr, "external destination (relative to the output base register)"),
            ],
        }
        widest = max(HEADER_BITS + sum(x.width for x in fs) for fs in self._fields.values())
        words = 1
        while 32 * words < widest:
            words *= 2
        self._words = words
        self._widest = widest

    @property
    def config(self):
        return self._config

    @property
    def words(self):
        """32-bit words per instruction."""
        return self._words

    @property
    def bits(self):
        return 32 * self._words

    def fields(self, op):
        """The fields of ``op`` after the header, in bit order."""
        return list(self._fields[Opcode(op)])

    def offsets(self, op):
        """``{field name: (lsb, width)}`` of ``op``, header included."""
        out = {"opcode": (0, OPCODE_BITS), "wait": (OPCODE_BITS, 1)}
        at = HEADER_BITS
        for fl in self._fields[Opcode(op)]:
            out[fl.name] = (at, fl.width)
            at += fl.width
        return out

    def layout(self, op):
        """An Amaranth ``StructLayout`` of the whole instruction for ``op`` (the RTL decoder's view)."""
        members = {"opcode": Opcode, "wait": 1}
        used = HEADER_BITS
        for fl in self._fields[Opcode(op)]:
            members[fl.name] = unsigned(fl.width)
            used += fl.width
        if used < self.bits:
            members["_reserved"] = unsigned(self.bits - used)
        return data.StructLayout(members)

    def encode(self, op, *, wait=False, **values):
        """The instruction as a list of ``words`` 32-bit integers.

        Every field of ``op`` must be given; a value outside ``[0, 2**width)`` raises ValueError naming
        the field, the value and the range; an unknown field raises TypeError.
        """
        op = Opcode(op)
        offs = self.offsets(op)
        unknown = set(values) - set(offs) - {"opcode", "wait"}
        if unknown:
            raise TypeError(f"{op.name} has no field(s) {sorted(unknown)}; fields: "
                            f"{[fl.name for fl in self._fields[op]]}")
        word = op.value | (int(bool(wait)) << OPCODE_BITS)
        for fl in self._fields[op]:
            if fl.name not in values:
                raise TypeError(f"{op.name} needs field {fl.name!r}")
            v = values[fl.name]
            if hasattr(v, "value") and not isinstance(v, int):
                v = v.value
            _check_int(f"{op.name}.{fl.name}", v, 0, (1 << fl.width) - 1)
            word |= v << offs[fl.name][0]
        return [(word >> (32 * i)) & 0xFFFFFFFF for i in range(self._words)]

    def decode(self, words):
        """``(Opcode, {field: value}, wait)`` of an instruction given as its 32-bit words."""
        if len(words) != self._words:
            raise ValueError(f"an instruction is {self._words} words, not {len(words)}")
        word = sum(int(w) << (32 * i) for i, w in enumerate(words))
        op = Opcode(word & ((1 << OPCODE_BITS) - 1))
        vals = {name: (word >> lsb) & ((1 << w) - 1) for name, (lsb, w) in self.offsets(op).items()
                if name not in ("opcode", "wait")}
        return op, vals, bool((word >> OPCODE_BITS) & 1)

    # ---- documentation -------------------------------------------------------------------------

    def markdown(self, title=None):
        """The field tables of every opcode, as Markdown."""
        c = self._config
        lines = [title or f"## Field widths for `{c.model.name}` ({c.pe_rows}x{c.pe_cols} PEs, "
                          f"token capacity {c.token_capacity})", "",
                 f"Instructions are {self._words} x 32-bit words ({self.bits} bits; the widest opcode "
                 f"uses {self._widest}).", ""]
        for op in Opcode:
            lines += [f"### `{op.name}` = {op.value}", "", OPCODE_DOC[op.name], "",
                      "| bits | field | width | width from | meaning |", "| --- | --- | --- | --- | --- |",
                      f"| 0-3 | opcode | {OPCODE_BITS} | - | {op.value} |",
                      f"| 4 | wait | 1 | - | start when every earlier instruction has finished |"]
            for fl in self._fields[op]:
                lsb, w = self.offsets(op)[fl.name]
                lines.append(f"| {lsb}-{lsb + w - 1} | {fl.name} | {w} | `{fl.source}` | {fl.doc} |")
            lines.append("")
        return "\n".join(lines)

    def c_header(self, guard="M3VIT_ISA_H"):
        """A C header: opcodes, per-field LSB and WIDTH macros, and a field setter."""
        c = self._config
        out = [f"/* Generated by m3vit_hw.control.isa for {c.model.name} ({c.pe_rows}x{c.pe_cols} PEs, "
               f"token capacity {c.token_capacity}). Do not edit. */",
               f"#ifndef {guard}", f"#define {guard}", "", "#include <stdint.h>", "",
               f"#define M3VIT_INSN_WORDS {self._words}u", f"#define M3VIT_OPCODE_BITS {OPCODE_BITS}u", ""]
        for op in Opcode:
            out.append(f"#define M3VIT_OP_{op.name} {op.value}u")
        out.append("")
        for op in Opcode:
            for name, (lsb, w) in self.offsets(op).items():
                if name in ("opcode", "wait") and op is not Opcode.END:
                    continue
                key = f"M3VIT_{name.upper()}" if name in ("opcode", "wait") else f"M3VIT_{op.name}_{name.upper()}"
                out += [f"#define {key}_LSB {lsb}u", f"#define {key}_WIDTH {w}u"]
            out.append("")
        out += [
            "/* Set a field of an instruction (w: M3VIT_INSN_WORDS words, zeroed first). */",
            "static inline void m3vit_insn_set(uint32_t *w, unsigned lsb, unsigned width, uint64_t v)",
            "{",
            "    for (unsigned i = 0; i < width; i++)",
            "        if ((v >> i) & 1u)",
            "            w[(lsb + i) / 32u] |= (uint32_t)1u << ((lsb + i) % 32u);",
            "}", "", f"#endif /* {guard} */", ""]
        return "\n".join(out)


def main(argv=None):
    """``python -m m3vit_hw.control [--preset NAME] [--header FILE] [--markdown FILE]``."""
    import argparse
    import os
    import sys
    from ..model_config import PRESETS
    ap = argparse.ArgumentParser(prog="python -m m3vit_hw.control",
                                 description="Print or write the instruction format for a preset.")
    ap.add_argument("--preset", default="vit-tiny-cityscapes", choices=sorted(PRESETS))
    ap.add_argument("--header", help="write the C header here")
    ap.add_argument("--markdown", help="write the field tables here")
    args = ap.parse_args(argv)
    for path in (args.header, args.markdown):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"error: the directory of {path!r} does not exist", file=sys.stderr)
            return 2
    isa = InstructionSet(AcceleratorConfig.from_preset(args.preset))
    if args.header:
        with open(args.header, "w") as fh:
            fh.write(isa.c_header())
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(isa.markdown() + "\n")
    if not (args.header or args.markdown):
        print(isa.markdown())
    return 0
