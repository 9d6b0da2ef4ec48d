"""Run the AXI top in Amaranth's simulator with :mod:`sim.axi_pysim`'s memory and CPU models.

:func:`run_top` places one compiled encoder image in memory, runs frames (one per ``(image, task)``)
through the register block and returns the tokens, the error register and the counters. It is the
Verilator-free check of the top; the third-party check is :mod:`sim.soc_cocotb`.
"""

from amaranth.sim import Simulator

from m3vit_hw.control.image_layout import output_row_bytes
from m3vit_hw.driver import unpack_tokens
from m3vit_hw.soc.regmap import COUNTED_OPS, OFFSETS
from m3vit_hw.soc.top import AcceleratorTop
from sim.axi_pysim import AxiLiteCpu, SparseBytes, axi_memory

__all__ = ["DEFAULT_PARAM_BASE", "DEFAULT_OUTPUT_BASE", "run_top"]

#: Beat-aligned but not page-aligned, so the core's bursts must respect 4 KiB wherever they fall.
DEFAULT_PARAM_BASE = 0x0001_0010
DEFAULT_OUTPUT_BASE = 0x0200_0FF0


def run_top(config, program, frames, *, axi_masters=1, pause=0.0, seed=0, bases=None, max_polls=200_000):
    """Run ``frames`` (``[(image_u8 HWC, task)]``) of the compiled ``program``; returns one dict per
    frame (``tokens``, ``error``, ``interrupt``, ``interrupt_after_clear``, ``tail``, counters).

    ``bases`` overrides ``{"PROGRAM", "PARAM", "OUTPUT", "IMAGE"}`` (default: the image at
    :data:`DEFAULT_PARAM_BASE`, its program section, the tokens at :data:`DEFAULT_OUTPUT_BASE`, the frame
    in the image's input section).
    """
    top = AcceleratorTop(config, axi_masters=axi_masters)
    lay = program.layout
    view = program.model_config
    param = (bases or {}).get("PARAM", DEFAULT_PARAM_BASE)
    # The frame goes into the image's input section, so IMAGE_BASE = PARAM_BASE.
    bases = dict({"PROGRAM": param + lay.program_addr, "PARAM": param, "OUTPUT": DEFAULT_OUTPUT_BASE,
                  "IMAGE": param}, **(bases or {}))
    mem = SparseBytes()
    mem.write(param, bytes(program.image))
    out_bytes = view.model.tokens * output_row_bytes(view)
    sim = Simulator(top)
    sim.add_clock(1e-8)
    for k in range(axi_masters):
        sim.add_testbench(axi_memory(top.m_axi[k], mem, data_bytes=top.axi_data_bytes, pause=pause,
                                     seed=seed * 16 + k), background=True)
    cpu = AxiLiteCpu(top.s_axi)
    results = []

    async def host(ctx):
        for name, a in bases.items():
            await cpu.write(ctx, OFFSETS[f"{name}_BASE_LO"], a)
        for img, task in frames:
            mem.write(param + lay.input_addr, img.tobytes())
            # Sentinels: the write strobes must leave the bytes after the tokens alone.
            mem.write(bases["OUTPUT"], b"\xA5" * (out_bytes + 16))
            await cpu.write(ctx, OFFSETS["TASK"], task)
            await cpu.write(ctx, OFFSETS["IRQ_ENABLE"], 1)
            await cpu.write(ctx, OFFSETS["CTRL"], 1)
            for _ in range(max_polls):
                if (await cpu.read(ctx, OFFSETS["STATUS"])) & 2:
                    break
            else:
                raise TimeoutError("AXI top: no STATUS.DONE")
            res = {"task": task, "interrupt": ctx.get(top.interrupt)}
            for name in ("ERROR", "CYCLES_LO", "INSN_COUNT"):
                res[name.lower()] = await cpu.read(ctx, OFFSETS[name])
            for op in COUNTED_OPS:
                res[f"op_cycles_{op.name.lower()}"] = await cpu.read(ctx, OFFSETS[f"OP_CYCLES_{op.name}"])
            await cpu.write(ctx, OFFSETS["IRQ_STATUS"], 1)
            res["interrupt_after_clear"] = ctx.get(top.interrupt)
            res["tokens"] = unpack_tokens(mem.read(bases["OUTPUT"], out_bytes), view)
            res["tail"] = mem.read(bases["OUTPUT"] + out_bytes, 16)
            results.append(res)

    sim.add_testbench(host)
    sim.run()
    return results
