#!/usr/bin/env bash
# bench/run.sh: the standard benchmark suite: ringhub against its peers, same scenarios and
# durations for every server, each server pinned to CPU 0 and ringhub-load pinned to CPU 1.
#
#   bench/peers/setup.sh     # once: installs/builds the peers, ringhub and ringhub-load
#   bench/run.sh             # ~6 minutes; results in bench/results/<UTC timestamp>/
#
# Environment (all optional):
#   BENCH_SERVERS    servers to run (default: ringhub uws node-ws-redis tokio-hub minimal)
#   BENCH_SCENARIOS  scenario ids to run (default: all; see the table below)
#   BENCH_DURATION   measured time per fan-out run (default 5s); BENCH_WARMUP (default 1s)
#   BENCH_REPEAT     passes over the whole list (default 1, ~6.5 min each); tables show the
#                    median and the spread over the passes
#   BENCH_OUT        results directory (default bench/results/<timestamp>)
#   BENCH_SERVER_CPU / BENCH_LOAD_CPU   cores (default 0 / 1)
#   BENCH_NICE       nice value for the servers and ringhub-load (default -19 as root, else 0):
#                    on a shared machine, other jobs then barely take time from the two cores
#
# Every server is started fresh for every scenario (so idle RSS is measured on a new process).
# bench/measure.py samples the server's CPU time, its core's ksoftirqd and /proc/stat around
# the load phase; results go to runs.jsonl + runs.csv, one .hgrm per fan-out run, tables.md
# (bench/report.py) and, when ringhub-load has `compare --svg`, one latency plot per scenario.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
load="$root/target/release/ringhub-load"
servers=${BENCH_SERVERS:-"ringhub uws node-ws-redis tokio-hub minimal"}
dur=${BENCH_DURATION:-5s}
repeat=${BENCH_REPEAT:-1}
warm=${BENCH_WARMUP:-1s}
scpu=${BENCH_SERVER_CPU:-0}
lcpu=${BENCH_LOAD_CPU:-1}
out=${BENCH_OUT:-"$here/results/$(date -u +%Y%m%dT%H%M%SZ)"}
mkdir -p "$out/hgrm" "$out/logs"
export BENCH_LOG_DIR="$out/logs"
ulimit -n "$(ulimit -Hn)"
nice_val=${BENCH_NICE:-$([ "$(id -u)" = 0 ] && echo -19 || echo 0)}

for bin in "$load" "$root/target/release/ringhub" "$root/target/release/minimal-peer" \
  "$here/peers/tokio-hub/target/release/tokio-hub"; do
  [ -x "$bin" ] || { echo "run.sh: $bin is missing: run bench/peers/setup.sh first" >&2; exit 1; }
done
[ -d "$here/peers/node_modules" ] || { echo "run.sh: run bench/peers/setup.sh first" >&2; exit 1; }
# Run copies of the binaries, so a rebuild during the suite cannot change what is measured.
mkdir -p "$out/bin"
cp "$load" "$root/target/release/ringhub" "$root/target/release/minimal-peer" "$out/bin/"
load="$out/bin/ringhub-load"
export RINGHUB_BIN="$out/bin/ringhub" MINIMAL_BIN="$out/bin/minimal-peer"

# Scenario table: id | ringhub-load arguments (the common ones are added below).
common_fanout="--duration $dur --warmup $warm --payload-size 64"
scenarios=(
  "f1k-max|fanout --subscribers 1000 --max --window 16 $common_fanout"
  "f1k-r50|fanout --subscribers 1000 --rate 50 $common_fanout"
  "f1k-r200|fanout --subscribers 1000 --rate 200 $common_fanout"
  "f10k-r50|fanout --subscribers 10000 --rate 50 $common_fanout"
  "f10k-max|fanout --subscribers 10000 --max --window 16 $common_fanout"
  "idle15k|idle --connections 15000 --rate 5000 --warmup 1s --duration 2s"
)
if "$load" --help 2>/dev/null | grep -qE '^\s+connect\b'; then
  # Open loop at 5,000 attempts/s; each connection is closed right after its welcome.
  scenarios+=("connect|connect --rate 5000 --warmup 1s --duration 3s")
else
  echo "note: this ringhub-load has no 'connect' scenario: connects/s not measured" | tee "$out/NOTES.txt"
fi
# Cross-instance through Redis: two instances of the server and one redis-server, all on the
# server core; the publisher on instance A, the 1,000 subscribers on instance B.
redis_scenario="redis-f1k-r50|fanout --subscribers 1000 --rate 50 $common_fanout"

{
  echo "date      $(date -u +%FT%TZ)"
  echo "commit    $(git -C "$root" rev-parse --short HEAD 2>/dev/null)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "kernel    $(uname -r)"
  echo "cpu       $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  echo "memory    $(free -g | awk '/Mem:/ {print $2}') GiB"
  echo "node      $(node --version)"
  echo "redis     $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')"
  echo "pinning   servers on CPU $scpu (taskset), ringhub-load on CPU $lcpu (--cpus $lcpu), both at nice $nice_val"
  echo "load avg  $(cut -d' ' -f1-3 /proc/loadavg) at start"
  if pgrep -f 'fuzz/target' >/dev/null; then echo "WARNING   a fuzzer was running during this run"; fi
} | tee "$out/machine.txt"

started=$(date +%s)

wanted() { # scenario id -> 0 if selected
  [ -z "${BENCH_SCENARIOS:-}" ] && return 0
  [[ " $BENCH_SCENARIOS " == *" $1 "* ]]
}

stop() { # PIDS...: SIGTERM, then SIGKILL after 5 s
  kill "$@" 2>/dev/null || true
  for _ in $(seq 1 50); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "$@" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

port=$(free_port)

run_one() { # SERVER SCENARIO_LINE REP
  local server=$1 id=${2%%|*} args=${2#*|} rep=$3
  local line pid more aux="" extra=() urls=(--url "ws://127.0.0.1:$port/ws") rport=""
  if [[ $id == redis-* ]]; then
    # Instance A (publisher side) and one redis-server, both counted as helpers of instance B.
    local pport rpid
    rport=$(free_port)
    pport=$(free_port)
    taskset -c "$scpu" nice -n "$nice_val" redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
      >"$out/logs/redis-$id-$server.log" 2>&1 &
    rpid=$!
    sleep 0.3
    if ! line=$(REDIS_PORT=$rport nice -n "$nice_val" "$here/peers/start.sh" "$server" "$pport" "$scpu"); then
      echo "$server $id: could not start instance A" | tee -a "$out/NOTES.txt"
      stop $rpid
      return 0
    fi
    aux="$line $rpid"
    urls=(--publish-url "ws://127.0.0.1:$pport/ws" --subscribe-url "ws://127.0.0.1:$port/ws")
  fi
  if ! line=$(REDIS_PORT=$rport nice -n "$nice_val" "$here/peers/start.sh" "$server" "$port" "$scpu"); then
    echo "$server $id: could not start the server" | tee -a "$out/NOTES.txt"
    # shellcheck disable=SC2086
    [ -z "$aux" ] || stop $aux
    return 0
  fi
  read -r pid more <<<"$line"
  aux="$aux ${more:-}"
  local auxargs=()
  for p in $aux; do auxargs+=(--aux "$p"); done
  if [[ $args == fanout* ]]; then
    mkdir -p "$out/hgrm/$id"
    # Pass 1's histogram is plotted; later passes keep theirs beside it.
    if [ "$rep" = 1 ]; then
      extra=(--hgrm "$out/hgrm/$id/$server.hgrm")
    else
      extra=(--hgrm "$out/hgrm/$id/$server.rep$rep.hgrm")
    fi
  fi
  sleep 0.3
  # shellcheck disable=SC2086
  python3 "$here/measure.py" --results "$out" --server "$server" --scenario "$id" --rep "$rep" \
    --pid "$pid" "${auxargs[@]}" --cpu "$scpu" -- \
    nice -n "$nice_val" "$load" $args "${urls[@]}" --cpus "$lcpu" --server-pid "$pid" "${extra[@]}" ||
    echo "$server $id: measure.py failed" | tee -a "$out/NOTES.txt"
  # shellcheck disable=SC2086
  stop $pid $aux
}

for rep in $(seq 1 "$repeat"); do
  [ "$repeat" = 1 ] || echo "--- pass $rep of $repeat"
  for s in "${scenarios[@]}"; do
    wanted "${s%%|*}" || continue
    for server in $servers; do
      run_one "$server" "$s" "$rep"
    done
  done
  if wanted "${redis_scenario%%|*}"; then
    for server in ringhub-redis node-ws-redis; do
      run_one "$server" "$redis_scenario" "$rep"
    done
  fi
done

python3 "$here/report.py" "$out" --csv "$out/runs.csv" >"$out/tables.md"
if "$load" compare --help >/dev/null 2>&1; then
  mkdir -p "$out/svg"
  for d in "$out"/hgrm/*/; do
    id=$(basename "$d")
    files=() labels=()
    # ringhub first (ringhub-load compare gives each run's ratio to the first one).
    for server in ringhub ringhub-redis minimal uws tokio-hub node-ws-redis; do
      # Skip missing and empty histograms (a run without latency samples).
      grep -qE '^ *[0-9.]+ +[0-9.]+ +[0-9]+' "$d$server.hgrm" 2>/dev/null || continue
      files+=("$d$server.hgrm")
      labels+=("$server")
    done
    [ ${#files[@]} -gt 1 ] || continue
    title=$(python3 -B -c 'import sys; sys.path.insert(0, sys.argv[1]); import report; print(report.SCENARIO_TITLES.get(sys.argv[2], sys.argv[2]))' "$here" "$id")
    "$load" compare "${files[@]}" --labels "$(IFS=,; echo "${labels[*]}")" --title "$title" \
      --svg "$out/svg/$id.svg" >"$out/svg/$id.txt" 2>&1 ||
      echo "compare failed for $id (see $out/svg/$id.txt)" | tee -a "$out/NOTES.txt"
  done
else
  echo "note: this ringhub-load has no 'compare --svg': no latency plots" | tee -a "$out/NOTES.txt"
fi
echo "suite done in $(($(date +%s) - started)) s; results in $out"
cat "$out/tables.md"
