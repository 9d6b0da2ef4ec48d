"""The GEMM engine: one shared int8 matrix-product unit for every GEMM of the encoder.

``GemmEngine(config)`` computes ``C = A (M x K) . B (K x N)`` by walking ``pe_rows x pe_cols`` output
tiles over a :class:`~m3vit_hw.gemm.pe_array.PEArray` and sending every finished row chunk through the
:class:`~m3vit_hw.gemm.epilogue.Epilogue`. It owns no buffers: it *reads* A, B, a row table and column
parameters through memory-read-port-like interfaces and *writes* results through memory-write-port-like
interfaces (or a stream), so the same engine serves the attention unit, the dense layers and the MoE
reordering controller, each of which owns or arbitrates its own buffers.

Buffers and words
-----------------
``C = pe_cols`` elements make one *word* everywhere:

* **activation buffer** (``a_rd``, ``act_wr``): token-major int8 rows; word ``w`` of a row holds
  features ``C*w .. C*w+C-1`` (lane ``l`` = feature ``C*w + l``). A row of D features takes
  ``ceil(D / C)`` words; ``a_stride``/``dst_stride`` give the row pitch in words, so a row may be a slice
  of a wider matrix (one head of the QKV output, one column block of the hidden layer).
* **residual buffer** (``res_rd``, ``res_wr``): the same layout with int16 lanes.
* **B operand** (``b_rd``): int8 words, two addressings chosen by ``b_trans``:

  - direct (weights, and V for the AV product): word at ``b_base + nb*b_tile_stride + k*b_k_stride``
    holds ``B[k, C*nb .. C*nb+C-1]``. The compiler's weight layout is *panels*: for each column tile
    ``nb``, K consecutive words (``b_k_stride = 1``, ``b_tile_stride = K``). V in the activation buffer
    is read with ``b_k_stride`` = row pitch, ``b_tile_stride = 1``.
  - transposed (Kᵀ for ``Q.Kᵀ``): B is given as Bᵀ stored token-major like activations; word
    ``b_base + nb*b_tile_stride + c*b_k_stride + kb`` holds ``Bᵀ[C*nb + c, C*kb .. C*kb+C-1]``
    (``b_k_stride`` = row pitch of K, ``b_tile_stride = C * pitch``).

  ``b_rd.addr`` has ``config.b_addr_bits`` bits, one more than either buffer needs: by convention the
  MSB selects the activation buffer (QKᵀ, AV) over the weight buffer; the integrator decodes it. The two
  halves of the double-buffered weight buffer are just two ``b_base`` values.
* **row table** (``rowtab_rd``): entry ``rowtab_base + m`` gives output row ``m``'s ``token`` (used to
  gather A rows and/or scatter output rows) and ``scale`` (ATTN8: the AV reciprocal, below
  ``2**MULT_BITS``; COMBINE: the Q0.15 combine weight, at most ``2**15``, in the low 16 bits). The MoE
  token queues are row tables.
* **column parameters** (``colp_rd``): word ``colp_base + nb`` holds ``(bias, mult)`` of output
  columns ``C*nb .. C*nb+C-1``.

Addressing of results: output row ``m`` (or ``token[m]`` with ``scatter``), column tile ``nb`` goes to
word ``dst_base + row*dst_stride + nb``; lanes beyond N are not written. A row of A is read from
``a_base + row*a_stride + kb`` with ``row = token[m]`` under ``gather``.

Schedule and throughput
-----------------------
Tiles run row-tile-major (``for mb: for nb:``), each over ``ceil(K / C)`` *blocks* of C reduction
steps. A command register, then a five-stage loader (walk; row-table read; row index registered; row products registered in
DSPs; operand reads, so no memory output and no multiply feeds an address in the same cycle) reads a block -- ``pe_rows`` A words (one per tile row, re-reading the row
table for gathered rows) and C B words, one of each per cycle, ``max(pe_rows, C)`` cycles -- into a
staging register while the PE array consumes the previous block, one reduction step per cycle. Hence:

* with ``pe_rows <= pe_cols`` and ``C | K`` the array computes every cycle (measured: 99.35 % of
  ``rows * cols`` MAC/cycle for 64x64x64 on 8x8, 98.6 % for 64x192x64 on 16x16, command accepted to
  last result written);
* a K tail costs ``max(pe_rows, C) - K % C`` idle cycles per tile;
* with ``pe_rows > pe_cols`` the A reads limit the rate to ``pe_cols / pe_rows`` of peak;
* a tile with ``K < rows + 4`` of the previous tile waits for that tile's drain (see
  :class:`~m3vit_hw.gemm.pe_array.PEArray`);
* consecutive commands overlap (the next command's loads start while the previous one computes)
  unless ``sync`` is set. M and N tails are masked (junk rows and lanes are computed, never written).

Results leave in tile order: ``for mb: for nb: for row in tile``, i.e. the chunks of one output row
are interleaved with the other rows of its row tile (a streaming consumer of RAW scores indexes its
row buffer with ``addr``).

Draining: every PE-array output row enters the epilogue as ``config.epi_beats = pe_cols / epi_lanes``
beats of ``epi_lanes`` lanes, one per cycle, so a tile drains in ``rows * epi_beats`` cycles; a tile
whose K is below :attr:`~m3vit_hw.config.AcceleratorConfig.epi_hidden_min_k` waits for the previous
tile's drain. The epilogue (and its DSP48E2s) is ``epi_lanes`` wide, independent of the array.

Latency: the first block is staged ``max(pe_rows, C) + 6`` cycles after the command is accepted; a
reduction step reaches the PE array 2 cycles after the feeder reads it from the staging banks (the
feed pipeline: the banks' bytes registered, then the rotated step registered); a tile's rows reach
the epilogue :attr:`PEArray.latency <m3vit_hw.gemm.pe_array.PEArray.latency>` (4, or 6 with
``pe_pack`` 2) cycles after its last reduction step, pass a skid buffer (1 cycle), and their results
are written :data:`~m3vit_hw.gemm.epilogue.LATENCY` (19) cycles later. The feeder takes the PE
array's shadow-bank credit for a tile's last step when it reads the step, 2 cycles ahead of the
array, so a tile whose K barely covers the previous tile's drain waits up to 2 cycles more than the
array alone would make it (measured: 64x16x4 on 4x4 with a 1-lane epilogue, 336 cycles against 303
before the feed pipeline; 64x20x4: 370 against 367).

Hazards: the engine does not order its own reads after its own writes across commands. A command that
reads what an earlier command writes (fc1 -> fc2) must set ``sync``: it is then held until the engine
is idle. Within the residual buffer, read-modify-writes are ordered (repeated scatter rows accumulate
in list order).
"""

from amaranth.hdl import Assert, Cat, Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..config import AcceleratorConfig
from .epilogue import Epilogue, EpilogueMode, StreamOutLayout
from .pe_array import PEArray
from ..lib.skid import SkidBuffer

__all__ = ["GemmEngine", "GemmCommand", "RowEntryLayout", "ColParamLayout", "check_command"]


def _bits(n):
    return max(1, int(n).bit_length())


class RowEntryLayout(data.StructLayout):
    """One row-table entry: ``token`` (gather/scatter row) and ``scale`` (per-row multiplier)."""

    def __init__(self, config):
        super().__init__({
            "token": unsigned(config.token_bits),
            "scale": unsigned(numerics.MULT_BITS),
        })


class ColParamLayout(data.StructLayout):
    """Epilogue parameters of one output column: int32 ``bias`` and unsigned ``mult``."""

    def __init__(self):
        super().__init__({
            "bias": signed(numerics.BIAS_BITS),
            "mult": unsigned(numerics.MULT_BITS),
        })


class GemmCommand(data.StructLayout):
    """A GEMM command (the payload of :attr:`GemmEngine.cmd`).

    Fields
    ------
    m, k, n : unsigned
        Problem size, each >= 1 (0 is treated as 1); at most ``config.largest_m``, ``largest_k``,
        ``largest_n``.
    a_base, a_stride : unsigned(act_addr_bits)
        A row ``r`` starts at word ``a_base + r * a_stride``.
    b_base, b_tile_stride, b_k_stride : unsigned(b_addr_bits)
        B addressing, see the module docstring (direct or ``b_trans``).
    dst_base, dst_stride : unsigned(dst_addr_bits)
        Output row ``r``, column tile ``nb`` goes to word ``dst_base + r * dst_stride + nb``.
    rowtab_base : unsigned(rowtab_addr_bits)
        Row ``m`` uses row-table entry ``rowtab_base + m``.
    colp_base : unsigned(param_addr_bits)
        Column tile ``nb`` uses parameter word ``colp_base + nb``.
    shift : range(SHIFT_MAX + 1)
        Requantization shift (ATTN8: ``out_shift``, at most ``SHIFT_MAX - AV_RECIP_BITS``).
    mode : EpilogueMode
    a_unsigned : 1
        A holds uint8 (attention weights e8) rather than int8.
    b_trans : 1
        B is given transposed (token-major), see the module docstring.
    gather : 1
        A row of output row ``m`` is ``token[m]`` of the row table (else ``m``).
    scatter : 1
        Output row ``m`` is written to row ``token[m]`` (else ``m``).
    sync : 1
        Wait until every earlier command has finished (its results written) before starting.
    """

    def __init__(self, config):
        super().__init__({
            "m": unsigned(_bits(config.largest_m)),
            "k": unsigned(_bits(config.largest_k)),
            "n": unsigned(_bits(config.largest_n)),
            "a_base": unsigned(config.act_addr_bits),
            "a_stride": unsigned(config.act_addr_bits),
            "b_base": unsigned(config.b_addr_bits),
            "b_tile_stride": unsigned(config.b_addr_bits),
            "b_k_stride": unsigned(config.b_addr_bits),
            "dst_base": unsigned(config.dst_addr_bits),
            "dst_stride": unsigned(config.dst_addr_bits),
            "rowtab_base": unsigned(config.rowtab_addr_bits),
            "colp_base": unsigned(config.param_addr_bits),
            "shift": range(numerics.SHIFT_MAX + 1),
            "mode": EpilogueMode,
            "a_unsigned": 1,
            "b_trans": 1,
            "gather": 1,
            "scatter": 1,
            "sync": 1,
        })


def check_command(config, cmd):
    """Check one GEMM command against ``config``'s limits before it is sent.

    Whoever builds a command (test harnesses, benchmarks, the compiler) calls this: a field cannot
    hold a value outside its range, and the engine would silently truncate it (an ``n`` of 384 in an
    8-bit field computes 128 columns; an output address past the field wraps to word 0).

    Parameters
    ----------
    config : AcceleratorConfig
    cmd : dict
        :class:`GemmCommand` fields; missing fields are 0.

    Raises
    ------
    ValueError
        Naming the field, the value and the allowed range: an unknown field, a value that does not fit
        its field, ``m``/``k``/``n`` outside ``[1, largest_m/k/n]``, or an A, B or destination address
        range that runs past its address field.
    """
    layout = GemmCommand(config)
    fields = dict(layout)
    for name, value in cmd.items():
        if name not in fields:
            raise ValueError(f"GEMM command has no field {name!r}; fields: {sorted(fields)}")
        shape = fields[name].shape
        if isinstance(shape, range):
            lo, hi = shape.start, shape.stop - 1
        elif isinstance(shape, type):                    # an enum (mode)
            continue
        else:
            lo, hi = 0, (1 << Shape.cast(shape).width) - 1
        if not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"GEMM command field {name} must be in [{lo}, {hi}], not {value!r}")
    c = {name: cmd.get(name, 0) for name in fields}
    for name, limit, what in (("m", config.largest_m, "largest_m (token_capacity)"),
                              ("k", config.largest_k, "largest_k"), ("n", config.largest_n, "largest_n")):
        if not 1 <= c[name] <= limit:
            raise ValueError(f"GEMM command field {name} must be in [1, {limit}] (config.{what}), "
                             f"not {c[name]}")
    C = config.pe_cols
    kw, nt = -(-c["k"] // C), -(-c["n"] // C)
    if c["b_trans"]:
        b_last = c["b_base"] + (nt - 1) * c["b_tile_stride"] + (C - 1) * c["b_k_stride"] + kw - 1
    else:
        b_last = c["b_base"] + (nt - 1) * c["b_tile_stride"] + (c["k"] - 1) * c["b_k_stride"]
    ranges = [("B", b_last, config.b_addr_bits)]
    if not c["gather"]:
        ranges.append(("A", c["a_base"] + (c["m"] - 1) * c["a_stride"] + kw - 1, config.act_addr_bits))
    if not c["scatter"]:
        ranges.append(("destination", c["dst_base"] + (c["m"] - 1) * c["dst_stride"] + nt - 1,
                       config.dst_addr_bits))
    for what, last, bits in ranges:
        if last >= 1 << bits:
            raise ValueError(f"GEMM command {what} addresses run to word {last}, past the "
                             f"{bits}-bit address field (at most {(1 << bits) - 1}): m={c['m']}, "
                             f"k={c['k']}, n={c['n']} do not fit this config's buffers")


class GemmEngine(wiring.Component):
    """Tiled int8 GEMM over a PE array, with operand/result buffers owned outside.

    Parameters
    ----------
    config : AcceleratorConfig
        Sizes everything: PE array, word width, address and command field widths.

    Interface attributes
    --------------------
    cmd : In(stream.Signature(GemmCommand(config)))
        Commands, executed in order. ``cmd.ready`` is high when the engine's command register is
        empty (and, for a ``sync`` command, when the engine is idle); it does not depend on the
        loader's progress.
    a_rd : In(memory.ReadPort.Signature(act_addr_bits, ArrayLayout(signed(8), C)))
    b_rd : In(memory.ReadPort.Signature(b_addr_bits, ArrayLayout(signed(8), C)))
    rowtab_rd : In(memory.ReadPort.Signature(rowtab_addr_bits, RowEntryLayout(config)))
    colp_rd : In(memory.ReadPort.Signature(param_addr_bits, ArrayLayout(ColParamLayout(), C)))
        Read ports, driven by the engine (``addr``, ``en``); the owner returns ``data`` one cycle after
        a cycle with ``en`` high and holds it while ``en`` is low (a synchronous
        :class:`amaranth.lib.memory.Memory` read port, connected with ``wiring.connect``). uint8 A
        data is stored as its bit pattern.
    act_wr : In(memory.WritePort.Signature(act_addr_bits, ArrayLayout(signed(8), C), granularity=1))
    res_rd : In(memory.ReadPort.Signature(res_addr_bits, ArrayLayout(signed(16), C)))
    res_wr : In(memory.WritePort.Signature(res_addr_bits, ArrayLayout(signed(16), C), granularity=1))
        Destination ports (see :class:`~m3vit_hw.gemm.epilogue.Epilogue`); ``res_rd`` need not be
        transparent.
    o : Out(stream.Signature(StreamOutLayout(C, dst_addr_bits)))
        RAW-mode results (scores, logits): one beat per output row chunk, ``addr`` as the destination
        addressing gives it, ``last`` on the final beat of the command.
    gelu_lut : Out(memory.WritePort.Signature(8, signed(8)))
        GELU table write port; load it before the GELU8 commands that use it.
    done : Out(1)
        Pulses once per command, when its last result has been written or transferred.
    busy : Out(1)
        Some command is not finished.
    pe_active : Out(1)
        The PE array accepted an operand beat in the previous cycle (a registered pulse, one per beat,
        one cycle after the beat): one reduction step of a full
        ``pe_rows x pe_cols`` tile (masked tail rows and lanes included). A command takes
        ``ceil(m / pe_rows) * ceil(n / pe_cols) * k`` such beats, in command order, and every block is
        read from the buffers before the array consumes it. Performance counters count it as "compute
        cycles"; the MoE reordering controller uses it to release weight-buffer halves early.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`~m3vit_hw.config.AcceleratorConfig`.
    """

    #: Loader pipeline latency: a command's first block is staged ``max(pe_rows, pe_cols) +
    #: LOADER_LATENCY`` cycles after the command is accepted (paid once per run of back-to-back commands).
    LOADER_LATENCY = 6

    #: Feed pipeline latency: a reduction step reaches the PE array this many cycles after the feeder
    #: reads it from the staging banks (the banks' bytes registered, then the rotated step).
    FEED_LATENCY = 2

    def __init__(self, config):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        C = config.pe_cols
        word8 = data.ArrayLayout(signed(numerics.ACT_BITS), C)
        word16 = data.ArrayLayout(signed(numerics.RES_BITS), C)
        super().__init__({
            "cmd": In(stream.Signature(GemmCommand(config))),
            "a_rd": In(memory.ReadPort.Signature(addr_width=config.act_addr_bits, shape=word8)),
            "b_rd": In(memory.ReadPort.Signature(addr_width=config.b_addr_bits, shape=word8)),
            "rowtab_rd": In(memory.ReadPort.Signature(addr_width=config.rowtab_addr_bits,
                                                      shape=RowEntryLayout(config))),
            "colp_rd": In(memory.ReadPort.Signature(addr_width=config.param_addr_bits,
                                                    shape=data.ArrayLayout(ColParamLayout(), C))),
            "act_wr": In(memory.WritePort.Signature(addr_width=config.act_addr_bits, shape=word8,
                                                    granularity=1)),
            "res_rd": In(memory.ReadPort.Signature(addr_width=config.res_addr_bits, shape=word16)),
            "res_wr": In(memory.WritePort.Signature(addr_width=config.res_addr_bits, shape=word16,
                                                    granularity=1)),
            "o": Out(stream.Signature(StreamOutLayout(C, config.dst_addr_bits))),
            "gelu_lut": Out(memory.WritePort.Signature(addr_width=numerics.ACT_BITS, shape=signed(numerics.ACT_BITS))),
            "done": Out(1),
            "busy": Out(1),
            "pe_active": Out(1),
        })

    @property
    def config(self):
        return self._config

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        R, C = cfg.pe_rows, cfg.pe_cols
        n_ent = max(R, C)                  # staging entries per block: R words of A, C words of B
        act_aw, b_aw, dst_aw = cfg.act_addr_bits, cfg.b_addr_bits, cfg.dst_addr_bits

        # A row leaves as epi_beats epilogue beats: with two or more, the array may drain a row
        # every other cycle, which keeps the output ready out of its shadow-bank control.
        m.submodules.pe = pe = PEArray.from_config(cfg)
        m.submodules.epilogue = ep = Epilogue(cfg.epi_lanes, act_aw, cfg.res_addr_bits, word_lanes=C)
        # The drain's skid buffer in front of the epilogue (see the drain below).
        m.submodules.epi_skid = es = SkidBuffer(ep.i.payload.shape())
        wiring.connect(m, es.o, ep.i)

        # Per-block information, computed by the loader and carried with the block to the feeder
        # (and, for a tile's first block, into the tile descriptor).
        block_info = data.StructLayout({
            "first": 1, "last": 1, "w": range(C + 1),
            "a_unsigned": 1, "b_trans": 1,
            "rows_valid": range(R + 1), "mask": unsigned(C),
            "mode": EpilogueMode, "shift": range(numerics.SHIFT_MAX + 1), "last_tile": 1,
        })
        row_out = data.StructLayout({"addr": unsigned(dst_aw), "scale": unsigned(numerics.MULT_BITS)})
        desc_layout = data.StructLayout({
            "rows": data.ArrayLayout(row_out, R),
            "colp": data.ArrayLayout(ColParamLayout(), C),
            "mask": unsigned(C), "mode": EpilogueMode, "shift": range(numerics.SHIFT_MAX + 1),
            "last_tile": 1,
        })
        # The command fields the second loader stage still needs after L0 may have moved on to the
        # next command.
        l1_cmd_layout = data.StructLayout({
            "a_base": unsigned(act_aw), "a_stride": unsigned(act_aw),
            "dst_base": unsigned(dst_aw), "dst_stride": unsigned(dst_aw),
            "colp_base": unsigned(cfg.param_addr_bits), "gather": 1, "scatter": 1,
        })

        # ---- L0: walk the command (tiles, blocks, staging entries) --------------------------------
        cmd = Signal(GemmCommand(cfg))
        active = Signal()
        # The accepted command waiting for L0 (see the command accept below).
        pcmd = Signal(GemmCommand(cfg))
        pcmd_valid = Signal()
        m_w = _bits(cfg.largest_m + R)
        n_w = _bits(cfg.largest_n + C)
        k_w = _bits(cfg.largest_k + C)
        m0 = Signal(m_w)
        k0 = Signal(k_w)
        # What is left of each dimension (cmd.x - x0, >= 1 while the command is active), kept as
        # down-counters: the "last" flags are compares of a register against a constant, not of an
        # adder output against the command (they feed cmd.ready and every L0 enable).
        m_rem = Signal(m_w)
        n_rem = Signal(n_w)
        k_rem = Signal(k_w)
        kb = Signal(act_aw)                # block index = word offset within an A row
        nb = Signal(dst_aw)                # column tile = word offset within an output row
        ent = Signal(range(n_ent))
        b_tile_base = Signal(b_aw)
        b_kblk = Signal(b_aw)              # k0 * b_k_stride (direct B)
        b_cstride = Signal(b_aw)           # C * b_k_stride
        b_istride = Signal(b_aw)           # ent * b_k_stride

        # L1 and L2 pipeline registers; every stage carries the entry's flags along.
        stage_flags = {"last_ent": 1, "a_en": 1, "b_en": 1, "kb0": 1, "first_ent": 1}
        l1_valid = Signal()
        l1 = Signal(data.StructLayout({
            **stage_flags,
            "m_idx": unsigned(m_w), "kb": unsigned(act_aw), "nb": unsigned(dst_aw),
            "b_addr": unsigned(b_aw), "info": block_info,
        }))
        l1_cmd = Signal(l1_cmd_layout)
        # L1R: the row-table entry registered (the memory output feeds no arithmetic in its own
        # cycle), the row indices selected, the address offsets pre-added. L1M: the two row products
        # registered (a DSP48E2 each, input and output registers absorbable). Then the reads are
        # issued from L1M with one add per address.
        l1r_valid = Signal()
        l1r = Signal(data.StructLayout({
            **stage_flags,
            "a_idx": unsigned(cfg.token_bits if cfg.token_bits > m_w else m_w),
            "d_idx": unsigned(cfg.token_bits if cfg.token_bits > m_w else m_w),
            "a_stride": unsigned(act_aw), "dst_stride": unsigned(dst_aw),
            "a_off": unsigned(act_aw), "d_off": unsigned(dst_aw),
            "b_addr": unsigned(b_aw), "colp_addr": unsigned(cfg.param_addr_bits),
            "scale": unsigned(numerics.MULT_BITS), "info": block_info,
        }))
        l1m_valid = Signal()
        l1m = Signal(data.StructLayout({
            **stage_flags,
            "a_prod": unsigned(act_aw), "d_prod": unsigned(dst_aw),
            "a_off": unsigned(act_aw), "d_off": unsigned(dst_aw),
            "b_addr": unsigned(b_aw), "colp_addr": unsigned(cfg.param_addr_bits),
            "scale": unsigned(numerics.MULT_BITS), "info": block_info,
        }))
        l2_valid = Signal()
        l2 = Signal(data.StructLayout({
            **stage_flags,
            "row": row_out, "info": block_info,
        }))

        # Staging block ("next") and the feeding block ("cur"): the A and B words of a block live in
        # two slots of skewed LUTRAM banks (_SkewedStage), not in registers, which at 32x64 were
        # 2 x (R + C) x C bytes = 98 k flip-flops with a 3:1 load/shift multiplexer on each.
        nx_full = Signal()
        nx_rows = [Signal(row_out, name=f"nx_row{i}") for i in range(R)]
        nx_colp = Signal(data.ArrayLayout(ColParamLayout(), C))
        nx_info = Signal(block_info)
        cur_valid = Signal()
        cur_info = Signal(block_info)
        col = Signal(range(C))
        # -col modulo the staging banks' count (a power of two), moved with col: the read rotation
        # of the staged words starts at a flip-flop, not behind a subtractor.
        ncol = Signal((max(R, C) - 1).bit_length() or 1)
        # The feeding block's width minus 2, set at the handoff: the next col_last is col == w_m2,
        # a compare of two registers (no adder in front of it).
        w_m2 = Signal(range(-2, C + 1))
        w_slot = Signal()                  # the slot the next block is written into
        r_slot = Signal()                  # the slot the feeding block is read from
        w_ent = Signal(range(n_ent))       # entry of the block written next
        stage_a = _SkewedStage(m, "stage_a", R, C)
        stage_b = _SkewedStage(m, "stage_b", C, C)
        # col == cur_info.w - 1, kept in a register: the PE array's ready, the block end and with
        # them the whole loader advance chain start at a flip-flop, not at a compare on an adder.
        col_last = Signal()

        # Tile descriptors between the feeder and the drain: tiles whose results are in flight between
        # the loader and the epilogue (staged, accumulating, draining); config.gemm_desc_depth = 3 by
        # default, so a tile with K just above pe_rows never waits for a descriptor slot.
        DESC_DEPTH = self._config.gemm_desc_depth
        descs = [Signal(desc_layout, name=f"desc{d}") for d in range(DESC_DEPTH)]
        d_head = Signal(range(DESC_DEPTH))
        d_tail = Signal(range(DESC_DEPTH))
        d_count = Signal(range(DESC_DEPTH + 1))

        # ---- handshakes --------------------------------------------------------------------------

        # The handoff reads flags set a cycle ahead, so that it is one LUT of flip-flops at the head
        # of the loader's advance enable: the feeding slot frees in this cycle whatever the PE
        # array's credit (no block, or its final step without the tile's last flag), or only with
        # the credit (the tile's final step); and the descriptor queue is full. Together with the
        # credit they give exactly ~cur_valid | block_end and d_count == DESC_DEPTH (a simulation
        # Assert checks both every cycle).
        fe_free = Signal(init=1)
        fe_credit = Signal()
        d_full = Signal()
        # The feed pipeline: the feeder (the cur_* state, "F0") addresses the staging banks for step
        # `col`; F1 registers the banks' bytes (LUTRAM outputs end at flip-flops), F2 the rotated
        # step, which is the PE array's operand beat. F1 and F2 never stall (no enable): the feeder
        # emits a tile's last step only when the array's shadow-bank credit is high and no other last
        # step is in F1 or F2, so the beat finds the credit still high two cycles later (the credit
        # only falls when a last beat is taken). `nl` is "no last step in F1 or F2", a register.
        f1_valid, f1_first, f1_last = Signal(), Signal(), Signal()
        f2_valid, f2_first, f2_last = Signal(), Signal(), Signal()
        nl = Signal(init=1)
        # fe_credit & nl, a register of its own (so the handoff stays one LUT of flip-flops).
        fe_go = Signal()
        emit = cur_valid & (~fe_credit | (fe_go & pe.credit))
        block_end = emit & col_last
        m.d.comb += Assert((fe_free == (~cur_valid | (col_last & ~cur_info.last))) &
                           (fe_credit == (cur_valid & col_last & cur_info.last)) &
                           (d_full == (d_count == DESC_DEPTH)),
                           "GemmEngine: a registered feeder/descriptor flag disagrees with its state")
        m.d.comb += Assert((nl == (~f1_last & ~f2_last)) & (fe_go == (fe_credit & nl)),
                           "GemmEngine: a registered feed-pipeline flag disagrees with its state")
        # Two more flags set a cycle ahead, for the loader's advance enable below: dq_ok is
        # ~nx_info.first | ~d_full (the staged block may take a descriptor slot) and stall_c is
        # l2_valid & nx_full (a staged write waits for the handoff). The enable is then one LUT of
        # flip-flops in front of its fanout (every loader register, the L0 walk, cmd.ready).
        dq_ok = Signal(init=1)
        stall_c = Signal()
        m.d.comb += Assert((dq_ok == (~nx_info.first | ~d_full)) & (stall_c == (l2_valid & nx_full)),
                           "GemmEngine: a registered loader-advance flag disagrees with its state")
        fe_go_now = fe_free | (fe_go & pe.credit)
        handoff = nx_full & fe_go_now & dq_ok
        room = ~nx_full | handoff
        # The loader stages L1 .. L2 hold together: one enable for all of them, rather than a chain
        # of "advance if the next stage is empty or advances" (which the LUT mapper keeps as one LUT
        # level per stage, each driving that stage's enables). A bubble then waits with the stall;
        # bubbles only enter at a command start, so this costs nothing while commands follow each
        # other.
        # = ~l2_valid | room: with l2_valid & nx_full, room is the handoff's condition.
        l_adv2 = ~stall_c | (fe_go_now & dq_ok)
        l_adv1m = l_adv1r = l_adv1 = l_adv2
        issue = active & l_adv1

        busy = Signal()
        m.d.comb += busy.eq(pcmd_valid | active | l1_valid | l1r_valid | l1m_valid | l2_valid | nx_full | cur_valid | pe.busy |
                            (d_count != 0) | es.o.valid | ep.busy | f1_valid | f2_valid)

        # The walk's "last" flags are registers, set a cycle ahead with their counters (each next
        # value is a compare of a register against a constant that the update only selects): the
        # L0 decisions and cmd.ready (final_issue) see flip-flops behind the loader's advance
        # enable, not a compare on top of it. A simulation Assert checks them every cycle.
        last_ent = Signal(init=int(n_ent == 1))
        last_blk = Signal()
        last_ntile = Signal()
        last_mtile = Signal()
        with m.If(active):
            m.d.comb += Assert((last_ent == (ent == n_ent - 1)) & (last_blk == (k_rem <= C)) &
                               (last_ntile == (n_rem <= C)) & (last_mtile == (m_rem <= R)),
                               "GemmEngine: a registered loader last flag disagrees with its counter")
        # The column tile's lane mask: lane j is on while more than j columns remain, one compare of
        # the n_rem register against a constant per lane (a shift and a C+1-bit decrement were a
        # 17-CARRY4 path at C = 64). It is decoded into the L1 register, whose enable is the issue
        # and whose data comes from registers only; as a register of its own, set with n_rem, its 64
        # flip-flops tripled the column-tile level's enable fanout on the path from the PE array's
        # credit.
        ntile_mask = Cat(*(n_rem > j for j in range(C)))
        rows_left = Signal(m_w)
        cols_left = Signal(n_w)
        k_left = Signal(k_w)
        m.d.comb += [
            rows_left.eq(m_rem),
            cols_left.eq(n_rem),
            k_left.eq(k_rem),
        ]
        b_row_base = b_tile_base + Mux(cmd.b_trans, kb, b_kblk)
        info = Signal(block_info)
        m.d.comb += [
            info.first.eq(k0 == 0),
            info.last.eq(last_blk),
            info.w.eq(Mux(k_left >= C, C, k_left)),
            info.a_unsigned.eq(cmd.a_unsigned),
            info.b_trans.eq(cmd.b_trans),
            info.rows_valid.eq(Mux(rows_left >= R, R, rows_left)),
            info.mask.eq(ntile_mask),
            info.mode.eq(cmd.mode),
            info.shift.eq(cmd.shift),
            info.last_tile.eq(last_mtile & last_ntile),
        ]

        # The row-table entry of the entry's row is read for every entry (harmless when unused).
        rt_row = Signal(cfg.rowtab_addr_bits)          # rowtab_base + m0
        m.d.comb += [
            self.rowtab_rd.addr.eq(rt_row + ent),
            self.rowtab_rd.en.eq(l_adv1),
        ]

        with m.If(l_adv1):
            m.d.sync += l1_valid.eq(issue)
            with m.If(issue):
                m.d.sync += [
                    l1.last_ent.eq(last_ent),
                    l1.a_en.eq(ent < R),
                    l1.b_en.eq(ent < C),
                    l1.kb0.eq(k0 == 0),
                    l1.first_ent.eq(ent == 0),
                    l1.m_idx.eq(m0 + ent),
                    l1.kb.eq(kb),
                    l1.nb.eq(nb),
                    l1.b_addr.eq(b_row_base + b_istride),
                    l1.info.eq(info),
                    l1_cmd.a_base.eq(cmd.a_base),
                    l1_cmd.a_stride.eq(cmd.a_stride),
                    l1_cmd.dst_base.eq(cmd.dst_base),
                    l1_cmd.dst_stride.eq(cmd.dst_stride),
                    l1_cmd.colp_base.eq(cmd.colp_base),
                    l1_cmd.gather.eq(cmd.gather),
                    l1_cmd.scatter.eq(cmd.scatter),
                ]

        # ---- command accept ----------------------------------------------------------------------
        # A command register in front of L0 (pcmd): cmd.ready is a register (pcmd empty) and, for a
        # sync command, the idle flag (an OR of state registers), so no path runs from the loader's
        # advance (the PE array's credit, the staging handoff) to cmd.ready or to the command's
        # decode; the
        # zero-size fix-ups and the walk's first flags are decoded into pcmd, and L0 loads from
        # registers. L0 loads the next command while it issues the current one's final entry, so
        # back-to-back commands leave no gap in the loader (this block comes after the L0 walk so
        # that its assignments win).
        p = self.cmd.payload
        p_last_blk, p_last_ntile, p_last_mtile = Signal(), Signal(), Signal()
        p_cstride = Signal(b_aw)
        m.d.comb += self.cmd.ready.eq(~pcmd_valid & (~p.sync | ~busy))
        with m.If(self.cmd.valid):
            # In simulation an oversize command trips here rather than computing a truncated one
            # (check_command refuses it earlier, where the command is built).
            m.d.comb += [
                Assert(p.m <= cfg.largest_m, "GemmEngine: command m above config.largest_m"),
                Assert(p.k <= cfg.largest_k, "GemmEngine: command k above config.largest_k"),
                Assert(p.n <= cfg.largest_n, "GemmEngine: command n above config.largest_n"),
            ]
        # A zero-sized command would never finish a block: treat 0 as 1.
        pm_ = Mux(p.m == 0, 1, p.m)
        pn_ = Mux(p.n == 0, 1, p.n)
        pk_ = Mux(p.k == 0, 1, p.k)
        # Advance ent -> block -> column tile -> row tile, and load a new command. Each level's
        # registers load under one enable (an issue that wraps the levels below it, or a command
        # start), and their next values are selected by registers only (the level's last flag, and
        # `fresh`: the step starts a command, from pcmd), so the loader's advance enable, which starts
        # at the PE array's credit, reaches the walk as flip-flop enables, never through a data
        # multiplexer. An issue that finishes the command with no command waiting loads stale pcmd
        # values into counters that the idle loader ignores (the next load sets them all).
        # fin3 = last_blk & last_ntile & last_mtile, a register loaded with the block level (those
        # flags change only then), so the command load (cmd's ~250 enables and `active`) is
        # pcmd_valid, active, last_ent, fin3 and the advance enable: two LUT levels from the credit.
        fin3 = Signal()
        with m.If(active):
            m.d.comb += Assert(fin3 == (last_blk & last_ntile & last_mtile),
                               "GemmEngine: the registered final-block flag disagrees with the last flags")
        final_issue = issue & last_ent & fin3
        load = pcmd_valid & (~active | final_issue)
        start = pcmd_valid & ~active            # a command start into an idle walk
        fresh = ~active | (last_ent & fin3)
        wrap0 = ~active | last_ent              # each level restarts: at a command start, or ...
        wrap1 = ~active | last_blk              # ... when its own last step passes
        wrap2 = ~active | last_ntile
        with m.If(issue | start):
            m.d.sync += [ent.eq(Mux(wrap0, 0, ent + 1)),
                         b_istride.eq(Mux(wrap0, 0, b_istride + cmd.b_k_stride)),
                         last_ent.eq(Mux(wrap0, int(n_ent == 1), ent == n_ent - 2))]
        with m.If((issue & last_ent) | start):
            m.d.sync += [k0.eq(Mux(wrap1, 0, k0 + C)), kb.eq(Mux(wrap1, 0, kb + 1)),
                         b_kblk.eq(Mux(wrap1, 0, b_kblk + b_cstride)),
                         k_rem.eq(Mux(wrap1, Mux(fresh, pcmd.k, cmd.k), k_rem - C)),
                         last_blk.eq(Mux(wrap1, Mux(fresh, p_last_blk, cmd.k <= C), k_rem <= 2 * C)),
                         # The three flags as the levels below set them (see there).
                         fin3.eq(Mux(fresh, p_last_blk & p_last_ntile & p_last_mtile,
                                     Mux(last_blk,
                                         (cmd.k <= C) & Mux(last_ntile, (cmd.n <= C) & (m_rem <= 2 * R),
                                                            (n_rem <= 2 * C) & last_mtile),
                                         (k_rem <= 2 * C) & last_ntile & last_mtile)))]
        with m.If((issue & last_ent & last_blk) | start):
            m.d.sync += [nb.eq(Mux(wrap2, 0, nb + 1)),
                         n_rem.eq(Mux(wrap2, Mux(fresh, pcmd.n, cmd.n), n_rem - C)),
                         last_ntile.eq(Mux(wrap2, Mux(fresh, p_last_ntile, cmd.n <= C), n_rem <= 2 * C)),
                         b_tile_base.eq(Mux(wrap2, Mux(fresh, pcmd.b_base, cmd.b_base),
                                            b_tile_base + cmd.b_tile_stride))]
        # The row tile wraps only at the command's end: its restart values are always pcmd's.
        with m.If((issue & last_ent & last_blk & last_ntile) | start):
            m.d.sync += [m0.eq(Mux(fresh, 0, m0 + R)), m_rem.eq(Mux(fresh, pcmd.m, m_rem - R)),
                         rt_row.eq(Mux(fresh, pcmd.rowtab_base, rt_row + R)),
                         last_mtile.eq(Mux(fresh, p_last_mtile, m_rem <= 2 * R))]
        with m.If(load):
            m.d.sync += [cmd.eq(pcmd), b_cstride.eq(p_cstride), active.eq(1)]
        with m.Elif(final_issue):
            m.d.sync += active.eq(0)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                pcmd.eq(p), pcmd.m.eq(pm_), pcmd.n.eq(pn_), pcmd.k.eq(pk_), pcmd_valid.eq(1),
                p_last_blk.eq(pk_ <= C), p_last_ntile.eq(pn_ <= C), p_last_mtile.eq(pm_ <= R),
                p_cstride.eq(p.b_k_stride * C),
            ]
        with m.Elif(load):
            m.d.sync += pcmd_valid.eq(0)

        # ---- L1: the row-table entry arrives; select the row indices, pre-add the offsets ---------
        entry = self.rowtab_rd.data
        with m.If(l_adv1r):
            m.d.sync += l1r_valid.eq(l1_valid)
            with m.If(l1_valid):
                m.d.sync += [
                    l1r.last_ent.eq(l1.last_ent), l1r.a_en.eq(l1.a_en), l1r.b_en.eq(l1.b_en),
                    l1r.kb0.eq(l1.kb0), l1r.first_ent.eq(l1.first_ent),
                    l1r.a_idx.eq(Mux(l1_cmd.gather, entry.token, l1.m_idx)),
                    l1r.d_idx.eq(Mux(l1_cmd.scatter, entry.token, l1.m_idx)),
                    l1r.a_stride.eq(l1_cmd.a_stride), l1r.dst_stride.eq(l1_cmd.dst_stride),
                    l1r.a_off.eq(l1_cmd.a_base + l1.kb),
                    l1r.d_off.eq(l1_cmd.dst_base + l1.nb),
                    l1r.b_addr.eq(l1.b_addr),
                    l1r.colp_addr.eq(l1_cmd.colp_base + l1.nb),
                    l1r.scale.eq(entry.scale),
                    l1r.info.eq(l1.info),
                ]

        # ---- L1R: the row products (registered operands in, registered product out) ------------
        with m.If(l_adv1m):
            m.d.sync += l1m_valid.eq(l1r_valid)
            with m.If(l1r_valid):
                m.d.sync += [
                    l1m.last_ent.eq(l1r.last_ent), l1m.a_en.eq(l1r.a_en), l1m.b_en.eq(l1r.b_en),
                    l1m.kb0.eq(l1r.kb0), l1m.first_ent.eq(l1r.first_ent),
                    # The row table is read again for every block, so a gathered row's address is
                    # recomputed each time instead of being stored per tile.
                    l1m.a_prod.eq(l1r.a_idx * l1r.a_stride),
                    l1m.d_prod.eq(l1r.d_idx * l1r.dst_stride),
                    l1m.a_off.eq(l1r.a_off), l1m.d_off.eq(l1r.d_off),
                    l1m.b_addr.eq(l1r.b_addr), l1m.colp_addr.eq(l1r.colp_addr),
                    l1m.scale.eq(l1r.scale), l1m.info.eq(l1r.info),
                ]

        # ---- L1M: read A, B and the column parameters -------------------------------------------
        m.d.comb += [
            self.a_rd.addr.eq(l1m.a_off + l1m.a_prod),
            self.a_rd.en.eq(l_adv2),
            self.b_rd.addr.eq(l1m.b_addr),
            self.b_rd.en.eq(l_adv2),
            self.colp_rd.addr.eq(l1m.colp_addr),
            self.colp_rd.en.eq(l_adv2),
        ]
        # Which staged registers the L2 entry writes, with l2_valid folded in: the write enables of
        # nx_rows, nx_info and nx_colp (about 3,600 flip-flops) are then one of these and `room`,
        # not l2_valid & room & the entry's flags behind the handoff (4 LUT levels from the PE
        # array's credit).
        l2_rows_we, l2_info_we, l2_colp_we = Signal(), Signal(), Signal()
        with m.If(l_adv2):
            m.d.sync += [l2_valid.eq(l1m_valid),
                         l2_rows_we.eq(l1m_valid & l1m.a_en & l1m.kb0),
                         l2_info_we.eq(l1m_valid & l1m.first_ent),
                         l2_colp_we.eq(l1m_valid & l1m.first_ent & l1m.kb0)]
            with m.If(l1m_valid):
                m.d.sync += [
                    l2.last_ent.eq(l1m.last_ent),
                    l2.a_en.eq(l1m.a_en),
                    l2.b_en.eq(l1m.b_en),
                    l2.kb0.eq(l1m.kb0),
                    l2.first_ent.eq(l1m.first_ent),
                    l2.row.addr.eq(l1m.d_off + l1m.d_prod),
                    l2.row.scale.eq(l1m.scale),
                    l2.info.eq(l1m.info),
                ]

        # ---- L2: write the read words into the staging block -------------------------------------
        # Entry e of a block is A word e (e < R) and B word e (e < C). While nx_full, a write can only
        # happen in the handoff cycle, and then it is the next block's: it goes to the other slot.
        l2_write = l2_valid & room
        wr_slot = w_slot ^ nx_full
        stage_a.write(m, l2_write & l2.a_en, wr_slot, w_ent, self.a_rd.data.as_value())
        stage_b.write(m, l2_write & l2.b_en, wr_slot, w_ent, self.b_rd.data.as_value())
        with m.If(l2_write):
            m.d.sync += w_ent.eq(Mux(l2.last_ent, 0, w_ent + 1))
        m.d.comb += Assert((l2_rows_we == (l2_valid & l2.a_en & l2.kb0)) &
                           (l2_info_we == (l2_valid & l2.first_ent)) &
                           (l2_colp_we == (l2_valid & l2.first_ent & l2.kb0)),
                           "GemmEngine: a registered L2 write flag disagrees with the L2 entry")
        with m.If(l2_rows_we & room):
            for i in range(R - 1):
                m.d.sync += nx_rows[i].eq(nx_rows[i + 1])
            m.d.sync += nx_rows[R - 1].eq(l2.row)
        with m.If(l2_info_we & room):
            m.d.sync += nx_info.eq(l2.info)
        with m.If(l2_colp_we & room):
            m.d.sync += nx_colp.eq(self.colp_rd.data)
        with m.If(l2_valid & room & l2.last_ent):
            m.d.sync += nx_full.eq(1)
        with m.Elif(handoff):
            m.d.sync += nx_full.eq(0)

        # ---- feeder: one reduction step per cycle into the PE array ------------------------------
        byte = numerics.ACT_BITS
        # F0: step `col` of the feeding block. A lane `col` of every A word; B word `col` (direct) or
        # lane `col` of every B word (transposed). The banks' read addresses are registers that move
        # with `col` (loaded at the handoff, stepped on emit).
        nx_b_trans = nx_info.b_trans
        a_banks = stage_a.fetch(m, r_slot, handoff, 1, emit, 1, cur_valid, col, ncol)
        b_banks = stage_b.fetch(m, r_slot, handoff, nx_b_trans, emit, cur_info.b_trans, cur_valid, col, ncol)
        f1_rows = Signal(range(R + 1))
        f1_aun = Signal()
        f1_neg = Signal.like(ncol)
        m.d.sync += [
            f1_valid.eq(emit),
            f1_first.eq(cur_info.first & (col == 0)),
            f1_last.eq(emit & fe_credit),
            f1_rows.eq(cur_info.rows_valid),
            f1_aun.eq(cur_info.a_unsigned),
            f1_neg.eq(ncol),
            nl.eq(~(emit & fe_credit) & ~f1_last),
        ]
        # F1 -> F2: output lane n = bank (n + col), a rotation by -col (f1_neg), from flip-flops.
        a_step = stage_a.rotate(a_banks, f1_neg)
        b_step = stage_b.rotate(b_banks, f1_neg)
        f2_a = Signal(R * byte, reset_less=True)
        f2_b = Signal(C * byte, reset_less=True)
        f2_rows = Signal(range(R + 1))
        f2_aun = Signal()
        m.d.sync += [
            f2_valid.eq(f1_valid), f2_first.eq(f1_first), f2_last.eq(f1_last & f1_valid),
            f2_rows.eq(f1_rows), f2_aun.eq(f1_aun),
            f2_a.eq(a_step[:R * byte]), f2_b.eq(b_step[:C * byte]),
        ]
        m.d.comb += [
            pe.i.valid.eq(f2_valid),
            pe.i.payload.a_unsigned.eq(f2_aun),
            pe.i.payload.first.eq(f2_first),
            pe.i.payload.last.eq(f2_last),
            pe.i.payload.rows_valid.eq(f2_rows),
        ]
        # The feeder's credit rule: a beat in F2 is always taken (checked at the clock edge: the
        # ready passes through the PE array's ports, which settle a delta later than the registers).
        m.d.sync += Assert(~f2_valid | pe.i.ready, "GemmEngine: the PE array refused a fed beat")
        for i in range(R):
            m.d.comb += pe.i.payload.a[i].eq(f2_a[i * byte:(i + 1) * byte])
        for c in range(C):
            m.d.comb += pe.i.payload.b[c].eq(f2_b[c * byte:(c + 1) * byte])

        fe_credit_nx = Signal()
        m.d.comb += fe_credit_nx.eq(fe_credit)
        with m.If(handoff):
            m.d.sync += [cur_valid.eq(1), col.eq(0), ncol.eq(0), cur_info.eq(nx_info), col_last.eq(nx_info.w == 1),
                         w_m2.eq(nx_info.w - 2),
                         fe_free.eq((nx_info.w == 1) & ~nx_info.last),
                         r_slot.eq(w_slot), w_slot.eq(~w_slot)]
            m.d.comb += fe_credit_nx.eq((nx_info.w == 1) & nx_info.last)
        with m.Elif(emit):
            next_last = col == w_m2
            m.d.sync += [col.eq(col + 1), ncol.eq(ncol - 1), col_last.eq(next_last),
                         fe_free.eq(next_last & ~cur_info.last)]
            m.d.comb += fe_credit_nx.eq(next_last & cur_info.last)
            with m.If(block_end):
                m.d.sync += [cur_valid.eq(0), fe_free.eq(1)]
                m.d.comb += fe_credit_nx.eq(0)
        m.d.sync += [fe_credit.eq(fe_credit_nx),
                     fe_go.eq(fe_credit_nx & ~(emit & fe_credit) & ~f1_last)]

        # ---- tile descriptors --------------------------------------------------------------------
        push = handoff & nx_info.first
        pop = Signal()
        pushed = Signal(desc_layout)
        m.d.comb += [
            pushed.colp.eq(nx_colp),
            pushed.mask.eq(nx_info.mask),
            pushed.mode.eq(nx_info.mode),
            pushed.shift.eq(nx_info.shift),
            pushed.last_tile.eq(nx_info.last_tile),
        ]
        m.d.comb += [pushed.rows[i].eq(nx_rows[i]) for i in range(R)]
        with m.If(push):
            m.d.sync += d_tail.eq(Mux(d_tail == DESC_DEPTH - 1, 0, d_tail + 1))
        # The tail slot takes `pushed` every cycle, push or not, so its ~1,200 enables hang on d_tail
        # alone and not on the handoff: the tail slot is free, or (queue full) it is the head's
        # slot, whose descriptor already sits in the `head` register and is never read again.
        with m.Switch(d_tail):
            for d in range(DESC_DEPTH):
                with m.Case(d):
                    m.d.sync += descs[d].eq(pushed)
        d_next = Signal.like(d_head)
        m.d.comb += d_next.eq(Mux(d_head == DESC_DEPTH - 1, 0, d_head + 1))
        with m.If(pop):
            m.d.sync += d_head.eq(d_next)
        m.d.sync += d_count.eq(d_count + push - pop)
        d_full_nx = Signal()
        m.d.comb += d_full_nx.eq(Mux(push & ~pop, d_count == DESC_DEPTH - 1, Mux(pop & ~push, 0, d_full)))
        m.d.sync += d_full.eq(d_full_nx)
        # The advance flags' next values (see dq_ok, stall_c).
        nx_first_nx = Mux(l2_write & l2.first_ent, l2.info.first, nx_info.first)
        nx_full_nx = Mux(l2_valid & room & l2.last_ent, 1, Mux(handoff, 0, nx_full))
        l2_valid_nx = Mux(l_adv2, l1m_valid, l2_valid)
        m.d.sync += [dq_ok.eq(~nx_first_nx | ~d_full_nx), stall_c.eq(l2_valid_nx & nx_full_nx)]

        # ---- drain: PE rows + descriptor -> epilogue ---------------------------------------------
        # The head descriptor is a register of its own (a copy of descs[d_head]), loaded when the
        # head moves or a descriptor arrives at an empty queue: the drain (the epilogue's bias add,
        # row scale and address) then starts at flip-flops, not behind the DESC_DEPTH:1 multiplexer.
        head = Signal(desc_layout, reset_less=True)
        with m.If(pop):
            with m.If(d_count == 1):
                # The queue empties unless a descriptor arrives in this cycle: then it is the head.
                m.d.sync += head.eq(pushed)
            with m.Else():
                with m.Switch(d_next):
                    for d in range(DESC_DEPTH):
                        with m.Case(d):
                            m.d.sync += head.eq(descs[d])
        with m.Elif(push & (d_count == 0)):
            m.d.sync += head.eq(pushed)
        # Each PE row leaves as cfg.epi_beats epilogue beats of epi_lanes lanes (sub 0, 1, ...): the
        # PE array's output register holds the row (stream rules) until its last beat is taken.
        L, S = cfg.epi_lanes, cfg.epi_beats
        # A skid buffer in front of the epilogue: the beat's lane chunk (acc, bias, multiplier) is
        # selected from the PE output row and the head descriptor into registers, so the
        # requantizer's bias add and multiplier select start at flip-flops, and the PE array's
        # output ready (its shadow-bank credit) reads the skid buffer's ready register. One cycle
        # more from a tile's rows to its results.
        epi = es.i
        row = head.rows[pe.o.payload.row]
        sub_last = Signal()
        m.d.comb += [
            epi.valid.eq(pe.o.valid),
            pe.o.ready.eq(epi.ready & sub_last),
            epi.payload.row_scale.eq(row.scale),
            epi.payload.shift.eq(head.shift),
            epi.payload.mode.eq(head.mode),
            epi.payload.addr.eq(row.addr),
            epi.payload.last.eq(pe.o.payload.last & head.last_tile & sub_last),
            pop.eq(pe.o.valid & pe.o.ready & pe.o.payload.last),
        ]
        if S == 1:
            m.d.comb += [sub_last.eq(1), epi.payload.acc.eq(pe.o.payload.acc),
                         epi.payload.mask.eq(head.mask)]
            for c in range(C):
                m.d.comb += [
                    epi.payload.bias[c].eq(head.colp[c].bias),
                    epi.payload.mult[c].eq(head.colp[c].mult),
                ]
        else:
            sub = Signal(range(S))
            # sub_last is a register (sub == S - 1), set a cycle ahead: it gates the PE array's
            # output ready and with it the shadow bank's row move, which fans out to every drained
            # register; a compare on sub would sit in front of that fanout.
            sub_last_r = Signal(init=int(S == 1))
            m.d.comb += [sub_last.eq(sub_last_r), epi.payload.sub.eq(sub)]
            with m.If(epi.valid & epi.ready):
                m.d.sync += [sub.eq(Mux(sub_last, 0, sub + 1)), sub_last_r.eq(~sub_last & (sub == S - 2))]
            m.d.comb += Assert(sub_last_r == (sub == S - 1),
                               "GemmEngine: the registered drain sub-beat flag disagrees with sub")
            with m.Switch(sub):
                for k in range(S):
                    with m.Case(k):
                        m.d.comb += epi.payload.mask.eq(head.mask[k * L:(k + 1) * L])
                        for j in range(L):
                            m.d.comb += [
                                epi.payload.acc[j].eq(pe.o.payload.acc[k * L + j]),
                                epi.payload.bias[j].eq(head.colp[k * L + j].bias),
                                epi.payload.mult[j].eq(head.colp[k * L + j].mult),
                            ]

        wiring.connect(m, ep.act_wr, wiring.flipped(self.act_wr))
        wiring.connect(m, ep.res_rd, wiring.flipped(self.res_rd))
        wiring.connect(m, ep.res_wr, wiring.flipped(self.res_wr))
        wiring.connect(m, ep.o, wiring.flipped(self.o))
        wiring.connect(m, ep.gelu_lut, wiring.flipped(self.gelu_lut))
        m.d.comb += [self.done.eq(ep.done), self.busy.eq(busy)]
        # pe_active is a registered pulse: the PE array's ready depends on its tile-last credit
        # (u_last, sh_left), and consumers (the MoE controller's early release into the weight
        # buffer's half state, counters) would otherwise extend that chain combinationally.
        pe_beat = Signal()
        m.d.sync += pe_beat.eq(pe.i.valid & pe.i.ready)
        m.d.comb += self.pe_active.eq(pe_beat)
        return m


class _SkewedStage:
    """Two slots of ``words`` staged words of ``lanes`` int8 lanes, read one *step* per cycle either
    as a word (``trans`` low: word ``step``) or as a column (``trans`` high: lane ``step`` of every
    word), in LUTRAM instead of registers.

    ``N`` (a power of two, at least ``words`` and ``lanes``) single-byte banks with their own read
    address. Word ``i`` is written rotated by ``i`` lanes: bank ``j`` holds lane ``(j - i) mod N`` of
    word ``i`` at address ``(slot, i)``. A step ``s`` reads bank ``j`` at ``(slot, s)`` (a word) or
    ``(slot, (j - s) mod N)`` (a column), and output lane ``n`` is bank ``(n + s) mod N``: one
    rotation by ``i`` on the write side and one by ``s`` on the read side serve both ways, with no
    bank read twice in a cycle.

    Timing: a write is registered (word, slot, index) and rotated into the banks from those registers
    a cycle later. The word is rotated by the index's two low bits on its way into its register (one
    LUT level of 4:1 multiplexers behind the memory output, whose path has the slack) and by the rest
    from the registers: the full barrel behind the index register, into the LUTRAM's data setup,
    missed 300 MHz in the W1 top. Reads are asynchronous (LUTRAM) from
    per-bank address registers, and their bytes are registered (:meth:`fetch`); the caller rotates
    the registered bytes (:meth:`rotate`). A slot may be refilled from the cycle its last step is
    read: the registered read samples the bank before any write of that cycle lands.
    """

    def __init__(self, m, name, words, lanes):
        self._n = 1 << (max(words, lanes) - 1).bit_length()
        self._name = name
        self._lanes = lanes
        self._byte = numerics.ACT_BITS
        self._banks = []
        for j in range(self._n):
            mem = memory.Memory(shape=unsigned(self._byte), depth=2 * self._n, init=[])
            m.submodules[f"{name}_bank{j}"] = mem
            self._banks.append((mem.write_port(), mem.read_port(domain="comb")))

    def rotate(self, value, amount, lo=0, hi=None):
        """``value`` (``N`` bytes) rotated left by ``amount`` lanes (lane ``l`` moves to lane
        ``l + amount``), counting only ``amount``'s bits ``lo .. hi - 1`` (default: all of them): a
        barrel of one stage per bit."""
        width = self._n * self._byte
        bits = max(1, (self._n - 1).bit_length())
        for k in range(lo, bits if hi is None else hi):
            value = Mux(amount[k], value.rotate_left((self._byte << k) % width), value)
        return value

    def write(self, m, en, slot, idx, word):
        """Write ``word`` as word ``idx`` of ``slot`` when ``en``; it lands one clock edge later than
        a plain memory write (the inputs are registered first)."""
        name = self._name
        ab = (self._n - 1).bit_length()
        w_en = Signal(name=f"{name}_wen")
        w_slot = Signal(name=f"{name}_wslot")
        w_idx = Signal(max(1, ab), name=f"{name}_widx")
        w_word = Signal(self._n * self._byte, name=f"{name}_wword", reset_less=True)
        padded = Cat(word, Const(0, (self._n - self._lanes) * self._byte)) if self._n > self._lanes \
            else word
        pre = min(2, max(1, ab))            # index bits rotated before the register
        idx_in = Signal.like(w_idx, name=f"{name}_idx")
        m.d.comb += idx_in.eq(idx)
        m.d.sync += [w_en.eq(en), w_slot.eq(slot), w_idx.eq(idx_in),
                     w_word.eq(self.rotate(padded, idx_in, 0, pre))]
        rotated = Signal(self._n * self._byte, name=f"{name}_rotated")
        m.d.comb += rotated.eq(self.rotate(w_word, w_idx, pre))
        for j, (wp, _) in enumerate(self._banks):
            m.d.comb += [wp.addr.eq(Cat(w_idx[:ab], w_slot)), wp.en.eq(w_en),
                         wp.data.eq(rotated[j * self._byte:(j + 1) * self._byte])]

    def fetch(self, m, slot, load, load_trans, adv, trans, valid, step, neg_step):
        """Read the current step of ``slot``; returns the ``N`` bank bytes (bank ``j`` in bits
        ``8j .. 8j+7``) registered, i.e. the step read in the previous cycle, not yet rotated.

        The banks' read addresses are registers: ``load`` sets them to step 0 (a column when
        ``load_trans``), ``adv`` moves them one step on (``trans`` as the current block's). In
        simulation, while ``valid``, they are checked against ``step`` and ``neg_step`` (``-step``
        modulo ``N``, a register of the caller's).
        """
        name = self._name
        n = self._n
        ab = (n - 1).bit_length()
        got = []
        for j, (_, rp) in enumerate(self._banks):
            if ab:
                # Bank j's address: step (a word) or (j - step) mod N (a column), counted with the
                # step rather than decoded from it.
                # Reset: step 0 of the reset-time addressing (a column when trans is constant).
                ra = Signal(ab, name=f"{name}_ra{j}", init=j if isinstance(trans, int) and trans else 0)
                with m.If(load):
                    m.d.sync += ra.eq(Mux(load_trans, j, 0))
                with m.Elif(adv):
                    m.d.sync += ra.eq(Mux(trans, ra - 1, ra + 1))
                # A simulation check on bank 0 only, against the caller's registers: a synthesized
                # netlist keeps checks as cells that the timing walk ends paths at, and a check per
                # bank needs an adder each (the banks' registers move alike; the bit-exact tests
                # read every bank).
                if j == 0:
                    with m.If(valid):
                        m.d.comb += Assert(ra == Mux(trans, neg_step[:ab], step[:ab]),
                                           f"GemmEngine: {name} bank 0 read address out of step")
                m.d.comb += rp.addr.eq(Cat(ra, slot))
            else:
                m.d.comb += rp.addr.eq(slot)
            q = Signal(self._byte, name=f"{name}_q{j}", reset_less=True)
            m.d.sync += q.eq(rp.data)
            got.append(q)
        return Cat(*got)
