"""The shared GEMM engine: the PE array, the tile walker and the epilogue (requantizer, GELU,
residual/combine stages). Every matrix product of the encoder runs here."""

from .epilogue import Epilogue, EpilogueMode
from .gemm_engine import GemmCommand, GemmEngine
from .pe_array import PEArray

__all__ = ["Epilogue", "EpilogueMode", "GemmCommand", "GemmEngine", "PEArray"]
