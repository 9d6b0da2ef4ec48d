"""Program-driven control: the instruction format (ISA); the compiler and the sequencer come later."""

from .isa import Field, InstructionSet, Opcode

__all__ = ["Field", "InstructionSet", "Opcode"]
