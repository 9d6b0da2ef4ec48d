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
from ..checks import check_int
from ..config import PARAM_LANE_BYTES, AcceleratorConfig, balanced_chunks, param_word_bytes

__all__ = [
    "PARAM_LANE_BYTES", "param_word_bytes", "ROUTER_RECORD_BYTES", "LUT_BYTES", "pack_router_record",
    "PAD_LOGIT", "PLAN_ENTRY_BYTES", "PLAN_FIELDS", "plan_entries", "pack_plan", "Tile", "MoELayout", "plan_moe", "pack_moe",
    "pack_panels", "pack_params", "unpack_params", "start_fields",
]

#: Byte offset of ``mult`` within a lane.
_MULT_OFFSET = 4

#: Bytes of one task's router record: the router softmax's ``c_mult`` (uint16 little-endian, bytes
#: 0-1) and ``c_shift`` (byte 2), the rest zero. Per task because a multi-gate model has one router
#: softmax scale per gate. The MoE client fetches task ``t``'s record from ``router_addr + t *
#: ROUTER_RECORD_BYTES`` when its start asks for it (the ISA's ``MOE.router_addr``).
ROUTER_RECORD_BYTES = 16

#: Task bias of a padded gate column (:func:`plan_moe` with fewer experts than the design): with zero
#: gate weights its logit is the int32 minimum, so its softmax exponent is 0 and top-k never picks it.
PAD_LOGIT = -(1 << (numerics.BIAS_BITS - 1))

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
    #: Columns of the packed gate (the design's E when a smaller model runs on it: its gate is padded,
    #: see :func:`plan_moe`); ``None`` = ``experts``.
    gate_columns: int = None

    @property
    def gate_cols(self):
        """Columns of the gate record: ``gate_columns``, or ``experts``."""
        return self.experts if self.gate_columns is None else self.gate_columns

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


def plan_moe(config, *, hidden=None, experts=None, tasks=None):
    """The tile plan and memory layout of one MoE layer for ``config``.

    With ``hidden``, ``experts`` or ``tasks`` (each at most the config's model's; default: the
    model's): the layout of a *smaller* MoE layer run on the design elaborated for ``config``
    (:class:`~m3vit_hw.moe.moe_sequencer.MoESequencer`'s run-time shape). ``D`` stays the config's.
    Its expert tiles are planned for ``hidden`` on the design's buffer halves (they reach the
    hardware as a plan table, :func:`pack_plan`), its expert region holds ``experts`` experts, and
    its gate keeps the design's ``model.experts`` columns (``gate_columns``): :func:`pack_moe` pads
    the gate with zero columns whose task bias is :data:`PAD_LOGIT`, so the design's gate chunks and
    router serve it unchanged and the padded experts get probability 0 and are never selected.

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
    runtime = (hidden, experts, tasks) != (None, None, None)
    if hidden is not None:
        check_int("hidden", hidden, 1, m.expert_hidden)
        h = hidden
    if experts is not None:
        check_int("experts", experts, 1, m.experts)
    if tasks is not None:
        check_int("tasks", tasks, 1, m.num_tasks)
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

    if runtime:
        # The design's chunking rule (config.moe_tile_chunks) for the smaller hidden width.
        tile_plan = tuple((kind, k, n, balanced_chunks(_ceil_div(n, C), config.moe_panels_per_tile(k)))
                          for kind, k, n in (("fc1", D, h), ("fc2", h, D)))
    else:
        tile_plan = config.moe_tile_chunks
    tiles, expert_stride = chunks(tile_plan)
    gate_tiles, gate_stride = chunks((("gate", D, E, config.gate_chunks),))
    n_experts = E if experts is None else experts
    tasks = m.num_tasks if tasks is None else tasks
    experts_offset = _round_up(tasks * gate_stride, data_bytes)
    layout = MoELayout(
        dim=D, hidden=h, experts=n_experts, tasks=tasks, pe_cols=C, data_bytes=data_bytes,
        weight_half_bytes=half, param_half_words=config.param_buffer_words // 2, param_word_bytes=pwb,
        tiles=tiles, expert_stride=expert_stride, gate_panels=config.gate_panels,
        gate_tiles=gate_tiles, gate_offset=0, gate_stride=gate_stride,
        experts_offset=experts_offset, image_bytes=experts_offset + n_experts * expert_stride,
        gate_columns=E if runtime else None)
    if not runtime:
        # The config validated the address width against its own count of the image.
        assert layout.image_bytes == config.moe_image_bytes, (layout.image_bytes, config.moe_image_bytes)
        return layout
    design = plan_moe(config)
    if len(tiles) > len(design.tiles):
        raise ValueError(f"hidden={h} needs {len(tiles)} expert tiles on this design, which holds a "
                         f"plan of at most {len(design.tiles)} (its hidden={m.expert_hidden})")
    if layout.image_bytes >= 1 << config.mem_addr_width:
        raise ValueError(f"mem_addr_width={config.mem_addr_width} cannot address the "
                         f"{layout.image_bytes}-byte MoE image")
    return layout


#: Bytes of one entry of an expert plan table (:func:`pack_plan`).
PLAN_ENTRY_BYTES = 32

#: The plan-table entry: ``name -> (byte offset, bytes)``, little-endian unsigned fields; ``flags``
#: bit 0 = fc2, bit 1 = the expert's first fc2 tile, bit 2 = the expert's last tile. ``nk`` =
#: ``ceil(n / pe_cols) * k`` (PE beats per row tile), ``w_last`` = reduction steps in the last block
#: of ``pe_cols`` steps, ``n0w`` = ``n0 / pe_cols``. Offsets are relative to the expert's base.
PLAN_FIELDS = {
    "w_off": (0, 4), "w_len": (4, 4), "p_off": (8, 4), "p_len": (12, 4),
    "n": (16, 2), "n0w": (18, 2), "nk": (20, 4), "k": (24, 2), "w_last": (26, 1), "flags": (27, 1),
}


def plan_entries(layout):
    """The plan table's entries of ``layout`` (a list of ``{field: value}``, see :data:`PLAN_FIELDS`)."""
    C = layout.pe_cols
    first_fc2 = next((t.index for t in layout.tiles if t.kind == "fc2"), None)
    out = []
    for t in layout.tiles:
        flags = (t.kind == "fc2") | (t.index == first_fc2) << 1 | (t.index == len(layout.tiles) - 1) << 2
        out.append({"w_off": t.w_offset, "w_len": t.w_bytes, "p_off": t.p_offset, "p_len": t.p_bytes,
                    "n": t.n, "n0w": t.n0 // C, "nk": _ceil_div(t.n, C) * t.k, "k": t.k,
                    "w_last": t.k - C * ((t.k - 1) // C), "flags": flags})
    return out


def pack_plan(layout, config):
    """The expert plan table of ``layout`` for external memory: one :data:`PLAN_ENTRY_BYTES` entry per
    tile, in plan order, padded with zero entries to the design's plan length (``len(plan_moe(config)
    .tiles)``: the MoE client fetches exactly that many when its start sets ``plan_fetch``).

    Raises
    ------
    ValueError
        If a field does not fit its bytes, or the plan is longer than the design's.
    """
    entries = len(plan_moe(config).tiles)
    if len(layout.tiles) > entries:
        raise ValueError(f"the plan has {len(layout.tiles)} tiles; this design holds at most {entries}")
    out = bytearray()
    for e in plan_entries(layout):
        entry = bytearray(PLAN_ENTRY_BYTES)
        for name, (at, size) in PLAN_FIELDS.items():
            v = int(e[name])
            if not 0 <= v < 1 << (8 * size):
                raise ValueError(f"plan entry field {name} = {v} does not fit {size} bytes")
            entry[at:at + size] = v.to_bytes(size, "little")
        out += entry
    return bytes(out) + bytes((entries - len(layout.tiles)) * PLAN_ENTRY_BYTES)


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


def _check_padding(qmoe, task, D, task_bias):
    """A padded gate column must get softmax exponent 0 exactly (``golden.softmax_exp``): the distance
    from the row maximum (at least ``-PAD_LOGIT - max|real logit|``) scaled by the task's router
    ``c_mult / 2**c_shift`` must reach ``EXP_ZERO_INT``."""
    g = _gate_index(qmoe, task)
    c_mult, c_shift = int(qmoe.router_c_mult[g]), int(qmoe.router_c_shift[g])
    lo, _ = numerics.int_range(numerics.ACT_BITS)
    wlo, _ = numerics.int_range(numerics.WEIGHT_BITS)
    real = D * lo * wlo + int(np.max(np.abs(task_bias))) if len(task_bias) else D * lo * wlo
    gap = -PAD_LOGIT - real
    if gap <= 0 or (gap * c_mult) >> c_shift < numerics.EXP_ZERO_INT << numerics.EXP_FRAC_BITS:
        raise ValueError(f"task {task}: the router scale c_mult={c_mult}, c_shift={c_shift} is too small "
                         f"for a padded gate (a padded expert would get a non-zero probability); run "
                         f"this model on a design with experts={len(task_bias)}")


def pack_moe(qmoe, config, *, layout=None):
    """Lay out one MoE layer's integer parameters for external memory.

    Parameters
    ----------
    qmoe : reference.qparams.QMoE
        Gates (one per task, or one shared), ``task_bias`` [tasks, E], fc1/fc2 of every expert.
    config : AcceleratorConfig
        Its ``mem_data_bytes`` is the memory beat every piece is aligned to.
    layout : MoELayout or None
        Default ``plan_moe(config)``. A run-time layout (``plan_moe(config, hidden=, experts=,
        tasks=)``) packs a smaller model for the design: its gate padded to ``layout.gate_cols``
        columns (zero weights, task bias :data:`PAD_LOGIT`).

    Returns
    -------
    (bytes, MoELayout)
        The image (offset 0 = the layer's base address) and its layout.

    Raises
    ------
    ValueError
        On parameters of the wrong shape, or a router scale too small for a padded gate.
    """
    layout = plan_moe(config) if layout is None else layout
    if not isinstance(layout, MoELayout):
        raise TypeError(f"layout must be a MoELayout, not {layout!r}")
    C, D, h, E = layout.pe_cols, layout.dim, layout.hidden, layout.experts
    G = layout.gate_cols
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
        bias = task_bias[t]
        if G > E:
            _check_padding(qmoe, t, D, bias)
            gate = np.concatenate([gate, np.zeros((D, G - E), dtype=gate.dtype)], axis=1)
            bias = np.concatenate([bias, np.full(G - E, PAD_LOGIT, dtype=np.int64)])
        at = layout.gate_record_offset(t)
        for tile in layout.gate_tiles:
            cols = slice(tile.n0, tile.n0 + tile.n)
            _place(image, at + tile.w_offset, pack_panels(gate[:, cols], C), tile.w_bytes)
            _place(image, at + tile.p_offset,
                   pack_params(bias[cols], np.zeros(tile.n, dtype=np.int64), C), tile.p_bytes)
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


def start_fields(qmoe, task, tokens, layout, *, base=0, top_k=None, plan_addr=None):
    """The payload of :attr:`MoELayer.start` for running ``task`` on ``tokens`` tokens.

    ``base`` is the external byte address where the :func:`pack_moe` image was placed. For a run-time
    shape (a smaller model on the design, ``layout`` from ``plan_moe(config, hidden=, ...)``) give the
    model's ``top_k`` and the external address of its :func:`pack_plan` table (``plan_addr``).
    """
    layout.gate_record_offset(task)
    g = _gate_index(qmoe, task)
    extra = {}
    if top_k is not None:
        check_int("top_k", top_k, 1, layout.experts)
        extra["top_k"] = top_k
    if plan_addr is not None:
        check_int("plan_addr", plan_addr, 0)
        extra.update(plan_fetch=1, plan_addr=plan_addr, expert_stride=layout.expert_stride)
    return {**extra, 
        "task": task, "tokens": tokens,
        "gate_base": base + layout.gate_offset, "expert_base": base + layout.experts_offset,
        "c_mult": int(qmoe.router_c_mult[g]), "c_shift": int(qmoe.router_c_shift[g]),
        "fc1_shift": int(qmoe.fc1.shift), "fc2_shift": int(qmoe.fc2.shift),
    }
