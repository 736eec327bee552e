#!/usr/bin/env python3
"""bench/report.py: turn a benchmark run (DIR/runs.jsonl from bench/measure.py) into markdown
tables with ratios (ringhub ÷ peer), and optionally a flat CSV of every run.

    report.py bench/results/<timestamp> [--csv out.csv] > tables.md

Ratios below 1 favour ringhub for costs (CPU per delivery, latency, bytes) and favour the peer
for rates (deliveries/s, connects/s). Redis scenarios compare against ringhub-redis.
"""

import argparse
import csv
import json
import os
import statistics
import sys

SERVER_ORDER = ["ringhub", "ringhub-redis", "minimal", "uws", "tokio-hub", "node-ws-redis"]
SCENARIO_TITLES = {
    "f1k-max": "1 publisher → 1,000 subscribers, closed loop (window 16)",
    "f1k-r50": "1 publisher → 1,000 subscribers, 50 msg/s",
    "f1k-r200": "1 publisher → 1,000 subscribers, 200 msg/s",
    "f10k-r50": "1 publisher → 10,000 subscribers, 50 msg/s",
    "f10k-max": "1 publisher → 10,000 subscribers, closed loop (window 16)",
    "redis-f1k-r50": "Cross-instance through Redis: publisher on instance A, 1,000 subscribers on "
    "instance B, 50 msg/s",
}
CSV_FIELDS = [
    "server", "scenario", "rep", "exit", "deliveries", "window_deliveries", "deliveries_per_s",
    "delivered_pct", "lost", "duplicates", "reordered", "lat_p50_us", "lat_p90_us", "lat_p99_us",
    "lat_p99_9_us", "lat_p99_99_us", "lat_max_us", "server_cpu_s", "aux_cpu_s",
    "ksoftirqd_cpu_s", "total_cpu_s", "core_busy_s", "core_softirq_s", "window_s",
    "cpu_per_delivery_us", "server_only_per_delivery_us", "core_busy_per_delivery_us",
    "server_core_pct", "loadgen_cpu_s", "loadgen_core_pct", "loadgen_warning",
    "reported_hub_cpu_s", "reported_softirq_s", "server_wait_s", "loadgen_wait_s", "established",
    "failed", "connect_rate", "cpu_per_connection_us", "rss_per_conn_b", "open_at_measure",
    "command",
]


def load(path):
    """One aggregated record per (server, scenario): the median of every number over the passes
    (bench/run.sh BENCH_REPEAT), with the spread of the headline figures kept beside it."""
    groups = {}
    with open(os.path.join(path, "runs.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                groups.setdefault((r["server"], r["scenario"]), []).append(r)
    out = []
    for (server, scenario), rs in groups.items():
        agg = dict(rs[0])
        agg["reps"] = len(rs)
        keys = {k for r in rs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in keys:
            vals = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
            if vals:
                agg[k] = statistics.median(vals)
                agg[k + "_min"], agg[k + "_max"] = min(vals), max(vals)
        agg["warnings"] = [w for r in rs for w in (r.get("warnings") or [])]
        agg["loadgen_warning"] = any(r.get("loadgen_warning") for r in rs)
        out.append(agg)
    return out


def spread(r, key, digits):
    """`median (min–max)` when there were several passes."""
    v = r.get(key)
    if v is None:
        return "–"
    if r.get("reps", 1) > 1 and r.get(key + "_min") is not None:
        return f"{fmt(v, digits)} ({fmt(r[key + '_min'], digits)}–{fmt(r[key + '_max'], digits)})"
    return fmt(v, digits)


def order(servers):
    known = [s for s in SERVER_ORDER if s in servers]
    return known + sorted(s for s in servers if s not in SERVER_ORDER)


def fmt(v, digits=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def ratio(ours, theirs):
    if ours is None or theirs in (None, 0):
        return "–"
    return f"{ours / theirs:.2f}"


def base_server(scenario, servers):
    if scenario.startswith("redis") and "ringhub-redis" in servers:
        return "ringhub-redis"
    return "ringhub"


def fanout_tables(runs, out):
    scenarios = [s for s in SCENARIO_TITLES if any(r["scenario"] == s for r in runs)]
    scenarios += sorted(
        {r["scenario"] for r in runs if "deliveries" in r and r["scenario"] not in scenarios}
    )
    for sc in scenarios:
        rs = {r["server"]: r for r in runs if r["scenario"] == sc and "deliveries" in r}
        if not rs:
            continue
        base = rs.get(base_server(sc, rs))
        out.append(f"### {SCENARIO_TITLES.get(sc, sc)} (`{sc}`)\n")
        out.append(
            "| server | CPU µs/delivery (server+ksoftirqd) | ringhub ÷ server | of which ksoftirqd µs "
            "| deliveries/s | delivered | p50 µs | p99 µs | p99.9 µs | p99 ringhub ÷ server "
            "| server core % | load gen core % |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for s in order(rs):
            r = rs[s]
            ks = r.get("ksoftirqd_cpu_s")
            ks_per = ks * 1e6 / r["deliveries"] if ks is not None and r.get("deliveries") else None
            warn = " ⚠" if r.get("loadgen_warning") else ""
            out.append(
                f"| {s} | {spread(r, 'cpu_per_delivery_us', 3)} "
                f"| {ratio(base and base.get('cpu_per_delivery_us'), r.get('cpu_per_delivery_us'))} "
                f"| {fmt(ks_per, 3)} | {fmt(r.get('deliveries_per_s'))} "
                f"| {fmt(r.get('delivered_pct'), 3)}% | {fmt(r.get('lat_p50_us'), 0)} "
                f"| {spread(r, 'lat_p99_us', 0)} | {fmt(r.get('lat_p99_9_us'), 0)} "
                f"| {ratio(base and base.get('lat_p99_us'), r.get('lat_p99_us'))} "
                f"| {fmt(r.get('server_core_pct'), 0)} | {fmt(r.get('loadgen_core_pct'), 0)}{warn} |"
            )
        out.append("")


def summary_table(runs, out):
    fan = [r for r in runs if "cpu_per_delivery_us" in r and not r["scenario"].startswith("redis")]
    if not fan:
        return
    scenarios = [s for s in SCENARIO_TITLES if any(r["scenario"] == s for r in fan)]
    servers = order({r["server"] for r in fan})
    cell = {(r["server"], r["scenario"]): r["cpu_per_delivery_us"] for r in fan}
    recs = {(r["server"], r["scenario"]): r for r in fan}
    reps = max(r.get("reps", 1) for r in fan)
    note = f", median (min–max) of {reps} passes" if reps > 1 else ""
    out.append(
        "### Server CPU per delivery, µs (server process + its core's ksoftirqd)"
        f"{note}; ratio = ringhub ÷ server\n"
    )
    out.append("| server | " + " | ".join(f"`{s}`" for s in scenarios) + " |")
    out.append("|---|" + "---:|" * len(scenarios))
    for s in servers:
        cells = []
        for sc in scenarios:
            v = cell.get((s, sc))
            b = cell.get(("ringhub", sc))
            if v is None:
                cells.append("–")
            elif s == "ringhub":
                cells.append(spread(recs[(s, sc)], "cpu_per_delivery_us", 3))
            else:
                cells.append(f"{spread(recs[(s, sc)], 'cpu_per_delivery_us', 3)}; ratio {ratio(b, v)}")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    out.append("")


def small_table(out, title, rs, columns):
    """A table of one scenario: `columns` is [(heading, key, digits, with_ratio)]."""
    if not rs:
        return
    base = rs.get("ringhub")
    out.append(f"### {title}\n")
    heads = ["server"]
    for head, _key, _digits, with_ratio in columns:
        heads += [head, "ringhub ÷ server"] if with_ratio else [head]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|---|" + "---:|" * (len(heads) - 1))
    for s in order(rs):
        r = rs[s]
        cells = [s]
        for _head, key, digits, with_ratio in columns:
            cells.append(fmt(r.get(key), digits))
            if with_ratio:
                cells.append(ratio(base and base.get(key), r.get(key)))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")


def idle_table(runs, out):
    rs = {r["server"]: r for r in runs if r.get("rss_per_conn_b") is not None}
    small_table(
        out,
        "Idle connections: server RSS growth per open connection (`idle15k`)",
        rs,
        [
            ("open", "established", 0, False),
            ("B per idle connection", "rss_per_conn_b", 0, True),
            ("server CPU µs per connection", "cpu_per_connection_us", 0, False),
        ],
    )


def connect_table(runs, out):
    rs = {r["server"]: r for r in runs if r["scenario"] == "connect"}
    small_table(
        out,
        "Connections per second (`connect`)",
        rs,
        [
            ("established", "established", 0, False),
            ("failed", "failed", 0, False),
            ("connects/s", "connect_rate", 0, True),
            ("server CPU µs per connection", "cpu_per_connection_us", 0, True),
            ("connect→welcome p50 µs", "lat_p50_us", 0, False),
            ("p99 µs", "lat_p99_us", 0, True),
        ],
    )


def conditions(runs, out):
    """Runs in which ringhub-load saw contention or a saturated load generator."""
    rows = []
    for r in sorted(runs, key=lambda r: (r["scenario"], r["server"])):
        for w in sorted(set(r.get("warnings") or [])):
            rows.append(f"| `{r['scenario']}` | {r['server']} | {w} |")
    if rows:
        out.append("### Warnings from ringhub-load\n")
        out.append("| scenario | server | warning |")
        out.append("|---|---|---|")
        out.extend(rows)
        out.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--csv")
    a = ap.parse_args()
    runs = load(a.dir)
    raw = []
    with open(os.path.join(a.dir, "runs.jsonl")) as f:
        raw = [json.loads(line) for line in f if line.strip()]
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in sorted(raw, key=lambda r: (r["scenario"], r["server"], r.get("rep", 1))):
                w.writerow(r)
    out = []
    summary_table(runs, out)
    fanout_tables(runs, out)
    idle_table(runs, out)
    connect_table(runs, out)
    conditions(runs, out)
    out.append(
        "Ratios are ringhub ÷ server (ringhub-redis ÷ server for Redis scenarios): below 1 "
        "ringhub costs less (CPU, latency, bytes). ⚠: the load generator warned that it may have "
        "been the bottleneck."
    )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
