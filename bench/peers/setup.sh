#!/usr/bin/env bash
# bench/peers/setup.sh: install and build everything the benchmark suite runs: the Node peers
# (npm packages from the npm registry, versions pinned in package-lock.json), the Rust peers
# (tokio-hub with cargo; minimal-peer in the workspace), ringhub and ringhub-load in release
# mode, and redis-server (Debian package) if it is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

command -v node >/dev/null || { echo "setup.sh: node (v18+) is required" >&2; exit 1; }
if ! command -v redis-server >/dev/null; then
  echo "installing redis-server ..."
  apt-get update -qq && apt-get install -y -qq redis-server
fi

echo "installing Node peers (npm ci) ..."
(cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
node -e "require('$here/node_modules/@trufflesuite/uws-js-unofficial')" || {
  echo "setup.sh: uWebSockets.js does not load on node $(node --version)" >&2
  exit 1
}

echo "building tokio-hub ..."
cargo build --release --quiet --manifest-path "$here/tokio-hub/Cargo.toml"

echo "building ringhub, ringhub-load, minimal-peer ..."
(cd "$root" && cargo build --release --quiet -p ringhub -p ringhub-load -p ringhub-bench --bins)
echo "peers ready"
