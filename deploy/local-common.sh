# shellcheck shell=bash
# Helpers shared by deploy/launch-local.sh and deploy/stop-local.sh (sourced, not run). Expects
# `root` (the repository root) to be set.

script_name="$(basename "$0" .sh)"

die() {
  echo "$script_name: error: $*" >&2
  exit 1
}

note() { echo "$script_name: $*" >&2; }

# The value of option $1 ("$@" of the caller's loop); fails when it is missing.
need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
  printf '%s' "$2"
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

# The nibble binary as an absolute path: $NIBBLE_BIN, else build/bin/nibble (or
# $NIBBLE_BUILD_DIR/bin/nibble) in the repository.
nibble_bin() {
  local bin="${NIBBLE_BIN:-${NIBBLE_BUILD_DIR:-$root/build}/bin/nibble}"
  if [[ "$bin" != */* ]]; then
    command -v "$bin" || die "nibble binary '$bin' not found in PATH"
    return
  fi
  if [ ! -f "$bin" ] || [ ! -x "$bin" ]; then
    die "nibble binary not found at $bin (build it with: bash deploy/build.sh, or set NIBBLE_BIN)"
  fi
  echo "$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
}

# Prints "TENSOR PIPELINE LISTEN" from a cluster config (defaults 1, 1, tcp://127.0.0.1:5555).
# Only these keys are read here; `nibble serve` validates the whole file at start-up.
read_config() {
  local py
  for py in python3 /usr/bin/python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" -c 'import yaml' 2>/dev/null || continue
    "$py" - "$1" "$script_name" <<'EOF'
import sys
import yaml

path, name = sys.argv[1], sys.argv[2]
try:
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
except (OSError, yaml.YAMLError) as e:
    sys.exit(f"{name}: error: cannot read {path}: {e}")
doc = doc if isinstance(doc, dict) else {}


def section(key):
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def count(key):
    value = section("parallel").get(key)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        sys.exit(f"{name}: error: {path}: parallel.{key}: expected an integer >= 1, got {value!r}")
    return value


listen = section("server").get("listen") or "tcp://127.0.0.1:5555"
if not isinstance(listen, str) or not listen or any(c.isspace() for c in listen):
    sys.exit(f"{name}: error: {path}: server.listen: expected an endpoint, got {listen!r}")
print(count("tensor"), count("pipeline"), listen)
EOF
    return
  done
  die "cannot read $1: needs python3 with PyYAML (apt-get install python3-yaml, or bash deploy/install-deps.sh); or pass --np and --endpoint"
}

# The address a local client connects to for a listen address: wildcard hosts become loopback.
connect_endpoint() {
  case "$1" in
    tcp://0.0.0.0:* | tcp://\*:*) echo "tcp://127.0.0.1:${1##*:}" ;;
    *) echo "$1" ;;
  esac
}

# Where launch-local.sh keeps the log, pid and exit code of the job serving an endpoint.
default_run_dir() {
  printf '%s/%s\n' "${NIBBLE_RUN_DIR:-$root/build/run}" "$(printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_')"
}

# True while process $1 exists and is not a zombie.
job_alive() {
  local stat
  [ -n "$1" ] && stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != "Z" ]
}

# True when the service at $1 answers a health request with ok within $2 milliseconds.
health() {
  "$bin" client --endpoint "$1" --health --timeout-ms "$2" >/dev/null 2>&1
}

# Live processes of the session led by $1 (launch-local.sh starts every job with setsid; mpirun gives
# each rank a process group of its own, but they stay in the session).
session_pids() {
  local stat f state sid
  for f in /proc/[0-9]*/stat; do
    stat="$(cat "$f" 2>/dev/null)" || continue
    read -r state _ _ sid _ <<<"${stat##*) }"
    [ "$sid" = "$1" ] && [ "$state" != Z ] && echo "${f//[^0-9]/}"
  done
  return 0
}

# Stops job $1 (the leader of the session launch-local.sh made): SIGTERM to every process of the
# session (mpirun forwards it to the ranks, the coordinator fails its open requests), SIGKILL to
# whatever is left after 10 s.
kill_job() {
  local pid="$1" left _
  job_alive "$pid" || return 0
  left="$(session_pids "$pid")"
  # shellcheck disable=SC2086 # one pid per word
  kill -TERM "$pid" $left 2>/dev/null || true
  for _ in $(seq 50); do
    left="$(session_pids "$pid")"
    [ -n "$left" ] || job_alive "$pid" || return 0
    sleep 0.2
  done
  note "the job did not stop within 10 s of SIGTERM; sending SIGKILL"
  # shellcheck disable=SC2086 # one pid per word
  kill -KILL "$pid" $left 2>/dev/null || true
}
