"""Float M³ViT reference model (PyTorch), built from a :class:`~m3vit_hw.model_config.ModelConfig`.

This is the float model of ``shared/DESIGN.md`` §2: the integer golden model is measured against it
(cosine, SQNR, routing agreement), and its ``state_dict`` layout is the training code's, so real
M³ViT checkpoints load into it (see :mod:`reference.checkpoint`).

Structure and ``state_dict`` names
----------------------------------
:class:`M3ViT` holds ``backbone`` (:class:`Encoder`) and ``decoders`` (one :class:`PUPHead` per task,
keyed by task name), exactly the two prefixes of a training checkpoint (which adds ``module.``).

* ``backbone.patch_embed.proj`` (Conv2d, kernel = stride = patch), ``backbone.cls_token`` [1,1,D],
  ``backbone.pos_embed`` [1,N+1,D].
* ``backbone.blocks.{i}``: ``norm1``, ``attn.qkv`` (D→3D, rows q|k|v), ``attn.proj``, ``norm2``, and
  ``mlp``: dense ``fc1``/``fc2`` on blocks where ``cfg.is_moe(i)`` is false, else :class:`MoEMlp` with
  ``experts.htoh4.{weight [E,h,D], bias [E,h]}``, ``experts.h4toh.{weight [E,D,h], bias [E,D]}`` and
  ``gate.{t}.w_gate``.
* Router ``multi_gate``: ``gate.{t}.w_gate`` [D,E], one per task ``t``.
  Router ``task_embedding``: the training code has a single ``gate.w_gate`` [D+g,E]; here it is
  ``gate.0.w_gate`` so that both routers share one layout (a ``ModuleList`` of gates, indexed by task
  for ``multi_gate`` and always 0 for ``task_embedding``). :mod:`reference.checkpoint` accepts the
  training code's name as an alias. The task representation lives in ``backbone.gate_task_represent``
  (``fc1`` T→g, GELU, ``fc2`` g→g, ``norm`` LayerNorm(g)).
* ``decoders.{task}``: ``norm``, ``conv_0..conv_3`` (3×3), ``syncbn_fc_0..3`` (BatchNorm), ``conv_4``
  (1×1), the names of the training code's ``VisionTransformerUpHead`` with ``num_conv=4``.

Gate semantics (inference: no noise)
------------------------------------
``logits = gate_in @ w_gate``; ``probs = softmax(logits)`` over **all** E experts; the top-k
probabilities are kept and the layer output is ``Σ_k p_k · expert_k(x)`` with the **raw** softmax
probabilities (no renormalisation over the top-k). Every token is routed; there is no capacity limit.
Top-k ties are broken toward the lowest expert index (a stable descending sort), so routing is a pure
function of the logits. The training code uses ``torch.topk``, whose tie order is unspecified; exact
ties do not happen with trained float weights, so this only pins down a corner case.

Intermediates
-------------
``encode(img, task, return_intermediates=True)`` returns a dict:

``"embed"``
    [B,T,D] tokens after patch embedding, cls token and ``pos_embed`` (the input of block 0).
``"blocks"``
    list of ``depth`` tensors [B,T,D]: the residual stream after each block.
``"routing"``
    {block: LongTensor [B,T,k]}: selected experts in **top-k order** (descending probability, ties to
    the lower index), for every MoE block.
``"combine"``
    {block: [B,T,k]}: the raw softmax probabilities of those experts, same order (the combine weights).
``"gate_logits"``, ``"gate_probs"``
    {block: [B,T,E]}: logits and softmax over all experts.
``"task_repr"``
    [g] task representation (``task_embedding`` router) or ``None``.
``"tokens"``
    [B,T,D] the encoder output (``blocks[-1]``; there is no final backbone norm).

``forward(img, task, return_intermediates=True)`` returns the same dict plus ``"output"``, the
decoder's dense prediction. ``T = N + 1`` tokens, cls first.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from m3vit_hw.model_config import ModelConfig, preset

__all__ = [
    "PatchEmbed", "Attention", "Mlp", "Gate", "ExpertLinear", "Experts", "Routing", "MoEMlp",
    "TaskRepresent", "Block", "Encoder", "PUPHead", "M3ViT", "route", "build_model",
]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``[B,C,H,W]`` → ``[B,N,D]`` in raster (row-major) order."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, img):
        return self.proj(img).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with the timm layout: ``qkv`` rows are q|k|v, each split into heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def _qkv(self, x):
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _attend(self, q, k):
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def probs(self, x):
        """Attention probabilities ``[B, heads, N, N]`` for the (already normalised) input ``x``.

        Exposed for analysis (entropy, calibration) so that nothing has to re-derive the head split.
        """
        q, k, _ = self._qkv(x)
        return self._attend(q, k)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        return self.proj((self._attend(q, k) @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Dense MLP: ``fc2(gelu(fc1(x)))`` with exact (erf) GELU."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Gate(nn.Module):
    """Holds one router matrix ``w_gate`` [gate_in, E] (no bias), as ``NoisyGate_VMoE`` does."""

    def __init__(self, gate_in, experts):
        super().__init__()
        self.w_gate = nn.Parameter(torch.zeros(gate_in, experts))


class ExpertLinear(nn.Module):
    """E stacked linear layers: ``weight`` [E, out, in], ``bias`` [E, out] (fastmoe ``FMoELinear``)."""

    def __init__(self, experts, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(experts, out_features))


class Experts(nn.Module):
    """The E experts of one MoE layer: ``htoh4`` (D→h), GELU, ``h4toh`` (h→D)."""

    def __init__(self, experts, dim, hidden):
        super().__init__()
        self.htoh4 = ExpertLinear(experts, dim, hidden)
        self.h4toh = ExpertLinear(experts, hidden, dim)

    def expert(self, e, x):
        """Expert ``e`` applied to tokens ``x`` [M, D]."""
        h = F.gelu(F.linear(x, self.htoh4.weight[e], self.htoh4.bias[e]))
        return F.linear(h, self.h4toh.weight[e], self.h4toh.bias[e])


class Routing(NamedTuple):
    """One MoE layer's routing decision for ``[..., gate_in]`` tokens.

    ``logits`` and ``probs`` are ``[..., E]``; ``experts`` (int64) and ``combine`` are ``[..., k]`` in
    top-k order: descending probability, ties toward the lower expert index.
    """
    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    combine: torch.Tensor


def route(gate_in, w_gate, top_k):
    """Inference routing of ``NoisyGate_VMoE``: softmax over all experts, keep the top-k.

    Parameters
    ----------
    gate_in : torch.Tensor
        ``[..., gate_in_dim]`` gate input.
    w_gate : torch.Tensor
        ``[gate_in_dim, E]``.
    top_k : int
        Experts kept per token, ``1 <= top_k <= E``.

    Returns
    -------
    Routing
        The combine weights are the raw softmax probabilities (not renormalised over the top-k).
    """
    logits = gate_in @ w_gate
    probs = logits.softmax(dim=-1)
    # A stable descending sort keeps equal probabilities in index order, which makes the tie-break
    # (lowest index wins) explicit instead of relying on torch.topk's unspecified order.
    values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return Routing(logits, probs, order[..., :top_k], values[..., :top_k])


class MoEMlp(nn.Module):
    """Mixture-of-experts MLP (fastmoe ``FMoETransformerMLP`` with ``NoisyGate_VMoE``, inference).

    ``gate`` is a ``ModuleList`` of :class:`Gate`: one per task for ``multi_gate``, a single shared one
    (index 0) for ``task_embedding``.

    The expert compute mirrors the accelerator's reordering: tokens are grouped by expert, each active
    expert runs once over its gathered tokens, idle experts are skipped. Results land in per-(token,
    slot) rows and are combined as ``Σ_k p_k · y_k`` in top-k order, the order of fastmoe's ``bmm``.
    """

    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg.experts
        self.top_k = cfg.top_k
        self.experts = Experts(cfg.experts, cfg.dim, cfg.expert_hidden)
        gates = cfg.num_tasks if cfg.router == "multi_gate" else 1
        self.gate = nn.ModuleList([Gate(cfg.gate_in_dim, cfg.experts) for _ in range(gates)])

    def route(self, gate_in, gate_index):
        """Routing of ``gate_in`` [..., gate_in_dim] through gate ``gate_index``."""
        return route(gate_in, self.gate[gate_index].w_gate, self.top_k)

    def combine_experts(self, x, experts, combine):
        """``Σ_k combine[:, k] · expert_{experts[:, k]}(x)`` for flat tokens ``x`` [M, D]."""
        M, D = x.shape
        k = experts.shape[-1]
        slots = x.new_zeros(M * k, D)
        flat = experts.reshape(-1)
        # Grouping by counting (bincount + stable order) rather than a per-expert mask scan keeps this
        # O(M·k) in bookkeeping, like the hardware's per-expert token queues.
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            sel = order[start:start + count]
            start += count
            slots[sel] = self.experts.expert(e, x[sel // k])
        return torch.bmm(combine.reshape(M, 1, k), slots.reshape(M, k, D)).reshape(M, D)

    def forward(self, x, gate_in, gate_index, return_routing=False):
        """MoE output for ``x`` [B,T,D] routed on ``gate_in`` [B,T,gate_in_dim]."""
        r = self.route(gate_in, gate_index)
        shape = x.shape
        out = self.combine_experts(x.reshape(-1, shape[-1]), r.experts.reshape(-1, self.top_k),
                                   r.combine.reshape(-1, self.top_k)).reshape(shape)
        return (out, r) if return_routing else out


class TaskRepresent(nn.Module):
    """Task representation of the ``task_embedding`` router: one-hot → fc1 → GELU → fc2 → LayerNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.num_tasks = cfg.num_tasks
        self.fc1 = nn.Linear(cfg.num_tasks, cfg.task_embed_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.task_embed_dim, cfg.task_embed_dim)
        self.norm = nn.LayerNorm(cfg.task_embed_dim, eps=cfg.ln_eps)

    def forward(self, task_index):
        one_hot = torch.zeros(self.num_tasks, dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
        one_hot[task_index] = 1.0
        return self.norm(self.fc2(self.act(self.fc1(one_hot))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x += attn(norm1(x)); x += mlp(norm2(x))``."""

    def __init__(self, cfg, index):
        super().__init__()
        self.index = index
        self.moe = cfg.is_moe(index)
        self.router = cfg.router
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = MoEMlp(cfg) if self.moe else Mlp(cfg.dim, cfg.mlp_hidden)

    def gate_input(self, h, task_repr):
        """Gate input for the normalised tokens ``h``: ``h`` itself, or ``[h, task_repr]``."""
        if self.router == "task_embedding":
            return torch.cat([h, task_repr.expand(*h.shape[:-1], task_repr.shape[-1])], dim=-1)
        return h

    def forward(self, x, task_index, task_repr=None):
        """Returns ``(x, routing)``; ``routing`` is a :class:`Routing` on MoE blocks, else ``None``."""
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        if not self.moe:
            return x + self.mlp(h), None
        gate_index = task_index if self.router == "multi_gate" else 0
        out, routing = self.mlp(h, self.gate_input(h, task_repr), gate_index, return_routing=True)
        return x + out, routing


class Encoder(nn.Module):
    """The M³ViT backbone (``VisionTransformerMoE``): patch embedding, cls token, ``pos_embed``, blocks.

    There is no final norm: each decoder has its own.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.tokens, cfg.dim))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        if cfg.router == "task_embedding":
            self.gate_task_represent = TaskRepresent(cfg)
        else:
            self.gate_task_represent = None

    def embed(self, img):
        """Tokens entering block 0: ``[cls, patches] + pos_embed``, ``[B, T, D]``."""
        cfg = self.cfg
        expected = (cfg.in_chans, *cfg.img_size)
        if img.dim() != 4 or tuple(img.shape[1:]) != expected:
            raise ValueError(f"img must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] for "
                             f"model {cfg.name!r}, not {list(img.shape)}")
        x = self.patch_embed(img)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def task_repr(self, task_index):
        """The ``[g]`` task representation, or ``None`` with the ``multi_gate`` router."""
        if self.gate_task_represent is None:
            return None
        return self.gate_task_represent(task_index)

    def forward(self, img, task, return_intermediates=False):
        """Encoder tokens ``[B, T, D]`` for task ``task`` (name or index); see the module docstring."""
        task_index = self.cfg.task_id(task)
        x = self.embed(img)
        task_repr = self.task_repr(task_index)
        if not return_intermediates:
            for blk in self.blocks:
                x, _ = blk(x, task_index, task_repr)
            return x
        inter = {"embed": x, "blocks": [], "routing": {}, "combine": {}, "gate_logits": {},
                 "gate_probs": {}, "task_repr": task_repr}
        for i, blk in enumerate(self.blocks):
            x, r = blk(x, task_index, task_repr)
            inter["blocks"].append(x)
            if r is not None:
                inter["routing"][i] = r.experts
                inter["combine"][i] = r.combine
                inter["gate_logits"][i] = r.logits
                inter["gate_probs"][i] = r.probs
        inter["tokens"] = x
        return inter


class PUPHead(nn.Module):
    """Progressive-upsampling (PUP) decoder head of one task (``VisionTransformerUpHead``, 4 convs).

    ``norm`` on the patch tokens (cls dropped), reshape to the ``H/p × W/p`` grid, then three stages of
    3×3 conv → BatchNorm → ReLU → 2× bilinear upsampling, a fourth 3×3 conv → BatchNorm → ReLU, the
    1×1 ``conv_4`` to the task's channels, and a final bilinear resize to the image size
    (``align_corners=False``). With ``patch_size = 16`` that last resize is the fourth 2× upsampling of
    the training code; for other patch sizes it still lands on the image size. Float only: the
    accelerator produces the encoder tokens and the host runs this.
    """

    def __init__(self, cfg, out_channels):
        super().__init__()
        self.grid = cfg.grid
        self.img_size = cfg.img_size
        ch = cfg.decoder_channels
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.conv_0 = nn.Conv2d(cfg.dim, ch, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(ch, ch, kernel_size=3, padding=1)
        self.conv_2 = nn.Conv2d(ch, ch, kernel_size=3, padding=1)
        self.conv_3 = nn.Conv2d(ch, ch, kernel_size=3, padding=1)
        self.conv_4 = nn.Conv2d(ch, out_channels, kernel_size=1)
        self.syncbn_fc_0 = nn.BatchNorm2d(ch)
        self.syncbn_fc_1 = nn.BatchNorm2d(ch)
        self.syncbn_fc_2 = nn.BatchNorm2d(ch)
        self.syncbn_fc_3 = nn.BatchNorm2d(ch)

    def forward(self, tokens):
        """``[B, T, D]`` encoder tokens → ``[B, out_channels, H, W]``."""
        x = self.norm(tokens[:, 1:])
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *self.grid)
        stages = [(self.conv_0, self.syncbn_fc_0), (self.conv_1, self.syncbn_fc_1),
                  (self.conv_2, self.syncbn_fc_2), (self.conv_3, self.syncbn_fc_3)]
        for i, (conv, bn) in enumerate(stages):
            x = F.relu(bn(conv(x)))
            if i < 3:
                x = F.interpolate(x, size=(x.shape[-2] * 2, x.shape[-1] * 2), mode="bilinear",
                                  align_corners=False)
        x = self.conv_4(x)
        return F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)


class M3ViT(nn.Module):
    """The whole multi-task model: ``backbone`` (:class:`Encoder`) and ``decoders[task]``.

    Parameters
    ----------
    cfg : ModelConfig
        Model dimensions; task names must be usable as module names (no ``.``).
    """

    def __init__(self, cfg):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, not {type(cfg).__name__}")
        for t in cfg.tasks:
            if not isinstance(t, str) or not t or "." in t:
                raise ValueError(f"task names must be non-empty strings without '.', not {t!r}")
        self.cfg = cfg
        self.backbone = Encoder(cfg)
        self.decoders = nn.ModuleDict({t: PUPHead(cfg, c) for t, c in zip(cfg.tasks, cfg.task_channels)})

    def encode(self, img, task, return_intermediates=False):
        """Encoder tokens ``[B, T, D]`` (or the intermediates dict) for task ``task``."""
        return self.backbone(img, task, return_intermediates=return_intermediates)

    def forward(self, img, task, return_intermediates=False):
        """Dense prediction ``[B, C_task, H, W]`` of task ``task`` (name or index).

        With ``return_intermediates=True`` returns the :meth:`encode` dict plus ``"output"``.
        """
        name = self.cfg.tasks[self.cfg.task_id(task)]
        if not return_intermediates:
            return self.decoders[name](self.encode(img, task))
        inter = self.encode(img, task, return_intermediates=True)
        inter["output"] = self.decoders[name](inter["tokens"])
        return inter


def _init_weights(model):
    """The training code's init: Linear and expert weights trunc_normal(0.02) with zero biases,
    LayerNorm (1, 0), ``w_gate`` kaiming_uniform(a=√5), cls/pos trunc_normal(0.02).

    Convolutions (patch embedding, decoder) keep PyTorch's default init, as in the training code.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, ExpertLinear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Gate):
            # fan_in of a [D, E] tensor is E for kaiming_uniform_: same call, same bound as the original.
            nn.init.kaiming_uniform_(m.w_gate, a=math.sqrt(5))
    nn.init.trunc_normal_(model.backbone.cls_token, std=0.02)
    nn.init.trunc_normal_(model.backbone.pos_embed, std=0.02)


def build_model(cfg_or_preset_name, seed=0):
    """Build an :class:`M3ViT` with the training code's random init, deterministically from ``seed``.

    Parameters
    ----------
    cfg_or_preset_name : ModelConfig or str
        A config, or a name in :data:`~m3vit_hw.model_config.PRESETS`.
    seed : int
        Seeds the init; the global RNG state is restored afterwards.

    Returns
    -------
    M3ViT
        In ``eval()`` mode (BatchNorm uses running statistics), float32.
    """
    if isinstance(cfg_or_preset_name, str):
        cfg = preset(cfg_or_preset_name)
    elif isinstance(cfg_or_preset_name, ModelConfig):
        cfg = cfg_or_preset_name
    else:
        raise TypeError(f"cfg_or_preset_name must be a ModelConfig or a preset name, "
                        f"not {type(cfg_or_preset_name).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, not {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = M3ViT(cfg)
        _init_weights(model)
    return model.eval()
