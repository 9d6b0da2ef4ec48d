"""The M³ViT model description shared by the generator, the reference model and the golden model.

This module is pure Python (no torch, no Amaranth) so that every layer of the project can read it:
the RTL generators size themselves from it, ``reference/`` builds the float and integer models from it,
and the build CLI names presets from it. The facts come from the M³ViT training code (see
``shared/DESIGN.md`` §2).
"""

from dataclasses import dataclass, replace
from .checks import check_int as _check_int

__all__ = ["ModelConfig", "PRESETS", "preset", "ROUTERS"]


#: Router variants. ``multi_gate``: one ``w_gate`` [D, E] per task (NoisyGate_VMoE with ``multi_gate``).
#: ``task_embedding``: one shared ``w_gate`` [D+g, E] whose input is the token concatenated with a
#: learned task representation (one-hot task -> MLP -> LayerNorm).
ROUTERS = ("multi_gate", "task_embedding")


#: Hidden widths whose ``None`` default is ``dim`` times this ratio (M³ViT's mlp_ratio, moe_mlp_ratio).
_DERIVED_FIELDS = {"mlp_hidden": 4, "expert_hidden": 2}


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of one M³ViT encoder (+ its task heads).

    Parameters
    ----------
    name : str
        Preset name, used in reports.
    img_size : (int, int)
        Input height and width in pixels; both multiples of ``patch_size``.
    patch_size : int
        Patch edge (16 in M³ViT).
    in_chans : int
        Image channels.
    dim : int
        Embedding width D.
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads; must divide ``dim``.
    mlp_hidden : int or None
        Hidden width of the dense MLP, any positive integer. Default ``4 * dim`` (M³ViT's
        ``mlp_ratio``), derived again by :meth:`with_` when ``dim`` changes.
    expert_hidden : int or None
        Hidden width h of one expert, any positive integer (``h < dim`` included). Default
        ``2 * dim`` (M³ViT's ``moe_mlp_ratio``). :meth:`from_ratios` builds both from ratios.
    experts : int
        Experts per MoE layer E.
    top_k : int
        Experts combined per token.
    tasks : tuple of str
        Task names, in task-id order.
    task_channels : tuple of int
        Output channels of each task's decoder head.
    router : str
        One of :data:`ROUTERS`.
    task_embed_dim : int
        Width g of the task representation (``task_embedding`` router only).
    moe_every : int
        MoE blocks are those with ``i % moe_every == moe_every - 1`` (odd blocks for 2).
    decoder_channels : int
        Width of the PUP decoder's convolutions.
    ln_eps : float
        LayerNorm epsilon.
    """

    name: str
    img_size: tuple
    dim: int
    depth: int
    heads: int
    experts: int
    top_k: int
    tasks: tuple = ("semseg", "depth")
    task_channels: tuple = (19, 1)
    patch_size: int = 16
    in_chans: int = 3
    mlp_hidden: int = None
    expert_hidden: int = None
    router: str = "multi_gate"
    task_embed_dim: int = 64
    moe_every: int = 2
    decoder_channels: int = 256
    ln_eps: float = 1e-6

    def __post_init__(self):
        # Remember which widths were derived, so that with_() derives them again from a new dim.
        object.__setattr__(self, "_derived", frozenset(
            name for name in _DERIVED_FIELDS if getattr(self, name) is None))
        if not isinstance(self.img_size, tuple) or len(self.img_size) != 2:
            raise TypeError(f"img_size must be a (height, width) tuple, not {self.img_size!r}")
        _check_int("patch_size", self.patch_size, 1)
        for axis, v in zip(("height", "width"), self.img_size):
            _check_int(f"img_size {axis}", v, self.patch_size)
            if v % self.patch_size:
                raise ValueError(f"img_size {axis} must be a multiple of patch_size={self.patch_size}, not {v}")
        _check_int("in_chans", self.in_chans, 1)
        _check_int("dim", self.dim, 1)
        _check_int("depth", self.depth, 1)
        _check_int("heads", self.heads, 1)
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim={self.dim}, not {self.heads}")
        for name, ratio in _DERIVED_FIELDS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.dim * ratio)
            _check_int(name, getattr(self, name), 1)
        _check_int("experts", self.experts, 1)
        _check_int("top_k", self.top_k, 1, self.experts)
        _check_int("moe_every", self.moe_every, 1)
        _check_int("task_embed_dim", self.task_embed_dim, 1)
        _check_int("decoder_channels", self.decoder_channels, 1)
        if not isinstance(self.tasks, tuple) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty tuple of names, not {self.tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, not {self.tasks!r}")
        if not isinstance(self.task_channels, tuple) or len(self.task_channels) != len(self.tasks):
            raise ValueError(f"task_channels must give one channel count per task ({len(self.tasks)}), "
                             f"not {self.task_channels!r}")
        for t, c in zip(self.tasks, self.task_channels):
            _check_int(f"task_channels[{t}]", c, 1)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, not {self.router!r}")
        if not (self.ln_eps > 0):
            raise ValueError(f"ln_eps must be > 0, not {self.ln_eps!r}")

    # Derived sizes: every other module reads these rather than recomputing them.
    @property
    def grid(self):
        """Patch grid (rows, cols)."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def patches(self):
        return self.grid[0] * self.grid[1]

    @property
    def tokens(self):
        """Tokens per frame, including the cls token."""
        return self.patches + 1

    @property
    def head_dim(self):
        return self.dim // self.heads

    @property
    def patch_dim(self):
        """K of the patch-embedding GEMM."""
        return self.in_chans * self.patch_size * self.patch_size

    @property
    def num_tasks(self):
        return len(self.tasks)

    @property
    def gate_in_dim(self):
        """Input width of ``w_gate``: D, or D+g with the task-embedding router."""
        return self.dim + (self.task_embed_dim if self.router == "task_embedding" else 0)

    def is_moe(self, block):
        """Whether block ``block`` has an MoE MLP."""
        return block % self.moe_every == self.moe_every - 1

    @property
    def moe_blocks(self):
        return tuple(i for i in range(self.depth) if self.is_moe(i))

    def task_id(self, task):
        """Task index for a name or an index, with a clear error."""
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < self.num_tasks:
                raise ValueError(f"task must be in [0, {self.num_tasks - 1}], not {task}")
            return task
        if task not in self.tasks:
            raise ValueError(f"task must be one of {self.tasks}, not {task!r}")
        return self.tasks.index(task)

    def macs_per_frame(self):
        """Encoder MACs per frame for one task, counting top-k experts per token (no decoder)."""
        T, D = self.tokens, self.dim
        macs = self.patches * self.patch_dim * D
        for i in range(self.depth):
            macs += T * D * 3 * D + 2 * T * T * D + T * D * D
            if self.is_moe(i):
                macs += T * self.gate_in_dim * self.experts
                macs += T * self.top_k * 2 * D * self.expert_hidden
            else:
                macs += T * 2 * D * self.mlp_hidden
        return macs

    @classmethod
    def from_ratios(cls, *, mlp_ratio=4, moe_mlp_ratio=2, **kwargs):
        """A model whose hidden widths are ``dim * mlp_ratio`` and ``dim * moe_mlp_ratio``
        (the M³ViT training code's parametrisation; both ratios positive integers)."""
        _check_int("mlp_ratio", mlp_ratio, 1)
        _check_int("moe_mlp_ratio", moe_mlp_ratio, 1)
        if "dim" not in kwargs:
            raise TypeError("from_ratios() needs dim")
        return cls(mlp_hidden=kwargs["dim"] * mlp_ratio, expert_hidden=kwargs["dim"] * moe_mlp_ratio,
                   **kwargs)

    def with_(self, **changes):
        """A copy with some fields changed (validated again).

        Hidden widths that were derived (left at ``None``) are derived again from the new ``dim``;
        widths that were given explicitly are kept unless changed.
        """
        for name in self._derived:
            changes.setdefault(name, None)
        return replace(self, **changes)


PRESETS = {
    # W1: Edge-MoE's workload.
    "vit-tiny-cityscapes": ModelConfig(
        name="vit-tiny-cityscapes", img_size=(128, 256), dim=192, depth=12, heads=3,
        experts=16, top_k=2, tasks=("semseg", "depth"), task_channels=(19, 1)),
    # W2: the M³ViT paper's FPGA figure.
    "vit-small-nyud": ModelConfig(
        name="vit-small-nyud", img_size=(480, 640), dim=384, depth=12, heads=12,
        experts=16, top_k=2, tasks=("semseg", "depth"), task_channels=(40, 1)),
    # Small presets for tests: same structure, tiny sizes.
    "tiny": ModelConfig(
        name="tiny", img_size=(32, 64), dim=32, depth=4, heads=2,
        experts=4, top_k=2, tasks=("semseg", "depth"), task_channels=(5, 1), decoder_channels=16),
    "tiny-task-embedding": ModelConfig(
        name="tiny-task-embedding", img_size=(32, 64), dim=32, depth=4, heads=2,
        experts=4, top_k=2, tasks=("semseg", "depth"), task_channels=(5, 1), decoder_channels=16,
        router="task_embedding", task_embed_dim=16),
}


def preset(name, **changes):
    """Look up a preset by name, optionally overriding fields (e.g. ``experts=64``)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {name!r}")
    cfg = PRESETS[name]
    return cfg.with_(**changes) if changes else cfg
