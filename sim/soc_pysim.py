"""Run the AXI top in Amaranth's simulator with :mod:`sim.axi_pysim`'s memory and CPU models.

:func:`run_top` loads one MoE-layer workload into memory, runs it (one run per task given) through the
register block and returns the outputs, the error registers and the counters. It is the quick,
Verilator-free check of the top; the third-party check is :mod:`sim.soc_cocotb`.
"""

from amaranth.sim import Simulator

from m3vit_hw.moe.expert_layout import pack_moe
from m3vit_hw.soc.image import pack_image, pack_program, unpack_output
from m3vit_hw.soc.regmap import OFFSETS
from m3vit_hw.soc.top import AcceleratorTop
from sim.axi_pysim import AxiLiteCpu, SparseBytes, axi_memory

__all__ = ["DEFAULT_BASES", "run_top"]

#: Beat-aligned but not page-aligned, so bursts must be split at 4 KiB.
DEFAULT_BASES = {"PROGRAM": 0x0001_0FF0, "WEIGHTS": 0x0002_0FD0, "IMAGE": 0x0100_0FE0, "OUTPUT": 0x0200_0FF0}


def run_top(config, workload, tasks, *, axi_masters=1, pause=0.0, seed=0, bases=None, max_polls=20000):
    """Run ``workload`` once per task in ``tasks``; returns a list of dicts (``x``, ``error``, counters)."""
    top = AcceleratorTop(config, axi_masters=axi_masters)
    bases = dict(DEFAULT_BASES, **(bases or {}))
    mem = SparseBytes()
    qmoe = workload["qmoe"]
    T = workload["h"].shape[0]
    mem.write(bases["WEIGHTS"], pack_moe(qmoe, config)[0])
    mem.write(bases["PROGRAM"], pack_program(qmoe, top.image, T, top.config_id))
    mem.write(bases["IMAGE"], pack_image(workload["h"], workload["x"], top.image))
    sim = Simulator(top)
    sim.add_clock(1e-8)
    for k in range(axi_masters):
        sim.add_testbench(axi_memory(top.m_axi[k], mem, data_bytes=top.data_bytes, pause=pause,
                                     seed=seed * 16 + k), background=True)
    cpu = AxiLiteCpu(top.s_axi)
    results = []

    async def host(ctx):
        for name, a in bases.items():
            await cpu.write(ctx, OFFSETS[f"{name}_BASE_LO"], a)
        for task in tasks:
            await cpu.write(ctx, OFFSETS["TASK"], task)
            await cpu.write(ctx, OFFSETS["IRQ_ENABLE"], 1)
            await cpu.write(ctx, OFFSETS["CTRL"], 1)
            for _ in range(max_polls):
                if (await cpu.read(ctx, OFFSETS["STATUS"])) & 2:
                    break
            else:
                raise TimeoutError("AXI top: no STATUS.DONE")
            res = {"task": task, "interrupt": ctx.get(top.interrupt)}
            for name in ("ERROR", "CYCLES_LO", "LOAD_CYCLES", "LAYER_CYCLES", "STORE_CYCLES"):
                res[name.lower()] = await cpu.read(ctx, OFFSETS[name])
            await cpu.write(ctx, OFFSETS["IRQ_STATUS"], 1)
            res["interrupt_after_clear"] = ctx.get(top.interrupt)
            n = T * config.row_words * config.pe_cols * 2
            res["x"] = unpack_output(mem.read(bases["OUTPUT"], n), top.image, T)
            res["tail"] = mem.read(bases["OUTPUT"] + n, 16)
            results.append(res)

    sim.add_testbench(host)
    sim.run()
    return results
