"""Loader (and writer) for M³ViT training checkpoints.

Layouts
-------
Single file
    ``torch.save`` of a state dict, either bare or wrapped as ``{"state_dict": sd, ...}`` or
    ``{"model": sd, ...}`` (other entries such as ``epoch`` or ``optimizer`` are ignored). Keys are
    ``module.backbone.<encoder key>`` and ``module.decoders.<task>.<head key>``; a state dict saved
    without the DDP wrapper (no ``module.`` prefix) is accepted too.
Sharded directory (fastmoe expert parallelism)
    Files ``0.pth``, ``1.pth``, … ``{R-1}.pth``, each laid out like a single file. Rank 0 holds the whole
    state; every rank holds its own slice of each expert tensor (keys containing ``.mlp.experts.``), and
    the full tensor is the concatenation along dim 0 in rank order. Non-expert entries in ranks ≥ 1 are
    replicas of rank 0's and are ignored. Slices may differ in size; only their sum must be E.

Key names are those of :class:`reference.model.M3ViT` with ``module.`` in front. One alias is accepted:
with the ``task_embedding`` router the training code names the single gate ``mlp.gate.w_gate``, which
maps to this model's ``mlp.gate.0.w_gate``.

Checks
------
Everything that is wrong with a checkpoint is reported at once: the loader collects every missing key,
unexpected key, wrongly shaped key (with both shapes) and bad expert slice, and raises one
:class:`CheckpointError` listing them all. Unreadable paths, files that are not state dicts and
incomplete shard sets raise :class:`CheckpointError` naming the file.

Loading uses ``torch.load(weights_only=True)``, which refuses pickled Python objects other than
tensors and plain containers; pass ``trusted=True`` for checkpoints from a source you trust that hold
such objects (e.g. an ``argparse.Namespace``).
"""

import os
import re

import torch

from m3vit_hw.model_config import ModelConfig, preset

from .model import M3ViT, build_model

__all__ = ["CheckpointError", "read_checkpoint", "load_checkpoint", "save_checkpoint"]

_RANK_FILE = re.compile(r"^(\d+)\.pth$")
_EXPERT_KEY = ".mlp.experts."
_PREFIX = "module."
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TE_GATE_ALIAS = re.compile(r"^(backbone\.blocks\.\d+\.mlp\.gate)\.w_gate$")
# Enough lines to see the pattern of a mismatch without burying the summary.
_MAX_LISTED = 200


class CheckpointError(ValueError):
    """A checkpoint does not exist, cannot be read, or does not match the model config."""


def _shape(t):
    return list(t.shape)


def _read_file(path, trusted):
    """The flat ``{key: tensor}`` state dict stored in one file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        text = _ANSI.sub("", str(exc)).strip()
        first = text.splitlines()[0] if text else ""
        if len(first) > 160:
            first = first[:160] + "..."
        refused = not trusted and "weights only" in text.lower()
        # The weights-only unpickler also fails this way on plain garbage, so this is only a hint.
        hint = (" (if it holds pickled Python objects from a source you trust, pass trusted=True)"
                if refused else "")
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint: "
                              f"{type(exc).__name__}: {first}{hint}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict "
                              f"(a dict of tensors, possibly under 'state_dict' or 'model')")
    for wrapper in ("state_dict", "model"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not obj:
        raise CheckpointError(f"{path}: holds an empty state dict")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        listed = ", ".join(bad[:10]) + (f", ... ({len(bad)} in all)" if len(bad) > 10 else "")
        raise CheckpointError(f"{path}: is not a state dict: entries that are not (str, tensor) pairs: "
                              f"{listed}")
    return obj


def _rank_files(path):
    """``[0.pth, 1.pth, ...]`` of a shard directory, checked to be complete."""
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot list checkpoint directory: {exc}") from exc
    ranks = {int(m.group(1)): n for n in names if (m := _RANK_FILE.match(n))}
    if not ranks:
        found = ", ".join(names[:10]) if names else "nothing"
        raise CheckpointError(f"{path}: checkpoint directory holds no rank files (0.pth, 1.pth, ...); "
                              f"found {found}")
    expected = range(max(ranks) + 1)
    missing = [f"{r}.pth" for r in expected if r not in ranks]
    if missing:
        raise CheckpointError(f"{path}: sharded checkpoint is missing rank file(s) {', '.join(missing)} "
                              f"(found {', '.join(ranks[r] for r in sorted(ranks))}; ranks must be "
                              f"0..{max(ranks)} without gaps)")
    # Names like 01.pth would also match the pattern; they must not shadow rank 1.
    duplicates = [n for n in names if _RANK_FILE.match(n) and n != f"{int(n[:-4])}.pth"]
    if duplicates:
        raise CheckpointError(f"{path}: ambiguous rank file name(s) {', '.join(duplicates)}; "
                              f"expected 0.pth, 1.pth, ...")
    return [os.path.join(path, f"{r}.pth") for r in expected]


def _merge_shards(files, expected, problems, skipped, trusted):
    """Rank 0's state with each expert tensor concatenated over ranks.

    Slice problems go to ``problems``; the offending keys are left out of the result and their model
    names added to ``skipped``, so they are not reported again as missing.
    """
    shards = [_read_file(f, trusted) for f in files]
    merged = dict(shards[0])
    for key in [k for k in merged if _EXPERT_KEY in k]:
        parts, bad = [], False
        for f, shard in zip(files, shards):
            if key not in shard:
                problems.append(f"{f}: missing expert slice {key}")
                bad = True
            else:
                parts.append((f, shard[key]))
        if bad:
            del merged[key]
            skipped.add(_normalise_key(key))
            continue
        tails = {tuple(t.shape[1:]) for _, t in parts}
        if any(t.dim() == 0 for _, t in parts) or len(tails) != 1:
            slices = ", ".join(f"{os.path.basename(f)} {_shape(t)}" for f, t in parts)
            problems.append(f"{key}: expert slices do not concatenate along dim 0 ({slices})")
            del merged[key]
            skipped.add(_normalise_key(key))
            continue
        full = torch.cat([t for _, t in parts], dim=0)
        want = expected.get(_normalise_key(key))
        if want is not None and want.dim() > 0 and full.shape[0] != want.shape[0]:
            slices = ", ".join(f"{os.path.basename(f)} {_shape(t)}" for f, t in parts)
            problems.append(f"{key}: expert slices of {len(parts)} rank file(s) concatenate to "
                            f"{full.shape[0]} experts, expected E={want.shape[0]} ({slices})")
            del merged[key]
            skipped.add(_normalise_key(key))
            continue
        merged[key] = full
    for f, shard in zip(files[1:], shards[1:]):
        for key in shard:
            if _EXPERT_KEY in key and key not in shards[0]:
                problems.append(f"{f}: unexpected expert slice {key} (not in rank 0)")
    return merged


def _normalise_key(key, task_embedding=False):
    if key.startswith(_PREFIX):
        key = key[len(_PREFIX):]
    if task_embedding:
        key = _TE_GATE_ALIAS.sub(r"\1.0.w_gate", key)
    return key


def _config(cfg):
    if isinstance(cfg, str):
        return preset(cfg)
    if isinstance(cfg, ModelConfig):
        return cfg
    raise TypeError(f"cfg must be a ModelConfig or a preset name, not {type(cfg).__name__}")


def read_checkpoint(path, cfg, *, encoder_only=False, trusted=False):
    """Read and check a checkpoint against ``cfg``; return its tensors under model key names.

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint file, or a directory of rank files ``0.pth``, ``1.pth``, ….
    cfg : ModelConfig or str
        The model the checkpoint must match (a config or a preset name).
    encoder_only : bool
        If true, decoder keys may be absent (those present are still checked).
    trusted : bool
        Allow arbitrary pickled objects (``torch.load(weights_only=False)``).

    Returns
    -------
    dict of str to torch.Tensor
        Keys as in ``M3ViT(cfg).state_dict()`` (no ``module.`` prefix), expert tensors merged.

    Raises
    ------
    CheckpointError
        The path does not exist, a file cannot be read or is not a state dict, a rank file is missing,
        or keys are missing, unexpected or wrongly shaped (all listed in one message).
    """
    cfg = _config(cfg)
    path = os.fspath(path)
    with torch.device("meta"):
        # Shapes only: a meta-device model costs no memory or init time, even for W2.
        expected = M3ViT(cfg).state_dict()
    problems, skipped = [], set()
    if os.path.isdir(path):
        raw = _merge_shards(_rank_files(path), expected, problems, skipped, trusted)
    elif os.path.exists(path):
        raw = _read_file(path, trusted)
    else:
        raise CheckpointError(f"{path}: checkpoint path does not exist")

    te = cfg.router == "task_embedding"
    state, source = {}, {}
    for key, value in raw.items():
        name = _normalise_key(key, te)
        if name in state:
            problems.append(f"{key}: duplicate of {source[name]} (both name {name})")
            continue
        state[name], source[name] = value, key

    missing = [k for k in expected if k not in state and k not in skipped
               and not (encoder_only and k.startswith("decoders."))]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    lines = []
    if missing:
        lines.append(f"{len(missing)} missing key(s):")
        lines += [f"  {_PREFIX}{k} (expected shape {_shape(expected[k])})" for k in missing]
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s):")
        lines += [f"  {source[k]} (shape {_shape(state[k])})" for k in unexpected]
    if wrong:
        lines.append(f"{len(wrong)} wrongly shaped key(s):")
        lines += [f"  {source[k]}: expected shape {_shape(expected[k])}, got {_shape(state[k])}" for k in wrong]
    if problems:
        lines.append(f"{len(problems)} other problem(s):")
        lines += [f"  {p}" for p in problems]
    if lines:
        if len(lines) > _MAX_LISTED:
            lines = lines[:_MAX_LISTED] + [f"  ... and {len(lines) - _MAX_LISTED} more line(s)"]
        raise CheckpointError(f"checkpoint {path} does not match model {cfg.name!r} (D={cfg.dim}, "
                              f"depth={cfg.depth}, E={cfg.experts}, router={cfg.router}, "
                              f"tasks={cfg.tasks}):\n" + "\n".join(lines))
    return state


def load_checkpoint(path, cfg, *, encoder_only=False, trusted=False):
    """Build an :class:`~reference.model.M3ViT` for ``cfg`` and load a checkpoint into it.

    Parameters are those of :func:`read_checkpoint`. With ``encoder_only=True`` and no decoder keys in
    the checkpoint, the decoders keep the deterministic init of ``build_model(cfg, seed=0)``: only
    :meth:`~reference.model.M3ViT.encode` is meaningful then.

    Returns
    -------
    M3ViT
        float32, in ``eval()`` mode.
    """
    cfg = _config(cfg)
    state = read_checkpoint(path, cfg, encoder_only=encoder_only, trusted=trusted)
    model = build_model(cfg, seed=0)
    model.load_state_dict(state, strict=not encoder_only)
    return model.eval()


def save_checkpoint(model, path, ranks=1):
    """Write ``model`` in the training code's layout (see the module docstring).

    Parameters
    ----------
    model : M3ViT
    path : str or os.PathLike
        The file to write (``ranks == 1``), or the directory to create and fill with ``0.pth`` …
        (``ranks > 1``). A directory that already holds rank files is refused rather than mixed.
    ranks : int
        Number of expert-parallel ranks; must divide E. Rank 0 gets the full state with its expert
        slice, ranks ≥ 1 only their expert slices, each file as ``{"state_dict": ...}``.
    """
    if not isinstance(model, M3ViT):
        raise TypeError(f"model must be an M3ViT, not {type(model).__name__}")
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"ranks must be a positive integer, not {ranks!r}")
    experts = model.cfg.experts
    if experts % ranks:
        raise ValueError(f"ranks={ranks} must divide the number of experts E={experts}")
    path = os.fspath(path)
    # clone(): saving a view would write its whole underlying storage.
    state = {f"{_PREFIX}{k}": v.detach().clone() for k, v in model.state_dict().items()}
    if ranks == 1:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        torch.save({"state_dict": state}, path)
        return
    os.makedirs(path, exist_ok=True)
    existing = [n for n in os.listdir(path) if _RANK_FILE.match(n)]
    if existing:
        raise FileExistsError(f"{path}: already holds rank files ({', '.join(sorted(existing))}); "
                              f"choose an empty directory")
    per_rank = experts // ranks
    for r in range(ranks):
        shard = {}
        for k, v in state.items():
            if _EXPERT_KEY in k:
                shard[k] = v[r * per_rank:(r + 1) * per_rank].clone()
            elif r == 0:
                shard[k] = v
        torch.save({"state_dict": shard}, os.path.join(path, f"{r}.pth"))
