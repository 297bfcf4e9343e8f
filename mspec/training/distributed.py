"""Multi-process start-up: ``jax.distributed`` initialisation and failure handling.

Every entry point calls :func:`initialize` first, before anything touches JAX devices::

    from mspec.training import distributed
    distributed.initialize()          # no-op for a plain single-process run

How the processes find each other (environment variables, read by :meth:`Settings.from_env`):

=============================== ==================================================================
``MSPEC_DISTRIBUTED``           ``auto`` (default): explicit settings below if given, else JAX's
                                cluster auto-detection when running under Slurm or Open MPI with
                                more than one task, else a single process. ``on``: always call
                                ``jax.distributed.initialize`` (auto-detects Cloud TPU pod
                                slices, Slurm, Open MPI). ``off``: never (single process).
``MSPEC_COORDINATOR_ADDRESS``   ``host:port`` of process 0 (``JAX_COORDINATOR_ADDRESS`` is also
                                read). Explicit mode needs it with the next two.
``MSPEC_NUM_PROCESSES``         number of processes.
``MSPEC_PROCESS_ID``            this process, ``0 .. MSPEC_NUM_PROCESSES - 1``.
``MSPEC_INIT_TIMEOUT``          seconds to wait for all processes to join (default 300).
``MSPEC_HEARTBEAT_TIMEOUT``     seconds without heartbeats after which a process counts as dead
                                and every other process is stopped (default 60).
``MSPEC_SHUTDOWN_TIMEOUT``      seconds a finishing process waits for the others (default 120).
=============================== ==================================================================

On CPU (local multi-process tests) the cross-process collectives use gloo over TCP; the number
of local (fake) CPU devices per process comes from ``JAX_NUM_CPU_DEVICES``.

Failure behaviour (measured on CPU with gloo, see ``tests/test_multihost.py``):

* A process that cannot join within ``MSPEC_INIT_TIMEOUT`` (coordinator unreachable, or a peer
  never started) prints which case it is and exits with code :data:`EXIT_PEER_FAILURE`.
* A process that dies (killed, crashed, preempted) stops sending heartbeats; JAX's coordination
  service then terminates every other process (SIGABRT, exit code 134) within about
  ``MSPEC_HEARTBEAT_TIMEOUT`` seconds. If process 0 (the coordinator) dies, the others stop at
  once. The message is JAX's "Terminating process because the JAX distributed service detected
  fatal errors".
* A Python exception in one process is published to the others through the coordination
  service's key-value store; each of them prints ``mspec: process K failed: ...`` and exits with
  :data:`EXIT_PEER_FAILURE` within about a second (instead of waiting in a collective).

Checkpoints are written atomically by orbax, so in every case the last complete checkpoint stays
valid and re-running the same command resumes from it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping

import jax

# Exit code of a process stopped because another process (or the coordinator) failed. 75 is
# EX_TEMPFAIL: the failure is elsewhere and re-running the job resumes from the last checkpoint.
EXIT_PEER_FAILURE = 75

_FAILURE_KEY = "mspec/failure"
_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to start ``jax.distributed`` (see the module docstring for the variables)."""

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: int = 300
    heartbeat_timeout: int = 60
    shutdown_timeout: int = 120

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ

        def integer(name: str, default: int | None) -> int | None:
            value = env.get(name, "").strip()
            if not value:
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name}={value!r} is not an integer") from None

        mode = env.get("MSPEC_DISTRIBUTED", "auto").strip().lower() or "auto"
        if mode not in _MODES:
            raise ValueError(f"MSPEC_DISTRIBUTED={mode!r}; use one of {_MODES}")
        return cls(
            mode=mode,
            coordinator_address=(
                env.get("MSPEC_COORDINATOR_ADDRESS") or env.get("JAX_COORDINATOR_ADDRESS") or None
            ),
            num_processes=integer("MSPEC_NUM_PROCESSES", None),
            process_id=integer("MSPEC_PROCESS_ID", None),
            init_timeout=integer("MSPEC_INIT_TIMEOUT", cls.init_timeout),
            heartbeat_timeout=integer("MSPEC_HEARTBEAT_TIMEOUT", cls.heartbeat_timeout),
            shutdown_timeout=integer("MSPEC_SHUTDOWN_TIMEOUT", cls.shutdown_timeout),
        )

    @property
    def explicit(self) -> bool:
        return self.num_processes is not None or self.process_id is not None

    def validate(self) -> None:
        if not self.explicit:
            return
        missing = [
            name
            for name, value in (
                ("MSPEC_COORDINATOR_ADDRESS", self.coordinator_address),
                ("MSPEC_NUM_PROCESSES", self.num_processes),
                ("MSPEC_PROCESS_ID", self.process_id),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"explicit multi-process settings are incomplete: set {missing}")
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"MSPEC_PROCESS_ID={self.process_id} must be in [0, MSPEC_NUM_PROCESSES="
                f"{self.num_processes})"
            )
        host, sep, port = self.coordinator_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"MSPEC_COORDINATOR_ADDRESS={self.coordinator_address!r} must be host:port"
            )
        for name in ("init_timeout", "heartbeat_timeout", "shutdown_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def _cluster_with_several_tasks(env: Mapping[str, str]) -> str | None:
    """Name of a scheduler that JAX auto-detects and that started more than one task, if any."""
    try:
        if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            return "Slurm"
        if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            return "Open MPI"
    except ValueError:
        return None
    return None


def _say(msg: str) -> None:
    print(f"mspec: {msg}", file=sys.stderr, flush=True)


def _coordinator_reachable(address: str, timeout: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _start_join_watchdog(settings: Settings) -> threading.Event:
    """Exits with a clear message if joining takes longer than ``settings.init_timeout``.

    JAX's own timeout (set longer) would abort with a generic "DEADLINE_EXCEEDED RegisterTask";
    this says which side is missing. ``connect()`` releases the GIL, so the thread runs.
    """
    joined = threading.Event()

    def watch():
        if joined.wait(settings.init_timeout):
            return
        addr = settings.coordinator_address
        if settings.process_id == 0:
            why = (
                f"not all {settings.num_processes} processes joined the coordinator at {addr} "
                f"within {settings.init_timeout} s. Were all processes started, with the same "
                "MSPEC_COORDINATOR_ADDRESS and MSPEC_NUM_PROCESSES, and can they reach this host?"
            )
        elif addr and not _coordinator_reachable(addr):
            why = (
                f"cannot reach the coordinator at {addr} within {settings.init_timeout} s: is "
                "process 0 running, and is that address/port reachable from this host?"
            )
        else:
            why = (
                f"the coordinator at {addr} is up, but not all {settings.num_processes} "
                f"processes joined within {settings.init_timeout} s"
            )
        _say(f"process {settings.process_id}: {why} (MSPEC_INIT_TIMEOUT). Exiting.")
        os._exit(EXIT_PEER_FAILURE)

    threading.Thread(target=watch, name="mspec-join-watchdog", daemon=True).start()
    return joined


def initialize(settings: Settings | None = None) -> str:
    """Starts ``jax.distributed`` as the settings (default: the environment) say.

    Must run before any JAX computation. Safe to call more than once (later calls do nothing).

    Returns:
      A one-line description, e.g. ``"single process"`` or ``"process 1 of 2 (explicit)"``.
    """
    if jax.distributed.is_initialized():
        return f"process {jax.process_index()} of {jax.process_count()} (already initialised)"
    settings = settings or Settings.from_env()
    settings.validate()
    env = os.environ
    if settings.mode == "off":
        return "single process (MSPEC_DISTRIBUTED=off)"
    cluster = _cluster_with_several_tasks(env)
    if settings.mode == "auto" and not settings.explicit and cluster is None:
        return "single process"

    on_cpu = "cpu" in (env.get("JAX_PLATFORMS") or "").lower().split(",")
    if on_cpu:
        # Cross-process collectives on CPU (local multi-process runs and tests).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeouts = dict(
        heartbeat_timeout_seconds=settings.heartbeat_timeout,
        shutdown_timeout_seconds=settings.shutdown_timeout,
    )
    if settings.explicit:
        how = "explicit"
        _say(
            f"process {settings.process_id} of {settings.num_processes}: joining the "
            f"coordinator at {settings.coordinator_address} (timeout {settings.init_timeout} s)"
        )
        joined = _start_join_watchdog(settings)
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            # The watchdog reports first, with a clearer message.
            initialization_timeout=settings.init_timeout + 30,
            **timeouts,
        )
        joined.set()
    else:
        how = f"auto-detected{f' ({cluster})' if cluster else ''}"
        _say(f"initialising jax.distributed by cluster auto-detection ({settings.mode})")
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address,
            initialization_timeout=settings.init_timeout,
            **timeouts,
        )
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        _warm_up_gloo(settings.init_timeout)
    _install_failure_reporting()
    return f"process {jax.process_index()} of {jax.process_count()} ({how})"


def _warm_up_gloo(timeout_s: int) -> None:
    """Creates the gloo context over all devices while the processes are known to be together.

    gloo builds its context at the first collective over a device set and gives the other
    processes only 30 s (fixed in jaxlib 0.10.2) to arrive; on a busy machine process start-up
    (dataset opening, compilation) easily drifts further apart than that ("Gloo context
    initialization failed: DEADLINE_EXCEEDED"). Once built, the context is reused by every later
    all-device collective, whose own timeout is long. So: wait at a coordination-service barrier
    (timeout ``timeout_s``), then run one all-device reduction.
    """
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    _client().wait_at_barrier("mspec_gloo_warm_up", timeout_s * 1000)
    mesh = jax.make_mesh((jax.device_count(),), ("all",), axis_types=(jax.sharding.AxisType.Auto,))
    ones = np.ones((jax.local_device_count(),), np.int32)
    total = jax.jit(jax.numpy.sum)(
        jax.make_array_from_process_local_data(NamedSharding(mesh, P("all")), ones)
    )
    if int(total) != jax.device_count():
        raise RuntimeError(f"gloo warm-up reduction gave {int(total)}, not {jax.device_count()}")


# --------------------------------------------------------------------------------------------------
# Propagating a Python exception in one process to the others
# --------------------------------------------------------------------------------------------------


def _client():
    # The coordination-service client has no public accessor in jax 0.10.2.
    from jax._src import distributed as _jax_distributed

    return _jax_distributed.global_state.client


def _install_failure_reporting() -> None:
    """A failing process publishes its error; the others print it and exit promptly.

    Without this, the survivors would sit in their next collective until the failed process's
    shutdown barrier times out (``MSPEC_SHUTDOWN_TIMEOUT``) and then abort with an unrelated
    "Shutdown barrier has failed" message.
    """
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    me = jax.process_index()
    previous_hook = sys.excepthook

    def report_and_exit(exc_type, exc, tb):
        previous_hook(exc_type, exc, tb)
        summary = "".join(traceback.format_exception_only(exc_type, exc)).strip()
        try:
            client.key_value_set(_FAILURE_KEY, f"process {me} failed: {summary}")
        except Exception:  # noqa: BLE001  (another process reported first; ours is printed above)
            pass
        sys.stderr.flush()
        # Skip the shutdown barrier: the other processes will not reach it.
        os._exit(1)

    sys.excepthook = report_and_exit

    def watch():
        while True:
            time.sleep(1.0)
            try:
                message = client.key_value_try_get(_FAILURE_KEY)
            except Exception:  # noqa: BLE001  (not set: the usual case; or the client shut down)
                continue
            if message.startswith(f"process {me} "):
                continue
            _say(
                f"{message}. Stopping process {me} as well; the last complete checkpoint is "
                "intact and re-running the same command resumes from it."
            )
            os._exit(EXIT_PEER_FAILURE)

    threading.Thread(target=watch, name="mspec-peer-failure-watch", daemon=True).start()
