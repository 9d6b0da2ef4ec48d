"""Synthetic weights with the statistics of a trained M³ViT, for when no checkpoint is at hand.

Why
---
The integer golden model and the RTL must be judged on weights that stress the numerics the way a trained
network does. The training code's random init (trunc-normal 0.02, unit LayerNorms, zero biases) is far
too benign: every channel looks alike, nothing has heavy tails, attention is nearly uniform and the
router is a coin toss (logits of order 0.1, so top-k is decided by near-ties). A quantisation scheme that
works on that can still fail on a real checkpoint. :func:`make_trained_like` replaces the weights, in
place, by weights with the features known from trained ViTs (and LLMs) that matter for integer
inference:

How each tensor is made
-----------------------
* **Heavy tails.** Every weight and bias is drawn from a Student-t distribution with
  ``_T_DOF = 4`` degrees of freedom, rescaled to unit variance, times the wanted std: most values are
  small, but the kurtosis is 10–25 and the largest of a W1 expert tensor's million values lies 20–45
  std out, which sets the per-tensor range a quantiser must cover.
* **Linear weights** have std ``gain / sqrt(fan_in)``: 0.02–0.05 for W1 (D=192) except q/k (below),
  in the range of trained DeiT-tiny. The gains (``_GAIN``) keep the residual stream growing moderately
  over the depth (about 2× from the embedding to block 11 for W1) instead of vanishing or exploding.
* **Attention that attends.** Per head, the key projection is a mix of the query projection and a
  fresh matrix, ``W_k = ρ W_q + sqrt(1-ρ²) R`` with ``ρ ~ U(0.3, 0.9)``, so that q·k is large for
  similar tokens. The q and k rows (weights and biases) of each block are then scaled by one factor,
  found by bisection on calibration tokens, so that the block's mean attention entropy is a target
  drawn from ``_ATTN_ENTROPY`` = 0.5–0.75 of ``log(T)``: trained heads attend selectively, random
  init attends almost uniformly. For W1 this leaves q/k weight stds of 0.06–0.15.
* **Smooth position embedding.** ``pos_embed`` is one low-frequency 2-D sinusoid per channel over the
  patch grid (std 0.5; neighbouring patches get similar embeddings, as learned ones do) plus t-noise
  of std 0.15; ``cls_token`` is t-noise of std 0.5. Learned embeddings are far larger than the 0.02 of
  the init.
* **Outlier channels.** 2 (D < 64) or 3 residual channels get a consistent-sign bias in the patch
  embedding and in every ``attn.proj``, ``fc2`` and ``h4toh``, summing over the depth to
  ``_OUTLIER_SHARE · sqrt(D / n_outliers)`` (16 for W1; about 10× the median channel rms after the
  last block). The LayerNorm inputs then have a few channels that dominate their range and their
  variance (the massive-activation channels of trained transformers), while the LayerNorm gammas on
  those channels are small (0.05–0.2), as trained networks learn to damp them.
* **LayerNorm affine.** Gammas are log-normal around 1 (``σ = 0.3``), betas t-distributed with std
  0.05, so channels are scaled unevenly after normalisation.
* **Biases** are non-zero: t-distributed, std 0.02 (qkv, proj, fc2, h4toh) and std 0.05 with a negative
  mean of -0.05 for fc1/htoh4 (trained MLPs bias the GELU input slightly negative).
* **Decisive routers.** Each ``w_gate`` is fitted to the tokens it will see. Calibration images
  (:func:`reference.inputs.synthetic_images`, ``seed + _CALIB_SEED_OFFSET``, so they differ from
  evaluation images drawn with small seeds) are run through the model block by block; at each MoE
  block the gate inputs of every task are collected, a few Lloyd (k-means) iterations find E token
  clusters, and the gate columns are the cluster centres, made orthogonal to the mean token (so no
  expert wins everywhere) and scaled so that the median across tokens of the logit std across experts
  is ``_GATE_LOGIT_STD = 2.5``. Tokens then have a clear favourite instead of near-ties: for W1 on
  evaluation images the median top-1 vs top-3 probability gap is 0.15–0.25 (top-1 probability about
  0.35 of 16 experts) and nearly all experts get tokens. With ``multi_gate`` each task's gate gets its own clustering
  (different tokens, different initial centres); with ``task_embedding`` the rows of ``w_gate`` that
  read the task representation are t-noise scaled so that the task shifts the logits by about 1 (std
  across experts), which moves the preferred experts per task.
* The task-representation MLP gets trained-like weights as above; decoder LayerNorms get the same
  gamma/beta treatment; decoder convolutions and BatchNorms keep their init (float-only, host side).

Everything is drawn from a private ``torch.Generator`` seeded with ``seed``; the global RNG is untouched.
"""

import math

import torch

from .inputs import synthetic_images
from .model import M3ViT, MoEMlp

__all__ = ["make_trained_like"]

_T_DOF = 4  # fixed: _t draws the chi2 variate in closed form for 4 dof
# Linear weight std = gain / sqrt(fan_in).
_GAIN = {
    "patch": 1.0,
    "q": 1.1,          # q and k: a starting point only, rescaled per block by _calibrate_attention
    "v": 0.7,
    "proj": 0.6,
    "fc1": 0.7,
    "fc2": 0.6,
    "task": 1.0,
}
_LN_GAMMA_SIGMA = 0.3
_LN_BETA_STD = 0.05
_OUTLIER_GAMMA = (0.05, 0.2)
# The outlier biases of all blocks sum to _OUTLIER_SHARE * sqrt(D / n) per outlier channel: n channels
# of that size carry _OUTLIER_SHARE**2 times the variance of the D unit-scale ones.
_OUTLIER_SHARE = 2.0
_POS_STD = 0.5
_GATE_LOGIT_STD = 2.5
# Mean attention entropy per block, as a fraction of log(tokens): drawn uniformly from this range.
_ATTN_ENTROPY = (0.5, 0.75)
_TASK_LOGIT_STD = 1.0
_KMEANS_ITERS = 8
_CALIB_SEED_OFFSET = 1_000_003


def _t(gen, shape, std, mean=0.0):
    """Student-t (``_T_DOF`` dof) samples rescaled to the given std."""
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    # chi2 with 4 dof is a sum of two exponentials of mean 2: -2 ln(U1 U2); cheaper than 4 squared
    # normals, and this runs over every expert weight.
    u = torch.rand((2, *shape), generator=gen, dtype=torch.float64).clamp_min(1e-300)
    chi2 = -2.0 * torch.log(u[0] * u[1])
    t = normal / torch.sqrt(chi2 / _T_DOF)
    return mean + std * t / math.sqrt(_T_DOF / (_T_DOF - 2))


def _set(param, value):
    param.copy_(value.to(param.dtype).reshape(param.shape))


def _linear(gen, weight, bias, gain, bias_std, bias_mean=0.0):
    fan_in = weight.shape[-1]
    _set(weight, _t(gen, weight.shape, gain / math.sqrt(fan_in)))
    if bias is not None:
        _set(bias, _t(gen, bias.shape, bias_std, bias_mean))


def _layernorm(gen, norm, outliers=None):
    gamma = torch.exp(_LN_GAMMA_SIGMA * torch.randn(norm.weight.shape, generator=gen, dtype=torch.float64))
    beta = _t(gen, norm.bias.shape, _LN_BETA_STD)
    if outliers is not None:
        lo, hi = _OUTLIER_GAMMA
        gamma[outliers] = lo + (hi - lo) * torch.rand(len(outliers), generator=gen, dtype=torch.float64)
        beta[outliers] = 0.0
    _set(norm.weight, gamma)
    _set(norm.bias, beta)


def _smooth_pos(gen, cfg, std):
    """``[T, D]`` position embedding: low-frequency 2-D sinusoids over the grid plus t-noise."""
    rows, cols = cfg.grid
    yy = torch.arange(rows, dtype=torch.float64).reshape(-1, 1) / max(rows, 1)
    xx = torch.arange(cols, dtype=torch.float64).reshape(1, -1) / max(cols, 1)
    pos = torch.zeros(cfg.tokens, cfg.dim, dtype=torch.float64)
    for c in range(cfg.dim):
        fy, fx = (torch.rand(2, generator=gen, dtype=torch.float64) * 3.0).tolist()
        phase = float(torch.rand((), generator=gen, dtype=torch.float64)) * 2 * math.pi
        pos[1:, c] = torch.cos(2 * math.pi * (fy * yy + fx * xx) + phase).reshape(-1)
    pos[1:] = pos[1:] * std * math.sqrt(2.0)
    pos += _t(gen, pos.shape, 0.3 * std)
    return pos


def _kmeans(gen, x, k, iters):
    """Lloyd's algorithm on the rows of ``x`` (float64), initialised from distinct random rows."""
    n = x.shape[0]
    if n >= k:
        centres = x[torch.randperm(n, generator=gen)[:k]].clone()
    else:
        # Fewer tokens than experts (tiny configs): pad with random directions of the same scale.
        extra = torch.randn(k - n, x.shape[1], generator=gen, dtype=torch.float64) * x.std()
        centres = torch.cat([x, extra])
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(dim=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return centres


def _fit_gate(gen, tokens, experts):
    """``[D_in, E]`` gate columns from cluster centres of ``tokens`` [M, D_in] (float64)."""
    mean = tokens.mean(dim=0)
    centred = tokens - mean
    centres = _kmeans(gen, centred, experts, _KMEANS_ITERS)
    # Keep the gate blind to the mean token: a component along it would be a per-expert constant
    # that sends every token to the same expert.
    unit_mean = mean / mean.norm().clamp_min(1e-12)
    centres = centres - (centres @ unit_mean).unsqueeze(1) * unit_mean
    centres = centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = centres.T
    spread = (tokens @ w).std(dim=1).median()
    return w * (_GATE_LOGIT_STD / spread.clamp_min(1e-12))


def _calibrate_attention(gen, attn, h, tokens):
    """Scale the q and k rows of ``attn.qkv`` so the mean attention entropy on ``h`` hits a target.

    Scaling q and k (weights and biases) by ``a`` scales every score by ``a**2``, so the scores are
    computed once and the bisection on ``log a`` only re-runs the softmax, on at most 128 query rows.
    The target is drawn per block from ``_ATTN_ENTROPY`` (fractions of ``log(tokens)``).
    """
    lo, hi = _ATTN_ENTROPY
    target = (lo + (hi - lo) * float(torch.rand((), generator=gen))) * math.log(tokens)
    q, k, _ = attn._qkv(h)
    # A sample of query rows estimates the mean entropy well and keeps W2 (1201 tokens) cheap.
    rows = torch.randperm(q.shape[-2], generator=gen)[:128]
    scores = (q[..., rows, :] @ k.transpose(-2, -1)) * attn.scale

    def entropy(log_a):
        logp = (scores * math.exp(2 * log_a)).log_softmax(dim=-1)
        return float(-(logp.exp() * logp).sum(dim=-1).mean())

    log_lo, log_hi = -4.0, 4.0
    for _ in range(24):
        mid = 0.5 * (log_lo + log_hi)
        # Entropy falls as the scores sharpen.
        if entropy(mid) > target:
            log_lo = mid
        else:
            log_hi = mid
    D = h.shape[-1]
    a = math.exp(0.5 * (log_lo + log_hi))
    attn.qkv.weight[:2 * D] *= a
    attn.qkv.bias[:2 * D] *= a


def _calibrate(gen, model, images):
    """Walk the blocks in order, fitting attention sharpness and every MoE gate on the tokens that
    actually reach them (so each fit sees the effect of the ones before it)."""
    bb = model.backbone
    cfg = model.cfg
    xs = [bb.embed(images) for _ in range(cfg.num_tasks)]
    reprs = [bb.task_repr(t) for t in range(cfg.num_tasks)]
    for blk in bb.blocks:
        # Attention weights are shared by the tasks; one image of task 0 is enough to set their sharpness.
        _calibrate_attention(gen, blk.attn, blk.norm1(xs[0][:1]), cfg.tokens)
        if blk.moe:
            mids = [x + blk.attn(blk.norm1(x)) for x in xs]
            normed = [blk.norm2(m).reshape(-1, cfg.dim).double() for m in mids]
            if cfg.router == "multi_gate":
                for t in range(cfg.num_tasks):
                    _set(blk.mlp.gate[t].w_gate, _fit_gate(gen, normed[t], cfg.experts))
            else:
                w_tok = _fit_gate(gen, torch.cat(normed), cfg.experts)
                w_task = _t(gen, (cfg.task_embed_dim, cfg.experts), 1.0)
                offsets = torch.stack([r.double() @ w_task for r in reprs])
                w_task = w_task * (_TASK_LOGIT_STD / offsets.std(dim=1).mean().clamp_min(1e-12))
                _set(blk.mlp.gate[0].w_gate, torch.cat([w_tok, w_task]))
        xs = [blk(x, t, reprs[t])[0] for t, x in enumerate(xs)]


@torch.no_grad()
def make_trained_like(model, seed):
    """Overwrite ``model``'s weights, in place, with trained-looking ones (see the module docstring).

    Parameters
    ----------
    model : M3ViT
        Any config; its dtype is kept.
    seed : int
        Seeds a private generator: the same model config and seed give the same weights.

    Returns
    -------
    M3ViT
        ``model`` itself, in ``eval()`` mode.
    """
    if not isinstance(model, M3ViT):
        raise TypeError(f"model must be an M3ViT, not {type(model).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, not {seed!r}")
    model.eval()
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    bb = model.backbone
    D = cfg.dim

    n_out = 2 if D < 64 else 3
    outliers = torch.randperm(D, generator=gen)[:n_out]
    signs = torch.where(torch.rand(n_out, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    # Two biased writers per block plus the patch embedding share the target magnitude.
    per_bias = _OUTLIER_SHARE * math.sqrt(D / n_out) / (2 * cfg.depth + 1)

    def add_outlier_bias(bias):
        b = bias.double().clone()
        b[..., outliers] += signs * per_bias
        _set(bias, b)

    proj = bb.patch_embed.proj
    _set(proj.weight, _t(gen, proj.weight.shape, _GAIN["patch"] / math.sqrt(cfg.patch_dim)))
    _set(proj.bias, _t(gen, proj.bias.shape, 0.02))
    add_outlier_bias(proj.bias)
    _set(bb.cls_token, _t(gen, bb.cls_token.shape, _POS_STD))
    _set(bb.pos_embed, _smooth_pos(gen, cfg, _POS_STD))

    hd = cfg.head_dim
    for blk in bb.blocks:
        _layernorm(gen, blk.norm1, outliers)
        _layernorm(gen, blk.norm2, outliers)
        qkv = blk.attn.qkv
        std_qk = _GAIN["q"] / math.sqrt(D)
        wq = _t(gen, (cfg.heads, hd, D), std_qk)
        rho = 0.3 + 0.6 * torch.rand(cfg.heads, 1, 1, generator=gen, dtype=torch.float64)
        wk = rho * wq + torch.sqrt(1 - rho ** 2) * _t(gen, (cfg.heads, hd, D), std_qk)
        wv = _t(gen, (D, D), _GAIN["v"] / math.sqrt(D))
        _set(qkv.weight, torch.cat([wq.reshape(D, D), wk.reshape(D, D), wv]))
        _set(qkv.bias, _t(gen, qkv.bias.shape, 0.02))
        _linear(gen, blk.attn.proj.weight, blk.attn.proj.bias, _GAIN["proj"], 0.02)
        add_outlier_bias(blk.attn.proj.bias)
        if isinstance(blk.mlp, MoEMlp):
            ex = blk.mlp.experts
            _linear(gen, ex.htoh4.weight, ex.htoh4.bias, _GAIN["fc1"], 0.05, -0.05)
            _linear(gen, ex.h4toh.weight, ex.h4toh.bias, _GAIN["fc2"], 0.02)
            add_outlier_bias(ex.h4toh.bias)
        else:
            _linear(gen, blk.mlp.fc1.weight, blk.mlp.fc1.bias, _GAIN["fc1"], 0.05, -0.05)
            _linear(gen, blk.mlp.fc2.weight, blk.mlp.fc2.bias, _GAIN["fc2"], 0.02)
            add_outlier_bias(blk.mlp.fc2.bias)

    if bb.gate_task_represent is not None:
        tr = bb.gate_task_represent
        _linear(gen, tr.fc1.weight, tr.fc1.bias, _GAIN["task"], 0.05)
        _linear(gen, tr.fc2.weight, tr.fc2.bias, _GAIN["task"], 0.05)
        _layernorm(gen, tr.norm)
    for head in model.decoders.values():
        _layernorm(gen, head.norm, outliers)

    images = synthetic_images(cfg, max(2, min(8, math.ceil(256 / cfg.tokens))), seed + _CALIB_SEED_OFFSET)
    _calibrate(gen, model, images.to(bb.pos_embed.dtype))
    return model
