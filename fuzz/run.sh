#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 600), one after another, on the stable
# toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz use its nightly-only flags), and print how many
# inputs each target executed. One libFuzzer job at a time (-jobs=1 -workers=1).
# Needs cargo-fuzz: `cargo install cargo-fuzz`. Usage: fuzz/run.sh [SECONDS]
# New interesting inputs go into fuzz/corpus/<target>/; minimize with
# `RUSTC_BOOTSTRAP=1 cargo fuzz cmin <target>` before committing. Crashes land in
# fuzz/artifacts/<target>/ (not committed: turn each into a regression test).
set -euo pipefail

seconds="${1:-600}"
fuzz_dir="$(cd "$(dirname "$0")" && pwd)"
targets=(ws_frames resp protocol http_head token)
logs="$(mktemp -d)"
export RUSTC_BOOTSTRAP=1

status=0
summary=()
for target in "${targets[@]}"; do
  echo "== fuzzing ${target} for ${seconds}s (log: ${logs}/${target}.log)"
  # libFuzzer in -jobs mode writes the job's output to fuzz-0.log in the current directory.
  if (cd "${logs}" && cargo fuzz run --fuzz-dir "${fuzz_dir}" "${target}" -- \
      -max_total_time="${seconds}" -rss_limit_mb=2048 -timeout=10 \
      -jobs=1 -workers=1 -print_final_stats=1) >"${logs}/${target}.log" 2>&1; then
    result="ok"
  else
    result="FAILED (see ${logs}/${target}.log and ${fuzz_dir}/artifacts/${target}/)"
    status=1
  fi
  cat "${logs}/fuzz-0.log" >>"${logs}/${target}.log" 2>/dev/null || true
  rm -f "${logs}/fuzz-0.log"
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "${logs}/${target}.log" \
    | tail -n 1 | grep -o '[0-9]*$' || true)"
  summary+=("${target}: ${execs:-?} executions, ${result}")
  echo "${summary[-1]}"
done

echo "== summary"
printf '%s\n' "${summary[@]}"
exit "${status}"
