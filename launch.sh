#!/usr/bin/env bash
# launch.sh: runs an mspec experiment module on one machine, a Cloud TPU VM pod slice, a Slurm
# allocation, or as N local CPU processes (for testing multi-process code).
#
# Usage: ./launch.sh [--dry-run] MODE [MODE OPTIONS] MODULE [MODULE ARGS...]
#        ./launch.sh MODULE [ARGS...]            (same as: ./launch.sh local MODULE ...)
#
#   --dry-run   print the commands instead of running them.
#   --help      this text.
#
# MODES
#   local       One process on this machine, all its devices.
#                 ./launch.sh local experiments.pretrain --config experiments/configs/pretrain_frad.py:tiny --workdir runs/tiny
#
#   cpu         N processes on this machine, on CPU, joined with jax.distributed over gloo on
#               127.0.0.1 (for testing multi-process code). Each process gets K fake CPU devices.
#                 --processes N            (default 2)
#                 --devices-per-process K  (default 2)
#                 --port P                 coordinator port (default: a free one)
#               Output lines are prefixed with [pI]. If a process fails, the others are given
#               MSPEC_HEARTBEAT_TIMEOUT + 30 s to stop by themselves, then killed. XLA_FLAGS reach
#               the processes, less a --xla_force_host_platform_device_count (K decides).
#                 ./launch.sh cpu --processes 2 experiments.pretrain --config ...:tiny --workdir runs/mp
#
#   tpu         Every worker of a Cloud TPU VM pod slice (gcloud compute tpus tpu-vm ... --worker=all):
#               1. sync: pack this checkout (git-tracked and untracked-not-ignored files), copy it
#                  to every worker and unpack it into --remote-dir;
#               2. install: a venv in --remote-dir/.venv with `pip install -e . jax[tpu]==0.10.2`
#                  (skipped with --no-install);
#               3. run: MODULE on every worker at once, MSPEC_DISTRIBUTED=on (JAX detects the pod).
#                 --name TPU_NAME          (required)
#                 --zone ZONE              (required)
#                 --project PROJECT        (default: gcloud's configured project)
#                 --remote-dir DIR         (default: mspec, relative to the remote home)
#                 --worker W               one worker only (default: all), e.g. to prepare a
#                                          dataset once on shared storage
#                 --no-install / --no-sync skip a step.
#               --workdir and data_dir must be on storage every worker can read and write
#               (e.g. a Filestore/NFS mount or a gcsfuse-mounted bucket).
#                 ./launch.sh tpu --name my-v4-32 --zone us-central2-b experiments.pretrain \
#                     --config experiments/configs/pretrain_frad.py --workdir /mnt/shared/runs/frad
#
#   slurm       srun inside a Slurm allocation (salloc/sbatch), one process per GPU or per node.
#               JAX reads rank, size and coordinator from the Slurm environment.
#                 --per gpu|node           (default gpu) one process per GPU, or per node with
#                                          all its GPUs (JAX_LOCAL_DEVICE_IDS set to 0..G-1)
#                 --gpus-per-node G        (default: $SLURM_GPUS_ON_NODE, else 8)
#                 --nodes N                (default: $SLURM_JOB_NUM_NODES, else 1)
#                 --srun-args "ARGS"       extra srun arguments (e.g. "--time=24:00:00")
#                 sbatch -N 4 --gpus-per-node=8 --wrap "./launch.sh slurm experiments.pretrain ..."
#
# ENVIRONMENT
#   PYTHON            interpreter for local/cpu/slurm modes (default: python3, else python, on
#                     PATH). Set it when the project is installed in a virtualenv that is not
#                     activated: PYTHON=venv/bin/python ./launch.sh ... The interpreter used is
#                     printed, and one that cannot import jax and mspec is refused.
#   MSPEC_INIT_TIMEOUT, MSPEC_HEARTBEAT_TIMEOUT, MSPEC_SHUTDOWN_TIMEOUT
#                     passed through (see mspec/training/distributed.py)
#   Re-running the same command resumes from the last checkpoint in --workdir.
set -euo pipefail

DRY_RUN=0
REPO="$(cd "$(dirname "$0")" && pwd)"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"; PY_FROM="\$PYTHON"
elif command -v python3 >/dev/null 2>&1; then
  PY=python3; PY_FROM="python3 on PATH; set PYTHON to choose another"
else
  PY=python; PY_FROM="python on PATH; set PYTHON to choose another"
fi

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "launch.sh: $*" >&2; exit 2; }

# Shell-quotes each argument (single quotes only where needed), joined by spaces.
quote() {
  local a out=() q="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+=("$a"); else out+=("'${a//$q/$q\\$q$q}'"); fi
  done
  printf '%s' "${out[*]}"
}

# Says which interpreter runs the processes, and stops early if it lacks the project (e.g. a
# virtualenv that is not activated: the workers would die with "No module named 'jax'").
check_python() {
  local where
  where="$(command -v "$PY" 2>/dev/null || true)"
  [ -n "$where" ] || die "interpreter '$PY' not found ($PY_FROM)"
  echo "[launch] interpreter: $where ($PY_FROM)" >&2
  [ "$DRY_RUN" = 1 ] && return 0
  (cd "$REPO" && "$PY" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("jax") and u.find_spec("mspec") else 1)') \
    || die "$where cannot import jax and mspec: run with the interpreter of the environment the project is installed in, e.g. PYTHON=venv/bin/python $0 ..."
}

# Prints a command (shell-quoted) in dry-run mode, runs it otherwise.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"; printf '\n'
  else
    "$@"
  fi
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
[ "$#" -ge 1 ] || { usage; exit 2; }

MODE="$1"
case "$MODE" in
  local|cpu|tpu|slurm) shift ;;
  -*) die "unknown option $MODE (see --help)" ;;
  *) MODE=local ;;  # ./launch.sh MODULE ...
esac

# ------------------------------------------------------------------------------------------------
mode_local() {
  [ "$#" -ge 1 ] || die "local: missing MODULE"
  check_python
  cd "$REPO"
  if [ "$DRY_RUN" = 1 ]; then run "$PY" -m "$@"; else exec "$PY" -m "$@"; fi
}

# ------------------------------------------------------------------------------------------------
mode_cpu() {
  local n=2 k=2 port=""
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --processes) n="$2"; shift 2 ;;
      --devices-per-process) k="$2"; shift 2 ;;
      --port) port="$2"; shift 2 ;;
      -*) die "cpu: unknown option $1" ;;
      *) break ;;
    esac
  done
  [ "$#" -ge 1 ] || die "cpu: missing MODULE"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "cpu: --processes must be a positive integer, got $n"
  [[ "$k" =~ ^[1-9][0-9]*$ ]] || die "cpu: --devices-per-process must be a positive integer, got $k"
  check_python
  if [ -z "$port" ]; then
    if [ "$DRY_RUN" = 1 ]; then
      port=PORT
    else
      port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    fi
  fi
  cd "$REPO"
  # XLA_FLAGS pass through, except one forcing another device count than --devices-per-process;
  # proxies can hang jax.distributed.
  local xla_flags="" flag
  for flag in ${XLA_FLAGS:-}; do
    case "$flag" in
      --xla_force_host_platform_device_count*) ;;
      *) xla_flags="${xla_flags:+$xla_flags }$flag" ;;
    esac
  done
  local env_cmd=(env -u XLA_FLAGS -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY
    -u all_proxy -u ALL_PROXY JAX_PLATFORMS=cpu "JAX_NUM_CPU_DEVICES=$k"
    "MSPEC_COORDINATOR_ADDRESS=127.0.0.1:$port" "MSPEC_NUM_PROCESSES=$n" PYTHONUNBUFFERED=1)
  [ -z "$xla_flags" ] || env_cmd+=("XLA_FLAGS=$xla_flags")
  if [ "$DRY_RUN" = 1 ]; then
    for ((i = 0; i < n; i++)); do run "${env_cmd[@]}" "MSPEC_PROCESS_ID=$i" "$PY" -m "$@"; done
    return 0
  fi

  local pids=() i
  trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done' INT TERM
  for ((i = 0; i < n; i++)); do
    "${env_cmd[@]}" "MSPEC_PROCESS_ID=$i" "$PY" -m "$@" > >(sed -u "s/^/[p$i] /" >&2) 2>&1 &
    pids+=("$!")
    echo "[launch] process $i pid $! (coordinator 127.0.0.1:$port)" >&2
  done

  # Wait for every process; after the first failure, give the others a bounded time to stop on
  # their own (they should: see mspec/training/distributed.py), then kill them.
  local grace=$(( ${MSPEC_HEARTBEAT_TIMEOUT:-60} + 30 )) status=0 deadline="" rc pid alive
  local -A done_rc=()
  while :; do
    alive=0
    for i in "${!pids[@]}"; do
      pid="${pids[$i]}"
      [ -n "${done_rc[$i]:-}" ] && continue
      if kill -0 "$pid" 2>/dev/null; then
        alive=1
      else
        rc=0; wait "$pid" || rc=$?
        done_rc[$i]=$rc
        echo "[launch] process $i exited with code $rc" >&2
        if [ "$rc" != 0 ] && [ "$status" = 0 ]; then
          status=$rc
          deadline=$(( $(date +%s) + grace ))
          echo "[launch] process $i failed; waiting up to ${grace} s for the others to stop" >&2
        fi
      fi
    done
    [ "$alive" = 0 ] && break
    if [ -n "$deadline" ] && [ "$(date +%s)" -ge "$deadline" ]; then
      for i in "${!pids[@]}"; do
        if [ -z "${done_rc[$i]:-}" ]; then
          echo "[launch] process $i still running after ${grace} s: killing it" >&2
          kill -KILL "${pids[$i]}" 2>/dev/null || true
        fi
      done
    fi
    sleep 0.5
  done
  wait || true  # the output filters
  if [ "$status" != 0 ]; then
    echo "[launch] failed (first failure: exit code $status). The last complete checkpoint is" \
      "intact; re-run the same command to resume." >&2
  fi
  return "$status"
}

# ------------------------------------------------------------------------------------------------
mode_tpu() {
  local name="" zone="" project="" remote_dir="mspec" install=1 sync=1 worker=all
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --name) name="$2"; shift 2 ;;
      --zone) zone="$2"; shift 2 ;;
      --project) project="$2"; shift 2 ;;
      --remote-dir) remote_dir="$2"; shift 2 ;;
      --worker) worker="$2"; shift 2 ;;
      --no-install) install=0; shift ;;
      --no-sync) sync=0; shift ;;
      -*) die "tpu: unknown option $1" ;;
      *) break ;;
    esac
  done
  [ -n "$name" ] || die "tpu: --name TPU_NAME is required"
  [ -n "$zone" ] || die "tpu: --zone ZONE is required"
  [ "$#" -ge 1 ] || die "tpu: missing MODULE"
  local gc=(gcloud compute tpus tpu-vm)
  local where=(--zone "$zone" "--worker=$worker")
  [ -n "$project" ] && where+=(--project "$project")
  local rd
  rd="$(quote "$remote_dir")"

  if [ "$sync" = 1 ]; then
    local tarball="${TMPDIR:-/tmp}/mspec-src-$$.tar.gz"
    if [ "$DRY_RUN" = 1 ]; then
      echo "(cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$tarball") --null -T -)"
    else
      (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -czf "$tarball" --null -T -)
    fi
    run "${gc[@]}" scp "$tarball" "$name:mspec-src.tar.gz" "${where[@]}"
    run "${gc[@]}" ssh "$name" "${where[@]}" --command \
      "mkdir -p $rd && tar -xzf mspec-src.tar.gz -C $rd && rm mspec-src.tar.gz"
    [ "$DRY_RUN" = 1 ] || rm -f "$tarball"
  fi
  if [ "$install" = 1 ]; then
    run "${gc[@]}" ssh "$name" "${where[@]}" --command \
      "cd $rd && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
  fi
  local passthrough="" v
  for v in MSPEC_INIT_TIMEOUT MSPEC_HEARTBEAT_TIMEOUT MSPEC_SHUTDOWN_TIMEOUT; do
    [ -n "${!v:-}" ] && passthrough+="$v=$(quote "${!v}") "
  done
  run "${gc[@]}" ssh "$name" "${where[@]}" --command \
    "cd $rd && MSPEC_DISTRIBUTED=on ${passthrough}.venv/bin/python -m $(quote "$@")"
}

# ------------------------------------------------------------------------------------------------
mode_slurm() {
  local per=gpu gpus="${SLURM_GPUS_ON_NODE:-8}" nodes="${SLURM_JOB_NUM_NODES:-1}" extra=""
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --per) per="$2"; shift 2 ;;
      --gpus-per-node) gpus="$2"; shift 2 ;;
      --nodes) nodes="$2"; shift 2 ;;
      --srun-args) extra="$2"; shift 2 ;;
      -*) die "slurm: unknown option $1" ;;
      *) break ;;
    esac
  done
  [ "$#" -ge 1 ] || die "slurm: missing MODULE"
  [[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "slurm: --gpus-per-node must be a positive integer, got $gpus"
  local srun_cmd=(srun --nodes="$nodes" --kill-on-bad-exit=1)
  local env_cmd=(env MSPEC_DISTRIBUTED=on)
  case "$per" in
    # Every task sees the node's GPUs; JAX picks GPU $SLURM_LOCALID for its task.
    gpu) srun_cmd+=(--ntasks-per-node="$gpus" --gpus-per-node="$gpus") ;;
    node)
      srun_cmd+=(--ntasks-per-node=1 --gpus-per-node="$gpus")
      # JAX's Slurm detection defaults to one GPU per process; give each process all of its node's.
      env_cmd+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
      ;;
    *) die "slurm: --per must be gpu or node, got $per" ;;
  esac
  # shellcheck disable=SC2206  (word splitting of user-given srun arguments is intended)
  [ -n "$extra" ] && srun_cmd+=($extra)
  check_python
  cd "$REPO"
  run "${srun_cmd[@]}" "${env_cmd[@]}" "$PY" -m "$@"
}

"mode_$MODE" "$@"
