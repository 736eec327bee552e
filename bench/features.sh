#!/usr/bin/env bash
# bench/features.sh: what the features cost. ringhub against itself with a feature on and off,
# same scenarios, alternating variants pass by pass (so machine noise hits both alike):
#
#   - auth:     fan-out CPU per delivery with [auth] (every connection authenticated, clients
#               allowed to publish) vs open mode; connects/s and hub CPU per connect with HS256,
#               RS256 and ES256 tokens vs no token;
#   - history:  fan-out CPU per delivery on a history channel vs a plain one, embedded and through
#               Redis (Redis's own CPU counted, as a helper process of the hub);
#   - reconnect (when ringhub-load has it): 1,000 subscribers of a history channel dropped and
#               resubscribed with `since` while a publisher runs.
#
#   cargo build --release --workspace      # ringhub and ringhub-load
#   bench/features.sh                       # ~8 minutes with the defaults; results in bench/results/features-<UTC>/
#
# Environment: FEAT_REPEAT (passes, default 3), FEAT_DURATION (default 5s), FEAT_SCENARIOS
# (subset of: f1k-max f1k-r200 connect redis-f1k-r200 reconnect), BENCH_SERVER_CPU /
# BENCH_LOAD_CPU (default 0 / 1), BENCH_NICE (default -19 as root).
# Server CPU = hub process + its helpers (redis-server) + the server core's ksoftirqd, sampled by
# bench/measure.py over the load phase; bench/features.py prints medians and ratios.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
repeat=${FEAT_REPEAT:-3}
dur=${FEAT_DURATION:-5s}
scpu=${BENCH_SERVER_CPU:-0}
lcpu=${BENCH_LOAD_CPU:-1}
nice_val=${BENCH_NICE:-$([ "$(id -u)" = 0 ] && echo -19 || echo 0)}
out=${BENCH_OUT:-"$here/results/features-$(date -u +%Y%m%dT%H%M%SZ)"}
mkdir -p "$out/logs" "$out/cfg" "$out/bin"
export BENCH_LOG_DIR="$out/logs"
ulimit -n "$(ulimit -Hn)"
for bin in ringhub ringhub-load; do
  [ -x "$root/target/release/$bin" ] || { echo "features.sh: build first: cargo build --release --workspace" >&2; exit 1; }
  cp "$root/target/release/$bin" "$out/bin/"
done
load="$out/bin/ringhub-load"
export RINGHUB_BIN="$out/bin/ringhub"

secret="features-bench-secret-0123456789abcdef"
keys="$root/tests/keys"
cat >"$out/cfg/auth.toml" <<TOML
[auth]
secret = "$secret"
public_key_files = ["$keys/rsa_public.pem", "$keys/ec_public.pem"]
[channels]
subscribe = "authenticated"
publish = "authenticated"
TOML
cat >"$out/cfg/history.toml" <<TOML
[channels]
history_size = 1000
history_ttl = "5m"
TOML

# id | variant | RINGHUB_ARGS | server kind | ringhub-load args
common="--duration $dur --warmup 1s --payload-size 64"
runs=(
  "f1k-max|open||ringhub|fanout --subscribers 1000 --max --window 16 $common"
  "f1k-max|auth|--config $out/cfg/auth.toml|ringhub|fanout --subscribers 1000 --max --window 16 $common --token-secret $secret"
  "f1k-max|history|--config $out/cfg/history.toml|ringhub|fanout --subscribers 1000 --max --window 16 $common"
  "f1k-r200|open||ringhub|fanout --subscribers 1000 --rate 200 $common"
  "f1k-r200|auth|--config $out/cfg/auth.toml|ringhub|fanout --subscribers 1000 --rate 200 $common --token-secret $secret"
  "f1k-r200|history|--config $out/cfg/history.toml|ringhub|fanout --subscribers 1000 --rate 200 $common"
  "redis-f1k-r200|open||ringhub-redis|fanout --subscribers 1000 --rate 200 $common"
  "redis-f1k-r200|history|--config $out/cfg/history.toml|ringhub-redis|fanout --subscribers 1000 --rate 200 $common"
  "connect|none||ringhub|connect --rate 2000 --warmup 1s --duration 3s"
  "connect|HS256|--config $out/cfg/auth.toml|ringhub|connect --rate 2000 --warmup 1s --duration 3s --token-secret $secret"
  "connect|RS256|--config $out/cfg/auth.toml|ringhub|connect --rate 2000 --warmup 1s --duration 3s --token-key $keys/rsa_private.pem --token-alg RS256"
  "connect|ES256|--config $out/cfg/auth.toml|ringhub|connect --rate 2000 --warmup 1s --duration 3s --token-key $keys/ec_private.pem --token-alg ES256"
)
if "$load" --help 2>/dev/null | grep -qE '^\s+reconnect\b'; then
  rc="reconnect --channel-prefix h: --subscribers 1000 --channels 10 --rate 200 --drop-every 1s --down-time 200ms --duration $dur --warmup 1s"
  runs+=("reconnect|history|--config $out/cfg/history.toml|ringhub|$rc")
  runs+=("redis-reconnect|history|--config $out/cfg/history.toml|ringhub-redis|$rc")
fi

{
  echo "date      $(date -u +%FT%TZ)"
  echo "commit    $(git -C "$root" rev-parse --short HEAD 2>/dev/null)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "kernel    $(uname -r)"
  echo "cpu       $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  echo "pinning   hub (and its redis-server) on CPU $scpu, ringhub-load on CPU $lcpu, nice $nice_val"
  echo "load avg  $(cut -d' ' -f1-3 /proc/loadavg) at start"
} | tee "$out/machine.txt"

wanted() { [ -z "${FEAT_SCENARIOS:-}" ] && return 0; [[ " $FEAT_SCENARIOS " == *" $1 "* ]]; }
stop() {
  kill "$@" 2>/dev/null || true
  for _ in $(seq 1 50); do
    local alive=0
    for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "$@" 2>/dev/null || true
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

for rep in $(seq 1 "$repeat"); do
  echo "--- pass $rep of $repeat"
  for r in "${runs[@]}"; do
    IFS='|' read -r id variant rargs kind args <<<"$r"
    wanted "$id" || continue
    port=$(free_port)
    if ! line=$(RINGHUB_ARGS="$rargs" nice -n "$nice_val" "$here/peers/start.sh" "$kind" "$port" "$scpu"); then
      echo "$id/$variant: could not start the hub" | tee -a "$out/NOTES.txt"
      continue
    fi
    read -r pid more <<<"$line"
    auxargs=()
    for p in ${more:-}; do auxargs+=(--aux "$p"); done
    sleep 0.3
    # shellcheck disable=SC2086
    python3 "$here/measure.py" --results "$out" --server "$variant" --scenario "$id" --rep "$rep" \
      --pid "$pid" "${auxargs[@]}" --cpu "$scpu" -- \
      nice -n "$nice_val" "$load" $args --url "ws://127.0.0.1:$port/ws" --cpus "$lcpu" --server-pid "$pid" ||
      echo "$id/$variant: measure.py failed" | tee -a "$out/NOTES.txt"
    # shellcheck disable=SC2086
    stop $pid ${more:-}
  done
done
python3 "$here/features.py" "$out" | tee "$out/tables.md"
