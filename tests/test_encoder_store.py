# amaranth: UnusedElaboratable=no
"""StoreDma: residual words -> the external write port, for words narrower than a beat (packed, a final
partial beat with strobes), as wide as a beat and wider (cut), over 4 KiB boundaries and with stalls."""

import numpy as np
import pytest
from amaranth.hdl import Module, signed
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.encoder import StoreDma
from m3vit_hw.lib.mem_port import WritePortSignature
from m3vit_hw.model_config import ModelConfig
from sim.ext_memory import ExternalMemory
from sim.testbench import stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


class _Bench(wiring.Component):
    def __init__(self, config, words):
        self.dma = StoreDma(config)
        C = config.pe_cols
        self.res = memory.Memory(shape=data.ArrayLayout(signed(numerics.RES_BITS), C),
                                 depth=config.res_buffer_words, init=[list(map(int, w)) for w in words])
        port = dict(addr_width=config.mem_addr_width, data_bytes=config.mem_data_bytes,
                    max_burst=config.mem_max_burst)
        super().__init__({"wr": Out(WritePortSignature(**port))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.dma, m.submodules.res = self.dma, self.res
        wiring.connect(m, self.dma.res_rd, self.res.read_port())
        wiring.connect(m, self.dma.wr, wiring.flipped(self.wr))
        return m


@pytest.mark.parametrize("pe_cols, data_bytes, max_burst, base, res_base, count, stall", [
    (4, 16, 16, 0x1000, 3, 27, 0.0),      # 8-byte words, two a beat, an odd count: a half last beat
    (8, 16, 4, 0x0FC0, 0, 36, 0.3),       # a word a beat, 4-beat bursts across a 4 KiB boundary
    (16, 16, 16, 0x2000, 5, 13, 0.3),     # 32-byte words cut into two beats
])
def test_store_bytes(pe_cols, data_bytes, max_burst, base, res_base, count, stall):
    model = ModelConfig(name="st", img_size=(32, 64), dim=32, depth=2, heads=2, experts=4, top_k=2,
                        tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
    config = AcceleratorConfig(model=model, pe_rows=4, pe_cols=pe_cols, mem_data_bytes=data_bytes,
                               mem_max_burst=max_burst)
    rng = np.random.default_rng(pe_cols)
    assert res_base + count <= config.res_buffer_words
    words = rng.integers(-32768, 32768, (config.res_buffer_words, pe_cols))
    bench = _Bench(config, words)
    mem = ExternalMemory(bytes(base + 4096 + count * 2 * pe_cols), bytes_per_cycle=data_bytes,
                         stall_prob=stall, seed=pe_cols)
    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve_write(bench.wr), background=True)
    out = {}

    async def host(ctx):
        dma = bench.dma
        await stream_put(ctx, dma.start, {"res_base": res_base, "words": count, "addr": base})
        for cycle in range(20000):
            await ctx.tick()
            if ctx.get(dma.done):
                out["cycles"] = cycle
                break

    sim.add_testbench(host)
    sim.run()
    assert "cycles" in out, "no done"
    want = (words[res_base:res_base + count] & 0xFFFF).astype("<u2").tobytes()
    got = bytes(mem.data[base:base + len(want)])
    assert got == want, f"first differing byte {next(i for i in range(len(want)) if got[i] != want[i])}"
    assert bytes(mem.data[base + len(want):base + len(want) + 16]) == bytes(16), "wrote past the end"
    assert mem.bytes_written == len(want)
    print(f"store C={pe_cols}: {count} words in {out['cycles']} cycles, requests {mem.write_log}")
