"""The reproduction study: pre-training (Coord, Frad, MolSpectra) against scratch, end to end.

    python -m experiments.reproduce --scale smoke --workdir runs/study_smoke   # ~2 min harness check
    python -m experiments.reproduce --scale cpu --workdir runs/study           # the CPU study (hours)
    python -m experiments.reproduce --scale paper --workdir /shared/study --dry-run

Runs every stage of the protocol in ``experiments/configs/reproduce.py`` (pre-training arms, then
fine-tuning of every arm on every target with every seed), each as its own
``experiments.pretrain`` / ``experiments.finetune`` process in ``<workdir>/<stage name>`` with its
log in ``<stage dir>/log.txt``, and writes ``<workdir>/results.json``, ``<workdir>/report.md`` and
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
``--launcher CMD`` starts the pre-training stages through ``CMD`` (e.g. ``./launch.sh tpu --name
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
import subprocess
import sys
import time

from experiments import reproduce_report, reproduce_stages
from experiments.configs import reproduce as protocol_config
from experiments.reproduce_stages import Stage

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


def check_protocol(workdir: str, p) -> None:
    """Records the protocol on first use; refuses a workdir whose study used another one."""
    path = os.path.join(workdir, PROTOCOL_FILE)
    current = protocol_json(p)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = _diff(saved, current)
        if diff:
            raise SystemExit(
                f"{workdir} holds a study with another protocol ({'; '.join(diff[:8])}"
                f"{'; ...' if len(diff) > 8 else ''}); use a new --workdir")
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


def _die_with_parent():
    """Child side: receive SIGKILL when the study process dies (Linux), so no orphan keeps
    writing into a stage workdir that a re-run is about to resume."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_stage(st: Stage, workdir: str, env: dict, launcher: str = "") -> dict:
    """Runs (or resumes) one stage in a subprocess; returns its updated status record."""
    stage_dir = st.workdir(workdir)
    os.makedirs(stage_dir, exist_ok=True)
    status = reproduce_stages.read_status(stage_dir)
    cmd = st.command(workdir, launcher=launcher)
    log_path = os.path.join(stage_dir, "log.txt")
    start_steps = reproduce_stages.checkpoint_steps(os.path.join(stage_dir, "checkpoints"))
    attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "resumed_from_step": start_steps[-1] if start_steps else 0}
    status.update(name=st.name, command=cmd, log=log_path, status="running", steps=st.steps)
    status.setdefault("attempts", []).append(attempt)
    reproduce_stages.write_status(stage_dir, status)
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n=== {attempt['started']} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent)
        try:
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            attempt.update(wall_s=time.time() - t0, rc="interrupted")
            status["status"] = "interrupted"
            status["wall_s"] = sum(a.get("wall_s", 0.0) for a in status["attempts"])
            reproduce_stages.write_status(stage_dir, status)
            raise
    attempt.update(wall_s=time.time() - t0, rc=rc)
    status["wall_s"] = sum(a.get("wall_s", 0.0) for a in status["attempts"])
    if rc == 0 and reproduce_stages.outputs_complete(st, stage_dir):
        status["status"] = "done"
    else:
        status["status"] = "failed"
        status["error"] = (f"exit status {rc}" if rc else "finished without its outputs") + \
            f"; last lines of {log_path}: " + " | ".join(_tail(log_path, 3))
    reproduce_stages.write_status(stage_dir, status)
    return status


def _tail(path: str, n: int) -> list[str]:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f.readlines()[-200:] if ln.strip()]
    return lines[-n:]


def stage_env(workdir: str) -> dict:
    env = dict(os.environ)
    # One compilation per distinct step shape for the whole study (fine-tuning runs of one
    # target differ only in seeds and initial values).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@contextlib.contextmanager
def study_lock(workdir: str):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another experiments.reproduce is running on {workdir}") from None
        yield


def run_study(p, stages: list[Stage], workdir: str, selected: set[str], launcher: str = "") -> int:
    env = stage_env(workdir)
    statuses = {st.name: reproduce_stages.read_status(st.workdir(workdir)) for st in stages}
    todo = [st for st in stages if st.name in selected]
    t_start, failed = time.time(), []
    for i, st in enumerate(todo, 1):
        stage_dir = st.workdir(workdir)
        prefix = f"[{i}/{len(todo)}] {st.name}"
        if statuses[st.name].get("status") == "done" and reproduce_stages.outputs_complete(st, stage_dir):
            print(f"{prefix}: done ({_fmt_s(statuses[st.name].get('wall_s', 0.0))}), skipped", flush=True)
            continue
        blocked = [n for n in st.needs if statuses.get(n, {}).get("status") != "done"]
        if blocked:
            why = ", ".join(f"{n} ({statuses.get(n, {}).get('status', 'pending')})" for n in blocked)
            print(f"{prefix}: not run, needs {why}", flush=True)
            if any(statuses.get(n, {}).get("status") == "failed" for n in blocked):
                failed.append(st.name)
            continue
        left = sum(s.estimate_s for s in todo[i - 1:])
        print(f"{prefix}: {'resuming' if statuses[st.name]['attempts'] else 'starting'} "
              f"({st.steps:,} steps, est. {_fmt_s(st.estimate_s)}; study est. {_fmt_s(left)} left, "
              f"{_fmt_s(time.time() - t_start)} so far); log {os.path.join(stage_dir, 'log.txt')}",
              flush=True)
        statuses[st.name] = run_stage(st, workdir, env, launcher)
        s = statuses[st.name]
        if s["status"] == "done":
            print(f"{prefix}: done in {_fmt_s(s['attempts'][-1]['wall_s'])}", flush=True)
        else:
            failed.append(st.name)
            print(f"{prefix}: FAILED ({s['error']})", file=sys.stderr, flush=True)
        reproduce_report.write(p, stages, workdir)
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


def export_state(stages: list[Stage], workdir: str, dest: str) -> None:
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
    print(f"exported the state of {kept} finished stage(s) to {dest}; continue with "
          f"`cp -r {dest} DIR` and the same command with --workdir DIR")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("smoke", "cpu", "paper"), required=True)
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
                rc = run_study(p, stages, workdir, selected, args.launcher)
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
            export_state(stages, workdir, os.path.abspath(args.export_state))
    return rc


if __name__ == "__main__":
    sys.exit(main())
