"""The reproduction study: pre-training (Coord, Frad, MolSpectra) against scratch, end to end.

    python -m experiments.reproduce --scale smoke --workdir runs/study_smoke --jobs 2  # harness check
    python -m experiments.reproduce --scale cpu --workdir runs/study           # the CPU study (hours)
    python -m experiments.reproduce --scale cpu_v1 --workdir runs/study_v1     # its first protocol (cpu_v2: the second)
    python -m experiments.reproduce --scale paper --workdir /shared/study --dry-run

Runs every stage of the protocol in ``experiments/configs/reproduce.py`` (pre-training arms, then
fine-tuning of every arm on every target with every seed), each an ``experiments.pretrain`` /
``experiments.finetune`` run in ``<workdir>/<stage name>`` with its log in
``<stage dir>/log.txt`` (run by a study worker process, see :mod:`experiments.reproduce_runner`),
and writes ``<workdir>/results.json``, ``<workdir>/report.md`` and
PNG figures after every stage. Re-running the same command skips finished stages and resumes an
interrupted one from its last checkpoint (exactly: the trainers resume bitwise), so a study can
span several runs or machines. A stage that fails is reported with its log path; the stages that do
not depend on it go on, and the command exits 1 at the end.

Options: ``--dry-run`` prints every stage's command and estimated cost and runs nothing;
``--only PATTERN[,PATTERN]`` runs the matching stages (shell globs on stage names, e.g.
``'pretrain/*,finetune/homo/*'``) and their missing dependencies are reported, not run;
``--report-only`` rewrites the report from what is on disk; ``--export DIR`` copies the small
outputs (results.json, report.md, figures) to ``DIR`` (how docs/reproduction/ is made);
``--set KEY=VALUE`` changes one protocol value (recorded; a workdir refuses a changed protocol);
``--export-state DIR`` copies the finished stages (their records and the last pre-training
checkpoints) as a study directory another machine or session continues from;
``--jobs N`` runs up to N independent stages at once (CPU machines); ``--isolate`` runs each
stage as its own entry-point process; ``--launcher CMD`` starts the pre-training stages through ``CMD`` (e.g. ``./launch.sh tpu --name
POD --zone ZONE``) for multi-host pre-training; fine-tuning stages run in this process's machine.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import signal
import sys
import time

from experiments import reproduce_report, reproduce_runner, reproduce_stages
from experiments.configs import reproduce as protocol_config
from experiments.reproduce_stages import Stage
from mspec.kernels import host_malloc

PROTOCOL_FILE = "protocol.json"
# Values that only estimate cost; changing them does not change the study.
NOT_PROTOCOL = ("cost",)


def load_protocol(scale: str, sets: list[str]):
    p = protocol_config.get_config(scale)
    for item in sets:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        node, *path = key.split(".")
        parent = p
        for part in [node, *path][:-1]:
            if part not in parent:
                raise SystemExit(f"--set {item!r}: no protocol key {key!r}")
            parent = parent[part]
        leaf = [node, *path][-1]
        if leaf not in parent:
            raise SystemExit(f"--set {item!r}: no protocol key {key!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        old = parent[leaf]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
        parent[leaf] = value
    return p


def protocol_json(p) -> dict:
    d = json.loads(p.to_json_best_effort())
    return {k: v for k, v in d.items() if k not in NOT_PROTOCOL}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            # A protocol key added after a study was recorded is no difference while it holds an
            # empty value (new keys default to what earlier studies did, e.g. extra=()).
            if k not in a and b[k] in ((), [], "", None):
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


# Protocols recorded before dataset versions existed (they have no ``protocol_version`` key) name
# the stage-2 spectra unversioned; then that was the 1,119-molecule set, now version 1.0.0.
_UNVERSIONED_THEN = {"qm9s/gfn2_qm9train": "qm9s/gfn2_qm9train:1.0.0",
                     "qm9s/gfn2": "qm9s/gfn2:1.0.0"}


def _as_recorded(saved: dict) -> dict:
    """A saved protocol with the dataset names it meant when it was recorded."""
    if "protocol_version" in saved or not isinstance(saved.get("stage2"), dict):
        return saved
    stage2 = dict(saved["stage2"])
    stage2["dataset"] = _UNVERSIONED_THEN.get(stage2.get("dataset"), stage2.get("dataset"))
    return {**saved, "stage2": stage2}


def _scale_of(saved: dict) -> str | None:
    """The scale whose default protocol a saved protocol is exactly (None: none, e.g. overrides)."""
    for scale in protocol_config.SCALES:
        if not _diff(saved, protocol_json(protocol_config.get_config(scale))):
            return scale
    return None


def _scale_hint(saved: dict) -> str:
    """`` (it is the study of --scale X)`` when a saved protocol is exactly a scale's default."""
    scale = _scale_of(saved)
    return f" (it is the study of --scale {scale})" if scale else ""


def check_protocol(workdir: str, p) -> None:
    """Records the protocol on first use; refuses a workdir whose study used another one."""
    path = os.path.join(workdir, PROTOCOL_FILE)
    current = protocol_json(p)
    if os.path.isfile(path):
        with open(path) as f:
            saved = _as_recorded(json.load(f))
        diff = _diff(saved, current)
        if diff:
            raise SystemExit(
                f"{workdir} holds a study with another protocol ({'; '.join(diff[:8])}"
                f"{'; ...' if len(diff) > 8 else ''}){_scale_hint(saved)}; use a new --workdir")
        return
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(current, f, indent=1)
    os.replace(path + ".tmp", path)


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def dry_run(p, stages: list[Stage], workdir: str, launcher: str = "") -> None:
    total = 0.0
    for i, st in enumerate(stages, 1):
        total += st.estimate_s
        print(f"[{i}/{len(stages)}] {st.name}: {st.steps:,} steps, est. {_fmt_s(st.estimate_s)}"
              f"{' (after ' + ', '.join(st.needs) + ')' if st.needs else ''}")
        print("    " + " ".join(_quote(a) for a in st.command(workdir, launcher=launcher)))
    by_kind: dict[str, float] = {}
    for st in stages:
        by_kind[st.kind] = by_kind.get(st.kind, 0.0) + st.estimate_s
    print(f"{len(stages)} stages; estimated {_fmt_s(total)} on {p.cost.machine} ("
          + ", ".join(f"{k} {_fmt_s(v)}" for k, v in by_kind.items()) + ")")


def _quote(arg: str) -> str:
    return arg if all(c.isalnum() or c in "-_=./:,@" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


class _Interrupted(Exception):
    pass


def _on_term(signum, frame):
    del frame
    raise _Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def study_lock(workdir: str):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another experiments.reproduce is running on {workdir}") from None
        yield


def run_study(p, stages: list[Stage], workdir: str, selected: set[str], launcher: str = "",
              jobs: int = 1, isolate: bool = False) -> int:
    """Runs the selected stages, up to ``jobs`` at once, each when the stages it needs are done
    (see :mod:`experiments.reproduce_runner`); rewrites the report after each. Returns the exit
    status: 1 if a stage failed or could not run."""
    statuses = {st.name: reproduce_stages.read_status(st.workdir(workdir)) for st in stages}
    todo = [st for st in stages if st.name in selected]
    number = {st.name: i for i, st in enumerate(todo, 1)}
    prefix = {st.name: f"[{number[st.name]}/{len(todo)}] {st.name}" for st in todo}
    pending, failed = list(todo), []
    t_start = time.time()
    runner = reproduce_runner.StageRunner(workdir, jobs=jobs, isolate=isolate, launcher=launcher)
    try:
        while pending or runner.running:
            for st in list(pending):
                stage_dir = st.workdir(workdir)
                if statuses[st.name].get("status") == "done" and \
                        reproduce_stages.outputs_complete(st, stage_dir):
                    print(f"{prefix[st.name]}: done ({_fmt_s(statuses[st.name].get('wall_s', 0.0))}), "
                          "skipped", flush=True)
                    pending.remove(st)
                    continue
                unmet = [n for n in st.needs if statuses.get(n, {}).get("status") != "done"]
                waiting = [n for n in unmet if n in runner.running or
                           any(q.name == n for q in pending)]
                if unmet and not waiting:
                    why = ", ".join(f"{n} ({statuses.get(n, {}).get('status', 'pending')})"
                                    for n in unmet)
                    print(f"{prefix[st.name]}: not run, needs {why}", flush=True)
                    if any(statuses.get(n, {}).get("status") in ("failed", "not run")
                           for n in unmet):
                        failed.append(st.name)
                        statuses[st.name] = {**statuses[st.name], "status": "not run"}
                    pending.remove(st)
                    continue
                if waiting or not runner.has_idle_lane and not (launcher and st.kind == "pretrain"):
                    continue
                left = sum(s.estimate_s for s in pending) / max(1, jobs)
                print(f"{prefix[st.name]}: {'resuming' if statuses[st.name]['attempts'] else 'starting'} "
                      f"({st.steps:,} steps, est. {_fmt_s(st.estimate_s)}; study est. {_fmt_s(left)} "
                      f"left, {_fmt_s(time.time() - t_start)} so far); log "
                      f"{os.path.join(stage_dir, 'log.txt')}", flush=True)
                runner.start(st)
                pending.remove(st)
            if not runner.running:
                continue
            finished = runner.wait_one()
            st, s = finished.stage, finished.status
            statuses[st.name] = s
            if s["status"] == "done":
                print(f"{prefix[st.name]}: done in {_fmt_s(s['attempts'][-1]['wall_s'])}", flush=True)
            elif s["status"] == "interrupted":
                raise _Interrupted(f"{st.name} was stopped by a signal")
            else:
                failed.append(st.name)
                print(f"{prefix[st.name]}: FAILED ({s['error']})", file=sys.stderr, flush=True)
            reproduce_report.write(p, stages, workdir)
    except BaseException:
        stopped = runner.interrupt()
        if stopped:
            print(f"stopped at a checkpoint: {', '.join(stopped)}", file=sys.stderr, flush=True)
        raise
    finally:
        runner.close()
    reproduce_report.write(p, stages, workdir)
    print(f"report: {os.path.join(workdir, 'report.md')}", flush=True)
    if failed:
        print(f"{len(failed)} stage(s) failed or could not run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def export(workdir: str, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    for name in sorted(os.listdir(workdir)):
        if name in ("results.json", "report.md", PROTOCOL_FILE) or name.endswith(".png"):
            shutil.copy2(os.path.join(workdir, name), os.path.join(dest, name))
    print(f"exported results.json, report.md and figures to {dest}")


STATE_FILES = ("stage.json", "log.txt", "metrics.jsonl", "config.json", "results.json")


def export_state(protocol, stages: list[Stage], workdir: str, dest: str) -> None:
    """A compact copy of the study that a later run continues from (``cp -r DEST DIR`` and
    re-run): every finished stage's records, and of the finished pre-training stages the last
    checkpoint (what later stages start from). Unfinished stages are left out; they re-run."""
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    shutil.copy2(os.path.join(workdir, PROTOCOL_FILE), os.path.join(dest, PROTOCOL_FILE))
    kept = 0
    for st in stages:
        src = st.workdir(workdir)
        if reproduce_stages.read_status(src).get("status") != "done":
            continue
        out = st.workdir(dest)
        os.makedirs(out)
        for name in STATE_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(out, name))
        if st.kind == "pretrain":
            last = reproduce_stages.checkpoint_steps(os.path.join(src, "checkpoints"))[-1]
            shutil.copytree(os.path.join(src, "checkpoints", str(last)),
                            os.path.join(out, "checkpoints", str(last)))
        kept += 1
    scale = _scale_of(protocol_json(protocol))
    again = (f"`python -m experiments.reproduce --scale {scale} --workdir DIR`" if scale
             else "this command (the same --scale and --config overrides) with --workdir DIR")
    print(f"exported the state of {kept} finished stage(s) to {dest}; continue with "
          f"`cp -r {dest} DIR` and {again}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=protocol_config.SCALES, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dry-run", action="store_true", help="print the stages and commands only")
    ap.add_argument("--only", default="", help="comma-separated globs of stage names to run")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report, run nothing")
    ap.add_argument("--export", default="", help="copy results.json, report.md and PNGs here")
    ap.add_argument("--export-state", default="",
                    help="copy the finished stages (records, last pre-training checkpoints) here, "
                         "as a study directory a later run continues from")
    ap.add_argument("--launcher", default="",
                    help="start pre-training stages with this command, e.g. "
                         "\"./launch.sh tpu --name POD --zone ZONE\" (fine-tuning runs locally)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="stages run at once, each in its own worker process (CPU machines: a "
                         "stage uses every device, so on GPUs/TPUs keep 1)")
    ap.add_argument("--isolate", action="store_true",
                    help="run every stage as its own experiments.pretrain/finetune process "
                         "(~10 s more start-up per stage) instead of in a study worker")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one protocol value, e.g. --set qm9.num_labels=2000")
    args = ap.parse_args(argv)
    p = load_protocol(args.scale, args.set)
    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    stages = reproduce_stages.plan(p)
    patterns = [s.strip() for s in args.only.split(",") if s.strip()]
    selected = {st.name for st in stages
                if not patterns or any(fnmatch.fnmatchcase(st.name, pat) for pat in patterns)}
    if patterns and not selected:
        raise SystemExit(f"--only {args.only!r} matches no stage; stages look like "
                         f"{stages[0].name}, {stages[-1].name}")
    if args.jobs < 1:
        raise SystemExit(f"--jobs {args.jobs}: must be at least 1")
    if args.jobs > 1 and host_malloc.accelerator_expected(os.environ):
        raise SystemExit(f"--jobs {args.jobs}: every stage uses all the accelerators of this "
                         "machine, so stages cannot share them; use --jobs 1")
    if args.dry_run:
        dry_run(p, [st for st in stages if st.name in selected], workdir, args.launcher)
        return 0
    # Reading and reporting need no lock (a running study may be writing the same report: every
    # file is replaced atomically); running stages does.
    lock = contextlib.nullcontext() if args.report_only else study_lock(workdir)
    with lock:
        check_protocol(workdir, p)
        if args.report_only:
            reproduce_report.write(p, stages, workdir)
            print(f"report: {os.path.join(workdir, 'report.md')}")
            rc = 0
        else:
            previous = {sig: signal.signal(sig, _on_term) for sig in (signal.SIGTERM, signal.SIGHUP)}
            try:
                rc = run_study(p, stages, workdir, selected, args.launcher, args.jobs, args.isolate)
            except (_Interrupted, KeyboardInterrupt) as e:
                print(f"interrupted ({e or 'SIGINT'}); re-run the same command to resume",
                      file=sys.stderr)
                reproduce_report.write(p, stages, workdir)
                return 130
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        if args.export:
            export(workdir, os.path.abspath(args.export))
        if args.export_state:
            export_state(p, stages, workdir, os.path.abspath(args.export_state))
    return rc


if __name__ == "__main__":
    # As the entry points do; the stage workers inherit it (glibc reads it at start-up only).
    host_malloc.reexec_with_hugepages()
    sys.exit(main())
