#!/usr/bin/env bash
# Starts a `nibble serve` cluster on this host: 1 coordinator + tensor * pipeline workers under
# mpirun, waits until it answers a health request, and prints its client endpoint on stdout (the
# only thing this script writes to stdout).
#
#   deploy/launch-local.sh --config C.yaml [--np N] [--foreground] [--timeout SECONDS]
#                          [--endpoint E] [--run-dir DIR] [-- EXTRA MPIRUN ARGS...]
#
#   --config C.yaml  the cluster configuration (see config/); required
#   --np N           ranks to start; default 1 + parallel.tensor * parallel.pipeline from the config
#   --foreground     stay attached: the job's log is echoed to stderr and this script exits with the
#                    job's exit code (Ctrl-C stops the job). Default: the job runs in the background
#                    in a session of its own and this script returns once it is ready.
#   --timeout S      seconds to wait for the first health answer (default 120)
#   --endpoint E     where to reach the coordinator; default server.listen from the config, with a
#                    wildcard host (0.0.0.0, *) replaced by 127.0.0.1
#   --run-dir DIR    where serve.log, serve.pid and serve.exit go; default
#                    build/run/<endpoint with / and : as _> (deploy/stop-local.sh finds it from the
#                    endpoint alone)
#
# Environment: NIBBLE_BIN (default build/bin/nibble, or $NIBBLE_BUILD_DIR/bin/nibble), MPIRUN
# (default mpirun; Open MPI), OMPI_MCA_btl_vader_single_copy_mechanism (default none: containers
# usually forbid the cross-process memory copies Open MPI would otherwise use).
#
# Stop a background job with: deploy/stop-local.sh --endpoint E
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=deploy/local-common.sh
source "$root/deploy/local-common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

config="" np="" foreground=0 timeout=120 endpoint="" run_dir=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$(need_value "$@")"; shift 2 ;;
    --np) np="$(need_value "$@")"; shift 2 ;;
    --foreground) foreground=1; shift ;;
    --timeout) timeout="$(need_value "$@")"; shift 2 ;;
    --endpoint) endpoint="$(need_value "$@")"; shift 2 ;;
    --run-dir) run_dir="$(need_value "$@")"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$config" ] || die "--config C.yaml is required (examples in $root/config/)"
[ -f "$config" ] || die "config file not found: $config"
is_count "$timeout" || die "--timeout: expected a whole number of seconds, got '$timeout'"
[ -z "$np" ] || is_count "$np" || die "--np: expected a positive integer, got '$np'"

bin="$(nibble_bin)"
mpirun_bin="${MPIRUN:-mpirun}"
command -v "$mpirun_bin" >/dev/null || die "$mpirun_bin not found (install Open MPI: bash deploy/install-deps.sh)"

config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
# tensor, pipeline and server.listen, read from the config (nibble serve itself validates the rest).
if [ -z "$np" ] || [ -z "$endpoint" ]; then
  settings="$(read_config "$config")" || exit 1
  read -r tensor pipeline listen <<<"$settings"
fi
[ -n "$np" ] || np=$((1 + tensor * pipeline))
[ -n "$endpoint" ] || endpoint="$(connect_endpoint "$listen")"
[ -n "$run_dir" ] || run_dir="$(default_run_dir "$endpoint")"
mkdir -p "$run_dir"
run_dir="$(cd "$run_dir" && pwd)"
log="$run_dir/serve.log" pid_file="$run_dir/serve.pid" exit_file="$run_dir/serve.exit"

if [ -f "$pid_file" ] && [ ! -f "$exit_file" ] && job_alive "$(cat "$pid_file")"; then
  die "a job started from $run_dir is still running (pid $(cat "$pid_file")); stop it with: deploy/stop-local.sh --endpoint $endpoint"
fi
if health "$endpoint" 1000; then
  die "something already answers at $endpoint (another nibble serve?); stop it or change server.listen"
fi
rm -f "$pid_file" "$exit_file"
: >"$log"

export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
# When a rank dies mpirun sends the others SIGTERM, then SIGKILL after this many seconds (Open MPI's
# default is 1): the coordinator needs the time to answer every open request with an error.
export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-5}"
# --oversubscribe: more ranks than cores is fine here (the coordinator mostly waits; `threads: auto`
# shares the cores among the workers). --bind-to none: a worker runs a thread pool, which a binding
# to one core would squeeze onto that core.
cmd=("$mpirun_bin" --allow-run-as-root --oversubscribe --bind-to none -np "$np" "${extra[@]}"
  "$bin" serve --config "$config")
note "starting ${cmd[*]}"
note "log: $log"

stop_foreground() {
  trap 'kill_job "$pid"' INT TERM  # a second Ctrl-C: signals at once
  note "stopping the job"
  "$bin" client --endpoint "$endpoint" --shutdown --timeout-ms 2000 >/dev/null 2>&1 || kill_job "$pid"
}

if [ "$foreground" -eq 1 ]; then
  # Its own process group, so that a Ctrl-C reaches this script (which asks for a clean shutdown)
  # and not mpirun (which would abort the job).
  setsid "${cmd[@]}" >"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  tail -n +1 -F --pid="$pid" "$log" >&2 2>/dev/null &
  tailer=$!
  # Ctrl-C or SIGTERM: a clean shutdown request first; signals if the service does not take it.
  trap 'stop_foreground' INT TERM
else
  # A session of its own: the job outlives this script and its terminal, and stop-local.sh can end
  # the whole process group. The wrapper records mpirun's exit code for stop-local.sh.
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid bash -c 'trap : INT TERM; "$@" >"$0" 2>&1 </dev/null; echo $? >"$0.exit.tmp"; mv "$0.exit.tmp" "${0%.log}.exit"' \
    "$log" "${cmd[@]}" </dev/null >/dev/null 2>&1 &
  pid=$!
  echo "$pid" >"$pid_file"
fi

# Wait for the first health answer, or for the job to end, or for the timeout.
deadline=$((SECONDS + timeout))
until health "$endpoint" 1000; do
  if ! job_alive "$pid" || [ -f "$exit_file" ]; then
    code="$(cat "$exit_file" 2>/dev/null || true)"
    if [ "$foreground" -eq 1 ]; then
      wait "$pid" && code=0 || code=$?
      echo "$code" >"$exit_file"
      wait "$tailer" 2>/dev/null || true
    else
      echo "--- last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
    fi
    die "the job ended before it answered (exit code ${code:-unknown}); log: $log"
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    kill_job "$pid"
    if [ "$foreground" -eq 0 ]; then
      echo "--- last lines of $log:" >&2
      tail -n 20 "$log" >&2 || true
    fi
    die "no health answer from $endpoint within ${timeout}s; the job was stopped; log: $log"
  fi
  sleep 0.2
done
note "ready: $np ranks, pid $pid, endpoint $endpoint"
echo "$endpoint"

if [ "$foreground" -eq 1 ]; then
  wait "$pid" && code=0 || code=$?
  # After Ctrl-C, wait returns early with the signal's status: wait again for mpirun to finish.
  while job_alive "$pid"; do wait "$pid" && code=0 || code=$?; done
  echo "$code" >"$exit_file"
  wait "$tailer" 2>/dev/null || true
  note "the job exited with code $code"
  exit "$code"
fi
