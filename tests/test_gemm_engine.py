# amaranth: UnusedElaboratable=no
"""GemmEngine: commands through real buffers, bit-exact against reference/golden.py.

The oracle is :func:`_model`: it reads the operands out of the buffers exactly as the GemmEngine
docstring defines the addressing, applies the golden functions, and writes the results back in the
engine's row order. Every test runs with random stalls on the command and output streams.
"""

import time

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import stream, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.gemm.epilogue import EpilogueMode as Mode
from m3vit_hw.gemm.epilogue import StreamOutLayout
from m3vit_hw.gemm.gemm_engine import GemmCommand, GemmEngine, check_command
from reference import golden
from sim.bench_gemm import W1_SHAPES, GemmHarness, bench, bench_config, simulate

CFG = AcceleratorConfig.from_preset("tiny")          # 4x4 PEs
RES_MODES = (Mode.RES16, Mode.RESADD, Mode.COMBINE)
ACT_MODES = (Mode.ACT8, Mode.GELU8, Mode.ATTN8)


# ---- buffers -------------------------------------------------------------------------------------

class Buffers:
    """Initial buffer contents (random junk everywhere, so unread/masked data cannot hide bugs)."""

    def __init__(self, cfg, rng):
        C = cfg.pe_cols
        self.cfg = cfg
        self.act = rng.integers(-128, 128, size=(cfg.act_buffer_words, C))
        self.weights = rng.integers(-128, 128, size=(cfg.weight_buffer_words, C))
        self.res = rng.integers(-(1 << 15), 1 << 15, size=(cfg.res_buffer_words, C))
        self.rowtab = np.stack([rng.integers(0, cfg.token_capacity, size=cfg.rowtab_entries),
                                rng.integers(0, 1 << numerics.MULT_BITS, size=cfg.rowtab_entries)], axis=1)
        self.colp = np.stack([rng.integers(-(1 << 16), 1 << 16, size=(cfg.param_buffer_words, C)),
                              rng.integers(0, 1 << numerics.MULT_BITS, size=(cfg.param_buffer_words, C))], axis=2)

    def store_rows(self, buf, base, pitch, matrix):
        """Token-major rows: row r, word w at base + r*pitch + w (lanes beyond the matrix keep junk)."""
        C = self.cfg.pe_cols
        for r, row in enumerate(np.asarray(matrix)):
            for w in range(-(-len(row) // C)):
                chunk = row[w * C:(w + 1) * C]
                buf[base + r * pitch + w, :len(chunk)] = chunk

    def store_panels(self, base, b):
        """Weight panels: column tile nb, reduction step k at base + nb*K + k."""
        C = self.cfg.pe_cols
        k, n = b.shape
        for nb in range(-(-n // C)):
            chunk = b[:, nb * C:(nb + 1) * C]
            self.weights[base + nb * k:base + nb * k + k, :chunk.shape[1]] = chunk
        return k                                               # b_tile_stride

    def harness(self):
        return GemmHarness(self.cfg, act=self.act, weights=self.weights, res=self.res,
                           rowtab=self.rowtab, colp=self.colp)


def _cmd(**kw):
    c = dict(m=1, k=1, n=1, a_base=0, a_stride=1, b_base=0, b_tile_stride=0, b_k_stride=1,
             dst_base=0, dst_stride=1, rowtab_base=0, colp_base=0, shift=0, mode=Mode.RAW,
             a_unsigned=0, b_trans=0, gather=0, scatter=0, sync=0)
    c.update(kw)
    return c


# ---- the oracle ----------------------------------------------------------------------------------

def _model(bufs, cmds, lut):
    """Expected RAW beats and final act/res buffers for ``cmds`` run in order."""
    cfg = bufs.cfg
    C, R = cfg.pe_cols, cfg.pe_rows
    act = bufs.act.copy()
    res = bufs.res.copy()
    msb = 1 << (cfg.b_addr_bits - 1)
    stream = []

    def b_word(addr):
        return act[addr - msb] if addr & msb else bufs.weights[addr]

    for c in cmds:
        M, K, N = c["m"], c["k"], c["n"]
        ent = [bufs.rowtab[c["rowtab_base"] + i] for i in range(M)]
        tok = [int(e[0]) for e in ent]
        scale = np.array([int(e[1]) for e in ent])
        a = np.zeros((M, K), dtype=np.int64)
        for i in range(M):
            r = tok[i] if c["gather"] else i
            for k in range(K):
                v = int(act[c["a_base"] + r * c["a_stride"] + k // C][k % C])
                a[i, k] = v & 0xFF if c["a_unsigned"] else v
        b = np.zeros((K, N), dtype=np.int64)
        for k in range(K):
            for n in range(N):
                base = c["b_base"] + (n // C) * c["b_tile_stride"]
                if c["b_trans"]:
                    b[k, n] = b_word(base + (n % C) * c["b_k_stride"] + k // C)[k % C]
                else:
                    b[k, n] = b_word(base + k * c["b_k_stride"])[n % C]
        acc = golden.matmul(a, b)
        bias = np.array([bufs.colp[c["colp_base"] + n // C][n % C][0] for n in range(N)])
        mult = np.array([bufs.colp[c["colp_base"] + n // C][n % C][1] for n in range(N)])
        mode = c["mode"]
        if mode in ACT_MODES or mode == Mode.RAW:
            if mode == Mode.ATTN8:
                y = golden.attention_normalize(acc, scale, c["shift"])
            elif mode == Mode.RAW:
                y = acc
            else:
                y = golden.requantize(acc, bias, mult, c["shift"], 8)
                if mode == Mode.GELU8:
                    y = golden.gelu(y, lut)
        else:
            y = golden.requantize(acc, bias, mult, c["shift"], 16)
        # Engine order: row tiles, column tiles, rows.
        for m0 in range(0, M, R):
            for nb in range(-(-N // C)):
                for i in range(m0, min(M, m0 + R)):
                    row = tok[i] if c["scatter"] else i
                    addr = c["dst_base"] + row * c["dst_stride"] + nb
                    lanes = range(nb * C, min(N, nb * C + C))
                    if mode == Mode.RAW:
                        stream.append((addr, (1 << len(lanes)) - 1, [int(y[i, n]) for n in lanes]))
                    elif mode in ACT_MODES:
                        for n in lanes:
                            act[addr][n % C] = y[i, n]
                    else:
                        old = res[addr][[n % C for n in lanes]]
                        new = y[i, list(lanes)]
                        if mode == Mode.RESADD:
                            new = golden.residual_add(old, new)
                        elif mode == Mode.COMBINE:
                            new = golden.moe_combine(old, new, scale[i])
                        for n, v in zip(lanes, new):
                            res[addr][n % C] = v
    return stream, act, res


def _check(bufs, cmds, *, lut=None, stalls=0.3, seed=0):
    """Simulate ``cmds`` and compare everything with the oracle; returns the simulation result."""
    cmds = [_cmd(**c) for c in cmds]
    want_stream, want_act, want_res = _model(bufs, cmds, lut)
    out = simulate(bufs.harness(), cmds, lut=lut, cmd_stalls=stalls,
                   o_stalls=stalls, seed=seed)
    assert out["done"] == len(cmds), f"GemmEngine: done pulsed {out['done']} times for {len(cmds)} commands"
    assert not out["busy_at_end"], "GemmEngine: still busy after the last command"
    got = out["stream"]
    assert len(got) == len(want_stream), f"GemmEngine o: {len(got)} beats, expected {len(want_stream)}"
    for idx, ((addr, mask, lanes, _), (waddr, wmask, wlanes)) in enumerate(zip(got, want_stream)):
        assert (addr, mask) == (waddr, wmask), \
            f"GemmEngine o beat {idx}: (addr, mask) expected {(waddr, wmask)}, got {(addr, mask)}"
        assert lanes[:len(wlanes)] == wlanes, f"GemmEngine o beat {idx}: expected {wlanes}, got {lanes[:len(wlanes)]}"
    if got:
        lasts = [g[3] for g in got]
        n_raw = sum(c.get("mode", Mode.RAW) == Mode.RAW for c in cmds)
        assert sum(lasts) == n_raw, f"GemmEngine o: {sum(lasts)} beats with last, expected {n_raw}"
    for name, want in (("act", want_act), ("res", want_res)):
        bad = np.argwhere(out[name] != want)
        if len(bad):
            w, j = bad[0]
            pytest.fail(f"GemmEngine {name} buffer word {w} lane {j}: expected {want[w, j]}, "
                        f"got {out[name][w, j]} ({len(bad)} mismatches)")
    return out


def _sensible_shift(acc_peak, mult_peak, out_bits):
    return int(np.clip((int(acc_peak) * int(mult_peak)).bit_length() - out_bits + 2, 0, numerics.SHIFT_MAX))


# ---- tests ---------------------------------------------------------------------------------------

def test_raw_odd_shapes_match_numpy():
    """M=5, K=7, N=3 on 4x4 (and other non-dividing shapes): masking of M, K and N tails."""
    rng = np.random.default_rng(1)
    bufs = Buffers(CFG, rng)
    cmds, products = [], []
    a_base, w_base, d_base = 0, 0, 0
    for (m, k, n) in [(5, 7, 3), (1, 1, 1), (4, 4, 4), (9, 13, 6), (3, 2, 9)]:
        a = rng.integers(-128, 128, size=(m, k))
        b = rng.integers(-128, 128, size=(k, n))
        pitch = -(-k // 4)
        bufs.store_rows(bufs.act, a_base, pitch, a)
        tile = bufs.store_panels(w_base, b)
        cmds.append(dict(m=m, k=k, n=n, a_base=a_base, a_stride=pitch, b_base=w_base,
                         b_tile_stride=tile, dst_base=d_base, dst_stride=-(-n // 4)))
        products.append(a @ b)
        a_base += m * pitch
        w_base += tile * -(-n // 4)
        d_base += 40
    out = _check(bufs, cmds)
    # The addressing contract itself: the RAW stream reassembles into a @ b.
    beats = iter(out["stream"])
    for c, want in zip(cmds, products):
        got = np.zeros(want.shape, dtype=np.int64)
        for m0 in range(0, c["m"], 4):
            for nb in range(-(-c["n"] // 4)):
                for i in range(m0, min(c["m"], m0 + 4)):
                    addr, _, lanes, _ = next(beats)
                    assert addr == c["dst_base"] + i * c["dst_stride"] + nb
                    cols = range(nb * 4, min(c["n"], nb * 4 + 4))
                    got[i, list(cols)] = lanes[:len(cols)]
        np.testing.assert_array_equal(got, want)
    print(f"RAW odd shapes: {len(out['stream'])} beats exact, {out['cycles']} cycles with stalls")


@pytest.mark.parametrize("rows,cols", [(4, 4), (3, 4), (5, 4)])
def test_requantized_modes_random(rows, cols):
    """ACT8, GELU8, RES16, RESADD back to back on random shapes, incl. PE arrays that are not square."""
    cfg = CFG if (rows, cols) == (4, 4) else AcceleratorConfig.from_preset("tiny", pe_rows=rows, pe_cols=cols)
    rng = np.random.default_rng(rows * 7 + cols)
    bufs = Buffers(cfg, rng)
    lut = rng.integers(-128, 128, size=256)
    modes = [Mode.ACT8, Mode.GELU8, Mode.RES16, Mode.RESADD, Mode.ACT8]
    cmds = []
    w_base = 0
    for t, mode in enumerate(modes):
        m, k, n = (int(rng.integers(1, 10)), int(rng.integers(1, 12)), int(rng.integers(1, 11)))
        pitch = -(-k // cols)
        b = rng.integers(-127, 128, size=(k, n))
        tile = bufs.store_panels(w_base, b)
        out_bits = 16 if mode in RES_MODES else 8
        shift = [0, numerics.SHIFT_MAX, _sensible_shift(128 * 128 * k, 1 << 23, out_bits)][t % 3]
        # An act-mode command writes above every command's A rows (words < 60 + 9 x 3): within one
        # command the engine reads a later row tile after writing an earlier one, which the oracle
        # (every read before the command's writes) does not model.
        a_base = int(rng.integers(0, 60))
        dst = int(rng.integers(0, 20)) + (0 if mode in RES_MODES else 100)
        cmds.append(dict(m=m, k=k, n=n, a_base=a_base, a_stride=pitch, b_base=w_base,
                         b_tile_stride=tile, dst_base=dst, dst_stride=-(-n // cols),
                         colp_base=int(rng.integers(0, 40)), shift=shift, mode=mode, sync=1))
        w_base += tile * -(-n // cols)
    _check(bufs, cmds, lut=lut, seed=rows)


def test_requant_extremes():
    """Saturation both ways, multiplier 2**MULT_BITS-1, shifts 0 and SHIFT_MAX, extreme operands."""
    rng = np.random.default_rng(3)
    bufs = Buffers(CFG, rng)
    bufs.colp[:8, :, 1] = (1 << numerics.MULT_BITS) - 1
    bufs.colp[:4, :, 0] = numerics.int_range(32)[1]
    bufs.colp[4:8, :, 0] = numerics.int_range(32)[0]
    a = rng.choice([-128, 127], size=(6, 9))
    b = rng.choice([-128, 127], size=(9, 8))
    bufs.store_rows(bufs.act, 0, 3, a)
    tile = bufs.store_panels(0, b)
    cmds = []
    for i, (mode, shift) in enumerate([(Mode.ACT8, 0), (Mode.ACT8, numerics.SHIFT_MAX), (Mode.RES16, 0),
                                       (Mode.RES16, 30), (Mode.ACT8, 20), (Mode.RESADD, 28)]):
        cmds.append(dict(m=6, k=9, n=8, a_stride=3, b_tile_stride=tile, dst_base=12 * i, dst_stride=2,
                         colp_base=4 * (i % 2), shift=shift, mode=mode))
    _check(bufs, cmds, stalls=0.2, seed=3)


@pytest.mark.parametrize("pack", [1, 2])
def test_attention_qk_and_av(pack):
    """QK^T (transposed B from the activation buffer, RAW scores) and AV (uint8 A, per-row
    reciprocal, V read directly from the activation buffer) for one head; one and two MACs per DSP."""
    cfg = CFG.with_(pe_pack=pack)
    rng = np.random.default_rng(4)
    bufs = Buffers(cfg, rng)
    T, hd, qt = cfg.token_capacity, cfg.model.head_dim, 6
    msb = 1 << (cfg.b_addr_bits - 1)
    pitch = -(-hd // 4)
    q = rng.integers(-128, 128, size=(qt, hd))
    kmat = rng.integers(-128, 128, size=(T, hd))
    v = rng.integers(-128, 128, size=(T, hd))
    q_base, k_base, v_base = 0, 40, 80
    bufs.store_rows(bufs.act, q_base, pitch, q)
    bufs.store_rows(bufs.act, k_base, pitch, kmat)
    bufs.store_rows(bufs.act, v_base, pitch, v)
    # e8 weights (uint8, stored as bit patterns) and per-row reciprocals, as the softmax would make them.
    scores = golden.matmul(q, kmat.T)
    e8, l = golden.attention_weights(scores, 181, 12)
    e8[0, :] = 255                                     # all-max row
    l[0] = 255 * T
    e_base, e_pitch = 120, -(-T // 4)
    bufs.store_rows(bufs.act, e_base, e_pitch, np.where(e8 > 127, e8 - 256, e8))
    recip = golden.attention_recip(l, (1 << numerics.AV_OUT_MULT_BITS) - 1)
    bufs.rowtab[:qt, 1] = recip
    cmds = [
        dict(m=qt, k=hd, n=T, a_base=q_base, a_stride=pitch, b_base=msb | k_base, b_trans=1,
             b_k_stride=pitch, b_tile_stride=4 * pitch, dst_base=0, dst_stride=-(-T // 4), mode=Mode.RAW),
        dict(m=qt, k=T, n=hd, a_base=e_base, a_stride=e_pitch, a_unsigned=1, b_base=msb | v_base,
             b_k_stride=pitch, b_tile_stride=1, dst_base=200, dst_stride=pitch, shift=6,
             mode=Mode.ATTN8),
    ]
    out = _check(bufs, cmds, stalls=0.3, seed=4)
    # And the end-to-end head against golden.attention_head on the same data.
    ctx = np.array([[out["act"][200 + i * pitch + d // 4][d % 4] for d in range(hd)] for i in range(qt)])
    want = golden.attention_normalize(golden.matmul(e8, v), recip, 6)
    np.testing.assert_array_equal(ctx, want)


def test_moe_expert_gather_scatter_combine():
    """One expert: fc1 + GELU over tokens gathered through a queue with repeated and out-of-order
    ids, then fc2 scatter-accumulated (COMBINE) into the residual rows of those tokens."""
    cfg = CFG
    rng = np.random.default_rng(5)
    bufs = Buffers(cfg, rng)
    D, h = cfg.model.dim, cfg.model.expert_hidden
    queue = [7, 2, 2, 8, 0, 5, 2, 1]                  # repeats and out of order
    weights = [32768, 1, 20000, 0, 16384, 32767, 12345, 9999]
    M = len(queue)
    bufs.rowtab[:M, 0] = queue
    bufs.rowtab[:M, 1] = weights
    bufs.res[:2 * 8, :] = rng.choice([-(1 << 15), (1 << 15) - 1], size=(16, 4))   # saturating rows
    lut = rng.integers(-128, 128, size=256)
    pitch_d, pitch_h = D // 4, h // 4
    w1 = rng.integers(-127, 128, size=(D, h))
    w2 = rng.integers(-127, 128, size=(h, D))
    t1 = bufs.store_panels(0, w1)
    half = cfg.weight_buffer_words // 2               # fc2 weights in the other buffer half
    t2 = bufs.store_panels(half, w2)
    hid_base = 100
    cmds = [
        dict(m=M, k=D, n=h, a_base=0, a_stride=pitch_d, gather=1, b_base=0, b_tile_stride=t1,
             dst_base=hid_base, dst_stride=pitch_h, colp_base=0, shift=_sensible_shift(D * 128 * 128, 1 << 23, 8),
             mode=Mode.GELU8),
        dict(m=M, k=h, n=D, a_base=hid_base, a_stride=pitch_h, b_base=half, b_tile_stride=t2,
             dst_base=0, dst_stride=pitch_d, scatter=1, colp_base=40,
             shift=_sensible_shift(h * 128 * 128, 1 << 23, 16) - 3, mode=Mode.COMBINE, sync=1),
    ]
    _check(bufs, cmds, lut=lut, stalls=0.3, seed=5)


@pytest.mark.parametrize("pack", [1, 2])
def test_max_k_extremes(pack):
    """K at the config's largest K (768) with -128*-128 and 255*-128 sums; one and two MACs per DSP
    (two: the packed low field wraps every few beats)."""
    cfg = CFG.with_(act_buffer_bytes=8192, pe_pack=pack)
    K = cfg.largest_k
    rng = np.random.default_rng(6)
    bufs = Buffers(cfg, rng)
    pitch = K // 4
    bufs.store_rows(bufs.act, 0, pitch, np.full((5, K), -128))
    bufs.store_rows(bufs.act, 5 * pitch, pitch, np.full((1, K), -1))        # 255 as uint8
    tile = bufs.store_panels(0, np.where(rng.random((K, 6)) < 0.9, -128, 127))
    cmds = [dict(m=5, k=K, n=6, a_stride=pitch, b_tile_stride=tile, dst_stride=2),
            dict(m=1, k=K, n=6, a_base=5 * pitch, a_stride=pitch, a_unsigned=1, b_tile_stride=tile,
                 dst_base=20, dst_stride=2)]
    out = _check(bufs, cmds, stalls=0.1, seed=6)
    peak = max(max(abs(x) for x in lanes) for _, _, lanes, _ in out["stream"])
    print(f"K={K}: peak |acc| {peak} (limit {(1 << 31) - 1})")
    assert peak >= 128 * 128 * K * 0.8


def _random_commands(cfg, bufs, rng, count):
    """A random mix of every mode and flag. Reads come from act words [0, split) and the weights;
    writes go to act words [split, end) and the residual buffer, so commands may overlap freely."""
    C = cfg.pe_cols
    split = cfg.act_buffer_words // 2
    msb = 1 << (cfg.b_addr_bits - 1)
    T = cfg.token_capacity
    bufs.rowtab[:, 1] = rng.integers(0, (1 << numerics.ROUTER_P_FRAC) + 1, size=cfg.rowtab_entries)
    cmds = []
    for _ in range(count):
        mode = list(Mode)[int(rng.integers(len(Mode)))]
        m, k, n = int(rng.integers(1, T + 1)), int(rng.integers(1, 3 * C + 1)), int(rng.integers(1, 3 * C + 1))
        kp, npch = -(-k // C), -(-n // C)
        c = dict(m=m, k=k, n=n, mode=mode, a_stride=kp, a_unsigned=int(rng.integers(2)),
                 gather=int(rng.integers(2)), scatter=int(rng.integers(2)), sync=int(rng.integers(2)),
                 rowtab_base=int(rng.integers(0, cfg.rowtab_entries - m + 1)),
                 colp_base=int(rng.integers(0, cfg.param_buffer_words - npch + 1)))
        c["a_base"] = int(rng.integers(0, split - T * kp + 1))
        source = int(rng.integers(3))
        if source == 0:                                   # weight panels
            c.update(b_base=int(rng.integers(0, cfg.weight_buffer_words - npch * k)), b_tile_stride=k,
                     b_k_stride=1)
        elif source == 1:                                 # direct B from activations (like V)
            c.update(b_base=msb | int(rng.integers(0, split - k * npch)), b_tile_stride=1, b_k_stride=npch)
        else:                                             # transposed B from activations (like K)
            c.update(b_base=msb | int(rng.integers(0, split - npch * C * kp)), b_trans=1,
                     b_tile_stride=C * kp, b_k_stride=kp)
        if mode in RES_MODES:
            stride = cfg.row_words
            c.update(dst_stride=stride, dst_base=int(rng.integers(0, stride - npch + 1)))
        else:
            c.update(dst_stride=npch, dst_base=int(rng.integers(split, cfg.act_buffer_words - T * npch + 1)))
        peak = k * 255 * 128
        if mode == Mode.ATTN8:
            c["shift"] = int(rng.integers(0, 24))
        else:
            bits = 16 if mode in RES_MODES else 8
            c["shift"] = int(rng.choice([0, numerics.SHIFT_MAX, _sensible_shift(peak, 1 << 23, bits)]))
        cmds.append(c)
    return cmds


@pytest.mark.parametrize("rows,cols,seed,pack,epi", [(4, 4, 1, 1, None), (4, 4, 2, 1, None),
                                                     (2, 4, 3, 1, None), (8, 8, 4, 1, None),
                                                     (4, 4, 5, 2, None), (2, 4, 6, 2, None),
                                                     (4, 4, 7, 2, 2), (2, 8, 8, 1, 2), (4, 8, 10, 2, 4)])
def test_random_command_mix(rows, cols, seed, pack, epi):
    """Every mode and flag (gather, scatter, b_trans, a_unsigned, sync, B from either buffer),
    random shapes, back-to-back commands, random stalls on cmd and o; one and two MACs per DSP; an
    epilogue narrower than the array (``epi_lanes``: each PE row drains as several beats)."""
    # A small activation buffer (short random addresses): 4x4-pixel patches (same 9 tokens) keep the
    # patch embedding's slots below the attention map, which 512 words hold.
    cfg = AcceleratorConfig.from_preset("tiny", pe_rows=rows, pe_cols=cols, act_buffer_bytes=512 * cols,
                                        img_size=(8, 16), patch_size=4, pe_pack=pack, epi_lanes=epi)
    rng = np.random.default_rng(100 + seed)
    bufs = Buffers(cfg, rng)
    cmds = _random_commands(cfg, bufs, rng, count=10)
    out = _check(bufs, cmds, lut=rng.integers(-128, 128, size=256), stalls=0.3, seed=seed)
    macs = sum(c["m"] * c["k"] * c["n"] for c in cmds)
    print(f"{rows}x{cols} pack {pack} epi_lanes {cfg.epi_lanes} seed {seed}: {len(cmds)} commands, "
          f"{macs} MACs, {out['cycles']} cycles")


@pytest.mark.parametrize("epi", [None, 1])
def test_short_k_many_tiles_in_flight(epi):
    """K = 1 and 2 (tiles shorter than their drain) with a slow consumer: up to three tiles are in
    flight between the loader and the epilogue, and none may be lost, duplicated or reordered (also
    with a one-lane epilogue: four beats per PE row)."""
    rng = np.random.default_rng(9)
    bufs = Buffers(CFG.with_(epi_lanes=epi) if epi else CFG, rng)
    cmds = []
    for i, k in enumerate([1, 2, 1, 3]):
        a = rng.integers(-128, 128, size=(9, k))
        b = rng.integers(-128, 128, size=(k, 12))
        bufs.store_rows(bufs.act, 20 * i, 1, a)
        tile = bufs.store_panels(100 * i, b)
        cmds.append(dict(m=9, k=k, n=12, a_base=20 * i, a_stride=1, b_base=100 * i, b_tile_stride=tile,
                         dst_base=40 * i, dst_stride=3, mode=Mode.RAW))
    out = _check(bufs, cmds, stalls=0.6, seed=9)
    print(f"short K: {len(out['stream'])} beats in order, {out['cycles']} cycles")


def test_throughput_64x64x64_on_8x8():
    """>= 95% of rows*cols MAC/cycle on a 64x64x64 int8 product with operands on chip."""
    t0 = time.time()
    cycles, mpc, util = bench(8, 8, 64, 64, 64)
    print(f"GEMM 64x64x64 on 8x8: {cycles} cycles (ideal 4096), {mpc:.2f} MAC/cycle, "
          f"utilization {util:.4f} ({time.time() - t0:.1f} s simulated)")
    assert util >= 0.95


def test_commands_overlap():
    """Independent commands run back to back: the next command's loads overlap the previous tail."""
    rng = np.random.default_rng(8)
    bufs = Buffers(CFG, rng)
    a = rng.integers(-128, 128, size=(8, 16))
    b = rng.integers(-128, 128, size=(16, 8))
    bufs.store_rows(bufs.act, 0, 4, a)
    tile = bufs.store_panels(0, b)
    one = dict(m=8, k=16, n=8, a_stride=4, b_tile_stride=tile, dst_stride=2, mode=Mode.RAW)
    single = _check(bufs, [one], stalls=0.0)["cycles"]
    four = _check(bufs, [dict(one, dst_base=16 * i) for i in range(4)], stalls=0.0)["cycles"]
    ideal = 8 * 16 * 8 // 16
    print(f"one command: {single} cycles; four back to back: {four} cycles (ideal {4 * ideal})")
    assert four <= 4 * ideal + (single - ideal)


def test_verilog_and_connect():
    t0 = time.time()
    text = verilog.convert(GemmEngine(CFG), name="gemm_engine")
    assert "module gemm_engine" in text
    print(f"verilog.convert GemmEngine(tiny 4x4): {len(text)} chars in {time.time() - t0:.1f} s")
    # The harness embeds the engine with wiring.connect on every memory port; this wrapper also
    # connects the command and result streams to its own (flipped) ports.
    bufs = Buffers(CFG, np.random.default_rng(0))

    class Wrapper(wiring.Component):
        def __init__(self):
            super().__init__({"cmd": wiring.In(stream.Signature(GemmCommand(CFG))),
                              "o": wiring.Out(stream.Signature(StreamOutLayout(CFG.pe_cols, CFG.dst_addr_bits))),
                              "done": wiring.Out(1)})

        def elaborate(self, platform):
            m = Module()
            m.submodules.harness = h = bufs.harness()
            wiring.connect(m, wiring.flipped(self.cmd), h.engine.cmd)
            wiring.connect(m, h.engine.o, wiring.flipped(self.o))
            m.d.comb += self.done.eq(h.engine.done)
            return m

    assert "module wrapper" in verilog.convert(Wrapper(), name="wrapper")


def test_bad_config():
    with pytest.raises(TypeError, match="config"):
        GemmEngine("tiny")


def test_command_layout_widths():
    """The command's fields are sized from the config (one source of truth)."""
    layout = GemmCommand(CFG)
    assert layout["a_base"].shape.width == CFG.act_addr_bits
    assert layout["b_base"].shape.width == CFG.b_addr_bits
    assert (1 << layout["k"].shape.width) > CFG.largest_k


@pytest.mark.parametrize("cmd, words", [
    (dict(m=1, k=1, n=CFG.largest_n + 1), r"field n must be in \[1, %d\]" % CFG.largest_n),
    (dict(m=1, k=1, n=1 << 12), r"field n must be in \[0, \d+\], not 4096"),
    (dict(m=0, k=1, n=1), r"field m must be in \[1, "),
    (dict(m=2, k=1, n=1, dst_base=(1 << CFG.dst_addr_bits) - 1, dst_stride=1), r"destination addresses run to word"),
    (dict(m=2, k=CFG.pe_cols + 1, n=1, a_base=(1 << CFG.act_addr_bits) - 1), r"A addresses run to word"),
    (dict(m=1, k=1, n=1, bogus=1), r"no field 'bogus'"),
])
def test_check_command_refuses_what_would_truncate(cmd, words):
    """An oversize command is refused where it is built, naming the field, value and range."""
    with pytest.raises(ValueError, match=words) as info:
        check_command(CFG, cmd)
    print(info.value)


def test_oversize_command_trips_an_assertion_in_simulation():
    """A command that bypasses check_command with n above largest_n (but inside its field) trips the
    engine's Assert instead of computing a truncated product."""
    n = CFG.largest_n + 1
    assert n < 1 << GemmCommand(CFG)["n"].shape.width
    engine = GemmEngine(CFG)
    sim = Simulator(engine)
    sim.add_clock(1e-8)

    async def tb(ctx):
        ctx.set(engine.cmd.payload, {"m": 1, "k": 1, "n": n})
        ctx.set(engine.cmd.valid, 1)
        await ctx.tick()

    sim.add_testbench(tb)
    with pytest.raises(AssertionError, match="command n above config.largest_n"):
        sim.run()


def test_bench_sizes_its_config_from_the_problem():
    """bench_gemm builds a config whose fields and buffers hold any M, K, N: here N = 260 (past the tiny
    preset's 8-bit n field) and M above its token count, bit-exact against numpy."""
    cfg = bench_config(4, 4, 11, 3, 260)
    assert cfg.largest_n >= 260 and cfg.token_capacity >= 11
    cycles, mpc, util = bench(4, 4, 11, 3, 260)
    print(f"bench 11x3x260 on 4x4: {cycles} cycles, {mpc:.2f} MAC/cycle, utilization {util:.3f}")


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(W1_SHAPES))
def test_bench_w1_shapes_bit_exact(label):
    """The W1 block's GEMM shapes on 16x16 PEs, bit-exact (bench raises otherwise); minutes each."""
    m, k, n = W1_SHAPES[label]
    cycles, mpc, util = bench(16, 16, m, k, n)
    print(f"W1 {label} {m}x{k}x{n} on 16x16: {cycles} cycles, {mpc:.1f} MAC/cycle, utilization {util:.3f}")
