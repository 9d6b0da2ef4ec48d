# amaranth: UnusedElaboratable=no
"""TopK against reference.golden.topk: random rows, all-equal rows, heavy ties, int32 extremes, stalls."""

import gc

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment

from m3vit_hw.moe.topk import TopK, expert_id_width
from m3vit_hw.config import AcceleratorConfig
from reference import golden
from sim.testbench import EmbeddingHarness, run_until_done, Stalls, stream_get, stream_put

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1

# Interface and parameter tests build units they never elaborate.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _rows(experts, rng, n_random=4):
    """Random rows, then all-equal rows, rows with heavy ties, and rows of int32 extremes."""
    rows = [rng.integers(I32_MIN, I32_MAX, experts, endpoint=True) for _ in range(n_random)]
    rows += [np.full(experts, 7), np.full(experts, I32_MIN)]
    rows += [rng.integers(-1, 2, experts) for _ in range(3)]
    rows += [rng.choice([I32_MIN, I32_MAX, 0, -1], experts) for _ in range(2)]
    return np.array(rows, dtype=np.int64)


def _simulate(experts, top_k, lanes, logits, tags, stall_prob, seed=0):
    dut = TopK(experts, top_k, lanes=lanes, tag_width=16)
    beats = dut.cycles_per_token
    pad = beats * lanes - experts
    # Lanes past E get the largest logit: if they were not ignored they would win every selection.
    padded = np.concatenate([logits, np.full((len(logits), pad), I32_MAX)], axis=1)
    padded_tags = np.concatenate([tags, np.full((len(tags), pad), 0xFFFF)], axis=1)
    want = golden.topk(logits, top_k)
    got = []

    async def feed(ctx):
        stalls = Stalls(stall_prob, seed)
        for t in range(len(logits)):
            for b in range(beats):
                sl = slice(b * lanes, (b + 1) * lanes)
                await stream_put(ctx, dut.i, {"logits": [int(v) for v in padded[t, sl]],
                                              "tags": [int(v) for v in padded_tags[t, sl]]},
                                 stalls=stalls)

    async def check(ctx):
        stalls = Stalls(stall_prob, seed + 1)
        for _ in range(len(logits)):
            p = await stream_get(ctx, dut.o, stalls=stalls)
            got.append(([int(x) for x in p.experts], [int(x) for x in p.tags]))

    cycles = run_until_done(dut, [feed, check])
    assert len(got) == len(logits), f"TopK: {len(got)} results for {len(logits)} tokens"
    for t, (experts_got, tags_got) in enumerate(got):
        exp = [int(x) for x in want[t]]
        assert experts_got == exp, (f"TopK(E={experts}, k={top_k}, lanes={lanes}): token {t} "
                                    f"logits {logits[t].tolist()}: expected {exp}, got {experts_got}")
        exp_tags = [int(tags[t, e]) for e in exp]
        assert tags_got == exp_tags, (f"TopK tags: token {t}: expected {exp_tags}, got {tags_got}")
    return cycles, beats


CONFIGS = [  # (E, k, lanes)
    (1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 1, 1), (3, 2, 1), (3, 2, 2),
    (16, 1, 1), (16, 2, 1), (16, 4, 1), (16, 2, 4), (16, 4, 16),
    (64, 1, 8), (64, 2, 1), (64, 4, 1), (64, 4, 16),
    (16, 2, 16),                     # the W1 router: one beat per token, a 4-level merge tree
    (12, 2, 6), (7, 3, 7), (10, 3, 3),  # lane counts that leave an odd list at some tree level
]


@pytest.mark.parametrize("experts, top_k, lanes", CONFIGS)
def test_matches_golden_with_stalls(experts, top_k, lanes):
    rng = np.random.default_rng(experts * 100 + top_k * 10 + lanes)
    logits = _rows(experts, rng, n_random=4 if experts * 11 // lanes < 400 else 2)
    tags = rng.integers(0, 1 << 16, logits.shape)
    cycles, beats = _simulate(experts, top_k, lanes, logits, tags, stall_prob=0.3, seed=experts)
    print(f"E={experts} k={top_k} lanes={lanes}: {len(logits)} tokens OK with 30% stalls "
          f"({cycles} cycles)")


@pytest.mark.parametrize("experts, top_k, lanes", [(16, 2, 1), (16, 2, 4), (3, 2, 2), (1, 1, 1), (16, 2, 16)])
def test_throughput_one_beat_per_cycle(experts, top_k, lanes):
    rng = np.random.default_rng(5)
    logits = rng.integers(-1000, 1000, (12, experts))
    tags = rng.integers(0, 1 << 16, logits.shape)
    cycles, beats = _simulate(experts, top_k, lanes, logits, tags, stall_prob=0.0)
    per_token = (cycles - 1) / len(logits)
    print(f"E={experts} k={top_k} lanes={lanes}: {per_token:.2f} cycles/token "
          f"({lanes} logits/cycle; ceil(E/lanes) = {beats})")
    # The first result appears `latency` cycles after the first token's last beat; then one per token.
    assert cycles == len(logits) * beats + TopK(experts, top_k, lanes=lanes).latency


def test_without_tags():
    dut = TopK(5, 2)
    assert "tags" not in dict(dut.i.p.shape()) and "tags" not in dict(dut.o.p.shape())
    logits = np.array([[3, 9, 9, -4, 9], [0, 0, 0, 0, 1]])
    got = []

    async def feed(ctx):
        for row in logits:
            for v in row:
                await stream_put(ctx, dut.i, {"logits": [int(v)]})

    async def check(ctx):
        for _ in logits:
            got.append([int(x) for x in (await stream_get(ctx, dut.o)).experts])

    run_until_done(dut, [feed, check])
    assert got == golden.topk(logits, 2).tolist()


def test_layouts():
    dut = TopK(64, 4, lanes=8, tag_width=16)
    assert expert_id_width(64) == 6 and expert_id_width(1) == 1 and expert_id_width(3) == 2
    assert len(dut.i.p.logits[0]) == 32 and len(dut.i.p.logits.as_value()) == 8 * 32
    assert len(dut.o.p.experts[0]) == 6 and len(dut.o.p.experts.as_value()) == 4 * 6
    assert dut.cycles_per_token == 8


@pytest.mark.parametrize("args, kwargs, exc, words", [
    ((0, 1), {}, ValueError, r"experts must be an integer >= 1, not 0"),
    ((4, 5), {}, ValueError, r"top_k must be in \[1, 4\], not 5"),
    ((4, 0), {}, ValueError, r"top_k must be in \[1, 4\], not 0"),
    ((4, 2), {"lanes": 5}, ValueError, r"lanes must be in \[1, 4\], not 5"),
    ((4, 2), {"lanes": 0}, ValueError, r"lanes"),
    ((4.0, 2), {}, TypeError, r"experts must be an integer, not 4.0"),
    ((4, 2), {"tag_width": -1}, ValueError, r"tag_width"),
])
def test_bad_parameters(args, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        TopK(*args, **kwargs)
    gc.collect()   # the half-built unit sits in a traceback cycle; drop it under this file's filter


@pytest.mark.parametrize("experts, top_k, lanes", [(16, 2, 4), (1, 1, 1)])
def test_verilog_and_embedding(experts, top_k, lanes):
    text = verilog.convert(TopK(experts, top_k, lanes=lanes, tag_width=16), name="topk")
    assert "module topk" in text
    harness = EmbeddingHarness(TopK(experts, top_k, lanes=lanes, tag_width=16))
    assert "module harness" in verilog.convert(harness, name="harness")
    # The embedded unit still works through the connections.
    dut = EmbeddingHarness(TopK(4, 2, tag_width=16))
    got = []

    async def feed(ctx):
        for v in (5, 8, 8, 1):
            await stream_put(ctx, dut.i, {"logits": [v], "tags": [v]})

    async def check(ctx):
        p = await stream_get(ctx, dut.o)
        got.append(([int(x) for x in p.experts], [int(x) for x in p.tags]))

    run_until_done(dut, [feed, check])
    assert got == [([1, 2], [8, 8])]


def test_from_accelerator_config():
    cfg = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    dut = TopK.from_config(cfg)
    assert (dut.experts, dut.top_k) == (cfg.model.experts, cfg.model.top_k)
    Fragment.get(dut, None)
