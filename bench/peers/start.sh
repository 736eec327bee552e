#!/usr/bin/env bash
# bench/peers/start.sh: start one benchmark server pinned to a core and print its PID.
#
#   bench/peers/start.sh NAME PORT CPU
#
# NAME: ringhub | ringhub-redis | uws | node-ws-redis | tokio-hub | minimal
# The server listens on 127.0.0.1:PORT (WebSocket at /ws) under `taskset -c CPU`. The script
# returns once the port accepts connections and prints one line: the server's PID, followed by
# the PIDs of helper processes that belong to it and run on the same core (the redis-server of
# node-ws-redis and ringhub-redis). Stop them all by those PIDs. Logs go to $BENCH_LOG_DIR
# (default /tmp). With REDIS_PORT set, the Redis-mode servers use that redis-server instead of
# starting their own (several instances on one bus). RINGHUB_BIN / MINIMAL_BIN override the
# binaries (default: target/release/); RINGHUB_ARGS adds flags to ringhub (e.g. --config FILE). ringhub runs with --max-publish-rate 0 (the peers have no
# publish rate limit, and closed-loop runs publish faster than its default 1000/s per
# connection). Build/install first with
# bench/peers/setup.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
name=${1:?usage: start.sh NAME PORT CPU}
port=${2:?usage: start.sh NAME PORT CPU}
cpu=${3:?usage: start.sh NAME PORT CPU}
logs=${BENCH_LOG_DIR:-/tmp}
mkdir -p "$logs"
log="$logs/$name-$port.log"
# Many connections: raise the soft open-file limit for everything started from here.
ulimit -n "$(ulimit -Hn)"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # PORT PID: wait until PORT accepts connections (or PID died)
  local p=$1 pid=$2
  for _ in $(seq 1 200); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "start.sh: $name exited during start-up; see $log" >&2
      tail -5 "$log" >&2 || true
      exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  echo "start.sh: $name did not listen on port $p within 10 s; see $log" >&2
  exit 1
}

start_redis() { # prints the redis-server PID and port
  if [ -n "${REDIS_PORT:-}" ]; then
    echo "- $REDIS_PORT"
    return 0
  fi
  local rport
  rport=$(free_port)
  if [ "$rport" = 6379 ]; then rport=$(free_port); fi
  taskset -c "$cpu" redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
    --daemonize no >"$logs/redis-$rport.log" 2>&1 &
  local rpid=$!
  wait_port "$rport" "$rpid"
  echo "$rpid $rport"
}

aux=""
case "$name" in
  ringhub)
    taskset -c "$cpu" "${RINGHUB_BIN:-$root/target/release/ringhub}" serve --listen "127.0.0.1:$port" \
      --shards 1 --cpus "$cpu" --log warn --max-publish-rate 0 ${RINGHUB_ARGS:-} >"$log" 2>&1 &
    ;;
  ringhub-redis)
    read -r rpid rport < <(start_redis) && [ -n "${rport:-}" ] || exit 1
    [ "$rpid" = - ] || aux=$rpid
    taskset -c "$cpu" "${RINGHUB_BIN:-$root/target/release/ringhub}" serve --listen "127.0.0.1:$port" \
      --shards 1 --cpus "$cpu" --log warn --max-publish-rate 0 --redis "redis://127.0.0.1:$rport" ${RINGHUB_ARGS:-} >"$log" 2>&1 &
    ;;
  uws)
    taskset -c "$cpu" node "$here/uws/server.js" "$port" >"$log" 2>&1 &
    ;;
  node-ws-redis)
    read -r rpid rport < <(start_redis) && [ -n "${rport:-}" ] || exit 1
    [ "$rpid" = - ] || aux=$rpid
    taskset -c "$cpu" node "$here/node-ws-redis/server.js" "$port" "$rport" >"$log" 2>&1 &
    ;;
  tokio-hub)
    taskset -c "$cpu" "$here/tokio-hub/target/release/tokio-hub" "$port" >"$log" 2>&1 &
    ;;
  minimal)
    taskset -c "$cpu" "${MINIMAL_BIN:-$root/target/release/minimal-peer}" "$port" >"$log" 2>&1 &
    ;;
  *)
    echo "start.sh: unknown server $name (ringhub, ringhub-redis, uws, node-ws-redis, tokio-hub, minimal)" >&2
    exit 2
    ;;
esac
pid=$!
wait_port "$port" "$pid"
echo "$pid${aux:+ $aux}"
