"""The integer M³ViT encoder: the golden model the accelerator must match bit for bit.

It composes the per-operation functions of :mod:`reference.golden` in the order the hardware runs
them. Inputs are int8 image pixels (see :func:`reference.quantize.quantize_image`), parameters a
:class:`reference.qparams.QuantizedEncoder`; everything in between is integer. No torch here: the
simulation runners use this module too.
"""

import numpy as np

from m3vit_hw import numerics
from . import golden as g

__all__ = ["patchify", "linear", "embed", "attention", "dense_mlp", "moe_layer", "block", "encode"]


def patchify(img, patch):
    """int image [3,H,W] -> patch rows [N, 3*patch*patch] in raster order, (c, kh, kw) inside a row.

    This matches the flattening of the patch-embedding convolution weight [D, 3, p, p].
    """
    c, h, w = img.shape
    x = img.reshape(c, h // patch, patch, w // patch, patch)
    return x.transpose(1, 3, 0, 2, 4).reshape((h // patch) * (w // patch), c * patch * patch)


def linear(x, q):
    """``requantize(x @ q.w.T, q.bias, q.mult, q.shift, q.out_bits)`` for a :class:`QLinear`."""
    return g.requantize(g.matmul(x, q.w.T), q.bias, q.mult, q.shift, q.out_bits)


def embed(qm, img_q):
    """Residual stream entering block 0, int16 [T, D]: cls row, then patch embeddings + pos_embed."""
    patches = patchify(np.asarray(img_q, dtype=np.int64), qm.cfg.patch_size)
    tok = g.residual_add(qm.pos_int[1:], linear(patches, qm.patch))
    return np.concatenate([qm.cls_int[None, :], tok], axis=0)


def attention(h, qa, heads, q_tile=None):
    """Multi-head attention on int8 LayerNorm output ``h`` [T, D] -> int8 context [T, D] (before proj).

    ``q_tile`` runs every head in query tiles (bit-identical; the form long sequences use).
    """
    d = h.shape[1]
    hd = d // heads
    qkv = linear(h, qa.qkv)
    out = np.empty_like(h)
    for i in range(heads):
        q, k, v = (qkv[:, s * d + i * hd: s * d + (i + 1) * hd] for s in range(3))
        args = (q, k, v, qa.c_mult, qa.c_shift, qa.out_mult, qa.out_shift)
        out[:, i * hd:(i + 1) * hd] = (g.attention_head_tiled(*args, q_tile) if q_tile
                                       else g.attention_head(*args))
    return out


def dense_mlp(x, h, qd):
    """Dense MLP with residual: ``x + fc2(gelu(fc1(h)))``, int16 [T, D]."""
    a = g.gelu(linear(h, qd.fc1), qd.gelu_lut)
    return g.residual_add(x, linear(a, qd.fc2))


def _expert(h, qe, e):
    """Expert ``e`` on int8 tokens h [M, D] -> its fc2 result at the residual scale, int16 [M, D]."""
    fc1 = qe.fc1
    a = g.requantize(g.matmul(h, fc1.w[e].T), fc1.bias[e], fc1.mult[e], fc1.shift, fc1.out_bits)
    a = g.gelu(a, qe.gelu_lut)
    fc2 = qe.fc2
    return g.requantize(g.matmul(a, fc2.w[e].T), fc2.bias[e], fc2.mult[e], fc2.shift, fc2.out_bits)


def moe_layer(x, h, qe, task, top_k, multi_gate=True, h_router=None, experts=None):
    """MoE MLP with residual, in the reordering controller's order.

    ``experts`` [T, k]: impose this expert choice instead of the top-k of the logits (a diagnostic:
    the fidelity report runs the integer model on the float model's routing to separate rounding
    error from routing flips; the hardware always uses its own top-k).

    Returns ``(x_out, routing)`` where routing is a dict with ``logits`` [T,E], ``probs`` [T,E] (Q0.15),
    ``experts`` [T,k] (best first) and ``active`` (ascending list of experts with tokens).
    """
    gate = task if multi_gate else 0
    # h_router: the 16-bit LN2 output when qe.router_h_shift > 0 (else the int8 h).
    logits = g.router_logits(h if h_router is None else h_router, qe.gates[gate], qe.task_bias[task])
    probs = g.router_probs(logits, qe.router_c_mult[gate], qe.router_c_shift[gate])
    if experts is None:
        experts = g.topk(logits, top_k)
    else:
        experts = np.asarray(experts, dtype=np.int64)
    queues, active = g.expert_queues(experts, probs, qe.fc1.w.shape[0])
    x = x.copy()
    for e in active:
        toks = np.array([t for t, _ in queues[e]], dtype=np.int64)
        wts = np.array([w for _, w in queues[e]], dtype=np.int64)
        y = _expert(h[toks], qe, e)
        x[toks] = g.moe_combine(x[toks], y, wts[:, None])
    return x, {"logits": logits, "probs": probs, "experts": experts, "active": active}


def block(qm, i, x, task, q_tile=None, experts=None):
    """Transformer block ``i`` on the int16 residual stream; returns ``(x, routing or None)``.

    ``experts``: imposed expert choice of an MoE block (see :func:`moe_layer`)."""
    cfg = qm.cfg
    qb = qm.blocks[i]
    h = g.layernorm(x, qb.ln1.eps_int, qb.ln1.gamma_mult, qb.ln1.beta_int, qb.ln1.shift, qb.ln1.out_bits)
    ctx = attention(h, qb.attn, cfg.heads, q_tile)
    x = g.residual_add(x, linear(ctx, qb.attn.proj))
    h = g.layernorm(x, qb.ln2.eps_int, qb.ln2.gamma_mult, qb.ln2.beta_int, qb.ln2.shift, qb.ln2.out_bits)
    if cfg.is_moe(i):
        h_router = None
        # A 16-bit LN2 output (ln_bits=16) already is the router's 16-bit input.
        if qb.mlp.router_h_shift and qb.ln2.out_bits == numerics.ACT_BITS:
            h_router = g.layernorm(x, qb.ln2.eps_int, qb.ln2.gamma_mult, qb.ln2.beta_int,
                                   qb.ln2.shift - qb.mlp.router_h_shift, numerics.RES_BITS)
        return moe_layer(x, h, qb.mlp, task, cfg.top_k, cfg.router == "multi_gate", h_router, experts)
    return dense_mlp(x, h, qb.mlp), None


def encode(qm, img_q, task, q_tile=None, return_intermediates=False, force_experts=None):
    """The integer encoder on one int8 image [3,H,W] for ``task`` (name or index).

    ``force_experts``: ``{block: [T, k] experts}`` imposed on those MoE blocks (diagnostic only).

    Returns the int16 encoder tokens [T, D] (scale ``qm.res_scale``), or with ``return_intermediates``
    a dict: ``embed``, ``blocks`` (list of int16 [T,D]), ``routing`` (block -> routing dict), ``tokens``.
    """
    cfg = qm.cfg
    task = cfg.task_id(task)
    img_q = np.asarray(img_q, dtype=np.int64)
    expected = (cfg.in_chans, *cfg.img_size)
    if img_q.shape != expected:
        raise ValueError(f"image must have shape {expected}, not {img_q.shape}")
    lo, hi = numerics.int_range(numerics.ACT_BITS)
    if img_q.min() < lo or img_q.max() > hi:
        raise ValueError("image must be int8 (quantize it with reference.quantize.quantize_image)")
    x = embed(qm, img_q)
    inter = {"embed": x, "blocks": [], "routing": {}}
    for i in range(cfg.depth):
        x, r = block(qm, i, x, task, q_tile, None if force_experts is None else force_experts.get(i))
        inter["blocks"].append(x)
        if r is not None:
            inter["routing"][i] = r
    inter["tokens"] = x
    return inter if return_intermediates else x
