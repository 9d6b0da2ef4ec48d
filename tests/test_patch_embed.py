# amaranth: UnusedElaboratable=no
"""Patch embedding from the camera image: PatchLoader (HWC uint8 -> patch rows) and PatchEmbed (the
residual stream entering block 0) against ``reference.golden_model.embed``, with random stalls on the
external memory and on every stream.
"""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Fragment, Module, signed
from amaranth.lib import data, memory, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.dense import PatchEmbed, PatchLoader, embed_buffer_map, pack_embed, plan_embed
from m3vit_hw.dense.embed_layout import loader_k_order
from reference import golden_model
from sim.ext_memory import ExternalMemory
from sim.patch_embed import PatchEmbedSim, embed_config, golden_embed, make_embed_workload
from sim.testbench import EmbeddingHarness, Stalls, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


class _LoaderHarness(wiring.Component):
    def __init__(self, loader, depth):
        self.loader = loader
        C = loader.config.pe_cols
        self.act = memory.Memory(shape=data.ArrayLayout(signed(8), C), depth=depth, init=[])
        super().__init__({k: v for k, v in loader.signature.members.items() if k != "act_wr"})

    def elaborate(self, platform):
        m = Module()
        m.submodules.loader, m.submodules.act = self.loader, self.act
        wiring.connect(m, self.loader.act_wr, self.act.write_port(granularity=1))
        wiring.connect(m, wiring.flipped(self.cmd), self.loader.cmd)
        wiring.connect(m, self.loader.mem, wiring.flipped(self.mem))
        m.d.comb += [self.done.eq(self.loader.done), self.busy.eq(self.loader.busy)]
        return m


@pytest.mark.parametrize("img, patch, cin, C, db, burst, tile, base", [
    ((4, 6), 2, 3, 4, 16, 16, 6, 0x100),      # one command, runs of 6 bytes inside 16-byte beats
    ((6, 9), 3, 3, 4, 4, 2, 2, 0xFF5),        # unaligned base, bursts split at 2 beats and at 4 KiB
    ((8, 8), 4, 3, 8, 4, 1, 3, 0x3),          # single-beat bursts, C=8 > beat
    ((6, 10), 2, 1, 2, 8, 4, 5, 0x7),         # grayscale, K=4, C=2
])
def test_loader_unfolds_hwc_image(img, patch, cin, C, db, burst, tile, base):
    """Patch rows in the activation buffer equal the image's patches in (kh, kw, c) order, minus 128."""
    cfg = embed_config(img=img, patch=patch, dim=8, in_chans=cin, pe_cols=C, act_buffer_bytes=C * 1024,
                       mem_data_bytes=db, mem_max_burst=burst)
    loader = PatchLoader(cfg)
    dut = _LoaderHarness(loader, cfg.act_buffer_words)
    kw, n, K = loader.row_words, cfg.model.patches, cfg.model.patch_dim
    rng = np.random.default_rng(base)
    frame = rng.integers(0, 256, (*img, cin)).astype(np.uint8)
    backing = np.zeros(base + frame.size + 2 * db, dtype=np.uint8)
    backing[base:base + frame.size] = frame.reshape(-1)
    mem = ExternalMemory(backing, bytes_per_cycle=db, latency=7, stall_prob=0.25, seed=base)
    got = {}

    async def host(ctx):
        st = Stalls(0.25, base)
        done = j = 0
        while done < n:
            cnt = min(tile, n - done)
            dst = 1 + (j % 2) * tile * kw
            await stream_put(ctx, dut.cmd, {"img_base": base, "restart": j == 0, "count": cnt, "dst_base": dst,
                                            "dst_stride": kw}, stalls=st)
            await ctx.tick().until(dut.done)
            for r in range(cnt):
                row = []
                for w in range(kw):
                    row += [int(v) for v in ctx.get(dut.act.data[dst + r * kw + w])]
                got[done + r] = row[:K]
            done += cnt
            j += 1

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(dut.mem), background=True)
    sim.add_testbench(host)
    sim.run()
    gw = cfg.model.grid[1]
    for i in range(n):
        py, px = divmod(i, gw)
        want = frame[py * patch:(py + 1) * patch, px * patch:(px + 1) * patch].astype(np.int64).reshape(-1) - 128
        assert got[i] == list(want), f"PatchLoader: patch {i} expected {list(want)}, got {got[i]}"


def _check(cfg, wl, res, label):
    want = golden_embed(cfg, wl)
    bad = np.argwhere(res["x"] != want)
    if len(bad):
        t, c = bad[0]
        pytest.fail(f"PatchEmbed {label}: x[{t}, {c}] expected {want[t, c]}, got {res['x'][t, c]} "
                    f"({len(bad)} mismatches)")
    mc = cfg.model
    macs = mc.patches * mc.patch_dim * mc.dim
    print(f"PatchEmbed {label}: bit-exact; {res['cycles']} cycles, {macs / res['cycles']:.2f} MAC/cycle, "
          f"GEMM {res['gemm_cycles']}, waiting for patches {res['patch_wait_cycles']} / weights "
          f"{res['weight_wait_cycles']}, residual init {res['init_cycles']}")
    return want


@pytest.mark.parametrize("img, patch, dim, cin, R, C, tile, wbuf, stall", [
    ((8, 12), 2, 12, 3, 4, 4, None, None, 0.0),   # one patch tile
    ((6, 9), 3, 10, 3, 4, 4, 2, None, 0.3),       # D=10, K=27 (K tail), 3 slots' worth of tiles
    ((8, 8), 4, 12, 3, 2, 8, 1, 768, 0.2),        # 2x8 array, one patch per tile, 2 weight tiles
    ((6, 10), 2, 6, 1, 4, 2, 5, None, 0.3),       # grayscale, 4x2 array, tile not a multiple of pe_rows
])
def test_embed_bit_exact(img, patch, dim, cin, R, C, tile, wbuf, stall):
    cfg = embed_config(img=img, patch=patch, dim=dim, in_chans=cin, pe_rows=R, pe_cols=C, weight_buffer_bytes=wbuf)
    wl = make_embed_workload(cfg, seed=dim)
    sim = PatchEmbedSim(cfg, wl, patch_tile=tile, mem_bytes_per_cycle=8, latency=11, stall_prob=stall, seed=dim)
    if wbuf:
        assert len(sim.layout.tiles) > 1
    res = sim.run(frames=2 if tile == 2 else 1)
    for f, r in enumerate(res):
        _check(cfg, wl, r, f"{img} p{patch} D{dim} {R}x{C} tile {tile} frame {f}")


def test_embed_extremes_saturate():
    cfg = embed_config(img=(4, 6), patch=2, dim=12)
    wl = make_embed_workload(cfg, seed=3, extremes=True)
    res = PatchEmbedSim(cfg, wl, patch_tile=4, stall_prob=0.2, seed=3).run()[0]
    want = _check(cfg, wl, res, "extremes")
    lo, hi = numerics.int_range(numerics.RES_BITS)
    assert (want[1:] == lo).any() and (want[1:] == hi).any(), "extremes must saturate both ways"


def test_layout_k_order_and_records():
    """The permuted weights give golden's products on loader-ordered patches; the residual records hold
    cls_int and pos_int[1:]."""
    cfg = embed_config(img=(6, 9), patch=3, dim=10)
    wl = make_embed_workload(cfg, seed=8)
    image, lay = pack_embed(wl["qpatch"], wl["cls_int"], wl["pos_int"], cfg)
    frame = wl["img"].astype(np.int64) - 128
    patches = golden_model.patchify(frame.transpose(2, 0, 1), 3)
    order = loader_k_order(3, 3)
    loader_rows = np.stack([frame[py * 3:py * 3 + 3, px * 3:px * 3 + 3].reshape(-1)
                            for py in range(2) for px in range(3)])
    assert np.array_equal(patches[:, order], loader_rows)
    C, rw = cfg.pe_cols, cfg.row_words
    recs = np.stack([np.frombuffer(image[i * lay.res_record_bytes:i * lay.res_record_bytes + 2 * C], "<i2")
                     for i in range(lay.res_words)]).reshape(lay.tokens, rw * C)[:, :10]
    assert np.array_equal(recs[0], wl["cls_int"]) and np.array_equal(recs[1:], wl["pos_int"][1:])


def test_bad_parameters_are_refused():
    cfg = embed_config(img=(8, 12), patch=2, dim=12)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        PatchEmbed("tiny")
    with pytest.raises(ValueError, match="patch_tile must be in"):
        PatchEmbed(cfg, patch_tile=25)
    # The config sizes the act buffer for two patch slots of one row tile (and refuses less, naming
    # the patch embedding); a config that validates elaborates.
    big = embed_config(img=(8, 8), patch=8, dim=4)
    need = big.act_buffer_needs["embed"][0]
    assert big.act_buffer_bytes >= need == 2 * big.pe_rows * embed_buffer_map(big).kw * big.act_word_bytes
    Fragment.get(PatchEmbed(big), None)
    with pytest.raises(ValueError, match=rf"act_buffer_bytes must be >= {need} \(patch embedding: "):
        big.with_(act_buffer_bytes=need - big.act_word_bytes)
    with pytest.raises(ValueError, match="mem_data_bytes must be a power of two"):
        embed_config(img=(8, 12), patch=2, dim=12, mem_data_bytes=3)
    with pytest.raises(ValueError, match=r"mem_addr_width must address a 12288-byte camera frame "
                                          r"\(>= 14 bits\), not 13"):
        embed_config(img=(64, 64), patch=16, dim=4, mem_addr_width=13)
    with pytest.raises(ValueError, match=r"pos_int \[25, 12\], not"):
        wl = make_embed_workload(cfg)
        pack_embed(wl["qpatch"], wl["cls_int"], wl["pos_int"][1:], cfg)


def test_verilog_and_embedding():
    cfg = embed_config(img=(4, 4), patch=2, dim=8)
    text = verilog.convert(EmbeddingHarness(PatchEmbed(cfg)), name="embed_top")
    assert "module embed_top" in text


def test_cli_reports_and_refuses(tmp_path, capsys):
    import json
    from sim.patch_embed import main
    out = tmp_path / "r.json"
    assert main(["--image", "4x6", "--patch", "2", "--dim", "8", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["bit_exact"] and rep["mismatches"] == 0 and rep["macs"] == 6 * 12 * 8
    assert main(["--image", "6y9"]) == 2
    assert "--image must be HxW" in capsys.readouterr().err
    assert main(["--image", "6x9", "--patch", "2"]) == 2
    assert main(["--json", str(tmp_path / "no" / "r.json")]) == 2
