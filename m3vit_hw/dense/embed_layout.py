"""External-memory layout of the patch embedding, its tile plan and its buffer map.

The single source of truth for where the patch-embedding parameters (``QuantizedEncoder.patch``, a
:class:`reference.qparams.QLinear` with ``out_bits = RES_BITS``; ``cls_int``; ``pos_int``) live in
external memory and where the patch rows live on chip. Read by :func:`pack_embed`,
:class:`~m3vit_hw.dense.patch_embed.PatchEmbed`, the simulation runner and the tests. Pure Python +
numpy.

Weight column order
-------------------
The golden model flattens a patch as ``(c, kh, kw)`` (the convolution weight ``[D, Cin, p, p]``); the
:class:`~m3vit_hw.dense.patch_loader.PatchLoader` reads a patch from the HWC image as ``(kh, kw, c)``.
The packer permutes the weight's K axis to the loader's order, so the integer dot products (and hence
the results) are those of the golden model.

Image
-----
``pack_embed`` returns one byte image (offset 0 = the embedding's base address):

* the *residual initialisation*: ``T = patches + 1`` rows of ``row_words`` residual words (row 0 =
  ``cls_int``, row ``t`` = ``pos_int[t]``, int16 LE lanes, padding lanes 0), each word in a record of
  ``res_record_bytes = round_up(2 * pe_cols, data_bytes)`` bytes;
* the tiles of the patch-embedding GEMM (``K = patch_dim``, ``N = D``): N-chunks that fit one half of
  the weight and parameter buffers, each ``[weight panels][parameter words]`` as in
  :mod:`m3vit_hw.moe.expert_layout`, pieces aligned and padded to the memory beat.

On chip: two *patch slots* of ``patch_tile`` rows of ``kw = ceil(K / C)`` activation words each
(:class:`EmbedBufferMap`), so that the loader fills one while the engine reads the other.
"""

from dataclasses import dataclass

import numpy as np

from .. import numerics
from ..checks import check_int
from ..config import AcceleratorConfig, balanced_chunks
from ..moe.expert_layout import pack_panels, pack_params

__all__ = ["EmbedTile", "EmbedLayout", "EmbedBufferMap", "plan_embed", "embed_buffer_map", "pack_embed",
           "start_fields", "loader_k_order"]


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


@dataclass(frozen=True)
class EmbedTile:
    """An N-chunk of the patch-embedding GEMM (fields as :class:`~m3vit_hw.dense.dense_layout.DenseTile`)."""

    index: int
    n0: int
    n: int
    k: int
    panels: int
    w_offset: int
    w_bytes: int
    p_offset: int
    p_bytes: int


@dataclass(frozen=True)
class EmbedLayout:
    """The tile plan and external-memory layout of the patch embedding (:func:`plan_embed`)."""

    dim: int
    patch_dim: int
    tokens: int
    pe_cols: int
    data_bytes: int
    res_record_bytes: int
    res_words: int
    weight_half_bytes: int
    param_half_words: int
    param_word_bytes: int
    tiles: tuple
    image_bytes: int

    @property
    def param_half_bytes(self):
        return _round_up(self.param_half_words * self.param_word_bytes,
                         max(self.param_word_bytes, self.data_bytes))

    @property
    def res_bytes(self):
        """Bytes of the residual initialisation (at offset 0)."""
        return self.res_words * self.res_record_bytes


@dataclass(frozen=True)
class EmbedBufferMap:
    """Two patch slots at activation words ``0`` and ``slot_words``, ``patch_tile`` rows of ``kw``
    words each (``slot_rows`` = ``patch_tile`` padded to ``pe_rows``)."""

    kw: int
    patch_tile: int
    slot_rows: int
    slot_words: int
    act_words: int


def embed_buffer_map(config, *, patch_tile=None):
    """The :class:`EmbedBufferMap` of ``config``.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, or if the activation buffer cannot hold two slots of ``pe_rows`` patch rows.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    R, C = config.pe_rows, config.pe_cols
    kw = _ceil_div(config.model.patch_dim, C)
    n = config.model.patches
    fit = config.act_buffer_words // (2 * kw) // R * R
    if fit < R:
        raise ValueError(f"act_buffer_bytes must be >= {2 * R * kw * config.act_word_bytes} for the patch "
                         f"embedding (two slots of pe_rows={R} patch rows x {kw} words), not "
                         f"{config.act_buffer_bytes}")
    if patch_tile is None:
        patch_tile = min(fit, _round_up(n, R))
    else:
        check_int("patch_tile", patch_tile, 1, min(fit, n))
    slot_rows = _round_up(patch_tile, R)
    return EmbedBufferMap(kw=kw, patch_tile=patch_tile, slot_rows=slot_rows, slot_words=slot_rows * kw,
                          act_words=2 * slot_rows * kw)


def plan_embed(config):
    """The tile plan and memory layout of the patch embedding for ``config``.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`. (Its validation guarantees that a buffer
        half holds one panel of ``K = patch_dim``; pieces are padded to ``config.mem_data_bytes``.)
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    data_bytes = config.mem_data_bytes
    mc = config.model
    C, D, K = config.pe_cols, mc.dim, mc.patch_dim
    word = config.act_word_bytes
    pwb = config.param_word_bytes
    half = config.weight_buffer_half_bytes
    p_half_words = config.param_buffer_words // 2
    rec = _round_up(C * numerics.RES_BITS // 8, data_bytes)
    res_words = mc.tokens * config.row_words
    offset = res_words * rec
    panel = K * word
    per_tile = min(half // panel, p_half_words)
    assert per_tile >= 1, "embed_layout: the config's weight_half_needs must cover the patch panel"
    tiles = []
    first = 0
    for count in balanced_chunks(_ceil_div(D, C), per_tile):
        w_bytes = _round_up(count * panel, data_bytes)
        p_bytes = _round_up(count * pwb, data_bytes)
        n0 = first * C
        tiles.append(EmbedTile(index=len(tiles), n0=n0, n=min(D, (first + count) * C) - n0, k=K, panels=count,
                               w_offset=offset, w_bytes=w_bytes, p_offset=offset + w_bytes, p_bytes=p_bytes))
        offset += w_bytes + p_bytes
        first += count
    return EmbedLayout(dim=D, patch_dim=K, tokens=mc.tokens, pe_cols=C, data_bytes=data_bytes,
                       res_record_bytes=rec, res_words=res_words, weight_half_bytes=half,
                       param_half_words=p_half_words, param_word_bytes=pwb, tiles=tuple(tiles),
                       image_bytes=offset)


def loader_k_order(in_chans, patch):
    """Index array: feature ``j`` of a loader patch row (``(kh, kw, c)`` order) is feature
    ``loader_k_order(...)[j]`` of a golden patch row (``(c, kh, kw)`` order)."""
    return np.arange(in_chans * patch * patch).reshape(in_chans, patch, patch).transpose(1, 2, 0).reshape(-1)


def pack_embed(qpatch, cls_int, pos_int, config):
    """Lay out the patch embedding (``qm.patch``, ``qm.cls_int``, ``qm.pos_int``) for external memory.

    Returns
    -------
    (bytes, EmbedLayout)
    """
    lay = plan_embed(config)
    mc = config.model
    C, D, K, T = lay.pe_cols, lay.dim, lay.patch_dim, lay.tokens
    w = np.asarray(qpatch.w, dtype=np.int64)
    if w.shape != (D, K):
        raise ValueError(f"qpatch.w must be [D={D}, patch_dim={K}], not {w.shape}")
    cls_int = np.asarray(cls_int, dtype=np.int64).reshape(-1)
    pos_int = np.asarray(pos_int, dtype=np.int64)
    if cls_int.shape != (D,) or pos_int.shape != (T, D):
        raise ValueError(f"cls_int must be [{D}] and pos_int [{T}, {D}], not {cls_int.shape} and {pos_int.shape}")
    lo, hi = numerics.int_range(numerics.RES_BITS)
    init = np.concatenate([cls_int[None, :], pos_int[1:]], axis=0)
    if init.min() < lo or init.max() > hi:
        raise ValueError(f"cls_int and pos_int must be int{numerics.RES_BITS}")
    image = bytearray(lay.image_bytes)
    rw = config.row_words
    padded = np.zeros((T, rw * C), dtype=np.int64)
    padded[:, :D] = init
    for i, word in enumerate(padded.reshape(T * rw, C)):
        at = i * lay.res_record_bytes
        image[at:at + 2 * C] = (word & 0xFFFF).astype("<u2").tobytes()
    b = w[:, loader_k_order(mc.in_chans, mc.patch_size)].T           # [K, D], K in loader order
    for t in lay.tiles:
        cols = slice(t.n0, t.n0 + t.n)
        wp = pack_panels(b[:, cols], C)
        pp = pack_params(np.asarray(qpatch.bias)[cols], np.asarray(qpatch.mult)[cols], C)
        assert len(wp) <= t.w_bytes and len(pp) <= t.p_bytes, "embed_layout: a piece overflows its slot"
        image[t.w_offset:t.w_offset + len(wp)] = wp
        image[t.p_offset:t.p_offset + len(pp)] = pp
    return bytes(image), lay


def start_fields(qpatch, *, base=0, img_base=0):
    """The payload of :attr:`PatchEmbed.start`: the image at ``img_base``, the parameters at ``base``."""
    return {"base": base, "img_base": img_base, "shift": int(qpatch.shift)}
