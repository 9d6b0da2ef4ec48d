"""The accelerator's control/status register map, described once and generated into every consumer.

:data:`REGISTERS` is the single description. From it come

* the RTL address decode (:class:`~m3vit_hw.soc.csr.CsrBlock` builds one port per register),
* the C header (:func:`c_header`, with the config ID and the memory-image layout added by the build),
* the Markdown documentation (:func:`markdown`),
* the host driver's offsets (:data:`OFFSETS`, :data:`FIELDS`).

All registers are 32 bits wide at word-aligned byte offsets of an AXI4-Lite slave. Access kinds:

``ro``
    read-only, driven by the hardware;
``rw``
    read/write, held by the register block;
``pulse``
    write-only: each written 1 bit is a one-cycle pulse into the hardware (reads return 0);
``w1c``
    read, write 1 to clear: the hardware sets bits, software clears them.
"""

import dataclasses
import json
import zlib
from dataclasses import dataclass

from ..config import AcceleratorConfig
from ..control.isa import Opcode
from ..encoder.top import CounterPhase

__all__ = ["REGMAP_VERSION", "Field", "Register", "REGISTERS", "OFFSETS", "FIELDS", "ERRORS", "BASES",
           "COUNTED_OPS", "PHASE_DOCS", "config_id", "register", "c_header", "markdown"]

#: (major, minor) of the register map; the major changes when an offset or field moves.
REGMAP_VERSION = (2, 1)

_ACCESS = ("ro", "rw", "pulse", "w1c")


@dataclass(frozen=True)
class Field:
    """A bit field: ``name``, least significant bit ``lsb``, ``width`` bits, ``doc``."""
    name: str
    lsb: int
    width: int
    doc: str = ""

    @property
    def mask(self):
        return ((1 << self.width) - 1) << self.lsb


@dataclass(frozen=True)
class Register:
    """A 32-bit register at byte ``offset`` with ``access`` in ``ro``, ``rw``, ``pulse``, ``w1c``."""
    name: str
    offset: int
    access: str
    doc: str
    fields: tuple = ()

    def __post_init__(self):
        if self.access not in _ACCESS:
            raise ValueError(f"access must be one of {_ACCESS}, not {self.access!r}")
        if self.offset % 4:
            raise ValueError(f"offset of {self.name} must be a multiple of 4, not {self.offset:#x}")
        used = 0
        for f in self.fields:
            if f.lsb < 0 or f.lsb + f.width > 32 or used & f.mask:
                raise ValueError(f"field {self.name}.{f.name} is outside 32 bits or overlaps")
            used |= f.mask


#: Error bits of the ``ERROR`` register (sticky until the next start).
ERRORS = (
    Field("BAD_PROGRAM", 0, 1, "the program holds an opcode outside the instruction set (control/isa.py)"),
    Field("UNALIGNED", 1, 1, "a base address is not a multiple of the memory beat (DATA_BYTES)"),
    Field("AXI", 2, 1, "an AXI read or write response was not OKAY"),
    Field("BAD_TASK", 3, 1, "TASK is not below the model's task count"),
    Field("NO_UNIT", 4, 1, "the program holds a valid opcode whose unit this build does not have"),
)

#: Base-address registers (each a ``_LO``/``_HI`` pair) and what they point at.
BASES = (
    ("PROGRAM", "the program (the compiled image's ``program`` section: PARAM_BASE + program_addr)"),
    ("PARAM", "the compiled image (``control/image_layout.py``): weights, tables; every instruction "
              "address but LOAD_IMAGE's frame is relative to it"),
    ("OUTPUT", "the encoder tokens STORE writes (T rows of row_words int16 words of pe_cols lanes)"),
    ("IMAGE", "the camera frame's origin: LOAD_IMAGE reads the uint8 HWC frame at IMAGE_BASE + its "
              "img_addr (the image's input offset), so IMAGE_BASE = PARAM_BASE for a frame in the image's "
              "input section, frame address - input offset (mod 2^64) for a frame in a buffer of its own"),
)

#: Opcode classes with a cycle counter (``OP_CYCLES_<name>``, ``PE_CYCLES_<name>``): every opcode
#: value (``control/isa.py`` ``Opcode``) but ``END``/``SYNC``, which have no unit.
COUNTED_OPS = tuple(op for op in Opcode if op not in (Opcode.END, Opcode.SYNC))


#: The encoder's phase counters (``PHASE_CYCLES_<name>``, ``PHASE_PE_CYCLES_<name>``, indexed by
#: :class:`~m3vit_hw.encoder.top.CounterPhase`): what each one counts, summed over the run.
PHASE_DOCS = {
    CounterPhase.ATTN_CORE: "the attention matmuls (a QK^T or AV command is the oldest in the engine, or a "
                            "head waits for the score path); OP_CYCLES_ATTENTION minus it is QKV + proj",
    CounterPhase.SOFTMAX: "a query tile in the attention score path (overlaps ATTN_CORE)",
    CounterPhase.MOE_ROUTER: "a MOE instruction before its first expert GEMM (gate, router softmax, top-k, "
                             "queues, first expert fetch); OP_CYCLES_MOE minus it is the experts",
}
assert set(PHASE_DOCS) == set(CounterPhase), "every phase counter is documented"


def _registers():
    regs = [
        Register("ID", 0x000, "ro", "Config ID: CRC-32 of the AcceleratorConfig and SoC parameters "
                 "(m3vit_hw.soc.regmap.config_id); a driver compares it with its compiled image's."),
        Register("VERSION", 0x004, "ro", "Register-map version.",
                 (Field("MINOR", 0, 16), Field("MAJOR", 16, 16))),
        Register("CTRL", 0x008, "pulse", "Control.",
                 (Field("START", 0, 1, "start a run (ignored while busy)"),)),
        Register("STATUS", 0x00C, "ro", "Status.",
                 (Field("BUSY", 0, 1, "a run is in progress"),
                  Field("DONE", 1, 1, "the last run finished (cleared by START)"))),
        Register("ERROR", 0x010, "ro", "Error codes of the last run (cleared by START).", ERRORS),
        Register("IRQ_ENABLE", 0x014, "rw", "Interrupt enable.",
                 (Field("DONE", 0, 1, "raise `interrupt` while IRQ_STATUS.DONE is set"),)),
        Register("IRQ_STATUS", 0x018, "w1c", "Interrupt status; write 1 to clear.",
                 (Field("DONE", 0, 1, "a run finished"),)),
        Register("TASK", 0x01C, "rw", "Task id of the next run (selects the MoE gate and router records).",
                 (Field("ID", 0, 8),)),
    ]
    off = 0x020
    for b, doc in BASES:
        regs.append(Register(f"{b}_BASE_LO", off, "rw", f"Byte address of {doc}, bits 31..0."))
        regs.append(Register(f"{b}_BASE_HI", off + 4, "rw", f"Byte address of {doc}, bits 63..32."))
        off += 8
    regs += [
        Register("CYCLES_LO", 0x040, "ro", "Cycles from START to done, bits 31..0."),
        Register("CYCLES_HI", 0x044, "ro", "Cycles from START to done, bits 63..32."),
        Register("INSN_COUNT", 0x048, "ro", "Instructions the sequencer decoded in the last run (END included)."),
        Register("CONFIG0", 0x070, "ro", "PE array shape.",
                 (Field("PE_ROWS", 0, 16), Field("PE_COLS", 16, 16))),
        Register("CONFIG1", 0x074, "ro", "Memory interface and capacity.",
                 (Field("DATA_BYTES", 0, 8, "the core's memory beat in bytes (each AXI master may be narrower)"),
                  Field("AXI_MASTERS", 8, 4), Field("TOKEN_CAPACITY", 16, 16))),
    ]
    for op in COUNTED_OPS:
        regs.append(Register(f"OP_CYCLES_{op.name}", 0x080 + 4 * op.value, "ro",
                             f"Cycles in which the {op.name} unit was busy (low 32 bits)."))
        regs.append(Register(f"PE_CYCLES_{op.name}", 0x0C0 + 4 * op.value, "ro",
                             f"PE-array busy cycles while {op.name} owned the datapath (low 32 bits)."))
    for p in CounterPhase:
        regs.append(Register(f"PHASE_CYCLES_{p.name}", 0x100 + 4 * p.value, "ro",
                             f"Cycles of phase {p.name}: {PHASE_DOCS[p]} (low 32 bits)."))
        regs.append(Register(f"PHASE_PE_CYCLES_{p.name}", 0x120 + 4 * p.value, "ro",
                             f"PE-array busy cycles in phase {p.name} (low 32 bits)."))
    return tuple(sorted(regs, key=lambda r: r.offset))


#: Every register, in offset order.
REGISTERS = _registers()
#: Register name -> byte offset.
OFFSETS = {r.name: r.offset for r in REGISTERS}
#: (register, field) -> Field.
FIELDS = {(r.name, f.name): f for r in REGISTERS for f in r.fields}
assert len(set(OFFSETS.values())) == len(REGISTERS), "register offsets collide"


def config_id(config, *, axi_masters):
    """The ``ID`` register's value: CRC-32 of everything that decides the hardware and its image.

    The same config and SoC parameters give the same ID on every machine and Python version
    (canonical JSON of the dataclass fields, sorted keys, plus ``axi_masters`` and the register-map
    version). A compiled :class:`~m3vit_hw.control.compiler.Program` carries its ``config``, so a
    driver checks ``config_id(program.config, ...)`` against the hardware before a run.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    desc = {"config": dataclasses.asdict(config), "axi_masters": axi_masters, "regmap": list(REGMAP_VERSION)}
    text = json.dumps(desc, sort_keys=True, default=str, separators=(",", ":"))
    return zlib.crc32(text.encode())


def register(name):
    """The :class:`Register` called ``name`` (KeyError naming the known registers otherwise)."""
    for r in REGISTERS:
        if r.name == name:
            return r
    raise KeyError(f"no register {name!r}; registers are {', '.join(OFFSETS)}")


def c_header(*, prefix="M3VIT", defines=(), guard=None):
    """The C header text: register offsets, field shifts/masks, then ``defines`` ((name, value, comment)).

    Parameters
    ----------
    prefix : str
        Prefix of every macro.
    defines : iterable of (str, int, str)
        Extra constants (the build adds the config ID and the memory-image layout).
    """
    guard = guard or f"{prefix}_REGS_H"
    out = [f"/* Generated by m3vit_hw.soc.regmap: do not edit. Register map v{REGMAP_VERSION[0]}."
           f"{REGMAP_VERSION[1]}. */",
           f"#ifndef {guard}", f"#define {guard}", "",
           f"#define {prefix}_REGMAP_VERSION_MAJOR {REGMAP_VERSION[0]}u",
           f"#define {prefix}_REGMAP_VERSION_MINOR {REGMAP_VERSION[1]}u", ""]
    for r in REGISTERS:
        out.append(f"/* {r.name} ({r.access}): {r.doc} */")
        out.append(f"#define {prefix}_REG_{r.name} 0x{r.offset:03X}u")
        for f in r.fields:
            out.append(f"#define {prefix}_{r.name}_{f.name}_SHIFT {f.lsb}u")
            out.append(f"#define {prefix}_{r.name}_{f.name}_MASK 0x{f.mask:08X}u")
    if defines:
        out.append("")
    for name, value, comment in defines:
        out.append(f"/* {comment} */" if comment else "")
        out.append(f"#define {prefix}_{name} 0x{value:X}u" if value >= 0 else
                   f"#define {prefix}_{name} ({value})")
    out += ["", f"#endif /* {guard} */", ""]
    return "\n".join(out)


def markdown():
    """The register map as a Markdown table (one row per register, fields listed in it)."""
    out = [f"# Register map (v{REGMAP_VERSION[0]}.{REGMAP_VERSION[1]})", "",
           "32-bit registers on the AXI4-Lite slave `s_axi`. Generated from "
           "`m3vit_hw/soc/regmap.py`.", "",
           "| offset | name | access | description | fields |", "| --- | --- | --- | --- | --- |"]
    for r in REGISTERS:
        fields = "; ".join(f"`{f.name}` [{f.lsb + f.width - 1}:{f.lsb}]" + (f" {f.doc}" if f.doc else "")
                           for f in r.fields)
        out.append(f"| 0x{r.offset:03X} | {r.name} | {r.access} | {r.doc} | {fields} |")
    return "\n".join(out) + "\n"
