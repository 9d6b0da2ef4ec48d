# amaranth: UnusedElaboratable=no
"""ExpertQueues against reference.golden.expert_queues: skewed and idle experts, E=1, top_k=E, stalls."""

import gc

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment

from m3vit_hw.moe.expert_queues import ExpertQueues
from m3vit_hw.config import AcceleratorConfig
from reference import golden
from sim.testbench import EmbeddingHarness, run_until_done, Stalls, stream_get, stream_put

# Interface and parameter tests build units they never elaborate.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _routing(tokens, experts, top_k, rng, skew=None):
    """Top-k ids and Q0.15 combine weights from the golden router on random logits.

    ``skew`` (a list of experts) adds a large bias to those experts so they take every token.
    """
    logits = rng.integers(-3000, 3000, (tokens, experts))
    if skew is not None:
        logits[:, skew] += 100000
    top_idx = golden.topk(logits, top_k)
    probs = golden.router_probs(logits, 3, 4)
    weights = np.take_along_axis(probs, top_idx, axis=1)
    return top_idx, probs, weights


def _expected_walk(top_idx, probs, experts):
    queues, active = golden.expert_queues(top_idx, probs, experts)
    walk = []
    for e in active:
        walk.append(("header", e, len(queues[e])))
        walk += [("entry", e, t, w) for t, w in queues[e]]
    return walk, active


def _beat(p):
    if p.header:
        return ("header", int(p.expert), int(p.count))
    return ("entry", int(p.expert), int(p.token), int(p.weight))


def _simulate(dut, layers, stall_prob, seed=0, experts=None):
    """Feed each layer's (top_idx, weights) and check the walk of each against the golden model."""
    experts = dut.experts if experts is None else experts
    got = []

    async def feed(ctx):
        stalls = Stalls(stall_prob, seed)
        for top_idx, weights, _ in layers:
            for t in range(len(top_idx)):
                await stream_put(ctx, dut.i, {
                    "experts": [int(x) for x in top_idx[t]],
                    "weights": [int(x) for x in weights[t]],
                    "last": int(t == len(top_idx) - 1),
                }, stalls=stalls)

    async def check(ctx):
        stalls = Stalls(stall_prob, seed + 1)
        for top_idx, _, probs in layers:
            want, _ = _expected_walk(top_idx, probs, experts)
            beats = []
            for _ in range(len(want)):
                p = await stream_get(ctx, dut.o, stalls=stalls)
                beats.append((_beat(p), int(p.last)))
            got.append(beats)
        for _ in range(4):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "ExpertQueues: extra output beat after the layer's last"

    # The checker idles 4 cycles after the last beat to catch extra beats; those are not the unit's.
    cycles = run_until_done(dut, [feed, check]) - 4
    for n, ((top_idx, _, probs), beats) in enumerate(zip(layers, got)):
        want, active = _expected_walk(top_idx, probs, experts)
        for i, (w, (g, last)) in enumerate(zip(want, beats)):
            assert g == w, f"ExpertQueues: layer {n} walk beat {i}: expected {w}, got {g}"
            assert last == (i == len(want) - 1), f"ExpertQueues: layer {n} beat {i}: last={last}"
    return cycles


CASES = {  # name: (experts, top_k, token_capacity, tokens, skew)
    "random-E4-k2-full": (4, 2, 16, 16, None),
    "idle-experts-E16-k2": (16, 2, 32, 20, None),
    "E1": (1, 1, 8, 5, None),
    "topk-equals-E": (3, 3, 8, 7, None),
    "skewed-two-experts-take-all": (8, 2, 16, 13, [6, 2]),
    "one-token": (8, 4, 8, 1, None),
    "E64-k4": (64, 4, 24, 24, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_golden_with_stalls(name):
    experts, top_k, cap, tokens, skew = CASES[name]
    rng = np.random.default_rng(len(name))
    top_idx, probs, weights = _routing(tokens, experts, top_k, rng, skew)
    dut = ExpertQueues(experts, top_k, cap)
    cycles = _simulate(dut, [(top_idx, weights, probs)], stall_prob=0.3, seed=tokens)
    _, active = _expected_walk(top_idx, probs, experts)
    print(f"{name}: T={tokens} E={experts} k={top_k}: {len(active)} active experts, "
          f"walk OK with 30% stalls ({cycles} cycles)")


def test_consecutive_layers_start_clean():
    rng = np.random.default_rng(11)
    dut = ExpertQueues(4, 2, 12)
    layers = []
    for tokens, skew in ((9, None), (3, [1, 3]), (12, None)):
        top_idx, probs, weights = _routing(tokens, 4, 2, rng, skew)
        layers.append((top_idx, weights, probs))
    cycles = _simulate(dut, layers, stall_prob=0.2, seed=3)
    print(f"3 consecutive layers OK ({cycles} cycles)")


@pytest.mark.parametrize("experts, top_k, tokens", [(16, 2, 32), (4, 1, 32), (8, 4, 16)])
def test_cycles_per_layer(experts, top_k, tokens):
    rng = np.random.default_rng(experts)
    top_idx, probs, weights = _routing(tokens, experts, top_k, rng)
    dut = ExpertQueues(experts, top_k, tokens)
    cycles = _simulate(dut, [(top_idx, weights, probs)], stall_prob=0.0)
    model = dut.cycles(tokens)
    print(f"T={tokens} E={experts} k={top_k}: {cycles} cycles per layer "
          f"(model T + 2E + 2Tk + 3 = {model})")
    assert cycles == model


def test_overflow_is_flagged_and_cuts_the_layer():
    rng = np.random.default_rng(4)
    dut = ExpertQueues(4, 2, 4)
    top_idx, probs, weights = _routing(6, 4, 2, rng)
    # Six tokens without `last` until the sixth: the first four fill the capacity and form one layer,
    # the remaining two (re-numbered from 0) the next.
    flags = []

    async def feed(ctx):
        for t in range(6):
            await stream_put(ctx, dut.i, {"experts": [int(x) for x in top_idx[t]],
                                          "weights": [int(x) for x in weights[t]],
                                          "last": int(t == 5)})

    async def check(ctx):
        for part in (slice(0, 4), slice(4, 6)):
            want, _ = _expected_walk(top_idx[part], probs[part], 4)
            beats = [_beat(await stream_get(ctx, dut.o)) for _ in want]
            assert beats == want
            flags.append(ctx.get(dut.overflow))

    run_until_done(dut, [feed, check])
    assert flags == [1, 1]


def test_layouts():
    dut = ExpertQueues(16, 2, 129)
    assert len(dut.i.p.experts[0]) == 4 and len(dut.i.p.weights[0]) == 16
    assert len(dut.o.p.token) == 8 and len(dut.o.p.count) == 8 and len(dut.o.p.weight) == 16
    assert dut.cycles(129) == 129 + 2 * 16 + 2 * 129 * 2 + 3


@pytest.mark.parametrize("args, exc, words", [
    ((0, 1, 4), ValueError, r"experts must be an integer >= 1, not 0"),
    ((4, 5, 4), ValueError, r"top_k must be in \[1, 4\], not 5"),
    ((4, 2, 0), ValueError, r"token_capacity must be an integer >= 1, not 0"),
    ((4, 2, 4.5), TypeError, r"token_capacity must be an integer, not 4.5"),
])
def test_bad_parameters(args, exc, words):
    with pytest.raises(exc, match=words):
        ExpertQueues(*args)
    gc.collect()   # the half-built unit sits in a traceback cycle; drop it under this file's filter


def test_verilog_and_embedding():
    assert "module queues" in verilog.convert(ExpertQueues(16, 2, 129), name="queues")
    assert "module harness" in verilog.convert(EmbeddingHarness(ExpertQueues(4, 4, 8)), name="harness")
    rng = np.random.default_rng(9)
    top_idx, probs, weights = _routing(6, 4, 2, rng)
    _simulate(EmbeddingHarness(ExpertQueues(4, 2, 8)), [(top_idx, weights, probs)], stall_prob=0.2, experts=4)


def test_from_accelerator_config():
    cfg = AcceleratorConfig.from_preset("vit-small-nyud")
    dut = ExpertQueues.from_config(cfg)
    assert (dut.experts, dut.top_k, dut.token_capacity) == (16, 2, cfg.token_capacity)
    assert len(dut.o.p.token) == cfg.token_bits == 11         # 1201 tokens
    Fragment.get(dut, None)
