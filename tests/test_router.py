# amaranth: UnusedElaboratable=no
"""Router (logit bias, softmax, top-k after the gate GEMM) against reference/golden.py.

The input is the gate GEMM's RAW beat stream exactly as the GemmEngine emits it (row tiles, then
column tiles, then rows), computed from ``golden.matmul``; the oracle is ``golden.router_logits`` +
``router_probs`` + ``topk``. Every stream has random stalls.
"""

import time

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Const, Elaboratable, Module, Mux
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw import numerics
from m3vit_hw.gemm.epilogue import StreamOutLayout
from m3vit_hw.moe.router import Router, RouterOutLayout
from reference import golden
from sim.moe_layer import moe_config
from sim.moe_workload import make_moe_workload
from sim.testbench import Stalls, run_until_done, stream_get, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


class _Bench(Elaboratable):
    """A Router whose ``bias_rd`` reads a small bias memory (the layer's parameter buffer stand-in).

    While ``drained`` is high the port returns junk, as in the MoE layer, where the parameter buffer's
    read port goes back to the GEMM engine as soon as the router has drained: a router that still used
    the bias data after raising ``drained`` would produce wrong probabilities.
    """

    def __init__(self, cfg, bias_words):
        self.router = Router(cfg)
        # At least two words, so the address is as wide as the router's (1 bit for E <= pe_cols).
        self.bias = memory.Memory(shape=data.ArrayLayout(numerics.ACC_BITS, cfg.pe_cols),
                                  depth=max(2, len(bias_words)), init=bias_words)

    def elaborate(self, platform):
        m = Module()
        m.submodules.router = self.router
        m.submodules.bias = self.bias
        rp = self.bias.read_port()
        bias_rd = self.router.bias_rd
        junk = Const(0x5A5A5A5A, 32)
        m.d.comb += [rp.addr.eq(bias_rd.addr), rp.en.eq(bias_rd.en)]
        for j in range(len(bias_rd.data)):
            m.d.comb += bias_rd.data[j].eq(Mux(self.router.drained, junk, rp.data[j]))
        return m


def _chunk_spans(cfg):
    """``(first column, columns)`` of every gate chunk (``config.gate_chunks``)."""
    C, E = cfg.pe_cols, cfg.model.experts
    spans, first = [], 0
    for count in cfg.gate_chunks:
        spans.append((first * C, min(E, (first + count) * C) - first * C))
        first += count
    return spans


def _engine_beats(logits, R, C):
    """RAW beats of one GEMM in the engine's order: for row tile: for column tile: for row."""
    T, E = logits.shape
    nbs = -(-E // C)
    beats = []
    for m0 in range(0, T, R):
        for nb in range(nbs):
            for r in range(m0, min(T, m0 + R)):
                lanes = [int(v) for v in logits[r, nb * C:(nb + 1) * C]] + [0] * C
                beats.append({"data": lanes[:C], "addr": 0, "mask": 0,
                              "last": 0})
    if beats:
        beats[-1]["last"] = 1
    return beats


def _bias_words(bias, C):
    nbs = -(-len(bias) // C)
    padded = np.zeros(nbs * C, dtype=np.int64)
    padded[:len(bias)] = bias
    return [[int(v) & 0xFFFFFFFF for v in padded[w * C:(w + 1) * C]] for w in range(nbs)]


def _run(cfg, layers, *, stall=0.3, seed=0):
    """Run several layers ``[(h, w_gate, task_bias, c_mult, c_shift)]`` through one Router, each as
    its gate chunks' GEMMs one after the other (the bias memory holds the current chunk's words and
    is rewritten between chunks, as the parameter half is in the MoE layer); return [[(experts,
    weights, last)] per token] per layer and the wall time of the simulation."""
    C, R = cfg.pe_cols, cfg.pe_rows
    spans = _chunk_spans(cfg)
    bench = _Bench(cfg, [[0] * C] * max(cfg.gate_chunks))
    dut = bench.router
    results = []

    async def feeder(ctx):
        for li, (h, w, bias, c_mult, c_shift) in enumerate(layers):
            logits = golden.matmul(h, w)
            await stream_put(ctx, dut.cmd, {"tokens": h.shape[0], "c_mult": c_mult, "c_shift": c_shift},
                             stalls=Stalls(stall, seed + li))
            st = Stalls(stall, seed + 100 + li)
            for n0, n in spans:
                for a, word in enumerate(_bias_words(bias[n0:n0 + n], C)):
                    ctx.set(bench.bias.data[a], word)
                for b in _engine_beats(logits[:, n0:n0 + n], R, C):
                    await stream_put(ctx, dut.i, b, stalls=st)
                # The next chunk's bias may only be written once this chunk stopped reading it.
                await ctx.tick().until(dut.drained)
                # Junk in the bias memory between chunks: a router that read it now would be wrong.
                for a in range(max(cfg.gate_chunks)):
                    ctx.set(bench.bias.data[a], [0x7F00FF00] * C)

    async def drain(ctx):
        st = Stalls(stall, seed + 1000)
        for h, *_rest in layers:
            got = []
            for _ in range(h.shape[0]):
                p = await stream_get(ctx, dut.o, stalls=st)
                got.append(([int(x) for x in p.experts], [int(x) for x in p.weights], int(p.last)))
            results.append(got)
        # Nothing extra may come out.
        for _ in range(40):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "Router: an extra output beat after the last token"
        assert not ctx.get(dut.busy), "Router: still busy after the last token"

    t0 = time.time()
    run_until_done(bench, [feeder, drain], max_cycles=20000)
    return results, time.time() - t0


def _check(layers, results, k):
    assert len(results) == len(layers), f"Router: {len(results)} layers came out, expected {len(layers)}"
    for li, ((h, w, bias, c_mult, c_shift), got) in enumerate(zip(layers, results)):
        logits = golden.router_logits(h, w, bias)
        probs = golden.router_probs(logits, c_mult, c_shift)
        top = golden.topk(logits, k)
        T = h.shape[0]
        assert len(got) == T, f"Router layer {li}: {len(got)} tokens out, expected {T}"
        for t in range(T):
            want_e = [int(e) for e in top[t]]
            want_w = [int(probs[t, e]) for e in top[t]]
            ge, gw, gl = got[t]
            assert ge == want_e, f"Router layer {li} token {t} experts: expected {want_e}, got {ge}"
            assert gw == want_w, f"Router layer {li} token {t} weights: expected {want_w}, got {gw}"
            assert gl == int(t == T - 1), f"Router layer {li} token {t}: last={gl}"


def _layer(E, k, D, T, seed, skew="none", task=0):
    wl = make_moe_workload(E, k, D, 2 * D, T, tasks=2, seed=seed, skew=skew)
    q = wl["qmoe"]
    return (wl["h"], q.gates[task], q.task_bias[task], q.router_c_mult[task], q.router_c_shift[task])


@pytest.mark.parametrize("E, k, T, rows", [(1, 1, 5, 4), (2, 2, 9, 4), (3, 2, 7, 4), (16, 4, 10, 4),
                                           (64, 2, 6, 4), (5, 3, 11, 2)])
def test_matches_golden_with_stalls(E, k, T, rows):
    """Random logits (and an uneven last row tile), two back-to-back layers of different tasks."""
    cfg = moe_config(experts=E, top_k=k, dim=16, hidden=32, tokens=max(T, 12), pe_rows=rows, pe_cols=4)
    layers = [_layer(E, k, 16, T, seed=E * 10 + k), _layer(E, k, 16, T - 1, seed=E + 1, task=1)]
    results, secs = _run(cfg, layers)
    _check(layers, results, k)
    print(f"Router E={E} k={k}: {T}+{T - 1} tokens bit-exact ({secs:.1f} s)")


@pytest.mark.parametrize("E, chunk_words, T, rows", [(64, 4, 9, 4), (13, 2, 7, 2), (9, 2, 5, 4)])
def test_gate_chunks_match_golden_with_stalls(E, chunk_words, T, rows):
    """The gate in several N-chunks (a parameter half of ``chunk_words`` words bounds a chunk): the
    router assembles each token's logit row from the chunks, biasing each with its own words."""
    cfg = moe_config(experts=E, top_k=2, dim=16, hidden=32, tokens=max(T, 12), pe_rows=rows,
                     pe_cols=4).with_(param_buffer_words=2 * chunk_words)
    assert len(cfg.gate_chunks) > 1, cfg.gate_chunks
    layers = [_layer(E, 2, 16, T, seed=E + 7, skew="hot"), _layer(E, 2, 16, T - 2, seed=E, task=1)]
    results, secs = _run(cfg, layers)
    _check(layers, results, 2)
    print(f"Router E={E} in {len(cfg.gate_chunks)} chunks {cfg.gate_chunks}: {T}+{T - 2} tokens "
          f"bit-exact ({secs:.1f} s)")


@pytest.mark.parametrize("skew", ["hot", "sparse"])
def test_task_bias_skews(skew):
    """Large task biases (+2**24 on one expert, -2**24 on all but k) dominate the logits."""
    cfg = moe_config(experts=8, top_k=2, dim=16, hidden=32, tokens=8, pe_cols=4)
    layers = [_layer(8, 2, 16, 8, seed=3, skew=skew)]
    results, _ = _run(cfg, layers)
    _check(layers, results, 2)


def test_ties_and_extremes():
    """All-equal logits (ties go to the lowest index, equal probabilities), and the int32 extremes."""
    E, k, D, T = 6, 3, 16, 6
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=32, tokens=T, pe_cols=4)
    h = np.zeros((T, D), dtype=np.int64)
    h[1:] = 1
    h[3] = 127
    h[4] = -128
    w = np.zeros((D, E), dtype=np.int64)
    w[:, 2] = 127
    w[:, 5] = -127
    w[0, 1] = 127
    # Token 0: all logits 0 (full tie). Token 3: 127*127*16 on expert 2, etc. A bias pushes a logit
    # near the int32 extremes without leaving them.
    bias = np.array([0, 0, 0, (1 << 31) - 1 - 127 * 127 * D, 0, -(1 << 31) + 128 * 127 * D])
    layers = [(h, w, bias, 40000, 20), (h, w, np.zeros(E, dtype=np.int64), 65535, 0)]
    results, _ = _run(cfg, layers, stall=0.2)
    _check(layers, results, k)


def test_throughput_router_rows():
    """No stalls: tokens leave at the softmax's pace (one per max(ceil(E/C), divider period) cycles)."""
    E, k, T = 16, 2, 16
    cfg = moe_config(experts=E, top_k=k, dim=16, hidden=32, tokens=T, pe_cols=4)
    assert cfg.gate_chunks == (4,)
    bench = _Bench(cfg, _bias_words(np.zeros(E), 4))
    dut = router = bench.router
    layer = _layer(E, k, 16, T, seed=5)
    logits = golden.matmul(layer[0], layer[1])
    stamps = []

    async def feeder(ctx):
        await stream_put(ctx, dut.cmd, {"tokens": T, "c_mult": layer[3], "c_shift": layer[4]})
        for b in _engine_beats(logits, cfg.pe_rows, 4):
            await stream_put(ctx, dut.i, b)

    async def drain(ctx):
        ctx.set(dut.o.ready, 1)
        cyc = 0
        while len(stamps) < T:
            await ctx.tick()
            cyc += 1
            if ctx.get(dut.o.valid):
                stamps.append(cyc)
    run_until_done(bench, [feeder, drain], max_cycles=5000)
    per_token = (stamps[-1] - stamps[0]) / (T - 1)
    pace = max(-(-E // 4), router.softmax.min_row_beats)
    print(f"Router E={E}: {per_token:.2f} cycles/token in steady state (softmax pace {pace})")
    assert per_token <= pace + 0.5


def test_verilog_and_embedding():
    """Converts alone, and embeds in another design through wiring.connect."""
    cfg = moe_config(experts=5, top_k=2, dim=16, hidden=32, tokens=8, pe_cols=4)
    assert "module router" in verilog.convert(Router(cfg), name="router")

    class Outer(wiring.Component):
        def __init__(self):
            self.router = Router(cfg)
            super().__init__({
                "cmd": In(self.router.cmd.signature.flip()),
                "beats": In(stream.Signature(StreamOutLayout(4, cfg.dst_addr_bits))),
                "o": Out(stream.Signature(RouterOutLayout(cfg))),
            })

        def elaborate(self, platform):
            m = Module()
            m.submodules.router = self.router
            m.submodules.bias = bias = memory.Memory(shape=data.ArrayLayout(32, 4), depth=2, init=[])
            wiring.connect(m, wiring.flipped(self.cmd), self.router.cmd)
            wiring.connect(m, wiring.flipped(self.beats), self.router.i)
            wiring.connect(m, self.router.o, wiring.flipped(self.o))
            wiring.connect(m, self.router.bias_rd, bias.read_port())
            return m

    assert "module outer" in verilog.convert(Outer(), name="outer")


def test_bad_config():
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig, not 3"):
        Router(3)
