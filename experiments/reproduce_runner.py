"""How the reproduction study runs its stages: which process, how many at once, what is recorded.

By default every stage runs in a long-lived **worker process** that calls the training loop as
the entry points do (``mspec.training.cli.load_config`` parses the same ``--config.KEY=VALUE``
arguments; ``loop.train_and_evaluate`` runs it), with the stage's output in its ``log.txt``. A
worker imports JAX once for all its stages, which saves the ~10 s of start-up an
``experiments.pretrain``/``finetune`` process costs, and a stage that crashes (even a segfault)
ends only its worker: the stage is reported failed and the next stage gets a fresh worker. The
results are the same as the entry points' (tested bitwise).

``jobs`` workers run independent stages at once (a stage starts when the stages it needs are
done). ``isolate`` runs every stage as its own entry-point process instead, and a ``launcher``
(multi-host pre-training) always starts the pre-training stages as processes of their own.

Every attempt is recorded in ``<stage>/stage.json`` (start, step resumed from, wall time, exit
status) by the study process; a stop signal or Ctrl-C stops the running stages at a checkpoint
and marks them interrupted, so the next run resumes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from experiments import reproduce_stages
from experiments.reproduce_stages import Stage

INTERRUPTED = "interrupted"


def die_with_parent() -> None:
    """Child side: receive SIGKILL when the study process dies (Linux), so no orphan keeps
    writing into a stage workdir that a re-run is about to resume."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stage_env(workdir: str) -> dict:
    """The environment of the study's stage processes."""
    env = dict(os.environ)
    # One compilation per distinct step shape for the whole study (fine-tuning runs of one
    # target differ only in seeds and initial values).
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(workdir, "jax_cache"))
    # Also the programs that compile in under a second (JAX caches only slower ones by default):
    # a study has dozens of them (initialisation, evaluation, the small scales' steps).
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------------------------------
# One stage inside a worker process
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_to(path: str):
    """Sends this process's stdout and stderr, Python's and the file descriptors' (XLA, C
    extensions), to ``path`` for the duration."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved_fds = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    with open(path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        try:
            yield
        finally:
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)


def run_in_this_process(st: Stage, workdir: str, log_path: str) -> int | str:
    """Runs one stage here, as its entry point would (same config parser, same training loop,
    same defaults), with its output appended to ``log_path``.

    Returns 0, 1 (failed; the error is in the log: one line for a config or data mistake, the
    traceback for anything else) or :data:`INTERRUPTED` (a stop signal arrived; the loop saved
    a checkpoint of the current step).
    """
    import gc
    import traceback

    import jax

    from mspec.training import cli, loop, stopping

    with output_to(log_path):
        try:
            config = cli.load_config(st.config_args(workdir))
        except ValueError as e:  # a config mistake: one line, as the entry point prints it
            print(f"{st.module}: error: {e}", flush=True)
            return 1
        try:
            loop.train_and_evaluate(config, st.workdir(workdir))
            return 0
        except stopping.Stopped as e:
            print(str(e), flush=True)
            return INTERRUPTED
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            return INTERRUPTED
        except Exception as e:  # noqa: BLE001 - a stage's failure must not end the study
            if cli.is_clear_error(e):
                print(f"{st.module}: error: {' '.join(str(e).split())}", flush=True)
            else:
                traceback.print_exc()  # a bug: the whole traceback
            return 1
        finally:
            # Compiled steps and host buffers of this stage are not reused by the next one.
            jax.clear_caches()
            gc.collect()


def _worker_main(conn, env: dict) -> None:
    """A worker process: runs the stages it is sent, one at a time, until the pipe closes."""
    die_with_parent()
    # Ctrl-C reaches every process of the terminal: a running stage stops at a checkpoint (the
    # training loop's own handler); an idle worker ignores it and the study process stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    import jax
    from absl import logging

    jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    # What the entry points do: orbax and TFDS log every file operation at INFO.
    logging.set_verbosity(logging.WARNING)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        st, workdir, log_path = job
        rc = run_in_this_process(st, workdir, log_path)
        conn.send(rc)
        if rc == INTERRUPTED:
            return


# --------------------------------------------------------------------------------------------------
# Lanes: where a stage runs
# --------------------------------------------------------------------------------------------------


class _WorkerLane:
    """A worker process, started on first use and again after it dies."""

    def __init__(self, env: dict):
        self.env = env
        self.process = None
        self.conn = None

    def prepare(self) -> None:
        """Starts the worker if it is not running. Called from the study's main thread: the
        worker's parent-death signal is tied to the thread that started it."""
        if self.process is None or not self.process.is_alive():
            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            # Not a daemon: a stage may start processes of its own (dataset builders' workers).
            # The worker ends with the study: close(), or its parent-death signal.
            self.process = ctx.Process(target=_worker_main, args=(child, self.env), daemon=False)
            self.process.start()
            child.close()

    def run(self, st: Stage, workdir: str, log_path: str) -> int | str:
        self.conn.send((st, workdir, log_path))
        try:
            return self.conn.recv()
        except (EOFError, OSError):  # the worker died (segfault, out of memory, killed)
            self.process.join()
            code = self.process.exitcode
            self.process = None
            with open(log_path, "a") as log:
                log.write(f"\nthe worker process running this stage died (exit code {code})\n")
            return code if code else 1

    def stop(self, sig: int) -> None:
        if self.process is not None and self.process.is_alive():
            os.kill(self.process.pid, sig)

    def wait(self, timeout: float) -> None:
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()
        self.process = None


class _ProcessLane:
    """One entry-point process per stage (``isolate``, or a launcher for pre-training)."""

    def __init__(self, env: dict, launcher: str = ""):
        self.env = env
        self.launcher = launcher
        self.proc = None
        self.stopping = False

    def prepare(self) -> None:
        pass

    def run(self, st: Stage, workdir: str, log_path: str) -> int | str:
        cmd = st.command(workdir, launcher=self.launcher)
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         preexec_fn=die_with_parent)
            rc = self.proc.wait()
        stopped_by_signal = rc in (-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM,
                                   128 + signal.SIGINT)
        return INTERRUPTED if stopped_by_signal and self.stopping else rc

    def stop(self, sig: int) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# The scheduler
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Finished:
    stage: Stage
    status: dict


class StageRunner:
    """Runs stages on ``jobs`` lanes, each stage in a thread that waits for its lane, and hands
    back their status records as they finish."""

    def __init__(self, workdir: str, jobs: int = 1, isolate: bool = False, launcher: str = ""):
        self.workdir = workdir
        self.env = stage_env(workdir)
        self.launcher = launcher
        self.isolate = isolate
        self.idle = [self._lane() for _ in range(max(1, jobs))]
        self.running: dict[str, tuple[object, threading.Thread]] = {}
        self.done: queue.Queue = queue.Queue()

    def _lane(self):
        return _ProcessLane(self.env) if self.isolate else _WorkerLane(self.env)

    @property
    def has_idle_lane(self) -> bool:
        return bool(self.idle)

    def start(self, st: Stage) -> None:
        """Starts ``st`` on an idle lane (pre-training stages under a launcher get a process of
        their own beside the lanes' work, as the launcher's hosts do the computing)."""
        if self.launcher and st.kind == "pretrain":
            lane, pooled = _ProcessLane(self.env, self.launcher), False
        else:
            lane, pooled = self.idle.pop(), True
        stage_dir = st.workdir(self.workdir)
        os.makedirs(stage_dir, exist_ok=True)
        status = reproduce_stages.read_status(stage_dir)
        cmd = st.command(self.workdir, launcher=self.launcher if not pooled else "")
        log_path = os.path.join(stage_dir, "log.txt")
        start_steps = reproduce_stages.checkpoint_steps(os.path.join(stage_dir, "checkpoints"))
        in_worker = isinstance(lane, _WorkerLane)
        attempt = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "resumed_from_step": start_steps[-1] if start_steps else 0,
                   "process": "study worker" if in_worker else "own process"}
        status.update(name=st.name, command=cmd, log=log_path, status="running", steps=st.steps)
        status.setdefault("attempts", []).append(attempt)
        reproduce_stages.write_status(stage_dir, status)
        with open(log_path, "a") as log:
            where = " (in a study worker process: the same run as)" if in_worker else ""
            log.write(f"\n=== {attempt['started']}{where} {' '.join(cmd)}\n")

        lane.prepare()

        def wait_for_it():
            t0 = time.time()
            try:
                rc = lane.run(st, self.workdir, log_path)
            except BaseException as e:  # noqa: BLE001 - reported as the stage's failure
                rc = f"{type(e).__name__}: {e}"
            self.done.put((st, status, attempt, rc, time.time() - t0, lane, pooled))

        thread = threading.Thread(target=wait_for_it, name=st.name, daemon=True)
        self.running[st.name] = (lane, thread)
        thread.start()

    def wait_one(self) -> Finished:
        """Blocks until a running stage finishes; records and returns its status."""
        while True:
            try:  # a timeout, so that signal handlers run in this (the main) thread
                st, status, attempt, rc, wall, lane, pooled = self.done.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        del self.running[st.name]
        if pooled:
            self.idle.append(lane)
        stage_dir = st.workdir(self.workdir)
        attempt.update(wall_s=wall, rc=rc)
        status["wall_s"] = sum(a.get("wall_s", 0.0) for a in status["attempts"])
        log_path = status["log"]
        if rc == INTERRUPTED:
            status["status"] = "interrupted"
        elif rc == 0 and reproduce_stages.outputs_complete(st, stage_dir):
            status["status"] = "done"
            status.pop("error", None)
        else:
            status["status"] = "failed"
            status["error"] = (f"exit status {rc}" if rc else "finished without its outputs") + \
                f"; last lines of {log_path}: " + " | ".join(tail(log_path, 3))
        reproduce_stages.write_status(stage_dir, status)
        return Finished(st, status)

    def interrupt(self, grace_s: float = 60.0) -> list[str]:
        """Stops every running stage at a checkpoint (SIGTERM: the loop saves the current step;
        killed after ``grace_s``), marks them interrupted; returns their names."""
        names = list(self.running)
        for lane, _ in self.running.values():
            lane.stop(signal.SIGTERM)
        for lane, thread in self.running.values():
            lane.wait(grace_s)
            thread.join(5)
        while self.running:
            try:
                st, status, attempt, rc, wall, lane, pooled = self.done.get(timeout=1)
            except queue.Empty:
                break
            self.running.pop(st.name, None)
            attempt.update(wall_s=wall, rc=INTERRUPTED)
            status["status"] = "interrupted"
            status["wall_s"] = sum(a.get("wall_s", 0.0) for a in status["attempts"])
            reproduce_stages.write_status(st.workdir(self.workdir), status)
        return names

    def close(self) -> None:
        for lane in self.idle:
            lane.close()


def tail(path: str, n: int) -> list[str]:
    with open(path, errors="replace") as f:
        lines = [ln.strip() for ln in f.readlines()[-200:] if ln.strip()]
    return lines[-n:]
