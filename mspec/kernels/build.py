"""Compiles and registers the C++ XLA:CPU kernels (``et_message.cc``: the ET message passing;
``eqln.cc``: the equivariant layer norm; ``parallel_for.h``) on first use.

The shared library is built once per (source, jaxlib, compiler, flags, CPU features) into
``$MSPEC_KERNEL_CACHE`` (default ``~/.cache/mspec/kernels``) with ``$CXX`` (default ``g++``),
``-O3 -march=native -fopenmp-simd -ffast-math`` (fast math lets the compiler vectorise the
kernels' sums and their inline ``exp``; they have no NaN/Inf logic that it could change; the tests
check its values and gradients against the XLA ops), against the XLA FFI headers that ship with
jaxlib; later processes load the cached file. ``-fopenmp-simd`` only enables the vectorisation
pragmas: the kernels start no threads of their own but run their parallel loops on XLA's
intra-op thread pool (the FFI ``ThreadPool`` context), the threads that also run XLA's own ops,
so the cores are never oversubscribed. Nothing is downloaded. When the build fails (no
compiler), :func:`load` raises :class:`KernelUnavailable` with the compiler's message; the
model's ``message_passing = "auto"`` then falls back to the XLA implementation and says so once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, f) for f in ("et_message.cc", "eqln.cc"))
HEADERS = (os.path.join(_HERE, "parallel_for.h"),)
TARGETS = {
    "mspec_et_message_fwd": "EtMessageForward",
    "mspec_et_message_bwd": "EtMessageBackward",
    "mspec_et_message_2nd": "EtMessageSecondOrder",
    "mspec_eqln_cov": "EqlnCov",
    "mspec_eqln_cov_bwd": "EqlnCovBackward",
    "mspec_eqln_apply": "EqlnApply",
    "mspec_eqln_apply_bwd": "EqlnApplyBackward",
}
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffast-math", "-shared", "-fPIC", "-std=c++17", "-w")

_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The native kernels could not be built or loaded on this machine."""


def cache_dir() -> str:
    return os.environ.get(
        "MSPEC_KERNEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mspec", "kernels")
    )


def _cpu_features() -> str:
    """This CPU's feature flags: ``-march=native`` code must not be loaded on a CPU without them
    (a cache directory shared by different machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _library_path(compiler: str) -> str:
    import jaxlib

    key = hashlib.sha256()
    for source in (*SOURCES, *HEADERS):
        with open(source, "rb") as f:
            key.update(f.read())
    key.update(" ".join((jaxlib.__version__, compiler, platform.machine(), *FLAGS)).encode())
    key.update(_cpu_features().encode())
    return os.path.join(cache_dir(), f"et_message-{key.hexdigest()[:16]}.so")


def _build(path: str, compiler: str) -> None:
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Build into a temporary file and rename: concurrent processes never load a partial library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", *SOURCES, "-o", tmp]
    logging.getLogger("mspec").info("building the fused CPU kernels: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise KernelUnavailable(
                f"compiling {' '.join(SOURCES)} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load() -> ctypes.CDLL:
    """Builds (first time) and loads the kernels and registers their XLA FFI targets.

    Returns the loaded library; raises :class:`KernelUnavailable` (the same error on every call
    of the process once a build failed).
    """
    global _loaded, _error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise KernelUnavailable(_error)
        compiler = os.environ.get("CXX", "g++")
        try:
            path = _library_path(compiler)
            if not os.path.exists(path):
                _build(path, compiler)
            lib = ctypes.CDLL(path)
            for target, symbol in TARGETS.items():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except (KernelUnavailable, OSError, subprocess.SubprocessError) as e:
            _error = str(e)
            raise KernelUnavailable(_error) from e
        _loaded = lib
        return lib


def available() -> bool:
    """True when :func:`load` succeeds."""
    try:
        load()
        return True
    except KernelUnavailable:
        return False
