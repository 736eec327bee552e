#!/usr/bin/env python3
"""bench/measure.py: run one ringhub-load scenario against one running server and record it.

    measure.py --results DIR --server NAME --scenario ID --pid PID [--aux PID ...] --cpu 0 \
        -- ringhub-load ARGS...

Besides what ringhub-load reports, it samples from /proc, over the load phase only (from
ringhub-load's "setup done" line to its first report line; for `idle`/`connect`, the whole run):
- the server's CPU time (utime+stime of PID and of each --aux PID, e.g. its redis-server),
- the server core's ksoftirqd/CPU thread (where the kernel defers network work from io_uring),
- the server core's busy time from /proc/stat (a cross-check that includes softirq run in any
  context).
Headline: server CPU per delivery = (server + aux + ksoftirqd CPU) / deliveries.

Appends one JSON object per run to DIR/runs.jsonl (ringhub-load's own --json summary is kept in
DIR/json/, its text output in DIR/logs/<server>-<scenario>.txt; the caller passes --hgrm).
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    """utime+stime of a process (all its threads), in seconds; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the comm field: state is fields[0]; utime, stime are stat fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_busy_s(cpu):
    """(busy, softirq) seconds of one core from /proc/stat."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
                return (user + nice + system + irq + softirq + steal) / TICK, softirq / TICK
    return None, None


def ksoftirqd_pid(cpu):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == f"ksoftirqd/{cpu}":
                        return int(pid)
            except OSError:
                pass
    return None


class Sampler:
    def __init__(self, pids, ksoft, cpu):
        self.pids, self.ksoft, self.cpu = pids, ksoft, cpu

    def snap(self):
        busy, softirq = cpu_busy_s(self.cpu)
        return {
            "t": time.monotonic(),
            "procs": [proc_cpu_s(p) for p in self.pids],
            "ksoftirqd": proc_cpu_s(self.ksoft) if self.ksoft else None,
            "core_busy": busy,
            "core_softirq": softirq,
        }


def diff(a, b, key):
    if a.get(key) is None or b.get(key) is None:
        return None
    return b[key] - a[key]


def from_summary(j):
    """The figures we tabulate, from ringhub-load's --json summary (fanout, idle or connect)."""
    r = {}
    c = j.get("counts", {})
    cpu = j.get("cpu", {})
    lat = j.get("latency_us", {})
    if j.get("scenario") == "reconnect":
        rc = j.get("reconnect", {})
        r["deliveries"] = c.get("delivered")
        r["expected"] = c.get("expected")
        if c.get("expected"):
            r["delivered_pct"] = c["delivered"] * 100.0 / c["expected"]
        for k in ("lost", "duplicates"):
            r[k] = c.get(k)
        r["reconnects"] = rc.get("reconnects")
        r["recovered_pct"] = rc.get("recovered_pct")
        rt = rc.get("recovery_time_us", {})
        r["recovery_p50_us"] = rt.get("p50")
        r["recovery_p99_us"] = rt.get("p99")
        mr = rc.get("messages_recovered", {})
        r["messages_recovered"] = mr.get("total")
        r["reconnect_summary"] = (
            f"{rc.get('reconnects')} reconnects, recovered {rc.get('recovered_pct', 0):.1f}%, "
            f"{mr.get('total')} messages recovered (p50 {mr.get('p50')}/reconnect), "
            f"recovery p50 {rt.get('p50', 0):.0f} µs p99 {rt.get('p99', 0):.0f} µs, "
            f"lost {c.get('lost')}, duplicates {c.get('duplicates')}"
        )
    elif j.get("scenario") == "fanout":
        r["deliveries"] = c.get("delivered")
        r["window_deliveries"] = c.get("deliveries_in_window")
        r["deliveries_per_s"] = j.get("deliveries_per_s")
        r["publishes"] = c.get("publishes_sent")
        r["expected"] = c.get("expected")
        if c.get("expected"):
            r["delivered_pct"] = c["delivered"] * 100.0 / c["expected"]
        for k in ("lost", "duplicates", "reordered"):
            r[k] = c.get(k)
    else:
        r["established"] = c.get("established")
        r["failed"] = c.get("failed")
        r["connect_rate"] = j.get("connections_per_s")
        mem = j.get("memory", {})
        r["rss_per_conn_b"] = mem.get("server", {}).get("bytes_per_connection")
        r["open_at_measure"] = mem.get("open_at_measure")
    for k in ("p50", "p90", "p99", "p99_9", "p99_99", "max"):
        if k in lat:
            r[f"lat_{k}_us"] = lat[k]
    r["lat_samples"] = lat.get("samples")
    r["loadgen_cpu_s"] = cpu.get("load_generator_s")
    if cpu.get("wall_s"):
        r["loadgen_core_pct"] = (cpu.get("load_generator_s") or 0) * 100.0 / cpu["wall_s"]
    waits = [w for w in cpu.get("load_generator_threads_wait_s") or [] if w is not None]
    r["loadgen_wait_s"] = sum(waits) if waits else None
    r["reported_hub_cpu_s"] = cpu.get("server_s")
    r["reported_softirq_s"] = cpu.get("server_softirq_s")
    r["server_wait_s"] = cpu.get("server_wait_s")
    r["warnings"] = j.get("warnings", [])
    r["loadgen_warning"] = any("bottleneck" in w or "saturat" in w for w in r["warnings"])
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--server", required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--aux", type=int, action="append", default=[])
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--rep", type=int, default=1, help="pass number (tables aggregate passes)")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    os.makedirs(os.path.join(a.results, "logs"), exist_ok=True)
    tag = f"{a.server}-{a.scenario}" + (f".rep{a.rep}" if a.rep > 1 else "")
    log_path = os.path.join(a.results, "logs", f"{tag}.txt")
    os.makedirs(os.path.join(a.results, "json"), exist_ok=True)
    json_path = os.path.join(a.results, "json", f"{tag}.json")
    if os.path.exists(json_path):
        os.remove(json_path)
    cmd = cmd + ["--json", json_path]

    ksoft = ksoftirqd_pid(a.cpu)
    sampler = Sampler([a.pid] + a.aux, ksoft, a.cpu)
    marks = {"begin": sampler.snap()}
    out_lines, err_lines = [], []

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read_err():
        for line in proc.stderr:
            if "setup done" in line and "load_start" not in marks:
                marks["load_start"] = sampler.snap()
            err_lines.append(line)

    def read_out():
        for line in proc.stdout:
            if "load_end" not in marks:
                marks["load_end"] = sampler.snap()
            out_lines.append(line)

    threads = [threading.Thread(target=read_err), threading.Thread(target=read_out)]
    for t in threads:
        t.start()
    try:
        rc = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    for t in threads:
        t.join()
    marks["end"] = sampler.snap()
    out, err = "".join(out_lines), "".join(err_lines)
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n" + out + "\n--- stderr ---\n" + err)

    # Fan-out: the load phase only (after every connection is up, until the report).
    # idle/connect: the whole run (connecting is the work being measured).
    a0 = marks.get("load_start", marks["begin"])
    a1 = marks.get("load_end", marks["end"])
    rec = {
        "server": a.server,
        "scenario": a.scenario,
        "rep": a.rep,
        "pid": a.pid,
        "exit": rc,
        "command": " ".join(cmd),
        "window_s": round(a1["t"] - a0["t"], 3),
    }
    procs = [
        (b - s) if (b is not None and s is not None) else None
        for s, b in zip(a0["procs"], a1["procs"])
    ]
    rec["server_cpu_s"] = procs[0]
    rec["aux_cpu_s"] = sum(p for p in procs[1:] if p is not None) if len(procs) > 1 else 0.0
    rec["ksoftirqd_cpu_s"] = diff(a0, a1, "ksoftirqd")
    rec["core_busy_s"] = diff(a0, a1, "core_busy")
    rec["core_softirq_s"] = diff(a0, a1, "core_softirq")
    try:
        with open(json_path) as f:
            rec.update(from_summary(json.load(f)))
    except (OSError, ValueError) as e:
        rec["error"] = f"no summary from ringhub-load: {e}"
    total = None
    if rec["server_cpu_s"] is not None:
        total = rec["server_cpu_s"] + rec["aux_cpu_s"] + (rec["ksoftirqd_cpu_s"] or 0.0)
    rec["total_cpu_s"] = total
    if total is not None and rec.get("established") and not rec.get("deliveries"):
        rec["cpu_per_connection_us"] = total * 1e6 / rec["established"]
    if total is not None and rec.get("deliveries"):
        rec["cpu_per_delivery_us"] = total * 1e6 / rec["deliveries"]
        rec["server_only_per_delivery_us"] = (
            (rec["server_cpu_s"] + rec["aux_cpu_s"]) * 1e6 / rec["deliveries"]
        )
        if rec.get("core_busy_s") is not None:
            rec["core_busy_per_delivery_us"] = rec["core_busy_s"] * 1e6 / rec["deliveries"]
    if rec.get("window_s"):
        rec["server_core_pct"] = (total or 0) / rec["window_s"] * 100
    with open(os.path.join(a.results, "runs.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")

    line = f"{a.server:14} {a.scenario:10}"
    if "cpu_per_delivery_us" in rec:
        line += (
            f" {rec['cpu_per_delivery_us']:.3f} µs/delivery (server+ksoftirqd)"
            f"  {rec.get('deliveries_per_s', 0):.0f} deliveries/s"
            f"  delivered {rec.get('delivered_pct', 0):.2f}%"
            f"  p99 {rec.get('lat_p99_us', float('nan')):.0f} µs"
            f"  server core {rec['server_core_pct']:.0f}%  loadgen {rec.get('loadgen_core_pct', 0):.0f}%"
        )
    if rec.get("rss_per_conn_b") is not None:
        line += f" {rec['rss_per_conn_b']:.0f} B RSS per idle connection ({rec.get('established')} open)"
    if rec.get("connect_rate") is not None:
        line += (
            f" {rec['connect_rate']:.0f} connects/s, {rec.get('cpu_per_connection_us', 0):.0f} µs"
            f" server CPU per connection, p99 {rec.get('lat_p99_us', 0):.0f} µs"
        )
    for w in rec.get("warnings", []):
        line += f"\n    ringhub-load: {w}"
    if rc != 0:
        line += f"  [ringhub-load exit {rc}: see {log_path}]"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
