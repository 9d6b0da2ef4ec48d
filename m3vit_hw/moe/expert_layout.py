"""External-memory layout of one MoE layer's integer parameters, and the static tile plan of an expert.

This module is the single source of truth for *where* an MoE layer's parameters
(:class:`reference.qparams.QMoE`) live in external memory and *how* an expert is cut into pieces that
each fit one half of the double-buffered weight buffer. The packer (:func:`pack_moe`), the reordering
controller (which bakes the tile plan into its fetch and compute sequencers), the simulation runners
and the tests all read it. Pure Python + numpy.

Buffers
-------
Two ping-pong buffers are filled in lockstep, one *tile* at a time:

* the **weight buffer** (``config.weight_buffer_bytes``, halves of ``config.weight_buffer_half_bytes``)
  holds B operands in the GemmEngine's native *panel* layout: for each column tile ``nb`` of the tile,
  ``K`` consecutive words of ``pe_cols`` int8 weights (word ``nb*K + k`` = ``B[k, C*nb .. C*nb+C-1]``,
  lanes past N are zero);
* the **parameter buffer** (halves of ``config.param_buffer_words // 2`` words) holds the epilogue's
  column parameters, one *parameter word* per column tile. A parameter word is ``pe_cols`` lanes of
  :data:`PARAM_LANE_BYTES` = 8 bytes (int32 ``bias`` little-endian in bytes 0-3, the unsigned 24-bit
  ``mult`` in bytes 4-6, byte 7 zero), padded to a power of two (:func:`param_word_bytes`) so that the
  buffer's read word is a power-of-two multiple or fraction of the memory beat.

Tiles
-----
An expert is ``fc1`` (``K = D``, ``N = h``) then ``fc2`` (``K = h``, ``N = D``). A *tile* is an N-chunk
of one of them: some whole column tiles (panels) of the matrix plus their parameter words, as many as
fit one half of each buffer. fc1 tiles come first, then fc2 tiles; chunks are balanced (their panel
counts differ by at most one). The plan depends only on ``D``, ``h``, ``pe_cols`` and the two half
sizes: it is the same for every expert and independent of E.

Image
-----
``pack_moe`` returns one byte image (offset 0 = the layer's base address)::

    gate region   task t at gate_offset + t * gate_stride, in gate chunks (``config.gate_chunks``):
                    chunk 0: [its panels of K = D words][its parameter words: bias = task_bias[t],
                    mult = 0], chunk 1: ..., covering the ceil(E/C) column tiles of the gate
    expert region expert e at experts_offset + e * expert_stride:
                    tile 0: [weight panels][parameter words], tile 1: ..., in plan order

Every piece starts on a memory-beat boundary and is padded to whole beats, so a streamer command per
piece fetches exactly its bytes (``weight_bytes(e)`` counts the padded bytes: they are what crosses
the port). The gate (``K = D``, ``N = E``) is cut into N-chunks exactly like an expert matrix, so
neither buffer's size depends on E; the router assembles each token's logit row from the chunks.
"""

from dataclasses import dataclass

import numpy as np

from .. import numerics
# The parameter-word format is a size the config validates buffers with: defined there, used here.
from ..config import PARAM_LANE_BYTES, AcceleratorConfig, param_word_bytes

__all__ = [
    "PARAM_LANE_BYTES", "param_word_bytes", "ROUTER_RECORD_BYTES", "LUT_BYTES", "pack_router_record", "Tile", "MoELayout", "plan_moe", "pack_moe",
    "pack_panels", "pack_params", "unpack_params", "start_fields",
]

#: Byte offset of ``mult`` within a lane.
_MULT_OFFSET = 4

#: Bytes of one task's router record: the router softmax's ``c_mult`` (uint16 little-endian, bytes
#: 0-1) and ``c_shift`` (byte 2), the rest zero. Per task because a multi-gate model has one router
#: softmax scale per gate. The MoE client fetches task ``t``'s record from ``router_addr + t *
#: ROUTER_RECORD_BYTES`` when its start asks for it (the ISA's ``MOE.router_addr``).
ROUTER_RECORD_BYTES = 16

#: Bytes of a GELU table in external memory: entry ``i`` (the int8 input ``i - 128``) at byte ``i``.
LUT_BYTES = 1 << numerics.ACT_BITS


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


@dataclass(frozen=True)
class Tile:
    """One tile of an expert: an N-chunk of fc1 or fc2.

    Attributes
    ----------
    index : int
        Position in the expert's plan (fc1 tiles first), or in the gate record's.
    kind : str
        ``"fc1"``, ``"fc2"`` or ``"gate"``.
    n0, n : int
        First output column (a multiple of ``pe_cols``) and number of output columns.
    k : int
        Reduction length (``D`` for fc1, ``h`` for fc2).
    panels : int
        Column tiles (= parameter words) in the tile.
    w_offset, w_bytes : int
        Byte offset of the weight panels within the expert's image (the gate record's for a gate
        chunk), and their padded length.
    p_offset, p_bytes : int
        The same for the parameter words.
    """

    index: int
    kind: str
    n0: int
    n: int
    k: int
    panels: int
    w_offset: int
    w_bytes: int
    p_offset: int
    p_bytes: int

    @property
    def bytes(self):
        return self.w_bytes + self.p_bytes


@dataclass(frozen=True)
class MoELayout:
    """Where one MoE layer's parameters live in external memory, and the static tile plan.

    Built by :func:`plan_moe` from an :class:`~m3vit_hw.config.AcceleratorConfig` (it does not depend
    on parameter values). Offsets are relative to the layer's base address.
    """

    dim: int
    hidden: int
    experts: int
    tasks: int
    pe_cols: int
    data_bytes: int
    weight_half_bytes: int
    param_half_words: int
    param_word_bytes: int
    tiles: tuple
    expert_stride: int
    gate_panels: int
    gate_tiles: tuple
    gate_offset: int
    gate_stride: int
    experts_offset: int
    image_bytes: int

    @property
    def param_half_bytes(self):
        """Bytes per half of the parameter buffer (whole words, whole memory beats)."""
        return _round_up(self.param_half_words * self.param_word_bytes,
                         max(self.param_word_bytes, self.data_bytes))

    @property
    def fc1_tiles(self):
        return tuple(t for t in self.tiles if t.kind == "fc1")

    @property
    def fc2_tiles(self):
        return tuple(t for t in self.tiles if t.kind == "fc2")

    @property
    def gate_bytes(self):
        """Bytes fetched for one task's gate (every chunk's weights + bias words, padded)."""
        return sum(t.bytes for t in self.gate_tiles)

    def weight_bytes(self, expert):
        """Bytes fetched for expert ``expert``: its weights and column parameters, padded to beats."""
        if not isinstance(expert, (int, np.integer)) or not 0 <= expert < self.experts:
            raise ValueError(f"expert must be in [0, {self.experts - 1}], not {expert!r}")
        return self.expert_stride

    def expert_offset(self, expert):
        """Byte offset of expert ``expert``'s first tile."""
        self.weight_bytes(expert)
        return self.experts_offset + expert * self.expert_stride

    def gate_record_offset(self, task):
        """Byte offset of task ``task``'s gate record (panels, then bias words)."""
        if not isinstance(task, (int, np.integer)) or not 0 <= task < self.tasks:
            raise ValueError(f"task must be in [0, {self.tasks - 1}], not {task!r}")
        return self.gate_offset + task * self.gate_stride

    def describe(self):
        """A readable summary of the plan."""
        lines = [f"MoE layout: D={self.dim}, h={self.hidden}, E={self.experts}, {self.tasks} task(s), "
                 f"pe_cols={self.pe_cols}, {self.data_bytes}-byte beats",
                 f"  weight half {self.weight_half_bytes} B, param half {self.param_half_words} words "
                 f"x {self.param_word_bytes} B",
                 f"  gate/task {self.gate_bytes} B in {len(self.gate_tiles)} chunk(s), "
                 f"expert {self.expert_stride} B in {len(self.tiles)} tiles:"]
        for t in self.tiles:
            lines.append(f"    tile {t.index}: {t.kind} columns {t.n0}..{t.n0 + t.n - 1} (K={t.k}), "
                         f"{t.w_bytes} B weights @ {t.w_offset}, {t.p_bytes} B params @ {t.p_offset}")
        return "\n".join(lines)


def plan_moe(config):
    """The tile plan and memory layout of one MoE layer for ``config``.

    Parameters
    ----------
    config : AcceleratorConfig
        Supplies ``D``, ``h``, E, the task count, ``pe_cols``, both buffer sizes and the memory beat
        (``mem_data_bytes``: every piece is aligned and padded to it). The config's validation has
        already checked every size this plan needs (:attr:`~m3vit_hw.config.AcceleratorConfig.weight_half_needs`,
        ``param_buffer_words``, the word/beat ratios), and the chunking is the config's
        :attr:`~m3vit_hw.config.AcceleratorConfig.moe_tile_chunks`: there is one definition of both.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`~m3vit_hw.config.AcceleratorConfig`.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    m = config.model
    C = config.pe_cols
    D, h, E = m.dim, m.expert_hidden, m.experts
    data_bytes = config.mem_data_bytes
    word = config.act_word_bytes
    pwb = config.param_word_bytes
    half = config.weight_buffer_half_bytes

    def chunks(plan):
        """Tiles (offsets from the record's start) of ``(kind, k, n, panel counts)`` chunk plans."""
        tiles, offset = [], 0
        for kind, k, n, counts in plan:
            panel = k * word
            first = 0
            for count in counts:
                w_bytes = _round_up(count * panel, data_bytes)
                p_bytes = _round_up(count * pwb, data_bytes)
                n0 = first * C
                tiles.append(Tile(index=len(tiles), kind=kind, n0=n0,
                                  n=min(n, (first + count) * C) - n0, k=k, panels=count,
                                  w_offset=offset, w_bytes=w_bytes, p_offset=offset + w_bytes,
                                  p_bytes=p_bytes))
                offset += w_bytes + p_bytes
                first += count
        return tuple(tiles), offset

    tiles, expert_stride = chunks(config.moe_tile_chunks)
    gate_tiles, gate_stride = chunks((("gate", D, E, config.gate_chunks),))
    tasks = m.num_tasks
    experts_offset = _round_up(tasks * gate_stride, data_bytes)
    layout = MoELayout(
        dim=D, hidden=h, experts=E, tasks=tasks, pe_cols=C, data_bytes=data_bytes,
        weight_half_bytes=half, param_half_words=config.param_buffer_words // 2, param_word_bytes=pwb,
        tiles=tiles, expert_stride=expert_stride, gate_panels=config.gate_panels,
        gate_tiles=gate_tiles, gate_offset=0, gate_stride=gate_stride,
        experts_offset=experts_offset, image_bytes=experts_offset + E * expert_stride)
    # The config validated the address width against its own count of the image.
    assert layout.image_bytes == config.moe_image_bytes, (layout.image_bytes, config.moe_image_bytes)
    return layout


def pack_panels(b, pe_cols):
    """int8 B [K, N] -> bytes in panel order (for each column tile: K words of ``pe_cols`` bytes)."""
    b = np.asarray(b, dtype=np.int64)
    k, n = b.shape
    lo, hi = numerics.int_range(numerics.WEIGHT_BITS)
    if b.size and (b.min() < lo or b.max() > hi):
        raise ValueError(f"weights must be int{numerics.WEIGHT_BITS}, got range [{b.min()}, {b.max()}]")
    panels = _ceil_div(n, pe_cols)
    padded = np.zeros((k, panels * pe_cols), dtype=np.int64)
    padded[:, :n] = b
    words = padded.reshape(k, panels, pe_cols).transpose(1, 0, 2)      # [panel, k, lane]
    return (words & 0xFF).astype(np.uint8).tobytes()


def pack_params(bias, mult, pe_cols):
    """Column parameters -> parameter words (see the module docstring for the byte layout)."""
    bias = np.asarray(bias, dtype=np.int64)
    mult = np.asarray(mult, dtype=np.int64)
    if bias.shape != mult.shape or bias.ndim != 1:
        raise ValueError(f"bias and mult must be 1-D of one length, not {bias.shape} and {mult.shape}")
    blo, bhi = numerics.int_range(numerics.BIAS_BITS)
    if bias.size and (bias.min() < blo or bias.max() > bhi):
        raise ValueError(f"bias must be int{numerics.BIAS_BITS}")
    if mult.size and (mult.min() < 0 or mult.max() >= 1 << numerics.MULT_BITS):
        raise ValueError(f"mult must be in [0, 2**{numerics.MULT_BITS})")
    pwb = param_word_bytes(pe_cols)
    panels = _ceil_div(len(bias), pe_cols)
    out = bytearray(panels * pwb)
    for j, (b, mu) in enumerate(zip(bias, mult)):
        at = (j // pe_cols) * pwb + (j % pe_cols) * PARAM_LANE_BYTES
        out[at:at + 4] = int(b & 0xFFFFFFFF).to_bytes(4, "little")
        out[at + _MULT_OFFSET:at + _MULT_OFFSET + 3] = int(mu).to_bytes(3, "little")
    return bytes(out)


def unpack_params(raw, columns, pe_cols):
    """Inverse of :func:`pack_params`: ``(bias, mult)`` arrays of ``columns`` entries."""
    pwb = param_word_bytes(pe_cols)
    bias, mult = [], []
    for j in range(columns):
        at = (j // pe_cols) * pwb + (j % pe_cols) * PARAM_LANE_BYTES
        bias.append(int.from_bytes(raw[at:at + 4], "little", signed=True))
        mult.append(int.from_bytes(raw[at + _MULT_OFFSET:at + _MULT_OFFSET + 3], "little"))
    return np.array(bias, dtype=np.int64), np.array(mult, dtype=np.int64)


def _place(image, at, blob, limit):
    if len(blob) > limit:
        raise AssertionError(f"expert_layout: piece of {len(blob)} bytes overflows its {limit}-byte slot")
    image[at:at + len(blob)] = blob


def _gate_index(qmoe, task):
    """multi_gate: one gate per task; a shared gate (task-embedding router) serves every task."""
    return task if len(qmoe.gates) > 1 else 0


def pack_moe(qmoe, config):
    """Lay out one MoE layer's integer parameters for external memory.

    Parameters
    ----------
    qmoe : reference.qparams.QMoE
        Gates (one per task, or one shared), ``task_bias`` [tasks, E], fc1/fc2 of every expert.
    config : AcceleratorConfig
        Its ``mem_data_bytes`` is the memory beat every piece is aligned to.

    Returns
    -------
    (bytes, MoELayout)
        The image (offset 0 = the layer's base address) and its layout.
    """
    layout = plan_moe(config)
    C, D, h, E = layout.pe_cols, layout.dim, layout.hidden, layout.experts
    w1 = np.asarray(qmoe.fc1.w)
    w2 = np.asarray(qmoe.fc2.w)
    if w1.shape != (E, h, D) or w2.shape != (E, D, h):
        raise ValueError(f"qmoe experts must be fc1 [E={E}, h={h}, D={D}] and fc2 [E, D, h], "
                         f"not {w1.shape} and {w2.shape}")
    task_bias = np.asarray(qmoe.task_bias, dtype=np.int64)
    if task_bias.shape != (layout.tasks, E):
        raise ValueError(f"qmoe.task_bias must have shape ({layout.tasks}, {E}), not {task_bias.shape}")
    image = bytearray(layout.image_bytes)
    for t in range(layout.tasks):
        gate = np.asarray(qmoe.gates[_gate_index(qmoe, t)])
        if gate.shape != (D, E):
            raise ValueError(f"gate of task {t} must have shape ({D}, {E}), not {gate.shape}")
        at = layout.gate_record_offset(t)
        for tile in layout.gate_tiles:
            cols = slice(tile.n0, tile.n0 + tile.n)
            _place(image, at + tile.w_offset, pack_panels(gate[:, cols], C), tile.w_bytes)
            _place(image, at + tile.p_offset,
                   pack_params(task_bias[t][cols], np.zeros(tile.n, dtype=np.int64), C), tile.p_bytes)
    for e in range(E):
        base = layout.expert_offset(e)
        for tile in layout.tiles:
            q = qmoe.fc1 if tile.kind == "fc1" else qmoe.fc2
            w = (w1 if tile.kind == "fc1" else w2)[e]            # [N, K]
            cols = slice(tile.n0, tile.n0 + tile.n)
            _place(image, base + tile.w_offset, pack_panels(w[cols].T, C), tile.w_bytes)
            _place(image, base + tile.p_offset,
                   pack_params(np.asarray(q.bias)[e][cols], np.asarray(q.mult)[e][cols], C), tile.p_bytes)
    return bytes(image), layout


def pack_router_record(c_mult, c_shift):
    """One task's router record (:data:`ROUTER_RECORD_BYTES` bytes, see there).

    Raises
    ------
    ValueError
        If ``c_mult`` or ``c_shift`` does not fit its field.
    """
    if not 0 <= int(c_mult) < 1 << numerics.SOFTMAX_MULT_BITS:
        raise ValueError(f"c_mult must be in [0, {(1 << numerics.SOFTMAX_MULT_BITS) - 1}], not {c_mult}")
    if not 0 <= int(c_shift) <= 0xFF:
        raise ValueError(f"c_shift must be in [0, 255], not {c_shift}")
    return (int(c_mult).to_bytes(2, "little") + bytes([int(c_shift)])).ljust(ROUTER_RECORD_BYTES, b"\0")


def start_fields(qmoe, task, tokens, layout, *, base=0):
    """The payload of :attr:`MoELayer.start` for running ``task`` on ``tokens`` tokens.

    ``base`` is the external byte address where the :func:`pack_moe` image was placed.
    """
    layout.gate_record_offset(task)
    g = _gate_index(qmoe, task)
    return {
        "task": task, "tokens": tokens,
        "gate_base": base + layout.gate_offset, "expert_base": base + layout.experts_offset,
        "c_mult": int(qmoe.router_c_mult[g]), "c_shift": int(qmoe.router_c_shift[g]),
        "fc1_shift": int(qmoe.fc1.shift), "fc2_shift": int(qmoe.fc2.shift),
    }
