"""Random but realistic integer MoE-layer workloads for the RTL runners and tests (no torch).

A workload is what one MoE layer of the accelerator sees: the int8 ``norm2`` output ``h`` [T, D], the int16
residual stream ``x`` [T, D], and the layer's integer parameters (:class:`reference.qparams.QMoE`) with one
gate per task. Values are drawn so that requantized results use the int8 range (neither all zero nor all
saturated) and routing is decisive, like a trained router; ``skew`` makes the token counts uneven.
"""

import math

import numpy as np

from m3vit_hw import numerics
from reference.qparams import QLinear, QMoE
from reference import golden_model

__all__ = ["make_moe_workload", "golden_moe", "gelu_table", "SKEWS"]

#: ``none``: logits as drawn; ``hot``: expert 0 wins every token's first slot (one expert gets all tokens,
#: others few); ``sparse``: only the first ``top_k`` experts can win (the rest get no tokens at all).
#: ``make_moe_workload`` takes one skew for every task, or a tuple with one skew per task (the skew is a
#: per-task logit bias, so one layer can route each task differently).
SKEWS = ("none", "hot", "sparse")


def gelu_table(s_in, s_out, zero=4):
    """The 256-entry GELU table of uint8 codes with zero point ``zero`` (docs/numerics.md §3), computed
    with math.erf."""
    out = []
    top = (1 << numerics.GELU_CODE_BITS) - 1
    for i in range(-128, 128):
        x = i * s_in
        y = 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))
        out.append(max(0, min(top, round(y / s_out) + zero)))
    return np.array(out, dtype=np.int64)


def _mult_for(k, rng, shape, target=48.0):
    """Multipliers mapping a K-term int8 dot product (std ~ 60*sqrt(K)*60) to std ~ ``target`` LSB."""
    real = target / (60.0 * 60.0 * math.sqrt(k))
    shift = int(math.floor(math.log2(((1 << numerics.MULT_BITS) - 1) / (real * 1.5))))
    mult = np.round(real * rng.uniform(0.5, 1.5, shape) * (1 << shift)).astype(np.int64)
    return mult, shift


def _linear(rng, experts, n_out, k_in, out_bits, target):
    w = np.clip(np.round(rng.standard_t(4, (experts, n_out, k_in)) * 40), -127, 127).astype(np.int64)
    bias = rng.integers(-2000, 2000, (experts, n_out))
    mult, shift = _mult_for(k_in, rng, (experts, n_out), target)
    return QLinear(w, bias, mult, shift, out_bits)


def make_moe_workload(experts, top_k, dim, hidden, tokens, tasks=1, seed=0, skew="none", router="multi_gate"):
    """Build a workload dict: ``h``, ``x``, ``qmoe``, and the parameters it was made from.

    ``router="task_embedding"`` makes the task-embedding router's integer form: ONE shared gate and a
    distinct per-task logit bias (the folded task representation, ``docs/numerics.md`` §7), so the tasks
    route differently through the same gate matrix.
    """
    if router not in ("multi_gate", "task_embedding"):
        raise ValueError(f"router must be 'multi_gate' or 'task_embedding', not {router!r}")
    for name, v, lo in (("experts", experts, 1), ("top_k", top_k, 1), ("dim", dim, 1),
                        ("hidden", hidden, 1), ("tokens", tokens, 1), ("tasks", tasks, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, not {v!r}")
    if top_k > experts:
        raise ValueError(f"top_k must be in [1, experts={experts}], not {top_k}")
    skews = (skew,) * tasks if isinstance(skew, str) else tuple(skew)
    if len(skews) != tasks or any(s not in SKEWS for s in skews):
        raise ValueError(f"skew must be one of {SKEWS} or a tuple of one per task ({tasks}), not {skew!r}")
    rng = np.random.default_rng(seed)
    h = np.clip(np.round(rng.normal(0, 40, (tokens, dim))), -128, 127).astype(np.int64)
    x = rng.integers(-6000, 6000, (tokens, dim))
    gates = [np.clip(np.round(rng.normal(0, 50, (dim, experts))), -127, 127).astype(np.int64)
             for _ in range(tasks if router == "multi_gate" else 1)]
    # Logit std is ~ 40*50*sqrt(D); scale the exponent so that std maps to ~2 nats, a decisive router.
    logit_std = 40.0 * 50.0 * math.sqrt(dim)
    task_bias = np.zeros((tasks, experts), dtype=np.int64)
    if router == "task_embedding":
        task_bias += np.round(rng.normal(0, logit_std, (tasks, experts))).astype(np.int64)
    for t, s in enumerate(skews):
        if s == "hot":
            task_bias[t, 0] = 1 << 24
        elif s == "sparse":
            task_bias[t, top_k:] = -(1 << 24)
    real = 2.0 / logit_std * math.log2(math.e) * (1 << numerics.EXP_FRAC_BITS)
    c_shift = int(math.floor(math.log2(((1 << numerics.SOFTMAX_MULT_BITS) - 1) / real)))
    c_mult = int(round(real * (1 << c_shift)))
    qmoe = QMoE(
        gates=gates, task_bias=task_bias, router_c_mult=[c_mult] * tasks, router_c_shift=[c_shift] * tasks,
        fc1=_linear(rng, experts, hidden, dim, numerics.ACT_BITS, 48.0),
        gelu_lut=gelu_table(3.0 / 48.0, 3.0 / 60.0),
        fc2=_linear(rng, experts, dim, hidden, numerics.RES_BITS, 3000.0),
    )
    return {"h": h, "x": x, "qmoe": qmoe, "experts": experts, "top_k": top_k, "dim": dim,
            "hidden": hidden, "tokens": tokens, "tasks": tasks, "seed": seed, "skew": skew, "router": router}


def golden_moe(workload, task):
    """The golden MoE layer on a workload: ``(x_out, routing)``."""
    return golden_model.moe_layer(workload["x"], workload["h"], workload["qmoe"], task, workload["top_k"],
                                  multi_gate=workload.get("router", "multi_gate") == "multi_gate")
