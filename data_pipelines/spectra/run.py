"""Command line: compute stick spectra for many molecules, in parallel, resumable.

    # a seeded random sample of QM9 (the shipped dataset was made like this)
    python -m data_pipelines.spectra.run compute --qm9-sample 2000 --seed 0 \
        --out data_pipelines/spectra/data/qm9_gfn2 --workers 1
    # your own molecules
    python -m data_pipelines.spectra.run compute --sdf mols.sdf --out my_spectra --workers 2
    python -m data_pipelines.spectra.run compute --smiles-file mols.smi --out my_spectra
    # gzip the finished file (after checking every line) for shipping
    python -m data_pipelines.spectra.run finalize --out data_pipelines/spectra/data/qm9_gfn2

Output directory: `sticks.jsonl` (one record per finished molecule, see `sticks.py`),
`failures.jsonl` (one line per failed molecule: index, smiles, kind, message), `meta.json` (level of
theory, settings, versions, input description). Each result is appended and fsynced by the parent
process as soon as a worker returns it, so a kill loses at most the molecules in flight; running the
same command again skips every molecule already in `sticks.jsonl` or `failures.jsonl`
(`--retry-failed` recomputes the failures).

Exit status of `compute`: 0 when every requested molecule has spectra; 3 when the run finished
but some requested molecules failed (now or in an earlier run; the last stderr line says how many
and ends in PARTIAL; `--allow-failures` makes this 0); 1 on an error that stopped the run (bad
arguments: 2). The JSON summary on stdout has `requested`, `with_spectra` and `failed_total`.
"""

from __future__ import annotations

import os

# One thread per worker process; must be set before numpy/PySCF load their BLAS/OpenMP.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import contextlib
import fcntl
import gzip
import json
import multiprocessing
import shutil
import sys
import time
import traceback

from tqdm import tqdm

from data_pipelines.spectra import sticks
from data_pipelines.spectra.compute import (
    MoleculeFailure,
    SpectraConfig,
    compute_record,
    level_of_theory,
)
from data_pipelines.spectra.inputs import (
    MoleculeInput,
    from_smiles,
    qm9_sample_positions,
    read_qm9,
    read_sdf,
    read_smiles_file,
    read_xyz,
)

STICKS_FILE = "sticks.jsonl"
FAILURES_FILE = "failures.jsonl"
LOCK_FILE = ".run.lock"
# Exit status of `compute` when it finished but some requested molecules have no spectra.
EXIT_PARTIAL = 3


class RunLockedError(RuntimeError):
    """Another process is computing into (or finalising) the same output directory."""


class MetaMismatchError(RuntimeError):
    """An output directory holds results of another level of theory or input selection."""


def _append_line(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_failures(path: str) -> list[dict]:
    """Failure records; a torn last line (killed mid-write) is dropped and cut from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    out = []
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise sticks.StickFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def _worker_init() -> None:
    try:
        from pyscf import lib

        lib.num_threads(1)
    except ImportError:
        pass


def _work(args: tuple[MoleculeInput, SpectraConfig]) -> tuple[str, int, str, float]:
    """Runs in a worker: ("ok", index, record JSON, seconds) or ("fail", index, failure JSON, s)."""
    mol, config = args
    start = time.perf_counter()
    try:
        line = compute_record(mol, config).to_json()
        return "ok", mol.index, line, time.perf_counter() - start
    except MoleculeFailure as e:
        fail = {"index": mol.index, "smiles": mol.smiles, "kind": e.kind, "message": e.message}
    except Exception as e:  # noqa: BLE001  (recorded, never swallowed silently)
        fail = {"index": mol.index, "smiles": mol.smiles, "kind": "error",
                "message": f"{mol.where}: {type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=5)}
    fail["seconds"] = round(time.perf_counter() - start, 3)
    return "fail", mol.index, json.dumps(fail), time.perf_counter() - start


@contextlib.contextmanager
def _results(jobs: list, workers: int):
    """Iterator over `_work` results: in this process for workers <= 1, else a process pool."""
    if workers <= 1:
        _worker_init()
        yield map(_work, jobs)
        return
    # spawn, not fork: the parent may hold threads (JAX in tests, BLAS pools) that fork would copy.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_worker_init, maxtasksperchild=200) as pool:
        yield pool.imap_unordered(_work, jobs, chunksize=1)


def differences(before: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, old value, new value)`` for each leaf that differs between two nested
    dicts (a key absent on one side shows as ``<absent>``)."""
    out = []
    for key in sorted(set(before) | set(now), key=str):
        old, new = before.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(old, dict) and isinstance(new, dict):
            out += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            out.append((f"{prefix}{key}", old, new))
    return out


def prepare_output(out_dir: str, meta: dict) -> None:
    """Creates the directory and meta.json, or checks that an existing run used the same setup."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(path):
        old = sticks.read_meta(out_dir)
        for key in ("level_of_theory", "input"):
            before, now = dict(old.get(key, {})), dict(meta.get(key, {}))
            # Program versions may differ between sessions (reported, not refused).
            old_versions, new_versions = before.pop("versions", None), now.pop("versions", None)
            if before != now:
                changes = "; ".join(f"{name}: {old_value!r} -> {new_value!r}"
                                    for name, old_value, new_value in differences(before, now))
                raise MetaMismatchError(f"{path} was written with a different {key} ({changes}); "
                                        "use another --out directory")
            if old_versions != new_versions:
                print(f"warning: {path} was written with {old_versions}, this run uses "
                      f"{new_versions}", file=sys.stderr)
        return
    sticks.write_meta(out_dir, meta)


@contextlib.contextmanager
def exclusive_run(out_dir: str):
    """Holds an exclusive lock on `out_dir` so two runs (or a run and `finalize`) never mix.

    Two writers would both compute the same molecules and append duplicates; finalising while a run
    appends would ship a file that is still growing. The lock (flock on `.run.lock`) dies with the
    process, so a killed run never leaves a stale lock behind.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{out_dir} is in use by another run (lock {path}); wait for it "
                                 "to finish or stop it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def compute(molecules: list[MoleculeInput], out_dir: str, config: SpectraConfig,
            input_description: dict, workers: int = 1, retry_failed: bool = False,
            progress: bool = True) -> dict:
    """Computes every molecule not yet finished in `out_dir`; returns a summary dict."""
    with exclusive_run(out_dir):
        return _compute_locked(molecules, out_dir, config, input_description, workers,
                               retry_failed, progress)


def _compute_locked(molecules, out_dir, config, input_description, workers, retry_failed,
                    progress) -> dict:
    prepare_output(out_dir, {"level_of_theory": level_of_theory(config),
                             "input": input_description, "format": "sticks.py (JSON lines)"})
    sticks_path = os.path.join(out_dir, STICKS_FILE)
    fail_path = os.path.join(out_dir, FAILURES_FILE)
    finished, torn = sticks.read_finished(sticks_path)
    if torn:
        print(f"{sticks_path}: dropped {torn} torn last line from an interrupted run", file=sys.stderr)
    done = {r.qm9_index for r in finished}
    failures = read_failures(fail_path)
    if retry_failed and failures:
        os.replace(fail_path, fail_path + ".previous")
        failures = []
    failed = {int(f["index"]): f["kind"] for f in failures}
    seen, todo = set(), []
    for m in molecules:
        if m.index in seen:
            raise ValueError(f"{m.where}: index {m.index} appears twice in the input")
        seen.add(m.index)
        if m.index not in done and m.index not in failed:
            todo.append(m)
    summary = {"already_done": len(done), "already_failed": len(failures), "todo": len(todo),
               "ok": 0, "failed": 0, "failure_kinds": {}}
    if todo:
        jobs = [(m, config) for m in todo]
        bar = tqdm(total=len(todo), disable=not progress, unit="mol", smoothing=0.05,
                   desc=os.path.basename(os.path.normpath(out_dir)))
        with _results(jobs, workers) as results:
            for status, index, payload, _ in results:
                if status == "ok":
                    # The worker already serialised the record (StickRecord.to_json); this is the
                    # same whole-line append + fsync as sticks.append.
                    _append_line(sticks_path, payload)
                    done.add(index)
                    summary["ok"] += 1
                else:
                    _append_line(fail_path, payload)
                    kind = json.loads(payload)["kind"]
                    failed[index] = kind
                    summary["failed"] += 1
                    summary["failure_kinds"][kind] = summary["failure_kinds"].get(kind, 0) + 1
                bar.update(1)
                bar.set_postfix(ok=summary["ok"], failed=summary["failed"])
        bar.close()
    # The outcome for the molecules asked for, whichever run computed them: what the exit status
    # of `compute` reports.
    summary["requested"] = len(seen)
    summary["with_spectra"] = len(seen & done)
    summary["failed_total"] = sum(1 for i in seen if i in failed)
    return summary


def summary_line(summary: dict, out_dir: str) -> str:
    """One line for the end of `compute`: how many of the requested molecules have spectra."""
    line = (f"{summary['with_spectra']} of {summary['requested']} requested molecules have "
            f"spectra in {out_dir}")
    if summary["failed_total"]:
        line += (f"; {summary['failed_total']} failed (this run: {summary['failed']} "
                 f"{summary['failure_kinds'] or ''}), listed in "
                 f"{os.path.join(out_dir, FAILURES_FILE)}; PARTIAL")
    return line


def finalize(out_dir: str) -> str:
    """Checks every line of sticks.jsonl (dropping a torn last line left by a kill) and writes
    sticks.jsonl.gz next to it; returns a one-line summary including the failure counts."""
    with exclusive_run(out_dir):
        return _finalize_locked(out_dir)


def _finalize_locked(out_dir: str) -> str:
    src = os.path.join(out_dir, STICKS_FILE)
    if not os.path.exists(src):
        raise FileNotFoundError(f"nothing to finalize: {src} does not exist")
    # No writer can be active (we hold the lock), so a torn last line is a leftover of a kill.
    records, torn = sticks.read_finished(src)  # raises on any other bad line
    dst = src + ".gz"
    tmp = src + ".tmp.gz"  # ends in .gz so sticks.read decompresses it
    with open(src, "rb") as fi, gzip.GzipFile(tmp, "wb", mtime=0) as fo:
        shutil.copyfileobj(fi, fo)
    n_back = sum(1 for _ in sticks.read(tmp))
    if n_back != len(records):
        raise sticks.StickFormatError(f"{tmp}: wrote {len(records)} records, read back {n_back}")
    os.replace(tmp, dst)
    kinds: dict[str, int] = {}
    for f in read_failures(os.path.join(out_dir, FAILURES_FILE)):
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    return (f"{dst}: {len(records)} molecules"
            + (f" (dropped {torn} torn last line)" if torn else "")
            + f"; failures: {sum(kinds.values())} {kinds if kinds else ''}".rstrip())


def _collect(args) -> tuple[list[MoleculeInput], dict]:
    if args.qm9_sample:
        positions = qm9_sample_positions(args.qm9_sample, args.seed)
        return read_qm9(positions=positions), {
            "source": "qm9pack 1.0.3", "selection": "random sample",
            "rule": "numpy.random.default_rng(seed).permutation(130831)[:n] row positions",
            "seed": args.seed, "index_field": "qm9_index = QM9 index (1-based)"}
    if args.qm9_index:
        idx = [int(t) for t in args.qm9_index.split(",") if t.strip()]
        return read_qm9(indices=idx), {"source": "qm9pack 1.0.3", "selection": "indices",
                                       "index_field": "qm9_index = QM9 index (1-based)"}
    rel = "qm9_index = 1-based record number in the input file"
    if args.sdf:
        return list(read_sdf(args.sdf)), {"source": os.path.abspath(args.sdf), "index_field": rel}
    if args.xyz:
        return list(read_xyz(args.xyz)), {"source": os.path.abspath(args.xyz), "index_field": rel}
    if args.smiles_file:
        return list(read_smiles_file(args.smiles_file, seed=args.seed)), {
            "source": os.path.abspath(args.smiles_file), "conformer": "ETKDG + MMFF",
            "seed": args.seed, "index_field": rel}
    if args.smiles:
        return list(from_smiles(args.smiles.split(","), seed=args.seed, where="--smiles")), {
            "source": "command line SMILES", "smiles": args.smiles, "conformer": "ETKDG + MMFF",
            "seed": args.seed, "index_field": rel}
    raise SystemExit("give one input: --qm9-sample, --qm9-index, --sdf, --xyz, --smiles-file or "
                     "--smiles")


def main(argv=None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compute", help="compute stick spectra (resumes an existing --out)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--qm9-sample", type=int, help="random sample of this many QM9 molecules")
    src.add_argument("--qm9-index", help="comma-separated QM9 indices (1-based)")
    src.add_argument("--sdf", help="SDF with 3D coordinates and explicit hydrogens")
    src.add_argument("--xyz", help="multi-molecule XYZ file (Å)")
    src.add_argument("--smiles-file", help="one SMILES per line")
    src.add_argument("--smiles", help="comma-separated SMILES")
    c.add_argument("--seed", type=int, default=0, help="QM9 sample / conformer seed")
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--retry-failed", action="store_true")
    c.add_argument("--allow-failures", action="store_true",
                   help=f"exit 0 even when some molecules failed (default: exit "
                        f"{EXIT_PARTIAL})")
    c.add_argument("--skip-uv", action="store_true", help="IR/Raman only (fast)")
    c.add_argument("--uv-max-ev", type=float, default=15.0)
    c.add_argument("--stda-threshold-ev", type=float, default=16.0)
    f = sub.add_parser("finalize", help="check sticks.jsonl and write sticks.jsonl.gz")
    f.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "finalize":
            print(finalize(args.out))
            return 0
        config = SpectraConfig(skip_uv=args.skip_uv, uv_max_ev=args.uv_max_ev,
                               stda_threshold_ev=args.stda_threshold_ev)
        molecules, description = _collect(args)
        summary = compute(molecules, args.out, config, description, workers=args.workers,
                          retry_failed=args.retry_failed)
    except (MetaMismatchError, RunLockedError, sticks.StickFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)  # one line; the cause is in the message
        return 1
    print(json.dumps(summary, indent=1))
    print(summary_line(summary, args.out), file=sys.stderr)
    if summary["failed_total"] and not args.allow_failures:
        return EXIT_PARTIAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
