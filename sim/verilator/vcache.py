"""A disk cache of emitted Verilog, so a cache hit skips Amaranth elaboration and conversion.

Converting a full-width W1 MoE layer to Verilog takes 28-73 s on this machine (elaboration, RTLIL,
yosys), on every run, although the compiled model itself is cached by
:func:`~sim.verilator.toolchain.build_model`. The Verilog of a design is a function of

* the design's class and its configuration (``repr`` of the :class:`~m3vit_hw.config.AcceleratorConfig`
  is complete: a frozen dataclass of plain values and the model config),
* anything the caller adds that changes the netlist (probe names, wrapper options),
* the generator's source: every ``.py`` file of the ``m3vit_hw`` package and of ``sim/verilator``
  (the :class:`~sim.verilator.model.Probed` wrapper is part of the netlist),
* the Amaranth version (the converter).

:func:`design_key` writes the first two as a string; :func:`cached_verilog` hashes it with the source
tree digest (:func:`source_digest`) and the Amaranth version, and returns the stored text on a hit or
runs the conversion and stores it on a miss. Entries are ``<cache>/verilog/<sha256>.sv``, written to a
temporary file and renamed, so a crashed or concurrent writer never leaves a half file under the
final name. Editing any generator source changes the digest, so a stale entry is never used (old
entries are not deleted; they are a few MB each).
"""

import hashlib
import os
import tempfile
import time
from pathlib import Path

import amaranth

__all__ = ["design_key", "source_digest", "cached_verilog", "SOURCE_ROOTS"]


def _default_roots():
    import m3vit_hw
    return (Path(m3vit_hw.__file__).resolve().parent, Path(__file__).resolve().parent)


#: Folders whose ``.py`` files make up the generator (``m3vit_hw/`` and ``sim/verilator/``).
SOURCE_ROOTS = _default_roots()


def source_digest(roots=None):
    """SHA-256 (hex) over every ``.py`` file under ``roots`` (default :data:`SOURCE_ROOTS`): relative
    path and content, in sorted order. Recomputed on every call (about 100 small files: milliseconds),
    so an edit made while a process runs is seen by its next conversion."""
    roots = SOURCE_ROOTS if roots is None else tuple(Path(r) for r in roots)
    h = hashlib.sha256()
    for i, root in enumerate(roots):
        for path in sorted(Path(root).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            h.update(f"{i}:{path.relative_to(root).as_posix()}".encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def design_key(component_class, config, *extra):
    """The string that names a design: ``module.Class`` of the top, ``repr(config)`` and ``extra``
    (anything else that changes the netlist, e.g. probe names), as ``repr``."""
    if not isinstance(component_class, type):
        raise TypeError(f"component_class must be a class, not {component_class!r}")
    return f"{component_class.__module__}.{component_class.__qualname__}|{config!r}|{extra!r}"


def cached_verilog(key, convert, *, cache, roots=None):
    """The Verilog of the design named ``key``, from the cache or from ``convert()``.

    Parameters
    ----------
    key : str
        :func:`design_key` of the design (plus anything else the caller wants in the hash).
    convert : callable
        Returns the Verilog text; called only on a miss.
    cache : path-like
        The cache directory; entries go to its ``verilog`` subfolder.
    roots : sequence of path-like, optional
        Source folders hashed into the key (default :data:`SOURCE_ROOTS`).

    Returns
    -------
    (str, dict)
        The text and ``{"verilog_cached": bool, "convert_seconds": float, "verilog_key": str}``;
        ``convert_seconds`` is the time spent this call (lookup, or conversion and store).
    """
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {key!r}")
    t0 = time.time()
    h = hashlib.sha256()
    h.update(f"amaranth {amaranth.__version__}\0".encode())
    h.update(source_digest(roots).encode() + b"\0")
    h.update(key.encode())
    digest = h.hexdigest()[:32]
    folder = Path(cache) / "verilog"
    path = folder / f"{digest}.sv"
    if path.is_file():
        return path.read_text(), {"verilog_cached": True, "convert_seconds": round(time.time() - t0, 2),
                                  "verilog_key": digest}
    text = convert()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{digest}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return text, {"verilog_cached": False, "convert_seconds": round(time.time() - t0, 2),
                  "verilog_key": digest}
