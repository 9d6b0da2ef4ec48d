# amaranth: UnusedElaboratable=no
"""Run the accelerator's AXI top (the encoder behind AXI) in Amaranth's simulator with a memory and a CPU model.

    PYTHONPATH=. python examples/axi_encoder.py

The top is an ordinary ``wiring.Component``: a larger Amaranth design instantiates
``AcceleratorTop(config, axi_masters=N)`` and connects ``m_axi[k]`` (``AXI4Signature``) and ``s_axi``
(``AXI4LiteSignature``) with ``wiring.connect``; here the simulator's memory and CPU models
(``sim/axi_pysim.py``) sit on those ports instead. A small random encoder is compiled, its image placed
in memory, and one frame per task runs through the register block; the tokens are compared with the
reference (the golden model, or the program executor while the top lacks a unit).
"""

import time

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.model_config import ModelConfig
from sim.soc_frames import core_units, expected_tokens, make_frame, random_image
from sim.soc_pysim import run_top

model = ModelConfig(name="example", img_size=(8, 16), patch_size=4, dim=16, depth=2, heads=2, experts=2,
                    top_k=1, mlp_hidden=32, tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
cfg = AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)
program, qm, drop = make_frame(cfg, seed=0, units=core_units(cfg))
frames = [(random_image(model, t), t) for t in range(model.num_tasks)]
t0 = time.time()
for (img, task), r in zip(frames, run_top(cfg, program, frames, axi_masters=2, pause=0.2)):
    want, ref = expected_tokens(program, qm, drop, img, task)
    print(f"task {task}: bit-exact vs {ref}: {bool((r['tokens'] == want).all())}, ERROR 0x{r['error']:X}, "
          f"{r['cycles_lo']} cycles, {r['insn_count']} instructions")
print(f"simulated in {time.time() - t0:.1f} s")
