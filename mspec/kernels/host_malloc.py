"""Transparent huge pages for XLA's host buffers: re-executes an entry point with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.

Why: on CPU, XLA allocates every large intermediate of a train step (edge tensors of 30-160 MB)
afresh, with ``posix_memalign``; glibc serves such blocks with ``mmap`` from worker-thread
arenas and returns them with ``munmap`` on free, so every step page-faults all of its working
memory back in, 4 KiB at a time. Measured on the 2-core development machine (BENCHMARKS.md):
an elementwise op on a 123 MB array took 44 ms with glibc's default settings and 12 ms with
``glibc.malloc.hugetlb=1`` (2 MiB pages, so 512x fewer faults); the QM9-size train step went
from 22 to 36 molecules/s, with unchanged peak memory. (The settings that keep freed memory in
the process, ``mmap_max=0:trim_threshold=...``, do not reach these worker-thread arenas and gave
nothing here; ``arena_max=1`` was as fast but tripled peak memory.)

glibc reads ``GLIBC_TUNABLES`` only at process start, so the entry points call
:func:`reexec_with_hugepages` first thing: if the setting is missing and would take effect, the
process replaces itself (``os.execve``) with the same command line and the setting added.
Library code cannot do that for scripts that import mspec; the trainers call
:func:`warn_if_untuned` instead, which logs once how to set it.

It does nothing when:

* ``MSPEC_MALLOC_TUNING=0`` (opt out), or the variable ``MSPEC_MALLOC_REEXEC`` is already set
  (this process is the re-executed one; no loops);
* ``GLIBC_TUNABLES`` already mentions ``glibc.malloc.hugetlb`` (your choice wins);
* the C library is not glibc >= 2.35 (the tunable's first release), or the kernel's transparent
  huge pages are ``never`` or unavailable (then the tunable has no effect);
* the run is for an accelerator (:func:`accelerator_expected`): the setting is about XLA:CPU's
  buffers, and a GPU or TPU run would only pay for a restart.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping

_warned = False

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VAR = "MSPEC_MALLOC_TUNING"
REEXEC_MARKER = "MSPEC_MALLOC_REEXEC"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_supports_hugetlb(libc: tuple[str, str] | None = None) -> bool:
    """True for glibc >= 2.35 (``libc`` as returned by :func:`platform.libc_ver`)."""
    name, version = libc if libc is not None else platform.libc_ver()
    if name != "glibc":
        return False
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def thp_mode(path: str = THP_SETTING) -> str | None:
    """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


# NVIDIA GPU, TPU v2-v4, AMD ROCm. (Newer TPU VMs expose /dev/vfio, which CPU servers may have
# too: those runs restart once, harmlessly, unless JAX_PLATFORMS says tpu.)
ACCELERATOR_DEVICE_FILES = ("nvidia0", "accel0", "kfd")


def accelerator_expected(environ: Mapping[str, str], dev: str = "/dev") -> bool:
    """Whether JAX will run on an accelerator, judged before JAX is imported: ``JAX_PLATFORMS``
    when set (its first platform is not ``cpu``), else a GPU or TPU device file in ``dev``."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] != "cpu"
    return any(os.path.exists(os.path.join(dev, name)) for name in ACCELERATOR_DEVICE_FILES)


def tuned_environment(
    environ: Mapping[str, str],
    *,
    libc: tuple[str, str] | None = None,
    thp: str | None = "auto",
    dev: str = "/dev",
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing should change.

    Args:
      environ: the current environment.
      libc: ``(name, version)`` of the C library; default: this process's.
      thp: the transparent-huge-page mode; ``"auto"`` reads it from the kernel.
      dev: where to look for accelerator device files (:func:`accelerator_expected`).

    Returns:
      A copy of ``environ`` with :data:`HUGEPAGE_TUNABLE` appended to ``GLIBC_TUNABLES`` and the
      re-execution marker set, or None (see the module docstring for when).
    """
    if environ.get(OPT_OUT_VAR, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    if REEXEC_MARKER in environ:
        return None
    if accelerator_expected(environ, dev):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    if not glibc_supports_hugetlb(libc):
        return None
    mode = thp_mode() if thp == "auto" else thp
    if mode not in ("always", "madvise"):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{HUGEPAGE_TUNABLE}" if current else HUGEPAGE_TUNABLE
    env[REEXEC_MARKER] = "1"
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process with the same command line (``sys.orig_argv``, interpreter options
    included) under the tuned environment.

    Call it from an entry point's ``if __name__ == "__main__":`` block, before importing JAX
    (never from library code: it does not return when it re-executes). Returns normally when
    nothing needs to change.
    """
    env = tuned_environment(os.environ)
    if env is None:
        return
    print(
        f"mspec: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for XLA's "
        f"buffers, see mspec/kernels/host_malloc.py; {OPT_OUT_VAR}=0 turns this off)",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError as e:  # e.g. no usable sys.executable: run on, untuned, rather than fail
        print(f"mspec: could not restart ({e}); continuing with glibc's defaults", file=sys.stderr)


def untuned_hint(environ: Mapping[str, str], **kwargs) -> str | None:
    """The advice to log for a process that runs XLA:CPU without the setting although it would
    take effect (e.g. a user's own script importing the trainers), or None.

    ``kwargs`` (``libc``, ``thp``) as for :func:`tuned_environment`.
    """
    if tuned_environment(environ, **kwargs) is None:
        return None
    return (
        "XLA:CPU ran the QM9-size train step 1.5-1.8x slower under glibc's default allocator in "
        "our measurements (page faults on every large buffer; mspec/kernels/host_malloc.py, "
        "BENCHMARKS.md). Start Python with "
        f"GLIBC_TUNABLES={HUGEPAGE_TUNABLE} (the experiments.* entry points do this themselves); "
        f"{OPT_OUT_VAR}=0 silences this message."
    )


def warn_if_untuned(backend: str) -> None:
    """Logs :func:`untuned_hint` once per process when ``backend`` is ``"cpu"``."""
    global _warned
    if _warned or backend != "cpu":
        return
    hint = untuned_hint(os.environ)
    if hint:
        _warned = True
        logging.getLogger("mspec").warning(hint)
