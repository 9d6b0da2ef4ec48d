"""External-memory layout of one attention sub-layer's parameters, and its on-chip buffer map.

This module is the single source of truth for *where* an attention sub-layer's integer parameters
(:class:`reference.qparams.QAttention`) live in external memory, how they are cut into tiles that each fit
one half of the double-buffered weight and parameter buffers, and where the sub-layer's operands live in
the on-chip buffers (:class:`BufferMap`). The packer (:func:`pack_attention`), the
:class:`~m3vit_hw.attention.attn_sequencer.AttnSequencer` (which walks the tile plan in hardware from
the run-time shape, :meth:`AttnLayout.shape_fields`),
the simulation runner and the tests all read it. Pure Python + numpy.

Heads and padding
-----------------
With ``C = pe_cols`` and head dim ``hd``, every head's Q, K and V occupy ``hw = ceil(hd / C)`` whole
words, so that each starts on a buffer word (the engine writes and reads whole words from lane 0):

* the QKV weights are stored *per head*: head ``i``'s B operand is ``D x 3*hw*C``, columns
  ``s*hw*C + c`` (``s`` = q, k, v; ``c < hd``) taken from ``qkv.w[s*D + i*hd + c]``, the padding columns
  zero (zero weight, zero bias, zero multiplier: they write zeros);
* the attention context is stored with the same per-head padding (``heads * hw`` words per token), so the
  projection's B operand is ``heads*hw*C x D`` with zero rows at the padding (the padding lanes of the
  context are never written and meet zero weights).

When ``C`` divides ``hd`` there is no padding.

Head packing: when a head is at most half a word (``p = config.attn_head_pack > 1``, e.g. head_dim 32
on 64 columns), ``p`` heads share each context word: head ``g*p + j`` keeps its context in lanes
``j*hd .. (j+1)*hd`` of word ``g`` (``ctx_pitch = heads / p * hw``), and the projection's B operand
is ``heads/p * C x D`` (the plain ``proj.w`` transposed when ``p * hd == C``). The engine writes a
tile's lanes ``0 .. N-1`` only, so the heads of a group run from the highest lane offset down: the
plan's head steps are ``g*p + p-1, .., g*p`` for each group ``g``; head ``g*p + j``'s V columns sit at
lanes ``j*hd ..`` of its V word (its Q and K at lane 0), and its AV runs with ``N = (j+1)*hd``:
it writes its own lanes and zeros below them, which the group's next (lower) heads overwrite.

Tiles
-----
A tile is an N-chunk of one GEMM's weight panels (``K`` words of ``C`` int8 each per column tile) plus
its parameter words (see :mod:`m3vit_hw.moe.expert_layout` for both formats), as many panels as fit one
half of each buffer. The plan is: head 0's Q|K tiles, head 0's V tiles, head 1's Q|K tiles, ..., then
the projection's tiles (Q|K and V are separate so that a head's Q|K can be computed while the previous
head's last AV still reads V). Each part (a head's Q|K, its V, the projection) is split into the fewest
balanced chunks (:func:`~m3vit_hw.config.balanced_chunks`), so the whole plan is described by the shape
(D, heads, head_dim) and three ``(panels, extra, chunks)`` triples (:meth:`AttnLayout.shape_fields`).

Run-time shape
--------------
The design's buffer map (:func:`buffer_map`) is sized for ``config.model``; :func:`plan_attention` also
plans any smaller shape (``dim``, ``heads``) that fits it, for the same elaborated design: the row
pitch of ``h`` and ``x`` (``row_words``), the region bases, the score and e8 slots and the row table
stay the design's; the head width (``hw``), the context pitch (``heads * hw``), the Q|K|V pitch
(``3 * hw``), the GEMM sizes and the tile plan follow the run-time shape.

Image
-----
``pack_attention`` returns one byte image (offset 0 = the sub-layer's base address): the tiles in plan
order, each ``[weight panels][parameter words]``, every piece aligned and padded to the memory beat.
"""

from dataclasses import dataclass

import numpy as np

from ..checks import check_int
from ..config import AcceleratorConfig, balanced_chunks
from ..moe.expert_layout import pack_panels, pack_params

__all__ = ["AttnTile", "AttnLayout", "BufferMap", "plan_attention", "buffer_map", "pack_attention",
           "start_fields", "SHAPE_PARTS"]

#: The parts of the tile plan, in plan order within a head (then the projection): each is split into
#: balanced chunks of whole panels (:func:`~m3vit_hw.config.balanced_chunks`).
SHAPE_PARTS = ("qk", "v", "proj")


def _ceil_div(a, b):
    return -(-a // b)


def _round_up(a, b):
    return _ceil_div(a, b) * b


@dataclass(frozen=True)
class AttnTile:
    """One tile: an N-chunk of a head's QKV GEMM or of the projection.

    Attributes
    ----------
    index : int
        Position in the plan.
    kind : str
        ``"qkv"`` or ``"proj"``.
    part : str
        For QKV tiles, ``"qk"`` (Q and K columns) or ``"v"`` (V columns); ``""`` for the projection.
    head : int
        The head (``qkv``), or 0 (``proj``).
    n0, n : int
        First output column (a multiple of ``pe_cols``) and column count, in the padded B operand.
    k : int
        Reduction length (``D`` for QKV, ``heads * hw * C`` for the projection).
    panels : int
        Column tiles (= parameter words) in the tile.
    w_offset, w_bytes, p_offset, p_bytes : int
        Byte offsets (from the image base) and padded lengths of the weight panels and parameter words.
    last_of_head : bool
        The head's last QKV tile (its last V tile): the head's attention runs after it.
    """

    index: int
    kind: str
    part: str
    head: int
    n0: int
    n: int
    k: int
    panels: int
    w_offset: int
    w_bytes: int
    p_offset: int
    p_bytes: int
    last_of_head: bool


@dataclass(frozen=True)
class BufferMap:
    """Where the attention sub-layer's operands live on chip (word addresses, ``C`` lanes a word).

    Activation address space (``config.act_addr_bits``):

    * ``h`` rows at word 0, pitch ``row_words`` (the LN1 output; loaded like MoELayer's ``h``);
    * the context at ``ctx_base``, pitch ``ctx_pitch = heads * hw``;
    * one head's Q | K | V at ``qkv_base``, pitch ``qkv_pitch = 3 * hw`` (Q at +0, K at +hw, V at +2hw).
      ``qkv_base`` is a multiple of the region's power-of-two range (``1 << qkv_bits``): the datapath
      keeps a copy of the region in its own bank, written with the main bank and read by the engine's
      B operand (K, V) while the A operand reads Q from the main bank, so the main bank needs one read
      port (one block-RAM/URAM copy) instead of two;
    * two e8 tiles at ``e8_base`` (a separate physical bank), slot ``s`` at ``e8_base + s * e8_slot``,
      pitch ``score_words = ceil(token_capacity / C)``. ``e8_base`` is a multiple of the e8 bank's
      power-of-two address range, so the bank is addressed by the low address bits (no subtractor on
      the engine's read-address path); the main bank holds ``main_words`` (h, context, QKV).

    ``h`` and the context have ``token_capacity`` rows; the QKV region, last in its bank, has
    ``rows_pad`` rows, enough for the junk rows the engine reads past the last row tile (those of the
    other regions fall into the next region and are never used). The score reorder buffer holds two slots of ``q_tile`` rows of ``score_words`` int32 words
    (slot ``s`` at ``s * score_slot``); the row table two slots of ``q_pad`` entries.
    """

    C: int
    row_words: int
    hw: int
    heads: int
    rows_pad: int
    ctx_base: int
    ctx_pitch: int
    qkv_base: int
    qkv_pitch: int
    e8_base: int
    e8_slot: int
    score_words: int
    q_tile: int
    q_pad: int
    score_slot: int
    main_words: int
    act_words: int

    @property
    def qkv_words(self):
        """Words of the Q|K|V region (``rows_pad * qkv_pitch``)."""
        return self.rows_pad * self.qkv_pitch

    @property
    def qkv_bits(self):
        """Address bits of the Q|K|V region's power-of-two range (``qkv_base`` is a multiple of it):
        the datapath's copy of the region is addressed by these low bits."""
        return (self.qkv_words - 1).bit_length()

    @property
    def e8_words(self):
        return 2 * self.e8_slot

    @property
    def score_buffer_words(self):
        return 2 * self.score_slot

    @property
    def rowtab_words(self):
        return 2 * self.q_pad


def buffer_map(config):
    """The :class:`BufferMap` of ``config``.

    The sizes come from the config's ``attn_*`` properties, which
    :attr:`~m3vit_hw.config.AcceleratorConfig.act_buffer_needs`, ``rowtab_needs`` and ``dst_addr_bits``
    also read: a config that validates has room for this map.
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    # Junk rows the engine reads past the last row tile of h or of the context land in the next
    # region (harmless reads); only the last region of the bank (Q|K|V) has the padding rows.
    cap, hw = config.token_capacity, config.attn_head_words
    ctx_base = cap * config.row_words
    ctx_pitch = config.attn_ctx_pitch
    bmap = BufferMap(C=config.pe_cols, row_words=config.row_words, hw=hw, heads=config.model.heads,
                     rows_pad=config.attn_rows_pad, ctx_base=ctx_base, ctx_pitch=ctx_pitch,
                     qkv_base=config.attn_qkv_base, qkv_pitch=3 * hw, e8_base=config.attn_e8_base,
                     e8_slot=config.attn_e8_slot, score_words=config.attn_score_words,
                     q_tile=config.q_tile, q_pad=config.attn_q_pad,
                     score_slot=config.attn_score_buffer_words // 2,
                     main_words=config.attn_main_words, act_words=config.attn_act_words)
    # The config sized the buffers from the same properties; these only guard against drift.
    assert bmap.qkv_base + bmap.qkv_words == bmap.main_words, "attn_layout: main bank"
    assert bmap.qkv_base % (1 << bmap.qkv_bits) == 0, "attn_layout: Q|K|V alignment"
    assert bmap.act_words <= config.act_buffer_words, "attn_layout: act buffer"
    assert bmap.rowtab_words <= config.rowtab_entries, "attn_layout: row table"
    assert bmap.score_buffer_words <= 1 << config.dst_addr_bits, "attn_layout: dst field"
    return bmap


@dataclass(frozen=True)
class AttnLayout:
    """The tile plan and external-memory layout of one attention sub-layer (:func:`plan_attention`)."""

    dim: int
    heads: int
    head_dim: int
    hw: int
    pe_cols: int
    data_bytes: int
    weight_half_bytes: int
    param_half_words: int
    param_word_bytes: int
    tiles: tuple
    image_bytes: int
    chunks: dict = None
    pack: int = 1

    def shape_fields(self):
        """The ``dims`` start field of :class:`~m3vit_hw.attention.attn_sequencer.AttnStartLayout`
        for this plan: ``dim``, ``heads``, ``head_dim`` and, per part (``qk``, ``v``, ``proj``), the
        balanced split of its panels: ``panels`` (the smaller chunk), ``extra`` (how many chunks have
        one panel more; they come first) and ``chunks``."""
        out = {"dim": self.dim, "heads": self.heads, "head_dim": self.head_dim}
        for part in SHAPE_PARTS:
            sizes = self.chunks[part]
            out[part] = {"panels": min(sizes), "extra": sum(1 for c in sizes if c > min(sizes)),
                         "chunks": len(sizes)}
        return out

    @property
    def param_half_bytes(self):
        """Bytes per half of the parameter buffer (whole words, whole memory beats)."""
        return _round_up(self.param_half_words * self.param_word_bytes,
                         max(self.param_word_bytes, self.data_bytes))

    @property
    def proj_k(self):
        """The projection's (padded) reduction length ``heads / pack * hw * C``."""
        return self.heads // self.pack * self.hw * self.pe_cols

    def ctx_lane(self, head):
        """Context column (of the ``proj_k`` padded ones) of ``head``'s first element."""
        return head // self.pack * self.hw * self.pe_cols + self.v_lane(head)

    def v_lane(self, head):
        """Lane of ``head``'s first V element in its V word(s) (and of its context in its word)."""
        return head % self.pack * self.head_dim

    def describe(self):
        lines = [f"attention layout: D={self.dim}, {self.heads} heads x {self.head_dim} "
                 f"({self.hw} words each), pe_cols={self.pe_cols}, {self.image_bytes} B in "
                 f"{len(self.tiles)} tiles"]
        for t in self.tiles:
            lines.append(f"    tile {t.index}: {t.kind} head {t.head} columns {t.n0}..{t.n0 + t.n - 1} "
                         f"(K={t.k}), {t.w_bytes} B @ {t.w_offset}, {t.p_bytes} B params @ {t.p_offset}")
        return "\n".join(lines)


def plan_attention(config, *, dim=None, heads=None):
    """The tile plan and memory layout of one attention sub-layer on the design ``config``.

    Parameters
    ----------
    config : AcceleratorConfig
        The elaborated design: its buffers, PE array and memory beat.
    dim, heads : int or None
        A run-time model shape (default: ``config.model``'s). One elaborated
        :class:`~m3vit_hw.attention.AttentionLayer` runs any shape whose operands fit the design's
        buffer map (:func:`buffer_map` of ``config``): ``ceil(dim / pe_cols) <= row_words`` (the row
        pitch of ``h`` and ``x`` stays the design's), a head no wider than the design's
        (``ceil(head_dim / pe_cols) <= attn_head_words``), a context no wider
        (``heads * head_words <= model.heads * attn_head_words``), and GEMM sizes within the engine's
        fields (``largest_k``, ``largest_n``). The tiles are cut for the design's buffer halves.

    Raises
    ------
    TypeError, ValueError
        If ``config`` is not an :class:`AcceleratorConfig`, or the shape does not fit (naming the
        parameter, its value and the limit). (For the design's own shape the config's validation
        guarantees that a weight and a parameter half hold one panel of every attention GEMM: the
        padded projection K is in ``config.gemm_k_list``; pieces are padded to ``config.mem_data_bytes``.)
    """
    if not isinstance(config, AcceleratorConfig):
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
    data_bytes = config.mem_data_bytes
    m = config.model
    C = config.pe_cols
    D, H, hd = m.dim, m.heads, m.head_dim
    hw = config.attn_head_words
    if dim is not None or heads is not None:
        D = m.dim if dim is None else dim
        H = m.heads if heads is None else heads
        check_int("dim", D, 1, config.row_words * C)
        check_int("heads", H, 1, D)
        if D % H:
            raise ValueError(f"heads must divide dim={D}, not {H}")
        hd = D // H
        hw = _ceil_div(hd, C)
        if hw > config.attn_head_words:
            raise ValueError(f"head_dim={hd} needs {hw} words a head; the design holds heads of at most "
                             f"attn_head_words={config.attn_head_words} words ({config.attn_head_words * C} "
                             f"elements)")
        pk = config.attn_head_pack
        if pk > 1 and (H % pk or pk * hd > C):
            raise ValueError(f"heads must be a multiple of attn_head_pack={pk} with head_dim x {pk} <= "
                             f"pe_cols={C} (the design packs {pk} heads a context word), not heads={H} "
                             f"(head_dim={hd})")
        if H // pk * hw > config.attn_ctx_pitch:
            raise ValueError(f"heads={H} x {hw} words need a context of {H // pk * hw} words a token; "
                             f"the design's is {config.attn_ctx_pitch}")
        for what, k in (("dim (the QKV reduction)", D), ("the projection's reduction", H // pk * hw * C)):
            if k > config.largest_k:
                raise ValueError(f"{what} {k} exceeds the engine's largest_k={config.largest_k}")
    word = config.act_word_bytes
    pwb = config.param_word_bytes
    half = config.weight_buffer_half_bytes
    p_half_words = config.param_buffer_words // 2
    pk = config.attn_head_pack
    proj_k = H // pk * hw * C       # config.attn_proj_k for the design's own shape
    tiles = []
    chunk_sizes = {}
    offset = 0
    hp = hw * C
    # Each head's Q|K columns and its V columns are separate tiles, so the sequencer can compute the
    # next head's Q|K while the last AV of a head still reads V.
    # Packed heads run from the group's highest lane offset down (module docstring).
    order = [g * pk + pk - 1 - t for g in range(H // pk) for t in range(pk)]
    plan = [e for i in order for e in (("qkv", "qk", i, D, 0, 2 * hp), ("qkv", "v", i, D, 2 * hp, 3 * hp))]
    plan.append(("proj", "", 0, proj_k, 0, D))
    for kind, part, head, k, c0, c1 in plan:
        panel = k * word
        per_tile = min(half // panel, p_half_words)
        if per_tile < 1:
            raise ValueError(f"a {kind} panel of K={k} ({panel} B) does not fit a weight_half_bytes="
                             f"{half} half")
        first = 0
        chunks = balanced_chunks(_ceil_div(c1 - c0, C), per_tile)
        chunk_sizes[part or "proj"] = chunks
        if max(chunks) * C > config.largest_n:
            raise ValueError(f"a {part or 'proj'} tile of {max(chunks) * C} columns exceeds the engine's "
                             f"largest_n={config.largest_n}")
        for ci, count in enumerate(chunks):
            w_bytes = _round_up(count * panel, data_bytes)
            p_bytes = _round_up(count * pwb, data_bytes)
            n0 = c0 + first * C
            tiles.append(AttnTile(index=len(tiles), kind=kind, part=part, head=head, n0=n0,
                                  n=min(c1, c0 + (first + count) * C) - n0, k=k, panels=count,
                                  w_offset=offset, w_bytes=w_bytes, p_offset=offset + w_bytes,
                                  p_bytes=p_bytes, last_of_head=part == "v" and ci == len(chunks) - 1))
            offset += w_bytes + p_bytes
            first += count
    return AttnLayout(dim=D, heads=H, head_dim=hd, hw=hw, pe_cols=C, data_bytes=data_bytes,
                      weight_half_bytes=half, param_half_words=p_half_words, param_word_bytes=pwb,
                      tiles=tuple(tiles), image_bytes=offset, chunks=chunk_sizes, pack=pk)


def _padded_operands(qattn, layout):
    """The padded B operands and column parameters: ``{("qkv", i) or "proj": (B [K, N], bias, mult)}``."""
    D, H, hd, hw, C = layout.dim, layout.heads, layout.head_dim, layout.hw, layout.pe_cols
    wq = np.asarray(qattn.qkv.w, dtype=np.int64)
    wp = np.asarray(qattn.proj.w, dtype=np.int64)
    if wq.shape != (3 * D, D) or wp.shape != (D, D):
        raise ValueError(f"qattn must have qkv.w [3D={3 * D}, D={D}] and proj.w [D, D], not {wq.shape} "
                         f"and {wp.shape}")
    out = {}
    hp = hw * C
    for i in range(H):
        b = np.zeros((D, 3 * hp), dtype=np.int64)
        bias = np.zeros(3 * hp, dtype=np.int64)
        mult = np.zeros(3 * hp, dtype=np.int64)
        for s in range(3):
            src = slice(s * D + i * hd, s * D + (i + 1) * hd)
            lane = layout.v_lane(i) if s == 2 else 0
            dst = slice(s * hp + lane, s * hp + lane + hd)
            b[:, dst] = wq[src].T
            bias[dst] = np.asarray(qattn.qkv.bias)[src]
            mult[dst] = np.asarray(qattn.qkv.mult)[src]
        out[("qkv", i)] = (b, bias, mult)
    b = np.zeros((layout.proj_k, D), dtype=np.int64)
    for i in range(H):
        b[layout.ctx_lane(i):layout.ctx_lane(i) + hd] = wp[:, i * hd:(i + 1) * hd].T
    out["proj"] = (b, np.asarray(qattn.proj.bias, dtype=np.int64), np.asarray(qattn.proj.mult, dtype=np.int64))
    return out


def pack_attention(qattn, config, *, heads=None):
    """Lay out one attention sub-layer's integer parameters for external memory.

    ``heads`` (default ``config.model.heads``) with ``qattn``'s D selects a run-time shape
    (:func:`plan_attention`); by default the shape is ``config.model``'s.

    Returns
    -------
    (bytes, AttnLayout)
        The image (offset 0 = the sub-layer's base address) and its layout.
    """
    if heads is None:
        layout = plan_attention(config)
    else:
        layout = plan_attention(config, dim=int(np.asarray(qattn.proj.w).shape[0]), heads=heads)
    ops = _padded_operands(qattn, layout)
    C = layout.pe_cols
    image = bytearray(layout.image_bytes)
    for t in layout.tiles:
        b, bias, mult = ops[("qkv", t.head) if t.kind == "qkv" else "proj"]
        cols = slice(t.n0, t.n0 + t.n)
        w = pack_panels(b[:, cols], C)
        p = pack_params(bias[cols], mult[cols], C)
        assert len(w) <= t.w_bytes and len(p) <= t.p_bytes, "attn_layout: a piece overflows its slot"
        image[t.w_offset:t.w_offset + len(w)] = w
        image[t.p_offset:t.p_offset + len(p)] = p
    return bytes(image), layout


def start_fields(qattn, tokens, *, base=0, layout=None):
    """The payload of :attr:`AttentionLayer.start` for ``tokens`` tokens, with the image at ``base``.

    ``layout`` (the :class:`AttnLayout` :func:`pack_attention` returned) fills the run-time ``dims``;
    without it ``dims`` is all zero, which the sequencer reads as the design's own model."""
    shape = layout.shape_fields() if layout is not None else {
        "dim": 0, "heads": 0, "head_dim": 0, **{p: {"panels": 0, "extra": 0, "chunks": 0} for p in SHAPE_PARTS}}
    return {
        "tokens": tokens, "base": base, "dims": shape,
        "c_mult": int(qattn.c_mult), "c_shift": int(qattn.c_shift),
        "out_mult": int(qattn.out_mult), "out_shift": int(qattn.out_shift),
        "qkv_shift": int(qattn.qkv.shift), "proj_shift": int(qattn.proj.shift),
    }
