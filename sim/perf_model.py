# amaranth: UnusedElaboratable=no
# (the model builds LayerNormUnit and SoftmaxUnit only to read their documented latencies)
"""An analytic cycle model of the accelerator: cycles per op class from sizes, routing and bandwidth.

No RTL is simulated. The model walks each unit's command schedule (the same order the RTL sequencers
issue their GEMMs and weight tiles) over three resources:

* the **GEMM engine** (:class:`_Engine`): a command of ``M x K x N`` takes
  ``ceil(M / R) * ceil(N / C) * ceil(K / C)`` *blocks* of ``max(R, C)`` cycles (``R, C`` = PE rows,
  columns; :mod:`m3vit_hw.gemm.gemm_engine`: the loader stages a block in ``max(R, C)`` cycles, a K
  tail costs the rest of its block). Back-to-back commands overlap; a command that waits for the
  engine to drain (``sync``, or one command at a time) pays the drain (:data:`DRAIN` + R) and the
  fill (:data:`FILL` + ``max(R, C)``);
* the **external memory** (:class:`_Memory`): weight tiles stream in plan order at ``bytes_per_cycle``
  (at most one beat per cycle), each into one half of the ping-pong weight/parameter buffers, so tile
  ``i`` may start only once tile ``i - 2`` released its half; an idle memory exposes its latency;
* the **row units** (LayerNorm, the attention softmax, the router): rows at one beat per cycle, with
  the per-row minimum and pipeline latencies of :mod:`m3vit_hw.rowops`.

Each ``*_cycles`` function returns a :class:`Estimate`: total ``cycles`` and a ``breakdown`` by op
class (:data:`OP_CLASSES`) whose values add up to ``cycles``: the engine's busy blocks go to the op
class of their GEMM; cycles the engine waits for weights are ``memory_stall``; the fixed pipeline
costs (fill, drain, row-unit tails) are ``idle`` unless they belong to an op (a softmax tail the engine
waits for is ``softmax``).

Constants marked *calibrated* are fixed costs (a handful of cycles per command or per layer) read off
simulations of the per-layer runners (``sim/*_layer.py``, pysim, seeds 0, ``tests/test_perf_model.py``
holds every runner to :data:`TOLERANCE`); every size-dependent term is derived from the RTL's
documented schedule. Projections of configurations nobody simulated (W1 frames, W2, bigger arrays)
are labelled ``projected`` by :func:`project_program` and :mod:`sim.perf_report`.
"""

from dataclasses import dataclass, field

__all__ = ["OP_CLASSES", "TOLERANCE", "Estimate", "gemm_blocks", "gemm_beats", "moe_cycles",
           "dense_cycles", "attention_cycles", "norm_cycles", "embed_cycles", "store_cycles",
           "gemm_instructions_cycles", "project_program", "project_frame", "routing_counts",
           "uniform_counts", "weight_minimum"]

#: Op classes of the breakdown, in the order of the paper's latency figure (plus stalls and idle).
OP_CLASSES = ("patch_embed", "layernorm", "qkv_proj", "attn_matmul", "softmax", "dense_mlp", "router",
              "experts", "store", "memory_stall", "idle")

#: The model's target accuracy against simulated cycles (the issue's 3 %).
TOLERANCE = 0.03

# ---- GEMM engine (m3vit_hw/gemm/gemm_engine.py) ---------------------------------------------------
#: Command accepted -> first reduction step: the first block is staged ``max(R, C) + 6`` cycles after
#: the command is accepted (docstring), ``FILL`` plus ``max(R, C)``.
FILL = 6      # m3vit_hw.gemm.gemm_engine.GemmEngine.LOADER_LATENCY
#: Last reduction step (the feeder's) -> results written: 2 cycles through the feed pipeline (F1, F2)
#: into the PE array, 4 cycles to the epilogue (the engine's skid buffer in front of it included),
#: the epilogue's 19-cycle latency, less two; plus the last row tile's rows, one a cycle.
DRAIN = 23
#: Calibrated on ``python -m sim.bench_gemm --rows 8 --cols 8 --epi-lanes 2|4`` (32x16x32: 334 and 560
#: cycles against 296 with a full-width epilogue; before the feed pipeline): cycles a tile waits beyond
#: the previous tile's ``rows * epi_beats`` drain when that drain is longer than its own blocks. The
#: feeder takes the PE array's credit for a tile's last step two cycles ahead of the array (the feed
#: pipeline), hence 2 more than before.
DRAIN_GAP = 4

#: Calibrated: cycles a ``sync`` boundary costs beyond the drain and the fill (command hand-off).
SYNC_EXTRA = 6

# ---- memory (sim/ext_memory.py, the weight streamers) ------------------------------------------
#: Calibrated: request -> first beat written beyond the memory's latency (arbiter, streamer, commit;
#: the arbiter's registered grant and buffered routing FIFO take one cycle more than before, its
#: per-master response skid buffer one more).
LOAD_EXTRA = 8
#: Read requests the external memory accepts ahead (``sim.ext_memory.ExternalMemory``'s default and
#: the runners' setting).
MAX_OUTSTANDING = 4

# ---- row units ------------------------------------------------------------------------------------
#: Calibrated: the NormStage's per-row minimum (cycles per row for rows of fewer beats).
NORM_MIN_ROW = 8


def _cdiv(a, b):
    return -(-int(a) // int(b))


@dataclass
class Estimate:
    """A modelled run: ``cycles`` and ``breakdown`` (op class -> cycles, summing to ``cycles``);
    ``macs``; ``weight_bytes`` streamed; ``detail`` (model internals: times of events)."""

    cycles: float
    breakdown: dict
    macs: int = 0
    weight_bytes: int = 0
    detail: dict = field(default_factory=dict)

    def __add__(self, other):
        bd = dict(self.breakdown)
        for k, v in other.breakdown.items():
            bd[k] = bd.get(k, 0) + v
        return Estimate(self.cycles + other.cycles, bd, self.macs + other.macs,
                        self.weight_bytes + other.weight_bytes)


def _blank():
    return {k: 0.0 for k in OP_CLASSES}


def gemm_blocks(config, m, k, n):
    """Blocks of an ``m x k x n`` command: ``ceil(m/R) * ceil(n/C) * ceil(k/C)``."""
    R, C = config.pe_rows, config.pe_cols
    return _cdiv(m, R) * _cdiv(n, C) * _cdiv(k, C)


def gemm_beats(config, m, k, n):
    """PE-array operand beats of a command (the RTL's ``compute_cycles``): ``ceil(m/R) * ceil(n/C) * k``."""
    return _cdiv(m, config.pe_rows) * _cdiv(n, config.pe_cols) * k


class _Engine:
    """The GEMM engine's timeline: when the PE array is busy and with which op class."""

    def __init__(self, config, t0=0.0):
        self.R, self.C = config.pe_rows, config.pe_cols
        self.L = max(self.R, self.C)
        self.cfg = config
        self.pe_end = t0          # last reduction step of the newest command
        self.written = t0         # its results written
        self.busy = _blank()
        self.wait = {}

    def run(self, ready, m, k, n, op, *, sync=False, wait="memory_stall", serial=False):
        """Issue a command that may start at ``ready``; return ``(pe_start, pe_end, written)``.

        The cycles the array waits for ``ready`` (beyond an engine that could go on at once) are
        booked to ``wait`` (the op class of what the command waited for). ``serial``: the sequencer
        issues the command only after the previous one's results are written (no hand-off cost
        beyond that)."""
        blocks = gemm_blocks(self.cfg, m, k, n)
        sync = "serial" if serial else sync
        start = self._start(ready, sync)
        ideal = self._start(float("-inf"), sync)
        if isinstance(wait, tuple):
            # ((t, class_a), class_b): the wait until the array could have started at t is class_a's.
            (t, first), wait = wait
            part = max(0.0, min(start, self._start(t, sync)) - ideal)
            self.wait[first] = self.wait.get(first, 0.0) + part
            ideal += part
        self.wait[wait] = self.wait.get(wait, 0.0) + (start - ideal)
        pe_cycles = blocks * self.L
        S = self.cfg.epi_beats
        last_rows = m - self.R * (_cdiv(m, self.R) - 1)
        if S > 1:
            # A narrow epilogue (epi_lanes < pe_cols) drains a tile's rows in S beats each; the next
            # tile's last step waits for that drain, so a tile takes max(its blocks, the previous
            # tile's drain + DRAIN_GAP).
            kb, nt, full = _cdiv(k, self.C), _cdiv(n, self.C), _cdiv(m, self.R) - 1
            pe_cycles = nt * (full * max(kb * self.L, self.R * S + DRAIN_GAP)
                              + max(kb * self.L, last_rows * S + DRAIN_GAP))
        end = start + pe_cycles
        self.busy[op] += pe_cycles
        self.pe_end = end
        # The last row tile's valid rows leave the epilogue one a cycle (masked rows are not sent),
        # or one per epi_beats cycles with a narrow epilogue.
        self.written = end + DRAIN + last_rows * S
        return start, end, self.written

    def _start(self, ready, sync):
        if sync == "serial":
            return max(ready, self.written) + FILL + self.L
        if sync:
            return max(ready, self.written + SYNC_EXTRA) + FILL + self.L
        if ready + FILL + self.L <= self.pe_end:
            return self.pe_end            # staged while the previous command computes
        return max(ready + FILL + self.L, self.pe_end)

    def breakdown(self, total, t0=0.0):
        """Busy blocks per op class, waits per class, the rest (fills, drains) ``idle``."""
        bd = _blank()
        for d in (self.busy, self.wait):
            for k, v in d.items():
                bd[k] += v
        bd["idle"] += total - t0 - sum(bd.values())
        return bd


class _Memory:
    """Weight tiles streamed in order into two halves (fluid bandwidth, latency when idle)."""

    def __init__(self, config, bytes_per_cycle, latency, t0=0.0):
        self.bw = min(float(bytes_per_cycle), config.mem_data_bytes)
        self.db = config.mem_data_bytes
        self.lat = latency
        self.free = t0
        self.released = [t0, t0]        # when each half was last released
        self.n = 0
        self.first = True
        self.bytes = 0

    def load(self, nbytes, ready=0.0, *, half=True):
        """Stream ``nbytes`` (into the next half when ``half``); return when they are written."""
        start = max(self.free, ready, self.released[self.n % 2] if half else 0.0)
        # An idle memory pays its latency; a busy one had the next requests in flight.
        lead = self.lat + LOAD_EXTRA - self.db / self.bw if start > self.free or self.first else 0.0
        self.first = False
        end = start + lead + nbytes / self.bw
        self.free = end
        self.bytes += nbytes
        if half:
            self.n += 1
        return end

    def release(self, index, t):
        """Tile ``index`` (0-based, in load order) releases its half at ``t``."""
        self.released[index % 2] = t


# ---- MoE layer (m3vit_hw/moe/moe_layer.py, reorder_controller.py) -------------------------------

#: Calibrated: router tail, last gate result -> first expert header (softmax, top-k, queue counting):
#: ``ROUTER_BASE + ROUTER_PER_EXPERT * E + ROUTER_PER_K * top_k``.
ROUTER_BASE, ROUTER_PER_EXPERT, ROUTER_PER_K = 60, 5, 10


def routing_counts(experts_of_tokens, experts):
    """``{expert: tokens}`` of the active experts from a ``[T, k]`` array of expert ids."""
    out = {}
    for row in experts_of_tokens:
        for e in row:
            out[int(e)] = out.get(int(e), 0) + 1
    return {e: out[e] for e in sorted(out) if 0 <= e < experts}


def moe_cycles(config, counts, *, tokens=None, bytes_per_cycle=16.0, latency=20):
    """One MoE layer (gate, router, experts) for routing ``counts`` = ``{expert: tokens}``.

    Parameters
    ----------
    config : AcceleratorConfig
    counts : dict of int to int
        Tokens per active expert (from the golden model's routing; idle experts absent or 0).
    tokens : int, optional
        T (default ``config.model.tokens``).
    bytes_per_cycle, latency : the external memory.
    """
    from m3vit_hw.moe.expert_layout import plan_moe
    m = config.model
    T = m.tokens if tokens is None else tokens
    R, C = config.pe_rows, config.pe_cols
    L = max(R, C)
    lay = plan_moe(config)
    mem = _Memory(config, bytes_per_cycle, latency)
    eng = _Engine(config)
    # Gate: chunks stream like tiles; each chunk's RAW GEMM (M = T, K = D, N = chunk.n) feeds the router.
    t = 0.0
    idx = 0
    gate_done = 0.0
    for g in lay.gate_tiles:
        loaded = mem.load(g.w_bytes + g.p_bytes)
        _, end, written = eng.run(loaded, T, g.k, g.n, "router", wait="memory_stall")
        mem.release(idx, end - L)
        idx += 1
        gate_done = written
    header = gate_done + ROUTER_BASE + ROUTER_PER_EXPERT * m.experts + ROUTER_PER_K * m.top_k
    macs = T * m.gate_in_dim * m.experts
    first = True
    for e in sorted(counts):
        cnt = int(counts[e])
        if cnt <= 0:
            continue
        macs += cnt * 2 * m.dim * m.expert_hidden
        for tile in lay.tiles:
            loaded = mem.load(tile.w_bytes + tile.p_bytes, ready=header if first else 0.0)
            sync = tile.kind == "fc2" and tile.n0 == 0
            # The first expert waits for the router (its header starts the first fetch).
            wait = ((header, "router"), "memory_stall") if first else "memory_stall"
            first = False
            start, end, _ = eng.run(loaded, cnt, tile.k, tile.n, "experts", sync=sync, wait=wait)
            mem.release(idx, end - L)
            idx += 1
    total = eng.written
    if first:                        # no active expert: the layer ends with the router
        total = max(total, header)
    bd = eng.breakdown(total)
    return Estimate(total, bd, macs, mem.bytes, {"header": header})


# ---- dense MLP (m3vit_hw/dense/dense_layer.py) ---------------------------------------------------

#: The GELU table: 256 entries written one per cycle (or slower, at the memory's rate).
LUT_ENTRIES = 256
#: Calibrated: start -> first request, and the sequencer's per-command hand-off.
DENSE_START = 8


def dense_cycles(config, *, tokens=None, bytes_per_cycle=16.0, latency=20, token_tile=None, lut=True):
    """One dense MLP sub-layer (fc1 GELU, fc2 residual add), one command in the engine at a time."""
    from m3vit_hw.dense.dense_layout import dense_buffer_map, plan_dense
    m = config.model
    T = m.tokens if tokens is None else tokens
    lay = plan_dense(config)
    bm = dense_buffer_map(config) if token_tile is None else None
    tt = token_tile or bm.token_tile
    mem = _Memory(config, bytes_per_cycle, latency, t0=DENSE_START)
    eng = _Engine(config)
    t_lut = mem.load(LUT_ENTRIES, half=False) if lut else DENSE_START
    if lut:
        # The table is written one entry per cycle: at most one byte per cycle however fast memory is.
        t_lut = max(t_lut, DENSE_START + latency + LUT_ENTRIES)
        mem.free = t_lut
    idx = 0
    for t0 in range(0, T, tt):
        rows = min(tt, T - t0)
        for tile in lay.tiles:
            loaded = mem.load(tile.w_bytes + tile.p_bytes)
            _, _, written = eng.run(loaded, rows, tile.k, tile.n, "dense_mlp", serial=True)
            mem.release(idx, written)
            idx += 1
    total = eng.written
    macs = 2 * T * m.dim * m.mlp_hidden
    return Estimate(total, eng.breakdown(total), macs, mem.bytes)


# ---- LayerNorm (m3vit_hw/dense/norm_stage.py) ----------------------------------------------------

#: Calibrated: rows the LayerNorm unit holds between input and output before it stops taking rows
#: (its reciprocal pipeline), and the cycles a full group of them occupies at the least.
NORM_GROUP_ROWS, NORM_GROUP_MIN = 8, 62
#: Calibrated: start -> first parameter request, and cycles a record waits after its last beat.
NORM_START, NORM_RECORD_GAP = 6, 1
#: Register stages the stage adds around the LayerNorm unit (the beats' skid buffer, the registered
#: activation write port): cycles on the stage's tail.
NORM_STAGE_REGS = 2


def norm_cycles(config, *, tokens=None, bytes_per_cycle=16.0, latency=20):
    """One LayerNorm stage: ``D / lanes`` parameter records fetched, then ``T`` rows of ``D / lanes``
    beats at one beat per cycle, short rows grouped (at most :data:`NORM_GROUP_ROWS` in flight), plus
    the unit's row latency."""
    from m3vit_hw.rowops.layernorm import LayerNormUnit
    m = config.model
    T = m.tokens if tokens is None else tokens
    lanes = config.norm_lanes
    nrec = m.dim // lanes
    rec = config.norm_record_bytes
    db = config.mem_data_bytes
    bw = min(float(bytes_per_cycle), db)
    beats = rec // db
    # Records are one request each; the memory accepts MAX_OUTSTANDING requests ahead, so past the
    # first few the request round trip (latency) can bound the record rate.
    per_rec = max(beats + NORM_RECORD_GAP, rec / bw)
    first = min(nrec, MAX_OUTSTANDING)
    fetch = (NORM_START + latency + first * per_rec
             + (nrec - first) * max(per_rec, (latency + LOAD_EXTRA) / MAX_OUTSTANDING)
             - db / bw)               # the memory's token bucket starts with one beat of credit
    R = m.dim // lanes
    bubble = max(0, NORM_GROUP_MIN - NORM_GROUP_ROWS * R) * (_cdiv(T, NORM_GROUP_ROWS) - 1)
    rows = T * R + bubble
    tail = LayerNormUnit(m.dim, lanes).row_latency + NORM_STAGE_REGS
    total = fetch + rows + tail
    bd = _blank()
    bd["layernorm"] = rows + tail
    bd["memory_stall"] = fetch
    return Estimate(total, bd, 0, nrec * rec)


#: Calibrated on the encoder top's STORE DMA (tiny and W1 reduced frames): fixed cycles, and cycles per
#: residual word ``1 + STORE_PER_BYTE_BEAT * (2 C / data_bytes)``.
STORE_FIXED, STORE_PER_BYTE_BEAT = 60, 2


def store_cycles(config, *, tokens=None, bytes_per_cycle=16.0, latency=20):
    """The STORE of the residual rows to external memory (:class:`~m3vit_hw.encoder.store.StoreDma`):
    one residual word every ``1 + 2 * (2 C / data_bytes)`` cycles (measured on the encoder top), or the
    write bandwidth if lower."""
    m = config.model
    T = m.tokens if tokens is None else tokens
    words = T * config.row_words
    db = config.mem_data_bytes
    per_word = 1 + STORE_PER_BYTE_BEAT * 2 * config.pe_cols / db
    bw = min(float(bytes_per_cycle), db)
    total = STORE_FIXED + max(words * per_word, words * 2 * config.pe_cols / bw)
    bd = _blank()
    bd["store"] = total
    return Estimate(total, bd, 0, 0)


#: Calibrated on the encoder top: cycles a ``GEMM`` instruction with ``wait`` costs beyond its fetch
#: and compute (the sequencer's dispatch after every unit is idle, the executor's queues).
EXEC_WAIT = 131


def gemm_instructions_cycles(config, insns, *, bytes_per_cycle=16.0, latency=20):
    """A run of ``GEMM`` instructions on the encoder's :class:`~m3vit_hw.encoder.gemm_exec.GemmExecutor`
    (``insns``: ``[(fields, wait)]``): one command in the engine at a time; a tile's weights are
    fetched as soon as its instruction is dispatched (an instruction with ``wait`` only once every
    unit is idle) into the half the tile before the previous one released; a GELU8 instruction with
    a new ``lut_addr`` loads the 256-entry table first."""
    mem = _Memory(config, bytes_per_cycle, latency)
    eng = _Engine(config)
    lut = None
    macs = 0
    idle_at = 0.0
    for i, (f, wait) in enumerate(insns):
        m_, k_, n_ = f["m"], f["k"], f["n"]
        C = config.pe_cols
        panels = _cdiv(n_, C)
        db = config.mem_data_bytes
        nbytes = (_cdiv(panels * k_ * C, db) + _cdiv(panels * config.param_word_bytes, db)) * db
        dispatch = eng.written + EXEC_WAIT if wait else 0.0
        if wait:
            mem.free = max(mem.free, dispatch)
        loaded = mem.load(nbytes, ready=dispatch)
        ready = loaded
        if f.get("mode") == 2 and f.get("lut_addr") != lut:        # EpilogueMode.GELU8
            lut = f.get("lut_addr")
            ready = max(ready, max(dispatch, eng.written) + latency + LUT_ENTRIES)
        _, _, written = eng.run(ready, m_, k_, n_, "dense_mlp", serial=True)
        mem.release(i, written)
        macs += m_ * k_ * n_
    total = eng.written
    return Estimate(total, eng.breakdown(total), macs, mem.bytes)


# ---- attention sub-layer (m3vit_hw/attention/attention_layer.py, score_path.py) ----------------

#: Calibrated: score path, QK^T results written -> first row into the softmax (slot hand-over,
#: read-ahead with its registered output, the skid buffer at the softmax input), and last e8 row
#: out -> the AV command may start (through the sequencer's command register).
SCORE_IN, SCORE_OUT = 8, 5

#: Cycles from the attention start until its first weight fetch may go, beyond a memory's own
#: latency: the sequencer derives its plan constants from the registered shape first (``plan_wait``
#: in attn_sequencer.py; ``first_ok`` one cycle later since the qk multiply left the instruction
#: payload).
ATTN_PLAN = 1


def attention_cycles(config, *, tokens=None, bytes_per_cycle=16.0, latency=20):
    """One attention sub-layer ``x + proj(attn(h))`` (QKV per head, query tiles of ``q_tile`` rows:
    ``QK^T`` -> softmax -> ``AV``, the projection), in the sequencer's issue order."""
    from m3vit_hw.attention.attn_layout import plan_attention
    from m3vit_hw.rowops.softmax import SoftmaxUnit
    m = config.model
    T = m.tokens if tokens is None else tokens
    R, C = config.pe_rows, config.pe_cols
    Lb = max(R, C)
    H, hd = m.heads, m.head_dim
    lay = plan_attention(config)
    mem = _Memory(config, bytes_per_cycle, latency, t0=ATTN_PLAN)
    eng = _Engine(config)
    sm = SoftmaxUnit(lanes=config.attn_softmax_lanes, max_length=config.token_capacity)
    row_beats = max(_cdiv(T, config.attn_softmax_lanes), sm.min_row_beats)
    sm_lat = sm.row_latency(T)
    qt = config.q_tile
    ntile = _cdiv(T, qt)
    tiles = list(lay.tiles)
    loads = [None] * len(tiles)
    nload = [0]
    busy_sm = [0.0]

    def weights(i):
        # Tiles stream in plan order, each into the half its predecessor-but-one released.
        while nload[0] <= i:
            t = tiles[nload[0]]
            loads[nload[0]] = mem.load(t.w_bytes + t.p_bytes)
            nload[0] += 1
        return loads[i]

    def gemm(ready, mm, kk, nn, op, sync=False, tile=None, wait="memory_stall"):
        out = eng.run(ready, mm, kk, nn, op, sync=sync, wait=wait)
        if tile is not None:
            mem.release(tile, out[2])
        return out

    by_head = {}
    for i, t in enumerate(tiles):
        by_head.setdefault((t.kind, t.head), []).append(i)
    qkv_tiles = lambda h, part: [i for i in by_head.get(("qkv", h), []) if tiles[i].part == part]

    def run_qkv(h, part):
        for i in qkv_tiles(h, part):
            t = tiles[i]
            gemm(weights(i), T, t.k, t.n, "qkv_proj", tile=i)

    run_qkv(0, "qk")
    run_qkv(0, "v")
    sm_free = 0.0            # softmax input side free
    for h in range(H):
        rows = [min(qt, T - j * qt) for j in range(ntile)]
        qk_written = [0.0] * ntile
        sm_done = [0.0] * ntile
        sm_in_end = [0.0] * ntile
        av_written = [0.0] * ntile

        def qk(j):
            # A score slot is free once the softmax read tile j - 2 out.
            ready = sm_in_end[j - 2] if j >= 2 else 0.0
            _, _, qk_written[j] = gemm(ready, rows[j], hd, T, "attn_matmul", sync=(j == 0),
                                       wait="softmax")
            nonlocal_sm(j)

        def nonlocal_sm(j):
            nonlocal sm_free
            e8_free = av_written[j - 2] if j >= 2 else 0.0
            s = max(qk_written[j] + SCORE_IN, sm_free, e8_free)
            sm_in_end[j] = s + rows[j] * row_beats
            sm_free = sm_in_end[j]
            sm_done[j] = sm_in_end[j] + sm_lat
            busy_sm[0] += rows[j] * row_beats + sm_lat

        def av(j):
            _, _, av_written[j] = gemm(sm_done[j] + SCORE_OUT, rows[j], T, hd, "attn_matmul",
                                       wait="softmax")

        qk(0)
        if ntile > 1:
            qk(1)
        for j in range(ntile):
            if j + 2 < ntile:
                av(j)
                qk(j + 2)
            else:
                if j == ntile - 1 and h + 1 < H:
                    run_qkv(h + 1, "qk")
                av(j)
        if h + 1 < H:
            run_qkv(h + 1, "v")
    for i, t in enumerate(tiles):
        if t.kind == "proj":
            gemm(weights(i), T, t.k, t.n, "qkv_proj", sync=(t.n0 == 0), tile=i)
    total = eng.written
    bd = eng.breakdown(total)
    macs = T * m.dim * 3 * m.dim + 2 * H * T * T * hd + T * m.dim * m.dim
    return Estimate(total, bd, macs, mem.bytes)


# ---- patch embedding (m3vit_hw/dense/patch_embed.py, patch_loader.py) --------------------------

#: Calibrated: loader cycles per image run (``p * Cin`` contiguous bytes): ``EMBED_RUN[0] +
#: EMBED_RUN[1] * (aligned beats covering the run) + EMBED_RUN[2] * (run bytes / gearbox bytes a
#: cycle)``, the gearbox moving ``min(pe_cols, data_bytes) / 2`` bytes a cycle. Read from the four
#: ``patch-embed`` cases of tests/test_perf_model.py with the loader's response skid buffer and five
#: run descriptors in flight (was (2.9, 2.9, 0.31) with four and no skid).
EMBED_RUN = (3.5, 2.1, 0.31)
#: Cycles from a loader command's last packed word to its ``done`` (the registered write port).
EMBED_LOAD_DONE = 1


def embed_cycles(config, *, bytes_per_cycle=16.0, latency=20, patch_tile=None, img_base=0):
    """The patch embedding: residual initialisation (cls + position rows), patch tiles unfolded by the
    loader into two slots, per patch tile the plan's RESADD GEMMs, one command at a time."""
    from m3vit_hw.dense.embed_layout import embed_buffer_map, plan_embed
    m = config.model
    lay = plan_embed(config)
    bm = embed_buffer_map(config, patch_tile=patch_tile)
    db = config.mem_data_bytes
    bw = min(float(bytes_per_cycle), db)
    p, cin = m.patch_size, m.in_chans
    run = p * cin
    gb = max(1, min(config.pe_cols, db) // 2)
    W = m.img_size[1]
    # Beats that cross the port per patch row (whole aligned beats covering each run).
    beats = 0
    runs = 0
    for py in range(m.img_size[0] // p):
        for px in range(W // p):
            for kh in range(p):
                a = img_base + ((py * p + kh) * W + px * p) * cin
                beats += (a + run - 1) // db - a // db + 1
                runs += 1
    npatch = m.patches
    img_bytes_per_patch = beats * db / npatch
    init_bytes = m.tokens * config.row_words * lay.res_record_bytes
    eng = _Engine(config)
    # Residual initialisation and the first patches share the memory from the start.
    init_end = latency + LOAD_EXTRA + init_bytes / bw
    per_patch = p * (EMBED_RUN[0] + EMBED_RUN[1] * beats / runs + EMBED_RUN[2] * run / gb)
    tile_rows = [min(bm.patch_tile, npatch - j) for j in range(0, npatch, bm.patch_tile)]
    first_weights = sum(t.w_bytes + t.p_bytes for t in lay.tiles[:2])
    loader_free = latency + LOAD_EXTRA
    slot_free = [0.0, 0.0]
    mem = _Memory(config, bytes_per_cycle, latency)
    mem_bytes = init_bytes
    for j, rows in enumerate(tile_rows):
        s = max(loader_free, slot_free[j % 2])
        mem_bytes += rows * img_bytes_per_patch + (first_weights if j == 0 else 0)
        # Loader-bound, or memory-bound over what is fetched before this tile's first GEMM (the
        # residual init, the patches and, for the first tile, the first weight tiles).
        ready = max(s + rows * per_patch + EMBED_LOAD_DONE, latency + LOAD_EXTRA + mem_bytes / bw)
        loader_free = ready
        if j == 0:
            ready = max(ready, init_end)
        for t in lay.tiles:
            # The plan's weight tiles stream once per patch tile through the ping-pong halves.
            loaded = mem.load(t.w_bytes + t.p_bytes)
            _, _, written = eng.run(max(ready, loaded), rows, t.k, t.n, "patch_embed", serial=True)
            mem.release(mem.n - 1, written)
        slot_free[j % 2] = eng.written
    total = eng.written
    bd = eng.breakdown(total)
    macs = npatch * m.patch_dim * m.dim
    # Weight bytes: the plan's tiles, once per patch tile (the image and the residual init are data).
    return Estimate(total, bd, macs, int(mem.bytes))


# ---- whole frames: a compiled program's instructions ----------------------------------------

def uniform_counts(config, tokens=None):
    """Routing with every expert equally loaded (``T * k`` assignments spread over E experts): the
    projection's routing when no golden routing is given."""
    m = config.model
    T = m.tokens if tokens is None else tokens
    total = T * m.top_k
    return {e: total // m.experts + (1 if e < total % m.experts else 0) for e in range(m.experts)}


def project_program(program, *, routing=None, bytes_per_cycle=16.0, latency=20):
    """Projected cycles of one frame: the sum over ``program.instructions`` (a compiled
    :class:`~m3vit_hw.control.compiler.Program`), one unit at a time (every non-GEMM instruction the
    compiler emits carries ``wait``, and a change of unit waits for every unit to be idle); a block's
    ``GEMM`` instructions (only the first with ``wait``) are modelled together on the encoder's GEMM
    executor (:func:`gemm_instructions_cycles`).

    Parameters
    ----------
    routing : dict of int to dict, optional
        Block index -> ``{expert: tokens}`` (the golden model's routing for the frame and task); a
        MoE block without an entry gets :func:`uniform_counts`.

    Returns
    -------
    dict
        ``cycles``, ``breakdown`` (op class -> cycles), ``macs``, ``weight_bytes_fetched``, ``ops``
        (one entry per modelled instruction: ``op``, ``block``, ``cycles``), ``routing`` (``golden`` /
        ``uniform`` per MoE block) and ``projected: True`` (no RTL ran).
    """
    from m3vit_hw.control.isa import Opcode
    cfg = program.model_config
    kw = dict(bytes_per_cycle=bytes_per_cycle, latency=latency)
    total = Estimate(0.0, _blank())
    ops, used = [], {}
    block = -1
    insns = program.instructions
    i = -1
    while i + 1 < len(insns):
        i += 1
        op, fields, wait = insns[i]
        est = None
        if op == Opcode.LOAD_IMAGE:
            est = embed_cycles(cfg, **kw)
        elif op == Opcode.LAYERNORM:
            est = norm_cycles(cfg, tokens=fields["tokens"], **kw)
        elif op == Opcode.ATTENTION:
            block += 1
            est = attention_cycles(cfg, tokens=fields["tokens"], **kw)
        elif op == Opcode.MOE:
            counts = (routing or {}).get(block)
            used[block] = "golden" if counts is not None else "uniform"
            if counts is None:
                counts = uniform_counts(cfg, fields["tokens"])
            est = moe_cycles(cfg, counts, tokens=fields["tokens"], **kw)
        elif op == Opcode.GEMM:
            run = [(fields, wait)]
            while i + 1 < len(insns) and insns[i + 1][0] == Opcode.GEMM:
                i += 1
                run.append((insns[i][1], insns[i][2]))
            est = gemm_instructions_cycles(cfg, run, **kw)
        elif op == Opcode.STORE:
            est = store_cycles(cfg, **kw)
        if est is None:
            continue
        total = total + est
        ops.append({"op": op.name, "block": block,
                    "cycles": round(est.cycles, 1)})
    return {"cycles": round(total.cycles, 1), "breakdown": {k: round(v, 1) for k, v in total.breakdown.items()},
            "macs": int(total.macs), "weight_bytes_fetched": int(total.weight_bytes), "ops": ops,
            "routing": used, "projected": True,
            "mem_bytes_per_cycle": bytes_per_cycle, "latency": latency}


def project_frame(config, *, task=0, seed=0, routing="golden", bytes_per_cycle=16.0, latency=20):
    """Compile ``config``'s model with random parameters (:func:`reference.random_qparams.random_quantized`,
    ``seed``) and project one frame of ``task`` (:func:`project_program`). ``routing="golden"`` runs the
    integer golden model on a random image for the per-block expert counts; ``"uniform"`` spreads the
    tokens evenly. The result also has ``config`` (array, preset) and ``weight_bytes_minimum``."""
    import numpy as np
    from m3vit_hw.control.compiler import compile_model
    from reference.random_qparams import random_quantized
    if routing not in ("golden", "uniform"):
        raise ValueError(f"routing must be 'golden' or 'uniform', not {routing!r}")
    m = config.model
    if not 0 <= task < m.num_tasks:
        raise ValueError(f"task must be in [0, {m.num_tasks - 1}], not {task}")
    qm = random_quantized(m, seed)
    program = compile_model(config, qm)
    counts = None
    if routing == "golden":
        from reference import golden_model
        H, W = m.img_size
        img = np.random.default_rng(seed).integers(0, 256, (H, W, m.in_chans)).astype(np.int64)
        inter = golden_model.encode(qm, img.transpose(2, 0, 1) - 128, task, q_tile=config.q_tile,
                                    return_intermediates=True)
        counts = {b: routing_counts(r["experts"], m.experts) for b, r in inter["routing"].items()}
    out = project_program(program, routing=counts, bytes_per_cycle=bytes_per_cycle, latency=latency)
    out["weight_bytes_minimum"] = weight_minimum(program.model_config, counts)
    out["config"] = {"model": m.name, "pe_rows": config.pe_rows, "pe_cols": config.pe_cols,
                     "tokens": m.tokens, "task": task, "seed": seed, "routing": routing,
                     "clock_mhz": config.clock_mhz}
    out["peak_mac_per_cycle"] = config.macs_per_cycle
    return out


def weight_minimum(cfg, counts):
    """Bytes every weight and parameter of one frame needs to cross the port at least once (each
    active expert once per layer, the task's gate record, one copy of everything else)."""
    from m3vit_hw.attention.attn_layout import plan_attention
    from m3vit_hw.dense.dense_layout import plan_dense
    from m3vit_hw.dense.embed_layout import plan_embed
    from m3vit_hw.moe.expert_layout import plan_moe
    m = cfg.model
    total = sum(t.w_bytes + t.p_bytes for t in plan_embed(cfg).tiles)
    attn = plan_attention(cfg).image_bytes
    ln = 2 * (m.dim // cfg.norm_lanes) * cfg.norm_record_bytes
    dense = sum(t.w_bytes + t.p_bytes for t in plan_dense(cfg).tiles) if m.mlp_hidden else 0
    moe = plan_moe(cfg)
    for b in range(m.depth):
        total += attn + ln
        if m.is_moe(b):
            active = (counts or {}).get(b) or uniform_counts(cfg)
            total += moe.gate_bytes + sum(moe.weight_bytes(e) for e, c in active.items() if c)
        else:
            total += dense
    return int(total)
