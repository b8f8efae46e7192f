#!/usr/bin/env bash
# Stops a `nibble serve` job: sends it a shutdown request and waits until every rank has exited.
# Exits with the job's exit code when deploy/launch-local.sh started it (0 = a clean shutdown).
#
#   deploy/stop-local.sh --endpoint E [--timeout SECONDS] [--run-dir DIR]
#
#   --endpoint E   the coordinator's client endpoint (what launch-local.sh printed); required
#   --timeout S    seconds to wait for the job to exit (default 60); after that the job started by
#                  launch-local.sh gets SIGTERM, then SIGKILL, and this script exits 1
#   --run-dir DIR  launch-local.sh's run folder, when it was given one (default: derived from E)
#
# A job not started by launch-local.sh (no pid file) is stopped too; then this script waits until
# the endpoint no longer answers, and cannot know the exit code.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=deploy/local-common.sh
source "$root/deploy/local-common.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

endpoint="" timeout=60 run_dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --endpoint) endpoint="$(need_value "$@")"; shift 2 ;;
    --timeout) timeout="$(need_value "$@")"; shift 2 ;;
    --run-dir) run_dir="$(need_value "$@")"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[ -n "$endpoint" ] || die "--endpoint E is required (what deploy/launch-local.sh printed)"
is_count "$timeout" || die "--timeout: expected a whole number of seconds, got '$timeout'"
bin="$(nibble_bin)"
[ -n "$run_dir" ] || run_dir="$(default_run_dir "$endpoint")"
pid_file="$run_dir/serve.pid" exit_file="$run_dir/serve.exit" log="$run_dir/serve.log"

# pid: the job launch-local.sh started, while it runs; ended: the exit code of one that has ended.
pid="" ended=""
if [ -f "$pid_file" ]; then
  pid="$(cat "$pid_file")"
  if [ -f "$exit_file" ] || ! job_alive "$pid"; then
    pid=""
    ended="$(cat "$exit_file" 2>/dev/null || echo unknown)"
  fi
fi

if ! "$bin" client --endpoint "$endpoint" --shutdown --timeout-ms 5000 >/dev/null 2>&1; then
  if [ -z "$pid" ]; then
    [ -n "$ended" ] || die "no nibble serve answers at $endpoint"
    [ "$ended" = 0 ] || die "the job at $endpoint had already ended with exit code $ended; log: $log"
    note "the job at $endpoint had already ended (exit code 0)"
    exit 0
  fi
  note "the shutdown request got no answer; stopping pid $pid with signals"
  kill_job "$pid"
  die "the job at $endpoint did not take the shutdown request and was killed; log: $log"
fi
note "shutdown requested at $endpoint"

deadline=$((SECONDS + timeout))
if [ -z "$pid" ]; then
  # Not ours: wait until nothing answers any more.
  while "$bin" client --endpoint "$endpoint" --stats --timeout-ms 500 >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$endpoint still answers ${timeout}s after the shutdown request"
    sleep 0.2
  done
  note "$endpoint no longer answers"
  exit 0
fi

# Ours: the wrapper writes the exit code once mpirun has returned, i.e. every rank has exited.
while [ ! -f "$exit_file" ] && job_alive "$pid"; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    note "the job did not exit within ${timeout}s of the shutdown request; stopping it with signals"
    kill_job "$pid"
    die "the job at $endpoint was killed; log: $log"
  fi
  sleep 0.2
done
# (A --foreground launch-local.sh writes the file just after its mpirun has gone.)
for _ in 1 2 3 4 5 6 7 8 9 10; do
  [ -f "$exit_file" ] && break
  sleep 0.2
done
code="$(cat "$exit_file" 2>/dev/null || echo unknown)"
if [ "$code" != 0 ]; then
  echo "--- last lines of $log:" >&2
  tail -n 20 "$log" >&2 || true
  die "the job exited with code $code; log: $log"
fi
note "the job exited cleanly (code 0)"
