#!/usr/bin/env python3
"""bench/features.py: tables for bench/features.sh — each feature variant against its baseline,
medians over the passes with the spread, and the ratio variant ÷ baseline.

    features.py bench/results/features-<timestamp> > tables.md
"""

import json
import os
import statistics
import sys

BASELINE = {"connect": "none"}
TITLES = {
    "f1k-max": "1 publisher → 1,000 subscribers, closed loop (window 16), embedded",
    "f1k-r200": "1 publisher → 1,000 subscribers, 200 msg/s, embedded",
    "redis-f1k-r200": "1 publisher → 1,000 subscribers, 200 msg/s, through Redis (Redis CPU included)",
    "connect": "Connections per second (open loop, 2,000/s offered), each closed after `connected`/`welcome`",
    "reconnect": "1,000 history subscribers dropped and resubscribed with `since`, publisher at 200 msg/s, embedded",
    "redis-reconnect": "the same through Redis",
}


def med(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def fmt(m, digits=3):
    v, lo, hi = m
    if v is None:
        return "–"
    if lo == hi:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main():
    path = sys.argv[1]
    groups = {}
    with open(os.path.join(path, "runs.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                groups.setdefault(r["scenario"], {}).setdefault(r["server"], []).append(r)
    print(f"# Feature costs ({os.path.basename(path)})\n")
    try:
        with open(os.path.join(path, "machine.txt")) as f:
            print("```\n" + f.read().strip() + "\n```\n")
    except OSError:
        pass
    for scenario, variants in groups.items():
        print(f"## {TITLES.get(scenario, scenario)} (`{scenario}`)\n")
        base_name = BASELINE.get(scenario, "open")
        if scenario.endswith("reconnect"):
            print("| variant | passes | server CPU s | reconnect summary (median pass) |")
            print("|---|---|---|---|")
            for name, rs in variants.items():
                print(f"| {name} | {len(rs)} | {fmt(med([r.get('total_cpu_s') for r in rs]))} "
                      f"| {rs[len(rs) // 2].get('reconnect_summary', '–')} |")
            print()
            continue
        if scenario == "connect":
            key, unit, digits = "cpu_per_connection_us", "hub CPU µs per connect", 1
        else:
            key, unit, digits = "cpu_per_delivery_us", "server CPU µs per delivery", 3
        base = med([r.get(key) for r in variants.get(base_name, [])])[0]
        print(f"| variant | passes | {unit} | ÷ {base_name} | rate | delivered / established | p99 µs |")
        print("|---|---|---|---|---|---|---|")
        for name, rs in variants.items():
            m = med([r.get(key) for r in rs])
            ratio = f"{m[0] / base:.2f}" if (m[0] and base) else "–"
            if scenario == "connect":
                rate = fmt(med([r.get("connect_rate") for r in rs]), 0) + " /s"
                ok = fmt(med([r.get("established") for r in rs]), 0)
            else:
                rate = fmt(med([r.get("deliveries_per_s") for r in rs]), 0) + " /s"
                ok = fmt(med([r.get("delivered_pct") for r in rs]), 2) + " %"
            p99 = fmt(med([r.get("lat_p99_us") for r in rs]), 0)
            print(f"| {name} | {len(rs)} | {fmt(m, digits)} | {ratio} | {rate} | {ok} | {p99} |")
        print()


if __name__ == "__main__":
    main()
