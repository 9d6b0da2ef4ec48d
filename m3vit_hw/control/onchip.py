"""On-chip buffer sizes of an accelerator config and their fit in the xczu7ev's block memories.

:func:`buffer_report` lists the shared datapath's buffers (width x depth, from the config and the
units' buffer maps) and places each in BRAM36 or URAM288 primitives with :func:`allocate` (both
budgets hold, smallest footprint). The counts follow the build's packing rules
(:mod:`m3vit_hw.build.memories`): RAMB36 or RAMB18 aspect ratios (simple dual port), URAM 72 x 4096,
and memories of at most :data:`LUTRAM_DEPTH` words or :data:`MIN_BITS` bits left to LUTRAM (no
block). What synthesis infers can differ by a few blocks.
"""

from dataclasses import dataclass

from .. import numerics
from ..attention.attn_layout import buffer_map
from ..config import URAM_BITS, AcceleratorConfig

__all__ = ["Buffer", "Device", "XCZU7EV", "LUTRAM_DEPTH", "MIN_BITS", "budget", "buffer_report",
           "allocate", "fits"]

#: Memories of at most this many words, or of at most :data:`MIN_BITS` bits, go to LUTRAM: the same
#: thresholds as :mod:`m3vit_hw.build.memories` (``tests/test_compiler.py`` checks they agree; the
#: build imports control, not the other way round).
LUTRAM_DEPTH = 64
MIN_BITS = 4096


def _ceil_div(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class Device:
    """Block memories of a device: ``bram36`` blocks (4.5 KiB, 72x512 .. 1x32768) and ``uram``
    blocks (36 KiB, 72x4096)."""

    name: str
    bram36: int
    uram: int


#: The ZCU104's part.
XCZU7EV = Device("xczu7ev", bram36=312, uram=96)

#: (width, depth) aspect ratios of a BRAM36 (simple dual port up to 72 bits), and of a RAMB18 (half a
#: BRAM36 site; simple dual port up to 36 bits).
_BRAM_SHAPES = ((72, 512), (36, 1024), (18, 2048), (9, 4096), (4, 8192), (2, 16384), (1, 32768))
_BRAM18_SHAPES = ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))
_URAM_SHAPE = (URAM_BITS, 4096)


@dataclass(frozen=True)
class Buffer:
    """One on-chip buffer: ``width`` bits x ``depth`` words; ``bram36_blocks`` / ``uram_blocks`` are
    the blocks it needs if built from that primitive alone (BRAM36 sites: RAMB36s, or RAMB18s / 2
    rounded up, whichever is fewer), all ``copies`` together; ``bram36`` / ``uram`` the chosen mapping
    (set by :func:`allocate`; by default the primitive with the smaller footprint). ``copies``: one
    per read port when a buffer has more read ports than a block RAM or URAM has ports besides the
    write (the rule of :mod:`m3vit_hw.build.memories`). ``lutram``: small enough for LUTRAM (no
    blocks; the build leaves it to yosys)."""

    name: str
    width: int
    depth: int
    bram36_blocks: int
    uram_blocks: int
    in_uram: bool
    copies: int = 1
    lutram: bool = False

    @property
    def bytes(self):
        """Bytes of one copy (the buffer's capacity)."""
        return self.width * self.depth // 8

    @property
    def bram36(self):
        return 0 if self.in_uram or self.lutram else self.bram36_blocks

    @property
    def uram(self):
        return self.uram_blocks if self.in_uram and not self.lutram else 0


def _map(name, width, depth, copies=1):
    if depth <= LUTRAM_DEPTH or width * depth <= MIN_BITS:
        return Buffer(name, width, depth, 0, 0, False, copies, lutram=True)
    n36 = min(_ceil_div(width, w) * _ceil_div(depth, d) for w, d in _BRAM_SHAPES)
    n18 = min(_ceil_div(width, w) * _ceil_div(depth, d) for w, d in _BRAM18_SHAPES)
    bram = copies * min(n36, _ceil_div(n18, 2))
    uram = copies * _ceil_div(width, _URAM_SHAPE[0]) * _ceil_div(depth, _URAM_SHAPE[1])
    # A URAM holds 8 BRAM36s' bits: by default the smaller footprint, URAM on a tie.
    return Buffer(name, width, depth, bram, uram, uram * 8 <= bram, copies)


def allocate(buffers, device=XCZU7EV):
    """The buffers with each placed in BRAM36 or URAM so that both budgets hold if any placement does
    (exhaustive over the few buffers), preferring the smallest total footprint in BRAM36 equivalents,
    then the smaller of the larger share.
    Without a fitting placement the default (smaller-footprint) mapping is returned."""
    from dataclasses import replace
    from itertools import product
    best = None
    for choice in product((False, True), repeat=len(buffers)):
        bufs = [replace(b, in_uram=c) for b, c in zip(buffers, choice)]
        b, u = sum(x.bram36 for x in bufs), sum(x.uram for x in bufs)
        # Ties (a URAM holds 8 BRAM36s' bits) go to the placement with the lower larger share, as
        # the build's balancing (build.memories.pack_all) does.
        key = (b + 8 * u, max(b / device.bram36, u / device.uram))
        if b <= device.bram36 and u <= device.uram and (best is None or key < best[0]):
            best = (key, bufs)
    return best[1] if best else list(buffers)


def budget(device=XCZU7EV, share=0.8):
    """``device`` with ``share`` of its block memories (rounded down): the budget that
    :func:`buffer_report` allocates within (issue 12: at most 80 % of BRAM36 and of URAM)."""
    return Device(f"{device.name} at {share:.0%}", int(device.bram36 * share), int(device.uram * share))


def buffer_report(config, device=XCZU7EV):
    """The shared datapath's buffers for ``config``, as a list of :class:`Buffer`.

    Activation (int8 words of ``pe_cols``; the main bank, one read port: the engine's A operand),
    the copy of attention's Q|K|V region (the engine's B operand reads K and V from it; see
    :func:`~m3vit_hw.attention.attention_layer.connect_qkv_copy`), the attention e8 bank, residual
    (int16 words), weight ping-pong, column parameters (int32 bias + 24-bit mult per lane), the
    attention score reorder buffer (int32 words) and the row table (token + scale), as the shared
    datapath (``encoder.datapath``) and the attention sequencer build them. With
    ``config.act_split_words`` the activation main bank is two buffers (its lower and upper banks);
    with ``config.lane_split`` a bank that splits (``lane_split_at``) is two buffers of its lanes.
    The placement is :func:`allocate`'d within ``device`` (e.g. :func:`budget` for a share of it).
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    C = config.pe_cols
    bm = buffer_map(config)
    split = config.act_split_words

    def bank(name, bits, depth):
        # With config.lane_split: the lanes filling whole URAM columns, and the rest (LaneMemory).
        at = config.lane_split_at(bits)
        if at is None:
            return [_map(name, C * bits, depth)]
        rest = f"lane {at}" if C - at == 1 else f"lanes {at}-{C - 1}"
        return [_map(f"{name} lanes 0-{at - 1}", at * bits, depth), _map(f"{name} {rest}", (C - at) * bits, depth)]

    act = (bank("activation", numerics.ACT_BITS, config.act_buffer_words) if not split else
           bank("activation (lower bank)", numerics.ACT_BITS, split) +
           [_map("activation (upper bank)", C * numerics.ACT_BITS, config.act_buffer_words - split)])
    return allocate(act + bank("activation Q|K|V copy", numerics.ACT_BITS, bm.qkv_words) + [
        _map("attention e8", C * numerics.ACT_BITS, bm.e8_words)] +
        bank("residual", numerics.RES_BITS, config.res_buffer_words) + [
        _map("weight (2 halves)", C * numerics.WEIGHT_BITS, config.weight_buffer_words),
        _map("column params (2 halves)", C * (numerics.BIAS_BITS + numerics.MULT_BITS), config.param_buffer_words),
        _map("attention scores", C * numerics.ACC_BITS, bm.score_buffer_words),
        _map("row table", config.token_bits + numerics.MULT_BITS, 1 << config.rowtab_addr_bits),
    ], device)


def fits(buffers, device=XCZU7EV):
    """``(bram36 used, uram used, fits)`` of ``buffers`` on ``device``."""
    b = sum(x.bram36 for x in buffers)
    u = sum(x.uram for x in buffers)
    return b, u, b <= device.bram36 and u <= device.uram
