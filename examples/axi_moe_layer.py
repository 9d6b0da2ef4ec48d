"""Run the accelerator's AXI top (MoE-layer core) in Amaranth's simulator with a memory and a CPU model.

    PYTHONPATH=. python examples/axi_moe_layer.py

The top is an ordinary ``wiring.Component``: a larger Amaranth design instantiates
``AcceleratorTop(config, axi_masters=N)`` and connects ``m_axi[k]`` (``AXI4Signature``) and ``s_axi``
(``AXI4LiteSignature``) with ``wiring.connect``; here the simulator's memory and CPU models
(``sim/axi_pysim.py``) sit on those ports instead.
"""

import time

from sim.moe_layer import moe_config
from sim.moe_workload import golden_moe, make_moe_workload
from sim.soc_pysim import run_top

cfg = moe_config(experts=4, top_k=2, dim=8, hidden=16, tokens=5, tasks=2)
work = make_moe_workload(4, 2, 8, 16, 5, tasks=2, seed=0)
t0 = time.time()
for r in run_top(cfg, work, [0, 1], axi_masters=2, pause=0.2):
    expected, _ = golden_moe(work, r["task"])
    print(f"task {r['task']}: bit-exact {bool((r['x'] == expected).all())}, ERROR 0x{r['error']:X}, "
          f"{r['cycles_lo']} cycles (load {r['load_cycles']}, layer {r['layer_cycles']}, "
          f"store {r['store_cycles']})")
print(f"simulated in {time.time() - t0:.1f} s")
