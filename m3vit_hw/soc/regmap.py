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

from dataclasses import dataclass

__all__ = ["REGMAP_VERSION", "Field", "Register", "REGISTERS", "OFFSETS", "FIELDS", "ERRORS",
           "register", "c_header", "markdown"]

#: (major, minor) of the register map; the major changes when an offset or field moves.
REGMAP_VERSION = (1, 0)

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
    Field("BAD_PROGRAM", 0, 1, "the program descriptor's magic, config ID, token count or shifts are invalid"),
    Field("UNALIGNED", 1, 1, "a base address is not a multiple of the AXI data width in bytes"),
    Field("AXI", 2, 1, "an AXI read or write response was not OKAY"),
    Field("BAD_TASK", 3, 1, "TASK is not below the model's task count"),
    Field("OVERFLOW", 4, 1, "the expert queues saw more tokens than token_capacity"),
)

_BASES = ("PROGRAM", "WEIGHTS", "IMAGE", "OUTPUT")
_BASE_DOCS = {
    "PROGRAM": "program (descriptor, then the GELU table)",
    "WEIGHTS": "weights (the expert_layout.pack_moe image)",
    "IMAGE": "input activations (h rows, then x rows)",
    "OUTPUT": "output (x rows after the layer)",
}


def _registers():
    regs = [
        Register("ID", 0x000, "ro", "Config ID: CRC-32 of the AcceleratorConfig and SoC parameters "
                 "(m3vit_hw.soc.config_id); a driver compares it with its memory image's."),
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
        Register("TASK", 0x01C, "rw", "Task id of the next run.", (Field("ID", 0, 8),)),
    ]
    off = 0x020
    for b in _BASES:
        regs.append(Register(f"{b}_BASE_LO", off, "rw", f"Byte address of the {_BASE_DOCS[b]}, bits 31..0."))
        regs.append(Register(f"{b}_BASE_HI", off + 4, "rw", f"Byte address of the {_BASE_DOCS[b]}, bits 63..32."))
        off += 8
    counters = (
        ("CYCLES_LO", "Cycles from START to done, bits 31..0."),
        ("CYCLES_HI", "Cycles from START to done, bits 63..32."),
        ("LOAD_CYCLES", "Cycles spent reading the program, the GELU table and the activations."),
        ("LAYER_CYCLES", "Cycles of the MoE layer (start accepted .. done)."),
        ("COMPUTE_CYCLES", "Cycles in which the PE array took an operand beat."),
        ("STORE_CYCLES", "Cycles spent writing the output (until the last write response)."),
        ("EXPERT_BYTES", "Bytes of expert weights and parameters fetched."),
        ("GATE_BYTES", "Bytes of gate weights and parameters fetched."),
        ("ACTIVE_EXPERTS", "Experts that received at least one token."),
    )
    off = 0x040
    for name, doc in counters:
        regs.append(Register(name, off, "ro", doc))
        off += 4
    regs.append(Register("CONFIG0", 0x070, "ro", "PE array shape.",
                         (Field("PE_ROWS", 0, 16), Field("PE_COLS", 16, 16))))
    regs.append(Register("CONFIG1", 0x074, "ro", "Memory interface and capacity.",
                         (Field("DATA_BYTES", 0, 8, "AXI data width in bytes"),
                          Field("AXI_MASTERS", 8, 4), Field("TOKEN_CAPACITY", 16, 16))))
    return tuple(regs)


#: Every register, in offset order.
REGISTERS = _registers()
#: Register name -> byte offset.
OFFSETS = {r.name: r.offset for r in REGISTERS}
#: (register, field) -> Field.
FIELDS = {(r.name, f.name): f for r in REGISTERS for f in r.fields}
assert len(set(OFFSETS.values())) == len(REGISTERS), "register offsets collide"


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
