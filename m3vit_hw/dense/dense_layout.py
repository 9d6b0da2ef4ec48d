"""External-memory layout of one dense MLP sub-layer's parameters, its tile plan and its buffer map.

The single source of truth for *where* a dense MLP's integer parameters
(:class:`reference.qparams.QDenseMlp`) live in external memory, how ``fc1`` and ``fc2`` are cut into
tiles that each fit one half of the double-buffered weight and parameter buffers, and where the
sub-layer's operands live on chip (:class:`DenseBufferMap`). The packer (:func:`pack_dense`), the
:class:`~m3vit_hw.dense.dense_layer.DenseLayer` (which bakes the plan into its sequencer), the simulation
runner and the tests all read it. Pure Python + numpy. Weight and parameter formats are those of
:mod:`m3vit_hw.moe.expert_layout` (panels; parameter words).

Tiles
-----
``fc1`` is ``K = D, N = hidden`` (GELU8 into the hidden region), ``fc2`` is ``K = hidden, N = D``
(RESADD into the residual). A tile is an N-chunk of one of them (whole column panels plus their
parameter words), as many panels as fit one half of each buffer; chunks are balanced. The plan is fc1's
tiles, then fc2's.

Token tiles
-----------
The ``T x hidden`` hidden matrix is never whole on chip: the activation buffer holds ``h`` (``T`` rows,
pitch ``row_words``) and one *hidden slot* of ``token_tile`` rows (pitch ``hw = ceil(hidden / C)``).
The sub-layer runs the whole tile plan once per token tile, so the weights cross the memory port
``ceil(T / token_tile)`` times; ``token_tile`` defaults to the largest multiple of ``pe_rows`` the
activation buffer leaves room for (capped at the token capacity).

Image
-----
``pack_dense`` returns one byte image (offset 0 = the sub-layer's base address): the 256-entry GELU
table (byte ``i`` = ``gelu_lut[i]``, the uint8 code for input ``i - 128``; padded to the memory beat), then
the tiles in plan order, each ``[weight panels][parameter words]``, every piece aligned and padded to
the memory beat.
"""

from dataclasses import dataclass

import numpy as np

from .. import numerics
from ..checks import check_int
from ..config import AcceleratorConfig, balanced_chunks
from ..moe.expert_layout import pack_panels, pack_params

__all__ = ["DenseTile", "DenseLayout", "DenseBufferMap", "plan_dense", "dense_buffer_map", "pack_dense",
           "start_fields"]


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


def _bits(n):
    return max(1, int(n).bit_length())


@dataclass(frozen=True)
class DenseTile:
    """One tile: an N-chunk of ``fc1`` or ``fc2``.

    Attributes
    ----------
    index : int
        Position in the plan.
    kind : str
        ``"fc1"`` or ``"fc2"``.
    n0, n, k : int
        First output column (a multiple of ``pe_cols``), column count and reduction length.
    panels : int
        Column tiles (= parameter words) in the tile.
    w_offset, w_bytes, p_offset, p_bytes : int
        Byte offsets (from the image base) and padded lengths of the panels and parameter words.
    first_fc2 : bool
        The first fc2 tile (its command carries ``sync``: it reads what fc1 wrote).
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
    first_fc2: bool


@dataclass(frozen=True)
class DenseBufferMap:
    """On-chip placement (word addresses, ``C`` lanes a word).

    * ``h`` at word 0, pitch ``row_words``, ``h_rows`` rows (token capacity padded to ``pe_rows``);
    * the hidden slot at ``hid_base``, pitch ``hw``, ``slot_rows`` rows (``token_tile`` padded to
      ``pe_rows``: the engine reads whole row tiles);
    * the residual stream at residual word 0, pitch ``row_words``.
    """

    C: int
    row_words: int
    hw: int
    h_rows: int
    hid_base: int
    token_tile: int
    slot_rows: int
    act_words: int


def dense_buffer_map(config, *, hidden=None, token_tile=None):
    """The :class:`DenseBufferMap` of ``config`` (``hidden`` defaults to ``config.model.mlp_hidden``).

    Raises
    ------
    TypeError, ValueError
        On a bad argument, or if the activation buffer cannot hold ``h`` plus a hidden slot of
        ``pe_rows`` rows (the message names the size it needs).
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    hidden = config.model.mlp_hidden if hidden is None else hidden
    check_int("hidden", hidden, 1, config.largest_n)
    R, C = config.pe_rows, config.pe_cols
    cap = config.token_capacity
    rw = config.row_words
    hw = _ceil_div(hidden, C)
    h_rows = _round_up(cap, R)
    hid_base = h_rows * rw
    room = config.act_buffer_words - hid_base
    fit = (room // hw) // R * R if room > 0 else 0
    if fit < R:
        need = (hid_base + R * hw) * config.act_word_bytes
        raise ValueError(f"act_buffer_bytes must be >= {need} for the dense MLP (h: {h_rows} rows x "
                         f"{rw} words, plus a hidden slot of pe_rows={R} rows x {hw} words), not "
                         f"{config.act_buffer_bytes}")
    cap_tile = _round_up(cap, R)
    if token_tile is None:
        token_tile = min(fit, cap_tile)
    else:
        check_int("token_tile", token_tile, 1, min(fit, cap))
    slot_rows = _round_up(token_tile, R)
    return DenseBufferMap(C=C, row_words=rw, hw=hw, h_rows=h_rows, hid_base=hid_base,
                          token_tile=token_tile, slot_rows=slot_rows,
                          act_words=hid_base + slot_rows * hw)


@dataclass(frozen=True)
class DenseLayout:
    """The tile plan and external-memory layout of one dense MLP (:func:`plan_dense`)."""

    dim: int
    hidden: int
    pe_cols: int
    data_bytes: int
    lut_bytes: int
    weight_half_bytes: int
    param_half_words: int
    param_word_bytes: int
    tiles: tuple
    image_bytes: int

    @property
    def param_half_bytes(self):
        """Bytes per half of the parameter buffer (whole words, whole memory beats)."""
        return _round_up(self.param_half_words * self.param_word_bytes,
                         max(self.param_word_bytes, self.data_bytes))

    @property
    def weight_bytes(self):
        """Weight and parameter bytes fetched per pass of the plan (one token tile)."""
        return sum(t.w_bytes + t.p_bytes for t in self.tiles)

    def describe(self):
        lines = [f"dense MLP layout: D={self.dim}, hidden={self.hidden}, pe_cols={self.pe_cols}, "
                 f"{self.image_bytes} B in {len(self.tiles)} tiles"]
        for t in self.tiles:
            lines.append(f"    tile {t.index}: {t.kind} columns {t.n0}..{t.n0 + t.n - 1} (K={t.k}), "
                         f"{t.w_bytes} B @ {t.w_offset}, {t.p_bytes} B params @ {t.p_offset}")
        return "\n".join(lines)


def plan_dense(config, *, hidden=None):
    """The tile plan and memory layout of one dense MLP for ``config``.

    Raises
    ------
    TypeError, ValueError
        On a bad argument, or if a buffer half cannot hold one panel (with its parameter word) of a
        ``hidden`` other than ``model.mlp_hidden`` (the config's validation covers that one), or if
        ``hidden`` exceeds the engine's ``k``/``n`` fields. Pieces are padded to
        ``config.mem_data_bytes``.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    data_bytes = config.mem_data_bytes
    hidden = config.model.mlp_hidden if hidden is None else hidden
    check_int("hidden", hidden, 1, min(config.largest_n, config.largest_k))
    C = config.pe_cols
    D = config.model.dim
    word = config.act_word_bytes
    pwb = config.param_word_bytes
    half = config.weight_buffer_half_bytes
    p_half_words = config.param_buffer_words // 2
    tiles = []
    lut_bytes = _round_up(1 << numerics.ACT_BITS, data_bytes)
    offset = lut_bytes
    for kind, k, n in (("fc1", D, hidden), ("fc2", hidden, D)):
        panel = k * word
        per_tile = min(half // panel, p_half_words)
        if per_tile < 1:
            raise ValueError(
                f"weight_buffer_bytes={config.weight_buffer_bytes} is too small: each half ({half} B) "
                f"must hold one {kind} panel of K={k} x pe_cols={C} = {panel} bytes; use >= {2 * panel}")
        first = 0
        for ci, count in enumerate(balanced_chunks(_ceil_div(n, C), per_tile)):
            w_bytes = _round_up(count * panel, data_bytes)
            p_bytes = _round_up(count * pwb, data_bytes)
            n0 = first * C
            tiles.append(DenseTile(index=len(tiles), kind=kind, n0=n0, n=min(n, (first + count) * C) - n0,
                                   k=k, panels=count, w_offset=offset, w_bytes=w_bytes,
                                   p_offset=offset + w_bytes, p_bytes=p_bytes,
                                   first_fc2=kind == "fc2" and ci == 0))
            offset += w_bytes + p_bytes
            first += count
    return DenseLayout(dim=D, hidden=hidden, pe_cols=C, data_bytes=data_bytes, lut_bytes=lut_bytes,
                       weight_half_bytes=half,
                       param_half_words=p_half_words, param_word_bytes=pwb, tiles=tuple(tiles),
                       image_bytes=offset)


def pack_dense(qdense, config):
    """Lay out one dense MLP's integer parameters (a :class:`reference.qparams.QDenseMlp`).

    The hidden width is taken from ``qdense.fc1.w`` (it may differ from ``config.model.mlp_hidden``).

    Returns
    -------
    (bytes, DenseLayout)
    """
    w1 = np.asarray(qdense.fc1.w, dtype=np.int64)
    w2 = np.asarray(qdense.fc2.w, dtype=np.int64)
    D = config.model.dim
    if w1.ndim != 2 or w1.shape[1] != D or w2.shape != (D, w1.shape[0]):
        raise ValueError(f"qdense must have fc1.w [hidden, D={D}] and fc2.w [D, hidden], not {w1.shape} "
                         f"and {w2.shape}")
    layout = plan_dense(config, hidden=w1.shape[0])
    ops = {"fc1": (w1.T, qdense.fc1), "fc2": (w2.T, qdense.fc2)}
    C = layout.pe_cols
    image = bytearray(layout.image_bytes)
    lut = np.asarray(qdense.gelu_lut, dtype=np.int64)
    # The GELU output is a uint8 code (fc2 reads it with a_unsigned): a signed table would be misread.
    lo, hi = numerics.int_range(numerics.GELU_CODE_BITS, signed=False)
    if lut.shape != (1 << numerics.ACT_BITS,) or lut.min() < lo or lut.max() > hi:
        raise ValueError(f"qdense.gelu_lut must be {1 << numerics.ACT_BITS} uint8 codes in [{lo}, {hi}], not shape "
                         f"{lut.shape} with range [{lut.min()}, {lut.max()}]")
    image[:lut.size] = lut.astype(np.uint8).tobytes()
    for t in layout.tiles:
        b, q = ops[t.kind]
        cols = slice(t.n0, t.n0 + t.n)
        w = pack_panels(b[:, cols], C)
        p = pack_params(np.asarray(q.bias)[cols], np.asarray(q.mult)[cols], C)
        assert len(w) <= t.w_bytes and len(p) <= t.p_bytes, "dense_layout: a piece overflows its slot"
        image[t.w_offset:t.w_offset + len(w)] = w
        image[t.p_offset:t.p_offset + len(p)] = p
    return bytes(image), layout


def start_fields(qdense, tokens, *, base=0):
    """The payload of :attr:`DenseLayer.start` for ``tokens`` tokens, with the image at ``base``."""
    return {"tokens": tokens, "base": base, "fc1_shift": int(qdense.fc1.shift),
            "fc2_shift": int(qdense.fc2.shift)}
