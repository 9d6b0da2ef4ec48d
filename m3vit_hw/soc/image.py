"""The memory image the AXI top reads and writes, and the config ID that ties an image to a bitstream.

Until the encoder top and its instruction set exist, the compute core behind the AXI top is one
:class:`~m3vit_hw.moe.moe_layer.MoELayer`, and its "program" is a fixed descriptor. Four regions, each
at a base address set in the register block (:mod:`.regmap`), each a multiple of the AXI data width
``data_bytes`` (``db``) in size and alignment:

``PROGRAM``
    the descriptor (:data:`DESC_WORDS` little-endian 32-bit words, padded to ``db``), then the 256-byte
    GELU table (entry ``i`` = GELU of int8 ``i - 128``). Descriptor words: ``magic`` (:data:`MAGIC`),
    ``config_id``, ``tokens`` (T), ``fc1_shift | fc2_shift << 8``, then per task ``t``: ``c_mult``,
    ``c_shift`` of that task's router softmax;
``WEIGHTS``
    the :func:`~m3vit_hw.moe.expert_layout.pack_moe` image;
``IMAGE``
    ``h`` (T rows of ``row_words`` words of ``pe_cols`` int8), padded to ``db``; then ``x`` (T rows of
    ``row_words`` words of ``pe_cols`` int16 little-endian);
``OUTPUT``
    ``x`` after the layer, same layout as the input ``x`` (exactly ``T * row_words * 2 * pe_cols``
    bytes are written; the rest of the last beat is left untouched through the write strobes).

Everything here is plain Python (no Amaranth, no torch): the driver, the build's C header and the
tests share it with the RTL (:class:`~m3vit_hw.soc.top.AcceleratorTop` reads the same constants).
"""

import dataclasses
import json
import zlib

import numpy as np

from .. import numerics
from ..config import AcceleratorConfig
from .regmap import REGMAP_VERSION

__all__ = ["MAGIC", "DESC_HEADER_WORDS", "GELU_BYTES", "config_id", "ImageLayout", "pack_program",
           "pack_image", "unpack_output"]

#: Descriptor magic: the bytes "M3VP" in memory order.
MAGIC = int.from_bytes(b"M3VP", "little")
#: Descriptor words before the per-task router scales.
DESC_HEADER_WORDS = 4
#: The GELU table: one int8 per int8 input.
GELU_BYTES = 256


def _round_up(n, m):
    return -(-n // m) * m


def config_id(config, *, axi_masters):
    """CRC-32 of everything that decides the hardware and its memory image.

    The same config and SoC parameters give the same ID on every machine and Python version
    (canonical JSON of the dataclass fields, sorted keys). The memory port's beat and address widths are
    config fields, so they are part of it.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    desc = {"config": dataclasses.asdict(config), "axi_masters": axi_masters, "regmap": list(REGMAP_VERSION)}
    text = json.dumps(desc, sort_keys=True, default=str, separators=(",", ":"))
    return zlib.crc32(text.encode())


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Sizes and offsets of the four regions for ``config`` (beats of ``config.mem_data_bytes``).

    ``tokens``-dependent sizes are methods; the rest are fixed by the hardware.
    """
    config: AcceleratorConfig

    @property
    def data_bytes(self):
        return self.config.mem_data_bytes

    @property
    def tasks(self):
        return self.config.model.num_tasks

    @property
    def desc_words(self):
        return DESC_HEADER_WORDS + 2 * self.tasks

    @property
    def desc_bytes(self):
        return _round_up(4 * self.desc_words, self.data_bytes)

    @property
    def gelu_offset(self):
        return self.desc_bytes

    @property
    def program_bytes(self):
        return self.desc_bytes + _round_up(GELU_BYTES, self.data_bytes)

    @property
    def h_word_bytes(self):
        return self.config.pe_cols * numerics.ACT_BITS // 8

    @property
    def x_word_bytes(self):
        return self.config.pe_cols * numerics.RES_BITS // 8

    def row_words_total(self, tokens):
        return tokens * self.config.row_words

    def x_offset(self, tokens):
        return _round_up(self.row_words_total(tokens) * self.h_word_bytes, self.data_bytes)

    def image_bytes(self, tokens):
        return self.x_offset(tokens) + self.output_bytes(tokens)

    def output_bytes(self, tokens):
        """Bytes of the output region, padded to a whole beat."""
        return _round_up(self.row_words_total(tokens) * self.x_word_bytes, self.data_bytes)


def _rows(matrix, C, lane_bytes, cols_check):
    m = np.asarray(matrix, dtype=np.int64)
    if m.ndim != 2 or m.shape[1] != cols_check:
        raise ValueError(f"expected a [T, {cols_check}] matrix, not shape {m.shape}")
    T, D = m.shape
    rw = -(-D // C)
    padded = np.zeros((T, rw * C), dtype=np.int64)
    padded[:, :D] = m
    dtype = "<i1" if lane_bytes == 1 else "<i2"
    return padded.astype(dtype).tobytes()


def pack_program(qmoe, layout, tokens, cid):
    """The PROGRAM region: descriptor for ``tokens`` tokens, then the GELU table."""
    cfg = layout.config
    if not 1 <= tokens <= cfg.token_capacity:
        raise ValueError(f"tokens must be in [1, {cfg.token_capacity}], not {tokens}")
    words = [MAGIC, cid, tokens, int(qmoe.fc1.shift) | int(qmoe.fc2.shift) << 8]
    for t in range(layout.tasks):
        g = t if len(qmoe.gates) > 1 else 0
        words += [int(qmoe.router_c_mult[g]), int(qmoe.router_c_shift[g])]
    out = bytearray(layout.program_bytes)
    out[:4 * len(words)] = b"".join(w.to_bytes(4, "little") for w in words)
    lut = np.asarray(qmoe.gelu_lut, dtype=np.int64)
    out[layout.gelu_offset:layout.gelu_offset + GELU_BYTES] = lut.astype("<i1").tobytes()
    return bytes(out)


def pack_image(h, x, layout):
    """The IMAGE region for int8 ``h`` [T, D] and int16 ``x`` [T, D]."""
    D = layout.config.model.dim
    C = layout.config.pe_cols
    hb = _rows(h, C, 1, D)
    xb = _rows(x, C, 2, D)
    T = np.asarray(h).shape[0]
    out = bytearray(layout.image_bytes(T))
    out[:len(hb)] = hb
    off = layout.x_offset(T)
    out[off:off + len(xb)] = xb
    return bytes(out)


def unpack_output(buf, layout, tokens):
    """The int16 ``x`` [T, D] from the OUTPUT region's bytes."""
    C = layout.config.pe_cols
    rw = layout.config.row_words
    n = tokens * rw * C
    arr = np.frombuffer(bytes(buf[:2 * n]), dtype="<i2").astype(np.int64).reshape(tokens, rw * C)
    return arr[:, :layout.config.model.dim]
