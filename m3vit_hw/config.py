"""``AcceleratorConfig``: the one object that describes an accelerator instance.

Everything that has a size reads it from here: the RTL generators (PE array shape, port and address
widths, buffer depths, command field widths), the compiler (buffer capacities, tile shapes), the build
report and the tests. Integer *formats* (operand, accumulator, residual widths) are not repeated here:
they come from :mod:`m3vit_hw.numerics` and are only exposed as read-only properties, so there is one
source of truth per fact.

The config is validated when it is built, before anything is elaborated: a bad value raises
:class:`TypeError` or :class:`ValueError` naming the parameter, the value and the allowed range.

Buffers
-------
All on-chip buffers that the GEMM engine reads or writes are organised in *words* of one PE-array
column tile: ``pe_cols`` elements (see :class:`m3vit_hw.gemm.gemm_engine.GemmEngine` for the exact layouts).

``act_buffer_bytes``
    The int8 activation scratch buffer (LayerNorm outputs, Q/K/V, attention context, MLP hidden tiles).
    It must hold the largest of :attr:`AcceleratorConfig.act_buffer_needs`: for attention, the
    address space of its buffer map (``h`` and the per-head padded context of every token, one head's
    Q|K|V with rows padded to whole tiles plus one row tile, then two e8 query tiles at an aligned
    base: the ``attn_*`` properties, read by ``attention.attn_layout.buffer_map``); for a MoE layer,
    every token's ``h`` row and its ``expert_hidden`` hidden row; for the dense MLP, ``h`` and one row
    tile of hidden rows; for the patch embedding, two slots of one row tile of patch rows; all in
    whole words.
``rowtab_entries`` (derived)
    The row table: the largest of :attr:`AcceleratorConfig.rowtab_needs` (every token routed to
    ``top_k`` experts, or attention's two query-tile slots).
``weight_buffer_bytes``
    The double-buffered weight buffer, *both halves together*. Its size does not depend on the number
    of experts: one expert (or one tile of a large expert) streams into one half while the engine
    computes from the other. Each half must hold at least one *weight panel* (``largest_weight_k *
    pe_cols`` bytes: the engine computes an output tile over the full K from one resident panel) and
    its requirements (:attr:`AcceleratorConfig.weight_half_needs`), in whole memory beats. The
    default holds one whole expert per half. The MoE gate (``N = experts``) is cut into N-chunks
    like a large expert (:attr:`AcceleratorConfig.gate_chunks`), so no requirement depends on E.
``res_buffer_bytes`` (derived)
    The int16 residual stream, ``token_capacity x dim`` (rows padded to whole words). It is never
    tiled: the residual stream stays on chip for the whole frame.
``param_buffer_words``
    Per-output-column epilogue parameters (int32 bias + multiplier), one word per column tile,
    double-buffered like the weights.
"""

import math
from dataclasses import dataclass, fields, replace

from . import numerics
from .checks import check_int as _check_int
from .lib.mem_arbiter import DEFAULT_DEPTH as DEFAULT_ARBITER_DEPTH
from .lib.mem_port import DEFAULT_ADDR_WIDTH, DEFAULT_DATA_BYTES, DEFAULT_MAX_BURST, ReadPortSignature
from .model_config import PRESETS as MODEL_PRESETS
from .model_config import ModelConfig

__all__ = ["AcceleratorConfig", "ACCEL_PRESETS", "SMALL_ACCEL_PRESETS", "DEVICE_ACCEL_PRESETS", "SIZINGS", "PARAM_LANE_BYTES", "param_word_bytes", "index_bits",
           "balanced_chunks"]


#: The small accelerator sizing of each preset (``from_preset(name, sizing="small")``): fast builds
#: and simulations. W1 uses Edge-MoE's 16x16 array; W2 is 10x the work, so it gets a 32x32 array
#: (1024 of the xczu7ev's 1728 DSP48E2s, one MAC each). Until issue 12 these were the defaults.
SMALL_ACCEL_PRESETS = {
    "vit-tiny-cityscapes": dict(pe_rows=16, pe_cols=16),
    "vit-small-nyud": dict(pe_rows=32, pe_cols=32),
    # Test presets: a 4x4 array, so simulations stay small.
    "tiny": dict(pe_rows=4, pe_cols=4),
    "tiny-task-embedding": dict(pe_rows=4, pe_cols=4),
}

#: W2's device weight buffer: one panel of its largest K (1,536 x 64 int8 = 96 KiB) per half, not one
#: whole expert (576 KiB): W2's on-chip buffers then fit 80 % of the xczu7ev's BRAM36 and URAM
#: (``control.onchip``), and the analytic model projects the same frame time (every expert's tokens
#: all pass each resident N-chunk, so a chunk's weights are fetched once either way).
W2_DEVICE_WEIGHT_BUFFER_BYTES = 2 * 1536 * 64

#: Device-sized PE arrays for the xczu7ev (issue 12): 2,048 int8 MAC/cycle from 1,024 DSP48E2s (two
#: MACs per DSP). 32 x 64 is the shape ``sim.pe_shapes`` ranks first for W2 and first for W1 among
#: the legal ones with >= 2,048 MAC/cycle (rows <= cols, so the A reads keep up; see the GEMM engine).
#: Selected with ``from_preset(name, sizing="device")``; W1's default (:data:`ACCEL_PRESETS`).
#: The row units stay narrow (their DSP48E2s and registers scale with their lanes, not with the
#: array). W1: a 16-lane epilogue (a PE row drains in 4 beats, hidden behind every K >= 132 and
#: behind the experts' half-full row tiles; the projected frame is 5 % slower than with 64 lanes,
#: all of it in QK^T, K = 64), 16-lane LayerNorm and softmax. W2: the same 16 lanes, so that the
#: whole W2 build stays within 80 % of DSP48E2 and LUT like W1's measured build (1,292 DSP48E2, 76.8 %
#: LUT): a 32-lane epilogue and softmax would project W2 at 104 ms instead of 126 ms (its QK^T, K =
#: head_dim = 32, drains 4-beat PE rows), but by the unit estimates they add about 80 + 48 DSP48E2
#: (1,420, 82 %) and 12 k LUT for the epilogue alone (about 82 %).
#: W1's activation buffer also holds the dense MLP's hidden slot for all 129 tokens (``act_holds_dense``:
#: 160 rows x 15 words of 64 B = 153,600 B in the same 8 URAM as the smallest legal buffer, which
#: holds 96 rows and so fetched every MLP weight twice, x1.12 of the minimum; now x1.012). W1 keeps the
#: 16-byte memory beat: the 64-byte beat over four HP ports halves the frame (README) but took the
#: whole build to 83.6 % of the LUTs, above the 80 % margin.
DEVICE_ACCEL_PRESETS = {
    "vit-tiny-cityscapes": dict(pe_rows=32, pe_cols=64, pe_pack=2, epi_lanes=16, ln_lanes=16,
                                softmax_lanes=16, act_holds_dense=True),
    "vit-small-nyud": dict(pe_rows=32, pe_cols=64, pe_pack=2, epi_lanes=16, ln_lanes=16,
                           softmax_lanes=16, weight_buffer_bytes=W2_DEVICE_WEIGHT_BUFFER_BYTES,
                           act_split_words=20480, lane_split=True),
}

#: Accelerator-side defaults per model preset (``sizing="default"``; the model itself comes from
#: ``model_config.PRESETS``). W1 is device-sized (the whole W1 build fits the xczu7ev within 80 %
#: of every resource by the build's estimate). W2 is device-sized too: its on-chip buffers fit
#: within 80 % of the part's BRAM36 and URAM by ``control.onchip`` (two heads of 32 a context word,
#: a copy of only the Q|K|V region for the B operand, the activation bank split URAM + block RAM, a
#: one-panel weight half; see the README). The test presets stay 4x4.
ACCEL_PRESETS = {
    "vit-tiny-cityscapes": DEVICE_ACCEL_PRESETS["vit-tiny-cityscapes"],
    "vit-small-nyud": DEVICE_ACCEL_PRESETS["vit-small-nyud"],
    "tiny": SMALL_ACCEL_PRESETS["tiny"],
    "tiny-task-embedding": SMALL_ACCEL_PRESETS["tiny-task-embedding"],
}

#: The ``sizing`` names of :meth:`AcceleratorConfig.from_preset` (and of the CLIs' ``--sizing``).
SIZINGS = {"default": ACCEL_PRESETS, "small": SMALL_ACCEL_PRESETS, "device": DEVICE_ACCEL_PRESETS}

#: Largest magnitude of one product: int8 x int8 peaks at (-128)(-128); unsigned attention weights
#: (e8 <= 255) times int8 peak at 255 * 128 (negative side).
_SIGNED_PRODUCT_MAX = 1 << (numerics.ACT_BITS - 1 + numerics.WEIGHT_BITS - 1)
_UNSIGNED_PRODUCT_MAX = ((1 << numerics.ATTN_P_BITS) - 1) * (1 << (numerics.WEIGHT_BITS - 1))


#: Bytes of one output column's epilogue parameters in a parameter word (int32 bias + 24-bit mult,
#: padded to 8): the external-memory image (``moe.expert_layout``) and the buffer sizes read it.
PARAM_LANE_BYTES = 8

#: Data bits of an UltraScale+ URAM288 word (4,096 of them): the unit of ``lane_split`` and of the
#: block-memory packing rules (``control.onchip``, ``build.memories``).
URAM_BITS = 72
#: ``lane_split`` moves at most this many bits of a word out of URAM: one or two block RAMs per 4,096
#: words (9 or 18 bits wide) cost less than the URAM column they free.
LANE_REST_MAX_BITS = 18


def param_word_bytes(pe_cols):
    """Bytes of one parameter word: ``pe_cols`` lanes of :data:`PARAM_LANE_BYTES`, padded to a power
    of two so that it is a power-of-two multiple or fraction of the memory beat."""
    return 1 << (pe_cols * PARAM_LANE_BYTES - 1).bit_length()


#: Which model quantity sets each GEMM's K (named in the accumulator-overflow error).
#: The GEMMs whose A operand is uint8: AV (the softmax weights) and fc2 / expert fc2 (the GELU codes,
#: ``numerics.GELU_CODE_BITS``); every other A is int8.
_UNSIGNED_A_GEMMS = ("av (uint8 A)", "fc2", "expert_fc2")

_K_SOURCE = {
    "patch_embed": "patch_dim", "qkv": "dim", "qk": "head_dim",
    "proj": "dim (padded to heads*ceil(head_dim/pe_cols)*pe_cols)", "fc1": "dim",
    "fc2": "mlp_hidden", "gate": "gate_in_dim", "expert_fc1": "dim", "expert_fc2": "expert_hidden",
    "task_fc1": "num_tasks", "task_fc2": "task_embed_dim",
}


#: Fields whose ``None`` default is derived from the others in ``__post_init__``.
_DERIVED_FIELDS = ("token_capacity", "ln_lanes", "softmax_lanes", "epi_lanes", "act_buffer_bytes",
                   "weight_buffer_bytes", "param_buffer_words", "q_tile")


def index_bits(count):
    """Bits of an index into ``count`` entries (at least 1): memory addresses, token ids."""
    return max(1, (int(count) - 1).bit_length())


_addr_bits = index_bits


def balanced_chunks(panels, per_chunk):
    """Split ``panels`` column tiles into the fewest chunks of at most ``per_chunk`` each, with panel
    counts that differ by at most one (so no chunk is a short tail that idles the engine)."""
    count = _ceil_div(panels, per_chunk)
    base, extra = divmod(panels, count)
    return tuple(base + (1 if i < extra else 0) for i in range(count))


def _ceil_div(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class AcceleratorConfig:
    """One accelerator instance: the model it runs, the PE array, buffers and clock.

    Parameters
    ----------
    model : ModelConfig
        The M³ViT encoder this instance runs (dims, heads, experts, top-k, tasks).
    pe_rows, pe_cols : int
        PE array shape; peak throughput is ``pe_rows * pe_cols`` int8 MACs per cycle. ``pe_cols`` is
        also the element count of one buffer word. The GEMM engine
        sustains full rate when ``pe_rows <= pe_cols`` (see :class:`~m3vit_hw.gemm.gemm_engine.GemmEngine`).
    token_capacity : int or None
        Most tokens held on chip; at least ``model.tokens``. Default: ``model.tokens``.
    ln_lanes, softmax_lanes : int or None
        Elements per cycle of the LayerNorm and softmax units. Default: ``pe_cols`` (one output row
        chunk of the GEMM engine per cycle).
    epi_lanes : int or None
        Lanes of the GEMM epilogue (requantizer, GELU, residual), a divisor of ``pe_cols``: the engine
        drains each PE-array output row through the epilogue as ``pe_cols / epi_lanes`` beats, one per
        cycle. Default: ``pe_cols`` (one row per cycle). A tile's drain then takes ``pe_rows *
        pe_cols / epi_lanes`` cycles and stays hidden behind the next tile's ``K`` reduction steps
        while ``K >= pe_rows * pe_cols / epi_lanes + 4`` (:attr:`epi_hidden_min_k`); the epilogue's
        DSP48E2s and registers scale with ``epi_lanes``, not with the array.
    act_buffer_bytes : int or None
        Size of the int8 activation buffer; a multiple of ``pe_cols``. Default: the minimum (see the
        module docstring), rounded up to whole words; with ``act_holds_dense``, at least
        :attr:`dense_act_full_words`.
    act_holds_dense : bool
        Size the derived activation buffer so that the dense MLP's hidden slot holds every token: one
        token tile, so each block's MLP weights are fetched once (the minimum buffer may hold fewer
        rows, and then the weights stream once per token tile). Ignored when ``act_buffer_bytes`` is
        given. Default False.
    weight_buffer_bytes : int or None
        Size of the double-buffered weight buffer, both halves together; a multiple of
        ``2 * pe_cols``. Default: each half holds one whole expert (fc1 + fc2 at int8, 144 KiB for W1:
        the same weight count as Edge-MoE's 2 x 288 KiB of 16-bit weights), or one weight panel if
        that is larger.
    param_buffer_words : int or None
        Words of the column-parameter buffer (one word = bias and multiplier of ``pe_cols`` output
        columns). Default: twice the column tiles of the widest set of GEMMs sharing one weight fill
        (qkv + proj, fc1 + fc2, one expert's fc1 + fc2; the MoE gate streams in chunks, so E does
        not enter), but no more than two weight halves hold panels of the smallest reduction of a
        GEMM with streamed weights (``gemm_k_list`` less QKᵀ and AV): every layout cuts its tiles to
        fit both halves, so more words would never be filled (W2's one-panel halves: 8 words, not 60).
    q_tile : int or None
        Query rows per attention tile, in ``[1, token_capacity]``. Default: ``min(pe_rows,
        token_capacity)`` (one PE-array row tile, so the score tile never needs re-tiling).
    clock_mhz : int or float
        Clock frequency used in reports (``(0, 1000]``).
    mem_addr_width, mem_data_bytes, mem_max_burst : int
        The external-memory read port (:class:`~m3vit_hw.lib.mem_port.ReadPortSignature`): byte-address
        width, bytes per beat, longest burst. Defaults: the ZCU104's 128-bit HP ports with 32-bit
        addresses and 16-beat bursts.
    tile_tag_width : int
        Width of the tag that numbers a tile between the reordering controller, the weight streamers
        and the weight buffers, in ``[1, 64]``; it must number every tile of an expert plus the gate.
    arbiter_depth : int
        Outstanding requests the external-memory read arbiter remembers (``[1, 256]``).
    counter_width : int
        Width of the performance counters (cycles, compute cycles, bytes fetched), ``[16, 64]``.
    pe_pack : int
        int8 MACs per DSP48E2 in the PE array: 1, or 2 (shared-operand packing, two columns per DSP;
        ``pe_cols`` must then be even). The results are bit-identical; 2 halves the DSPs (see
        :class:`~m3vit_hw.gemm.pe_array.PEArray`).
    gemm_desc_depth : int
        GEMM engine tile descriptors in flight between the loader and the epilogue (``[2, 16]``):
        staged, accumulating, draining. Three (the default) means a tile with ``K`` just above
        ``pe_rows`` never waits for a descriptor slot.
    act_split_words : int
        0 (default): the shared datapath's activation main bank is one memory. Else it is two: words
        ``[0, act_split_words)`` and the rest, so that a build places the large lower bank in URAM
        (whole 4,096-word URAM columns) and the short upper one in block RAM (W2 at 32 x 64: 20,480 +
        1,216 words, 40 URAM + 23 BRAM36 instead of 48 URAM). It must be a multiple of the upper
        bank's power-of-two range (the upper bank decodes from the high address bits and is addressed
        by the low ones), below ``act_buffer_words``.
    lane_split : bool
        False (default): each buffer word is one memory. True: the activation main bank (its lower
        bank with ``act_split_words``), its Q|K|V copy and the residual bank each keep the lanes that
        fill whole 72-bit URAM columns in one memory and the rest in another
        (:class:`~m3vit_hw.lib.lane_memory.LaneMemory`, :meth:`lane_split_at`), which a build puts
        in block RAM: 64 int8 lanes as 63 in 7 URAMs + 1 in a RAMB36 per 4,096 words instead of 8
        URAMs; 64 int16 lanes as 14 URAMs + 2 RAMB36 instead of 15 (W2: 78 URAM -> 70). A buffer
        splits only where the rest is at most 18 bits; ``pe_cols`` must let one of the two split.

    Raises
    ------
    TypeError, ValueError
        On any parameter outside its range, naming the parameter, the value and the range. This
        includes a model whose largest GEMM reduction could overflow the ``ACC_BITS`` accumulator.
    """

    model: ModelConfig
    pe_rows: int = 16
    pe_cols: int = 16
    pe_pack: int = 1
    token_capacity: int = None
    ln_lanes: int = None
    softmax_lanes: int = None
    epi_lanes: int = None
    act_buffer_bytes: int = None
    act_holds_dense: bool = False
    weight_buffer_bytes: int = None
    param_buffer_words: int = None
    q_tile: int = None
    clock_mhz: float = 300
    mem_addr_width: int = DEFAULT_ADDR_WIDTH
    mem_data_bytes: int = DEFAULT_DATA_BYTES
    mem_max_burst: int = DEFAULT_MAX_BURST
    tile_tag_width: int = 16
    arbiter_depth: int = DEFAULT_ARBITER_DEPTH
    counter_width: int = 32
    gemm_desc_depth: int = 3
    act_split_words: int = 0
    lane_split: bool = False

    def __post_init__(self):
        # Remember which sizes were derived, so that with_() derives them again from the new values.
        object.__setattr__(self, "_derived", frozenset(
            name for name in _DERIVED_FIELDS if getattr(self, name) is None))
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"model must be a ModelConfig, not {self.model!r}")
        m = self.model
        _check_int("pe_rows", self.pe_rows, 1, 256)
        _check_int("pe_cols", self.pe_cols, 1, 256)
        _check_int("pe_pack", self.pe_pack, 1, 2)
        if self.pe_pack == 2 and self.pe_cols % 2:
            raise ValueError(f"pe_cols must be even with pe_pack=2 (two columns share a DSP48E2), "
                             f"not {self.pe_cols}")

        if self.token_capacity is None:
            self._set("token_capacity", m.tokens)
        _check_int("token_capacity", self.token_capacity, m.tokens)

        # The accumulator check comes before the buffer checks: it is the one that says the model
        # cannot run on this datapath at all, whatever the buffers.
        self._check_accumulator()

        for name in ("ln_lanes", "softmax_lanes"):
            if getattr(self, name) is None:
                self._set(name, self.pe_cols)
            _check_int(name, getattr(self, name), 1, 1024)

        if self.epi_lanes is None:
            self._set("epi_lanes", self.pe_cols)
        _check_int("epi_lanes", self.epi_lanes, 1, self.pe_cols)
        if self.pe_cols % self.epi_lanes:
            raise ValueError(f"epi_lanes must divide pe_cols={self.pe_cols} (a PE-array row drains as "
                             f"whole epilogue beats), not {self.epi_lanes}; allowed: "
                             f"{[d for d in range(1, self.pe_cols + 1) if self.pe_cols % d == 0]}")

        if self.q_tile is None:
            self._set("q_tile", min(self.pe_rows, self.token_capacity))
        _check_int("q_tile", self.q_tile, 1, self.token_capacity)

        self._check_memory_system()
        self._check_buffers()
        self._check_stream_units()

        if (isinstance(self.clock_mhz, bool) or not isinstance(self.clock_mhz, (int, float))
                or not 0 < self.clock_mhz <= 1000):
            raise ValueError(f"clock_mhz must be a number in (0, 1000], not {self.clock_mhz!r}")

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def _check_memory_system(self):
        try:
            ReadPortSignature.check_parameters(addr_width=self.mem_addr_width,
                                               data_bytes=self.mem_data_bytes,
                                               max_burst=self.mem_max_burst)
        except (TypeError, ValueError) as e:
            # The port names its parameters without the prefix; the config's fields carry it.
            msg = str(e)
            for name in ("addr_width", "data_bytes", "max_burst"):
                msg = msg.replace(name, "mem_" + name)
            raise type(e)(msg) from None
        _check_int("tile_tag_width", self.tile_tag_width, 1, 64)
        _check_int("arbiter_depth", self.arbiter_depth, 1, 256)
        _check_int("counter_width", self.counter_width, 16, 64)
        _check_int("gemm_desc_depth", self.gemm_desc_depth, 2, 16)
        # Buffers are filled beat by beat and read word by word from banks of the narrower width,
        # so every word size must be a power-of-two multiple or fraction of the memory beat.
        for name, size in (("pe_cols (weight word bytes)", self.act_word_bytes),
                           ("param_word_bytes", self.param_word_bytes)):
            wide, narrow = max(size, self.mem_data_bytes), min(size, self.mem_data_bytes)
            ratio = wide // narrow
            if wide % narrow or ratio & (ratio - 1):
                raise ValueError(f"{name}={size} must be a power-of-two multiple or fraction of "
                                 f"mem_data_bytes={self.mem_data_bytes} (the buffer is built from "
                                 f"banks of the narrower width)")

    def _check_buffers(self):
        """Size (when derived) and check every on-chip buffer against :meth:`buffer_needs`.

        The units size themselves from the same properties, so a config that passes elaborates.
        """
        word = self.act_word_bytes
        act_need, act_why = max(self.act_buffer_needs.values())
        if not isinstance(self.act_holds_dense, bool):
            raise TypeError(f"act_holds_dense must be a bool, not {self.act_holds_dense!r}")
        if self.act_buffer_bytes is None:
            need = max(act_need, self.dense_act_full_words * word) if self.act_holds_dense else act_need
            self._set("act_buffer_bytes", _ceil_div(need, word) * word)
        _check_int("act_buffer_bytes", self.act_buffer_bytes, 1)
        if self.act_buffer_bytes < act_need:
            raise ValueError(f"act_buffer_bytes must be >= {act_need} ({act_why}), "
                             f"not {self.act_buffer_bytes}")
        if self.act_buffer_bytes % word:
            raise ValueError(f"act_buffer_bytes must be a multiple of the {word}-byte buffer word "
                             f"(pe_cols int8), not {self.act_buffer_bytes}")
        words = self.act_buffer_words
        _check_int("act_split_words", self.act_split_words, 0, words - 1)
        if self.act_split_words and self.act_split_words % self.act_hi_span:
            raise ValueError(f"act_split_words must be 0 or a multiple of {self.act_hi_span} (the "
                             f"upper bank's power-of-two range, act_buffer_words={words}), not "
                             f"{self.act_split_words}")
        if not isinstance(self.lane_split, bool):
            raise TypeError(f"lane_split must be a bool, not {self.lane_split!r}")
        if self.lane_split and not any(self.lane_split_at(b) for b in (numerics.ACT_BITS, numerics.RES_BITS)):
            raise ValueError(f"lane_split needs an int8 or int16 word of pe_cols lanes that leaves at most "
                             f"{LANE_REST_MAX_BITS} bits past whole {URAM_BITS}-bit URAM columns (pe_cols=64 "
                             f"leaves 8 and 16), not pe_cols={self.pe_cols}")

        unit = self.weight_half_unit_bytes
        half_need, half_why = max(self.weight_half_needs.values())
        if self.weight_buffer_bytes is None:
            half = max(half_need, self.expert_weight_bytes)
            self._set("weight_buffer_bytes", 2 * _ceil_div(half, unit) * unit)
        _check_int("weight_buffer_bytes", self.weight_buffer_bytes, 2)
        if self.weight_buffer_bytes % (2 * unit):
            raise ValueError(f"weight_buffer_bytes must be a multiple of {2 * unit} (two halves of "
                             f"whole {word}-byte words and {self.mem_data_bytes}-byte memory beats), "
                             f"not {self.weight_buffer_bytes}")
        if self.weight_buffer_bytes // 2 < half_need:
            raise ValueError(f"weight_buffer_bytes must be >= {2 * half_need} (each half must hold "
                             f"{half_why} = {half_need} bytes), not {self.weight_buffer_bytes}")

        if self.param_buffer_words is None:
            self._set("param_buffer_words", self._default_param_words())
        _check_int("param_buffer_words", self.param_buffer_words, 1)
        # Gate and expert tiles are N-chunks of whole panels: one parameter word per half suffices.
        if self.param_buffer_words < 2:
            raise ValueError(f"param_buffer_words must be >= 2 (each half must hold one column "
                             f"tile's parameter word), not {self.param_buffer_words}")

        tiles = sum(len(counts) for _, _, _, counts in self.moe_tile_chunks)
        if tiles + 1 >= 1 << self.tile_tag_width:
            raise ValueError(f"tile_tag_width must number the gate and an expert's {tiles} tiles "
                             f"(>= {(tiles + 1).bit_length()} bits), not {self.tile_tag_width}")
        if self.moe_image_bytes >= 1 << self.mem_addr_width:
            raise ValueError(f"mem_addr_width must address a MoE layer's {self.moe_image_bytes}-byte "
                             f"parameter image (>= {self.moe_image_bytes.bit_length()} bits), "
                             f"not {self.mem_addr_width}")

    def _check_stream_units(self):
        """The patch loader's camera frame fits the memory address space."""
        if self.frame_bytes >= 1 << self.mem_addr_width:
            raise ValueError(f"mem_addr_width must address a {self.frame_bytes}-byte camera frame "
                             f"(>= {self.frame_bytes.bit_length()} bits), not {self.mem_addr_width}")

    def _check_accumulator(self):
        worst, what, param = self.worst_case_acc
        limit = (1 << (numerics.ACC_BITS - 1)) - 1
        if worst > limit:
            raise ValueError(
                f"{param} makes the {what} overflow the {numerics.ACC_BITS}-bit accumulator: worst-case "
                f"|sum| {worst} > {limit}; the largest K allowed is "
                f"{limit // _SIGNED_PRODUCT_MAX} (int8 x int8) or "
                f"{limit // _UNSIGNED_PRODUCT_MAX} (uint8 x int8)")

    def _default_param_words(self):
        m = self.model
        c = self.pe_cols
        tiles = max(_ceil_div(3 * m.dim, c) + _ceil_div(m.dim, c),
                    _ceil_div(m.mlp_hidden, c) + _ceil_div(m.dim, c),
                    _ceil_div(m.expert_hidden, c) + _ceil_div(m.dim, c))
        # No E term: the MoE gate is streamed in N-chunks (gate_chunks) like a large expert.
        # A tile holds at most half // panel column tiles of its K (every layout takes the min of that
        # and the parameter half), so the smallest K bounds the words a half can ever receive: at W2
        # (96 KiB halves, K >= 384) 4 words a half, a parameter buffer of 8 rows in RAM32M16 LUTRAM
        # instead of 60 in RAM64M8 (W2's build: about 2,000 LUTs less).
        # QKᵀ and AV stream no weights or parameters (their B operand is on chip).
        k_min = min(k for name, k in self.gemm_k_list.items() if name not in ("qk", "av (uint8 A)"))
        fit = self.weight_buffer_half_bytes // (k_min * self.act_word_bytes)
        return 2 * max(1, min(tiles, fit))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name, *, sizing="default", **overrides):
        """An instance for a named workload preset, with optional overrides.

        ``name`` is a key of :data:`m3vit_hw.model_config.PRESETS` (``"vit-tiny-cityscapes"`` = W1,
        ``"vit-small-nyud"`` = W2, ``"tiny"``, ...). ``sizing`` picks the accelerator defaults
        (:data:`SIZINGS`): ``"default"`` (:data:`ACCEL_PRESETS`: W1 and W2 device-sized, the test
        presets small),
        ``"small"`` (:data:`SMALL_ACCEL_PRESETS`: 16x16 for W1, 32x32 for W2, 4x4 for the test
        presets; fast builds and simulations) or ``"device"`` (:data:`DEVICE_ACCEL_PRESETS`, the PE
        array sized to the xczu7ev; W1 and W2 only). ``overrides`` may name accelerator fields
        (``pe_rows=8``) or model fields (``experts=64``); the latter are applied to the model.
        """
        if name not in MODEL_PRESETS:
            raise ValueError(f"preset must be one of {sorted(MODEL_PRESETS)}, not {name!r}")
        sizings = SIZINGS
        if sizing not in sizings:
            raise ValueError(f"sizing must be one of {sorted(sizings)}, not {sizing!r}")
        if name not in sizings[sizing] and sizing != "default":
            raise ValueError(f"sizing={sizing!r} has presets {sorted(sizings[sizing])}, not {name!r}")
        accel_fields = {f.name for f in fields(cls)} - {"model"}
        model_fields = {f.name for f in fields(ModelConfig)}
        accel = dict(sizings[sizing].get(name, {}))
        model_changes = {}
        for key, value in overrides.items():
            if key in accel_fields:
                accel[key] = value
            elif key in model_fields:
                model_changes[key] = value
            else:
                raise TypeError(f"from_preset() got an unknown override {key!r}; allowed: "
                                f"{sorted(accel_fields | model_fields)}")
        model = MODEL_PRESETS[name]
        if model_changes:
            model = model.with_(**model_changes)
        return cls(model=model, **accel)

    def with_(self, **changes):
        """A copy with some fields changed (validated again).

        Sizes that were derived (left at ``None``) are derived again from the changed values; sizes
        that were given explicitly are kept unless changed.
        """
        for name in self._derived:
            changes.setdefault(name, None)
        return replace(self, **changes)

    # -- formats (from numerics; read-only views) ----------------------------------------------

    @property
    def act_bits(self):
        return numerics.ACT_BITS

    @property
    def weight_bits(self):
        return numerics.WEIGHT_BITS

    @property
    def acc_bits(self):
        return numerics.ACC_BITS

    @property
    def res_bits(self):
        return numerics.RES_BITS

    # -- compute -------------------------------------------------------------------------------

    @property
    def macs_per_cycle(self):
        """Peak int8 MACs per cycle of the PE array."""
        return self.pe_rows * self.pe_cols

    @property
    def pe_dsps(self):
        """DSP48E2s of the PE array: ``pe_rows * pe_cols / pe_pack``."""
        return self.pe_rows * self.pe_cols // self.pe_pack

    @property
    def epi_beats(self):
        """Epilogue beats per PE-array output row: ``pe_cols / epi_lanes``."""
        return self.pe_cols // self.epi_lanes

    @property
    def epi_hidden_min_k(self):
        """Smallest ``K`` whose tiles never wait for the previous tile's drain: the drain takes
        ``pe_rows * epi_beats`` cycles, and the PE array's shadow bank needs 4 more (see
        :class:`~m3vit_hw.gemm.pe_array.PEArray`)."""
        return self.pe_rows * self.epi_beats + 4

    @property
    def peak_gmacs(self):
        """Peak GMAC/s at ``clock_mhz``."""
        return self.macs_per_cycle * self.clock_mhz / 1000

    @property
    def gemm_k_list(self):
        """``{gemm name: K}`` for every GEMM of the model (signed int8 A except AV and the fc2s, which
        read uint8: the softmax weights and the GELU codes)."""
        m = self.model
        ks = {
            "patch_embed": m.patch_dim,
            "qkv": m.dim,
            "qk": m.head_dim,
            "av (uint8 A)": self.token_capacity,
            # The projection reads the per-head padded context (attention.attn_layout): its K is the
            # padded width, which equals dim when pe_cols divides head_dim.
            "proj": self.attn_proj_k,
            "fc1": m.dim,
            "fc2": m.mlp_hidden,
            "gate": m.gate_in_dim,
            "expert_fc1": m.dim,
            "expert_fc2": m.expert_hidden,
        }
        if m.router == "task_embedding":
            ks["task_fc1"] = m.num_tasks
            ks["task_fc2"] = m.task_embed_dim
        return ks

    @property
    def largest_k(self):
        """Largest reduction length of any GEMM (including AV, whose K is the token count)."""
        return max(self.gemm_k_list.values())

    @property
    def largest_signed_k(self):
        """Largest K of the int8 x int8 GEMMs (all but AV and the fc2s)."""
        return max(k for name, k in self.gemm_k_list.items() if name not in _UNSIGNED_A_GEMMS)

    @property
    def largest_weight_k(self):
        """Largest K of the GEMMs whose B operand comes from the weight buffer."""
        return max(k for name, k in self.gemm_k_list.items() if name not in ("qk", "av (uint8 A)"))

    @property
    def largest_n(self):
        """Largest output width N of any GEMM."""
        m = self.model
        task = m.task_embed_dim if m.router == "task_embedding" else 1
        return max(3 * m.dim, m.mlp_hidden, m.expert_hidden, m.dim, m.experts, self.token_capacity, task)

    @property
    def largest_m(self):
        """Largest M (rows of A) of any GEMM: every token."""
        return self.token_capacity

    @property
    def worst_case_acc(self):
        """``(|sum| bound, what, parameter)`` of the worst accumulator magnitude of any GEMM."""
        signed = _SIGNED_PRODUCT_MAX * self.largest_signed_k
        ks = self.gemm_k_list
        uname = max((n for n in ks if n in _UNSIGNED_A_GEMMS), key=lambda n: ks[n])
        unsigned = _UNSIGNED_PRODUCT_MAX * ks[uname]
        if unsigned >= signed:
            if uname == "av (uint8 A)" or ks[uname] == self.token_capacity:
                return (unsigned, f"AV product (K = token_capacity = {self.token_capacity}, uint8 x int8)",
                        f"token_capacity={self.token_capacity}")
            return (unsigned, f"{uname} GEMM (K = {ks[uname]}, uint8 GELU codes x int8)",
                    f"model.{_K_SOURCE[uname]}={ks[uname]}")
        k = self.largest_signed_k
        name = next(n for n, v in self.gemm_k_list.items() if v == k)
        return signed, f"{name} GEMM (K = {k}, int8 x int8)", f"model.{_K_SOURCE[name]}={k}"

    # -- buffers -------------------------------------------------------------------------------

    @property
    def act_word_lanes(self):
        """Elements per word of the activation, residual and weight buffers (= ``pe_cols``)."""
        return self.pe_cols

    @property
    def act_word_bytes(self):
        return self.pe_cols * numerics.ACT_BITS // 8

    @property
    def act_buffer_needs(self):
        """``{user: (bytes, why)}``: what each user of the activation buffer needs.

        The one definition of the activation buffer's requirement: validation checks
        ``act_buffer_bytes`` against the largest entry, and the units lay out their regions from the
        same properties (:attr:`moe_hidden_base`, :attr:`moe_hidden_words`, the ``attn_*`` map,
        :attr:`dense_act_min_words`, :attr:`embed_act_min_words`).
        """
        m = self.model
        T = self.token_capacity
        word = self.act_word_bytes
        moe = (self.moe_hidden_base + T * self.moe_hidden_words) * word
        R, C = self.pe_rows, self.pe_cols
        return {
            "attention": (self.attn_act_words * word,
                          f"attention: {self.attn_main_words} words of {word} B for h and the context of "
                          f"token_capacity={T} tokens and one head's Q|K|V ({self.attn_rows_pad} rows), "
                          f"then two e8 tiles of q_tile={self.q_tile} (padded to {self.attn_q_pad}) x "
                          f"{self.attn_score_words} words at the aligned word {self.attn_e8_base}"),
            "moe": (moe, f"MoE layer: token_capacity={T} x ({self.row_words} + {self.moe_hidden_words})"
                         f" words of {word} B, every token's h row (dim={m.dim}) and "
                         f"its expert_hidden={m.expert_hidden} hidden row"),
            "dense": (self.dense_act_min_words * word,
                      f"dense MLP: h of token_capacity={T} rows padded to pe_rows={R} x {self.row_words} "
                      f"words, plus a hidden slot of {R} rows x ceil(mlp_hidden={m.mlp_hidden} / {C}) "
                      f"words of {word} B"),
            "embed": (self.embed_act_min_words * word,
                      f"patch embedding: two slots of pe_rows={R} patch rows x ceil(patch_dim="
                      f"{m.patch_dim} / {C}) words of {word} B"),
        }

    # -- attention, dense and embedding buffer maps (attention.attn_layout.buffer_map,
    #    dense.dense_layout.dense_buffer_map and dense.embed_layout.embed_buffer_map read these) ---

    @property
    def attn_head_words(self):
        """Words per head's Q, K or V row (``ceil(head_dim / pe_cols)``: each starts on a word)."""
        return _ceil_div(self.model.head_dim, self.pe_cols)

    @property
    def attn_softmax_lanes(self):
        """Lanes of the attention softmax: ``gcd(softmax_lanes, pe_cols)``, so that a score word is
        whole softmax beats (``pe_cols`` by default: one word a cycle)."""
        return math.gcd(self.softmax_lanes, self.pe_cols)

    @property
    def attn_head_pack(self):
        """Heads per context word (1 unless a head is at most half a word): the largest power of two
        ``p`` with ``p * head_dim <= pe_cols`` that divides ``heads``. Head ``g*p + j`` keeps its
        context in lanes ``j*head_dim ..`` of word ``g``, so a head_dim-32 model on 64 columns does not
        leave half of every context word empty (see ``attention.attn_layout``)."""
        m = self.model
        p = 1
        while 2 * p * m.head_dim <= self.pe_cols and m.heads % (2 * p) == 0:
            p *= 2
        return p

    @property
    def attn_ctx_pitch(self):
        """Words per token of the attention context: ``heads / attn_head_pack * attn_head_words``."""
        return self.model.heads // self.attn_head_pack * self.attn_head_words

    @property
    def attn_proj_k(self):
        """The projection's padded reduction length ``attn_ctx_pitch * pe_cols``."""
        return self.attn_ctx_pitch * self.pe_cols

    @property
    def attn_rows_pad(self):
        """Rows of the Q|K|V region: the token capacity in whole row and column tiles plus one row
        tile, for the junk rows the engine reads past the last row tile."""
        return _ceil_div(self.token_capacity, math.lcm(self.pe_rows, self.pe_cols)) \
            * math.lcm(self.pe_rows, self.pe_cols) + self.pe_rows

    @property
    def attn_qkv_words(self):
        """Words of the Q|K|V region (``attn_rows_pad`` rows of ``3 * attn_head_words`` words)."""
        return self.attn_rows_pad * 3 * self.attn_head_words

    @property
    def attn_qkv_base(self):
        """Activation word of the Q|K|V region, after h and the context: a multiple of its
        power-of-two range, so that the shared datapath's copy of the region (the engine's B operand
        reads K and V from it while the A operand reads Q from the main bank) decodes from the high
        address bits and is addressed by the low ones."""
        T = self.token_capacity
        span = 1 << (self.attn_qkv_words - 1).bit_length()
        return _ceil_div(T * self.row_words + T * self.attn_ctx_pitch, span) * span

    @property
    def attn_main_words(self):
        """Words of the attention's main activation bank: h, the padded context, one head's Q|K|V."""
        return self.attn_qkv_base + self.attn_qkv_words

    @property
    def attn_score_words(self):
        """Words per score / e8 row (``ceil(token_capacity / pe_cols)``)."""
        return _ceil_div(self.token_capacity, self.pe_cols)

    @property
    def attn_q_pad(self):
        """``q_tile`` padded to whole PE-array row tiles (e8 slot rows, row-table slot entries)."""
        return _ceil_div(self.q_tile, self.pe_rows) * self.pe_rows

    @property
    def attn_e8_slot(self):
        """Words of one e8 query-tile slot."""
        return self.attn_q_pad * self.attn_score_words

    @property
    def attn_e8_base(self):
        """Activation word of the e8 bank: a multiple of its power-of-two range, so the bank decodes
        from the low address bits."""
        span = 1 << (2 * self.attn_e8_slot - 1).bit_length()
        return _ceil_div(self.attn_main_words, span) * span

    @property
    def attn_act_words(self):
        """Activation address space of the attention sub-layer (main bank, gap, two e8 slots)."""
        return self.attn_e8_base + 2 * self.attn_e8_slot

    @property
    def attn_score_buffer_words(self):
        """int32 words of the score reorder buffer: two slots of ``q_tile`` rows."""
        return 2 * self.q_tile * self.attn_score_words

    @property
    def dense_act_min_words(self):
        """Smallest activation buffer of the dense MLP (``mlp_hidden``): h, then a hidden slot of one
        row tile (a larger buffer gives larger token tiles)."""
        R = self.pe_rows
        return (_ceil_div(self.token_capacity, R) * R * self.row_words
                + R * _ceil_div(self.model.mlp_hidden, self.pe_cols))

    @property
    def dense_act_full_words(self):
        """Activation buffer of the dense MLP in one token tile: h, then a hidden slot of every token
        (``token_capacity`` padded to whole row tiles; see ``act_holds_dense``)."""
        rows = _ceil_div(self.token_capacity, self.pe_rows) * self.pe_rows
        return rows * (self.row_words + _ceil_div(self.model.mlp_hidden, self.pe_cols))

    @property
    def embed_act_min_words(self):
        """Smallest activation buffer of the patch embedding: two slots of one row tile of patches."""
        return 2 * self.pe_rows * _ceil_div(self.model.patch_dim, self.pe_cols)

    @property
    def norm_lanes(self):
        """Values per cycle of the LayerNorm stage: ``gcd(ln_lanes, pe_cols, dim)`` (whole words)."""
        return math.gcd(self.ln_lanes, self.pe_cols, self.model.dim)

    @property
    def norm_record_bytes(self):
        """Bytes of one LayerNorm parameter record (``norm_lanes`` int16 gains, int32 biases, eps,
        shift: ``6*lanes + 5``), a power of two of at least one memory beat."""
        need = 6 * self.norm_lanes + 5
        return max(self.mem_data_bytes, 1 << (need - 1).bit_length())

    @property
    def frame_bytes(self):
        """Bytes of one uint8 HWC camera frame."""
        m = self.model
        return m.img_size[0] * m.img_size[1] * m.in_chans

    @property
    def act_buffer_min_bytes(self):
        """Smallest legal ``act_buffer_bytes``: the largest of :attr:`act_buffer_needs`."""
        return max(need for need, _ in self.act_buffer_needs.values())

    @property
    def moe_hidden_base(self):
        """Activation-buffer word where the MoE hidden region starts (after ``token_capacity`` h rows)."""
        return self.token_capacity * self.row_words

    @property
    def moe_hidden_words(self):
        """Words per MoE hidden row (``expert_hidden`` int8)."""
        return _ceil_div(self.model.expert_hidden, self.pe_cols)

    @property
    def act_buffer_words(self):
        return self.act_buffer_bytes // self.act_word_bytes

    @property
    def act_hi_span(self):
        """Power-of-two range of the activation buffer's upper bank (``act_split_words``): at least
        ``act_buffer_words - act_split_words``; the upper bank is addressed by its low bits."""
        return 1 << (self.act_buffer_words - self.act_split_words - 1).bit_length()

    def lane_split_at(self, bits):
        """With ``lane_split``: the lanes of a ``pe_cols`` x ``bits`` word that fill whole 72-bit URAM
        columns (the first memory of a :class:`~m3vit_hw.lib.lane_memory.LaneMemory`), when the rest
        is 1 to :data:`LANE_REST_MAX_BITS` bits; else None (one memory)."""
        columns = -(-self.pe_cols * bits // URAM_BITS)
        lanes = (columns - 1) * URAM_BITS // bits
        if not self.lane_split or not 0 < (self.pe_cols - lanes) * bits <= LANE_REST_MAX_BITS:
            return None
        return lanes

    @property
    def act_addr_bits(self):
        return _addr_bits(self.act_buffer_words)

    @property
    def row_words(self):
        """Words per ``dim``-wide token row (activation or residual)."""
        return _ceil_div(self.model.dim, self.pe_cols)

    @property
    def res_buffer_words(self):
        return self.token_capacity * self.row_words

    @property
    def res_buffer_bytes(self):
        return self.res_buffer_words * self.pe_cols * numerics.RES_BITS // 8

    @property
    def res_addr_bits(self):
        return _addr_bits(self.res_buffer_words)

    @property
    def weight_panel_bytes(self):
        """One weight panel: ``largest_weight_k`` rows of ``pe_cols`` int8 weights."""
        return self.largest_weight_k * self.pe_cols * numerics.WEIGHT_BITS // 8

    @property
    def weight_half_unit_bytes(self):
        """Granule of a weight-buffer half: whole weight words and whole memory beats."""
        return max(self.act_word_bytes, self.mem_data_bytes)

    @property
    def gate_panels(self):
        """Column tiles of the MoE gate GEMM (``N = experts``)."""
        return _ceil_div(self.model.experts, self.pe_cols)

    @property
    def weight_half_needs(self):
        """``{user: (bytes, why)}``: what one weight-buffer half must hold (validation reads the max).

        Every weight GEMM is streamed in N-chunks of whole panels (expert tiles,
        :attr:`moe_tile_chunks`; gate chunks, :attr:`gate_chunks`), so one panel of the largest K is
        the whole requirement: it does not depend on the number of experts.
        """
        return {
            "panel": (self.weight_panel_bytes,
                      f"one weight panel of largest_weight_k={self.largest_weight_k} x "
                      f"pe_cols={self.pe_cols} int8"),
        }

    @property
    def param_word_bytes(self):
        """Bytes of one parameter word (:func:`param_word_bytes` of ``pe_cols``)."""
        return param_word_bytes(self.pe_cols)

    def moe_panels_per_tile(self, k):
        """Column tiles (panels) of a K=``k`` MoE GEMM (expert fc1/fc2 or the gate) that one tile
        holds: as many as fit one weight half and one parameter half."""
        return min(self.weight_buffer_half_bytes // (k * self.act_word_bytes),
                   self.param_buffer_words // 2)

    def _chunk_counts(self, k, n):
        """Balanced panel counts (differing by at most one) of the N-chunks of a K=``k``, N=``n`` GEMM."""
        return balanced_chunks(_ceil_div(n, self.pe_cols), self.moe_panels_per_tile(k))

    @property
    def gate_chunks(self):
        """The static chunk plan of the MoE gate GEMM (``K = dim``, ``N = experts``): the panel counts
        of its N-chunks, each fitting one weight half and one parameter half like an expert tile.

        The gate streams through the weight double buffer chunk by chunk; the
        :class:`~m3vit_hw.moe.router.Router` assembles every token's full logit row from the chunks
        before the softmax and top-k. One chunk whenever the whole gate fits one half.
        """
        return self._chunk_counts(self.model.dim, self.model.experts)

    @property
    def moe_tile_chunks(self):
        """The static tile plan of one expert: ``((kind, k, n, panel counts), ...)`` for fc1 then fc2.

        Chunks are balanced (their panel counts differ by at most one). The same for every expert;
        :func:`m3vit_hw.moe.expert_layout.plan_moe` lays the image out from it.
        """
        m = self.model
        plan = []
        for kind, k, n in (("fc1", m.dim, m.expert_hidden), ("fc2", m.expert_hidden, m.dim)):
            plan.append((kind, k, n, self._chunk_counts(k, n)))
        return tuple(plan)

    @property
    def moe_image_bytes(self):
        """Bytes of one MoE layer's parameter image in external memory (gates of every task, then
        every expert; every piece padded to whole memory beats)."""
        db, word, pwb = self.mem_data_bytes, self.act_word_bytes, self.param_word_bytes
        up = lambda a: _ceil_div(a, db) * db
        expert = sum(up(c * k * word) + up(c * pwb)
                     for _, k, _, counts in self.moe_tile_chunks for c in counts)
        gate = sum(up(c * self.model.dim * word) + up(c * pwb) for c in self.gate_chunks)
        return up(self.model.num_tasks * gate) + self.model.experts * expert

    @property
    def expert_weight_bytes(self):
        """int8 weights of one expert (htoh4 and h4toh)."""
        m = self.model
        return 2 * m.dim * m.expert_hidden * numerics.WEIGHT_BITS // 8

    @property
    def weight_buffer_half_bytes(self):
        return self.weight_buffer_bytes // 2

    @property
    def weight_buffer_words(self):
        return self.weight_buffer_bytes // (self.pe_cols * numerics.WEIGHT_BITS // 8)

    @property
    def weight_addr_bits(self):
        return _addr_bits(self.weight_buffer_words)

    @property
    def b_addr_bits(self):
        """Address bits of the GEMM engine's B port: one more than either buffer needs; the MSB
        selects the activation buffer (QKᵀ, AV) over the weight buffer."""
        return 1 + max(self.weight_addr_bits, self.act_addr_bits)

    @property
    def param_addr_bits(self):
        return _addr_bits(self.param_buffer_words)

    @property
    def rowtab_needs(self):
        """``{user: (entries, why)}``: what each user of the row table needs."""
        T, k = self.token_capacity, self.model.top_k
        return {
            "moe": (T * k, f"MoE: token_capacity={T} x top_k={k} routed rows"),
            "attention": (2 * self.attn_q_pad, f"attention: two q_tile={self.q_tile} slots padded to "
                                               f"{self.attn_q_pad} rows"),
        }

    @property
    def rowtab_entries(self):
        """Entries of a row table: the largest of :attr:`rowtab_needs` (every token routed to ``top_k``
        experts, or two attention query tiles)."""
        return max(n for n, _ in self.rowtab_needs.values())

    @property
    def rowtab_addr_bits(self):
        return _addr_bits(self.rowtab_entries)

    @property
    def token_bits(self):
        """Bits of a token index (``0 .. token_capacity - 1``)."""
        return index_bits(self.token_capacity)

    @property
    def dst_addr_bits(self):
        """Address bits of a GEMM destination (activation or residual buffer, or a stream index:
        the attention score reorder buffer's word)."""
        return max(self.act_addr_bits, self.res_addr_bits, index_bits(self.attn_score_buffer_words))

    # -- reports -------------------------------------------------------------------------------

    def describe(self):
        """A readable multi-line summary of the instance."""
        m = self.model
        kib = 1024
        worst, what, _ = self.worst_case_acc
        lines = [
            f"accelerator for {m.name}: D={m.dim}, {m.heads} heads (head_dim {m.head_dim}), "
            f"{m.depth} blocks, {m.experts} experts (h={m.expert_hidden}, top-{m.top_k}), "
            f"{m.num_tasks} tasks, {m.tokens} tokens",
            f"  PE array        {self.pe_rows} x {self.pe_cols} = {self.macs_per_cycle} MAC/cycle "
            f"(int{numerics.ACT_BITS}/uint{numerics.ATTN_P_BITS} x int{numerics.WEIGHT_BITS} -> int{numerics.ACC_BITS}), "
            f"{self.peak_gmacs:.1f} GMAC/s at {self.clock_mhz} MHz; {self.pe_dsps} DSP48E2 "
            f"({self.pe_pack} MAC/DSP)",
            f"  largest K       {self.largest_k} (worst |acc| {worst} < 2^{numerics.ACC_BITS - 1}, {what})",
            f"  token capacity  {self.token_capacity}, q_tile {self.q_tile}",
            f"  act buffer      {self.act_buffer_bytes / kib:.1f} KiB "
            f"({self.act_buffer_words} x {self.act_word_bytes} B words)",
            f"  residual buffer {self.res_buffer_bytes / kib:.1f} KiB "
            f"({self.res_buffer_words} x {self.pe_cols * numerics.RES_BITS // 8} B words)",
            f"  weight buffer   {self.weight_buffer_bytes / kib:.1f} KiB = 2 x "
            f"{self.weight_buffer_half_bytes / kib:.1f} KiB (panel {self.weight_panel_bytes} B)",
            f"  param buffer    {self.param_buffer_words} words (bias+mult of {self.pe_cols} columns)",
            f"  LN lanes {self.ln_lanes}, softmax lanes {self.softmax_lanes}, epilogue lanes "
            f"{self.epi_lanes} ({self.epi_beats} beat(s) per PE row; drain hidden for K >= "
            f"{self.epi_hidden_min_k})",
            f"  memory port     {8 * self.mem_data_bytes}-bit beats, {self.mem_addr_width}-bit addresses, "
            f"bursts <= {self.mem_max_burst}; arbiter depth {self.arbiter_depth}, tile tags "
            f"{self.tile_tag_width} bits, counters {self.counter_width} bits",
            f"  encoder work    {m.macs_per_frame() / 1e9:.3f} GMAC/frame -> "
            f"{m.macs_per_frame() / self.macs_per_cycle / self.clock_mhz / 1e3:.2f} ms at peak",
        ]
        return "\n".join(lines)
