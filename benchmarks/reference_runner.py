"""Run the PyTorch reference benchmark (torchmd-net) in its own interpreter.

mspec must not depend on torch, so the reference lives in a separate virtual environment
(by default ``~/torchref-venv``, see ``docs/spec/benchmark-protocol.md`` §2) and is
driven from here through a subprocess running ``benchmarks/torchmd_reference.py``. This
module imports neither torch nor torchmd-net.

Typical use from an mspec benchmark::

    from benchmarks.qm9_molecules import load_qm9_sample, save_batches_npz
    from benchmarks.reference_runner import run_reference

    save_batches_npz("/tmp/qm9_b128.npz", load_qm9_sample(1280, seed=0), 128)
    ref = run_reference("/tmp/qm9_b128.npz", threads=2, steps=10, warmup=2,
                        malloc="tuned")
    if ref is not None:
        print(ref["mol_per_s_median"])

The interpreter is chosen as: the ``python`` argument, else the environment variable
``MSPEC_TORCH_PYTHON``, else ``~/torchref-venv/bin/python`` if it exists. When none is
available the reference is skipped: a line ``reference skipped: ...`` is printed and
``None`` returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional, Sequence

# The setting mspec's entry points give themselves (a module without JAX or torch imports).
from mspec.kernels.host_malloc import HUGEPAGE_TUNABLE

__all__ = [
    "DEFAULT_VENV_PYTHON",
    "TUNED_GLIBC_TUNABLES",
    "MALLOC_SETTINGS",
    "REFERENCE_SCRIPT",
    "find_reference_python",
    "run_reference",
]

#: Default location of the reference virtual environment's interpreter.
DEFAULT_VENV_PYTHON = os.path.expanduser("~/torchref-venv/bin/python")

#: glibc malloc settings that keep freed memory in the process (no mmap for large
#: blocks, never trim the heap); they make the PyTorch reference 3-4x faster on CPU.
TUNED_GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"

#: Named allocator settings (``GLIBC_TUNABLES`` values; None = glibc defaults). ``hugetlb`` is
#: what mspec's entry points set for themselves (mspec/kernels/host_malloc.py).
MALLOC_SETTINGS: Dict[str, Optional[str]] = {
    "default": None,
    "tuned": TUNED_GLIBC_TUNABLES,
    "hugetlb": HUGEPAGE_TUNABLE,
    "tuned+hugetlb": f"{TUNED_GLIBC_TUNABLES}:{HUGEPAGE_TUNABLE}",
}


def malloc_environment(env: Dict[str, str], malloc: str) -> Dict[str, str]:
    """``env`` with ``GLIBC_TUNABLES`` set for the named setting (removed for "default")."""
    if malloc not in MALLOC_SETTINGS:
        raise ValueError(f"unknown malloc setting {malloc!r}; one of {sorted(MALLOC_SETTINGS)}")
    env = dict(env)
    tunables = MALLOC_SETTINGS[malloc]
    if tunables is None:
        env.pop("GLIBC_TUNABLES", None)
    else:
        env["GLIBC_TUNABLES"] = tunables
    return env

#: The script run inside the reference environment.
REFERENCE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchmd_reference.py")


def find_reference_python(python: Optional[str] = None) -> Optional[str]:
    """Return the reference interpreter path, or None when none is available.

    Order: ``python`` argument, ``$MSPEC_TORCH_PYTHON``, :data:`DEFAULT_VENV_PYTHON`.
    An explicitly given path (argument or environment variable) is returned even if it
    does not exist, so that the caller reports it rather than silently falling back.
    """
    if python:
        return python
    env = os.environ.get("MSPEC_TORCH_PYTHON")
    if env:
        return env
    if os.path.isfile(DEFAULT_VENV_PYTHON) and os.access(DEFAULT_VENV_PYTHON, os.X_OK):
        return DEFAULT_VENV_PYTHON
    return None


def _tail(text: str, lines: int = 30) -> str:
    """Last ``lines`` lines of ``text``."""
    return "\n".join((text or "").rstrip().splitlines()[-lines:])


def run_reference(
    batches_path: str,
    threads: int,
    steps: int,
    warmup: int,
    malloc: str,
    python: Optional[str] = None,
    *,
    inference: bool = False,
    hidden: int = 256,
    layers: int = 8,
    heads: int = 8,
    rbf: int = 64,
    extra_args: Sequence[str] = (),
    timeout_s: Optional[float] = None,
    script: Optional[str] = None,
) -> Optional[Dict[str, Any]]:
    """Time torchmd-net on the batches in ``batches_path`` in a subprocess.

    Args:
        batches_path: ``.npz`` written by ``qm9_molecules.save_batches_npz``.
        threads: ``torch.set_num_threads`` value in the child; ``OMP_NUM_THREADS`` and
            ``MKL_NUM_THREADS`` are set to the same value.
        steps: Timed steps.
        warmup: Untimed warm-up steps (excluded from the statistics).
        malloc: a name in :data:`MALLOC_SETTINGS`: the child's ``GLIBC_TUNABLES``
            ("tuned" is the reference's best configuration,
            docs/spec/benchmark-protocol.md §3; "default" removes the variable).
        python: Reference interpreter; see :func:`find_reference_python`.
        inference: Time the forward pass only instead of a training step.
        hidden, layers, heads, rbf: Model size (defaults: the full H=256/8/8/64 config).
        extra_args: Further command-line arguments for ``torchmd_reference.py``.
        timeout_s: Subprocess timeout in seconds; default is generous and scales with
            the number of steps (120 s + 60 s per step).
        script: The script to run in the reference interpreter (default
            :data:`REFERENCE_SCRIPT`; ``benchmarks/torchmd_finetune_reference.py`` times the
            fine-tuning steps). It must take the options above and print one JSON line.

    Returns:
        The parsed JSON result of ``torchmd_reference.py`` (keys ``impl``, ``torch``,
        ``threads``, ``mol_per_s_median``, ``mol_per_s_min``, ``mol_per_s_max``,
        ``step_s_median``, ``peak_rss_gb``, ``n_params``, ``batch_size``, ...) with
        ``"malloc"`` (the setting's name) added, or None when no reference
        interpreter is available or the run failed (a message starting with
        ``reference skipped:`` or ``reference failed:`` is printed, with the tail of
        the child's stderr for failures).
    """
    exe = find_reference_python(python)
    if exe is None:
        print(
            "reference skipped: no PyTorch reference interpreter (set MSPEC_TORCH_PYTHON "
            f"or create {DEFAULT_VENV_PYTHON}; see docs/spec/benchmark-protocol.md §2)",
            flush=True,
        )
        return None
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        print(f"reference skipped: interpreter {exe!r} does not exist or is not executable",
              flush=True)
        return None
    if not os.path.isfile(batches_path):
        raise FileNotFoundError(f"batches file not found: {batches_path}")

    script = script or REFERENCE_SCRIPT
    cmd = [
        exe,
        script,
        "--batches", os.path.abspath(batches_path),
        "--threads", str(int(threads)),
        "--steps", str(int(steps)),
        "--warmup", str(int(warmup)),
        "--hidden", str(int(hidden)),
        "--layers", str(int(layers)),
        "--heads", str(int(heads)),
        "--rbf", str(int(rbf)),
    ]
    if inference:
        cmd.append("--inference")
    cmd.extend(extra_args)

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # keep the mspec environment out of the reference venv
    env.pop("PYTHONHOME", None)
    env["OMP_NUM_THREADS"] = str(int(threads))
    env["MKL_NUM_THREADS"] = str(int(threads))
    env = malloc_environment(env, malloc)

    if timeout_s is None:
        timeout_s = 120.0 + 60.0 * (int(steps) + int(warmup))
    label = (
        f"threads={threads} malloc={malloc}"
        f"{' inference' if inference else ''}"
    )
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=timeout_s,
            cwd=os.path.dirname(script),
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        print(f"reference failed: {label}: timed out after {timeout_s:.0f} s\n"
              f"--- stderr tail ---\n{_tail(stderr or '')}", file=sys.stderr, flush=True)
        return None
    if proc.returncode != 0:
        print(f"reference failed: {label}: exit code {proc.returncode}\n"
              f"command: {' '.join(cmd)}\n--- stderr tail ---\n{_tail(proc.stderr)}",
              file=sys.stderr, flush=True)
        return None

    result = None
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    if result is None:
        print(f"reference failed: {label}: no JSON line on stdout\n"
              f"--- stdout tail ---\n{_tail(proc.stdout)}\n"
              f"--- stderr tail ---\n{_tail(proc.stderr)}", file=sys.stderr, flush=True)
        return None
    result["malloc"] = malloc
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the torchmd-net reference benchmark")
    parser.add_argument("batches")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--malloc", default="tuned,default",
                        help=f"comma list of: {', '.join(MALLOC_SETTINGS)}")
    parser.add_argument("--inference", action="store_true")
    parser.add_argument("--python", default=None)
    cli = parser.parse_args()
    for n in cli.threads:
        for malloc in cli.malloc.split(","):
            res = run_reference(cli.batches, n, cli.steps, cli.warmup, malloc,
                                python=cli.python, inference=cli.inference)
            if res is not None:
                print(json.dumps(res), flush=True)
