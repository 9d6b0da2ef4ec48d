"""Program-driven control: the instruction format (ISA), the program compiler and the one external-memory
image it lays out; the sequencer comes later."""

from .compiler import Program, compile_model
from .isa import Field, InstructionSet, Opcode

__all__ = ["Field", "InstructionSet", "Opcode", "Program", "compile_model"]
