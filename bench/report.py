"""Turn bin/bench's runs into target/bench/report.md, report.json and chart.png.

Reads OUT/machine.txt, OUT/runs/SCENARIO.PEER.json (one `lightrelay bench --json` object
each) and OUT/runs/ceiling.txt (redis-benchmark's output); writes the report with each figure,
our ratio to each peer and whether each target of issue 6 was met. Standard library only;
the chart is drawn by gnuplot. Usage: python3 bench/report.py target/bench
"""

import json
import math
import os
import re
import subprocess
import sys

PEERS = ["lightrelay", "nchan", "python"]
# A run during which the hypervisor took this share of the machine's CPU time (or more) is
# marked disturbed in the report.
STEAL_WARN = 5.0

PEER_NAMES = {
    "lightrelay": "lightrelay",
    "nchan": "nchan (1 worker)",
    "python": "classic Python relay",
}
SCENARIOS = [
    ("idle", "idle connections (100 channels), server RSS per connection"),
    ("idle-pub", "idle publishers (one path each; lightrelay: presence and downlink on), server RSS per connection"),
    ("fanout-1k", "fan-out 1 channel × 1,000 subscribers, 100 B, max rate"),
    ("fanout-w10", "fan-out 1 × 1,000, 100 B, max rate, 10 messages in flight per channel"),
    ("fanout-w1", "fan-out 1 × 1,000, 100 B, max rate, 1 message in flight per channel"),
    ("fanout-10k", "fan-out 1 channel × 10,000 subscribers, 100 B, max rate"),
    ("channels", "fan-out 1,000 channels × 10 subscribers, 100 B, max rate"),
    ("latency", "20 messages/s to 1,000 subscribers, 100 B"),
    ("ingest-plain", "ingest, 50 publisher connections, 100 B"),
    ("ingest-ack", "ingest, 50 publishers, acknowledged"),
    ("ingest-history", "ingest, 50 publishers, --history 100 (lightrelay only)"),
    ("frames-256k", "256 KiB binary frames to 100 subscribers, max rate"),
]
# SPEC §8 (issue 13), lightrelay only: the peers have no equivalent token check.
AUTH_SCENARIOS = [
    ("storm-off", "connection storm, auth off"),
    ("storm-hs256", "connection storm, --auth all, HS256 tokens"),
    ("storm-es256", "connection storm, --auth all, ES256 tokens"),
    ("idle-auth", "idle connections (100 channels), --auth all, HS256 token"),
]
# SPEC §9 (issue 14), lightrelay only: the peers have no envelopes or history.
HISTORY_SCENARIOS = [
    ("fanout-json-base", "fan-out 1 × 1,000, raw, --history 100, in through the publish server"),
    ("fanout-json", "fan-out 1 × 1,000, format=json envelopes, --history 100"),
    ("storm-last-base", "connection storm on 10 channels, history on, no replay"),
    ("storm-last", "connection storm on 10 channels, ?last=1"),
]
# Issue 18, lightrelay and nchan: each stack as deployed, nginx's CPU (master and worker)
# counted with the server's; lightrelay's runs list the relay's pid first.
DEPLOYED_SCENARIOS = [
    ("deployed-direct", "deployed: fan-out 1 × 1,000, 100 B, max rate, ws:// straight to the server"),
    ("deployed-proxy", "deployed: the same, ws:// through nginx (nginx/lightrelay.conf)"),
    ("deployed-tls", "deployed: the same, wss:// through nginx (nginx/lightrelay-tls.conf; nchan: TLS in its nginx)"),
    ("deployed-direct-w10", "deployed: fan-out 1 × 1,000, 10 in flight, ws:// straight to the server"),
    ("deployed-proxy-w10", "deployed: the same, 10 in flight, ws:// through nginx"),
    ("deployed-tls-w10", "deployed: the same, 10 in flight, wss:// through nginx (nchan: TLS in its nginx)"),
]


def load(out):
    machine = {}
    path = os.path.join(out, "machine.txt")
    if os.path.exists(path):
        for line in open(path):
            key, _, value = line.rstrip("\n").partition("=")
            machine[key] = value
    runs = {}
    errors = {}
    rundir = os.path.join(out, "runs")
    for name in sorted(os.listdir(rundir)) if os.path.isdir(rundir) else []:
        scenario, _, rest = name.partition(".")
        peer = rest.split(".")[0]
        full = os.path.join(rundir, name)
        if name.endswith(".json"):
            runs[(scenario, peer)] = json.load(open(full))
        elif name.endswith(".err") and (scenario, peer) not in runs:
            text = open(full).read().strip()
            if text:
                errors[(scenario, peer)] = text.splitlines()[-1][:200]
    ceiling = None
    path = os.path.join(rundir, "ceiling.txt")
    if os.path.exists(path):
        text = open(path).read().replace("\r", "\n")
        m = re.findall(r"([\d.]+) requests per second", text)
        if m:
            ceiling = float(m[-1])
    return machine, runs, errors, ceiling


def num(x, digits=0):
    if x is None:
        return "—"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ms(us):
    if us is None:
        return "—"
    return f"{us / 1000:.1f} ms" if us < 100_000 else f"{us / 1000:,.0f} ms"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×"


def counted(run):
    return run is not None and run.get("ok")


def cores_rows(out):
    """The cores runs bin/bench made last: (scenario, threads, window, server CPUs, others' CPUs)
    from OUT/runs/cores.rows, in run order."""
    path = os.path.join(out, "runs", "cores.rows")
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 5:
            rows.append((parts[0], int(parts[1]), parts[2], parts[3], parts[4]))
    return rows


def cores_lines(runs, rows):
    """Issue 18's per-core table: one row per worker-thread count and window, its deliveries
    per server CPU-second, raw rate, cores used (server CPU-s per wall second) and efficiency
    per core against the 1-thread row at the same window (target ≥ 0.80 from 4 threads)."""
    if not rows:
        return []
    lines = [
        "| window | --worker-threads | server CPUs | generator and Redis CPUs | deliveries/s "
        "| per server CPU-s | cores used | per core ÷ 1 thread | generator CPU-s per s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = {}
    for scenario, threads, window, srv, others in rows:
        r = runs.get((scenario, "lightrelay"))
        if threads == 1 and counted(r):
            base[window] = r.get("per_server_cpu_s")
    for scenario, threads, window, srv, others in rows:
        r = runs.get((scenario, "lightrelay"))
        shown = "fanout-1k's (100)" if window == "default" else window
        if r is None:
            lines.append(f"| {shown} | {threads} | {srv} | {others} | failed | | | | | |")
            continue
        per = r.get("per_server_cpu_s") if counted(r) else None
        elapsed = r.get("elapsed_s") or 0
        used = r["server_cpu_s"] / elapsed if elapsed else None
        gen = r["client_cpu_s"] / elapsed if elapsed else None
        eff = ratio(per, base.get(window))
        note = "OK" if r.get("ok") else "NOT COUNTED: " + "; ".join(r.get("problems", []))[:80]
        if threads >= 4 and eff is not None:
            note += f"; target ≥ 0.80: {'met' if eff >= 0.8 else 'NOT met'}"
        steal = r.get("host_steal_pct")
        if steal is not None and steal >= STEAL_WARN:
            note += f"; host stole {steal:.0f}% (disturbed)"
        lines.append(
            f"| {shown} | {threads} | {srv} | {others} | {num(r['per_s'])} | {num(per)} | "
            f"{num(used, 2)} | {fmt_ratio(eff)} | {num(gen, 2)} | {note} |")
    return lines


def main(out):
    machine, runs, errors, ceiling = load(out)

    def run(scenario, peer):
        return runs.get((scenario, peer))

    def figure(scenario, peer, key):
        r = run(scenario, peer)
        if not counted(r):
            return None
        if key == "p99":
            return r["latency"]["p99_us"] if r["latency"]["count"] else None
        return r.get(key)

    # ---- the targets table ------------------------------------------------------------------
    targets = []

    def target_row(name, scenario, key, fmt, goal_text, check, lower_is_better=False):
        values = {p: figure(scenario, p, key) for p in PEERS}
        ours = values["lightrelay"]
        ratios = {p: ratio(ours, values[p]) for p in PEERS if p != "lightrelay"}
        met = check(values, ratios)
        targets.append({
            "figure": name,
            "scenario": scenario,
            "values": values,
            "ratios": ratios,
            "target": goal_text,
            "met": met,
            "format": fmt,
            "lower_is_better": lower_is_better,
        })

    target_row(
        "fan-out 1 × 1,000, deliveries per server CPU-second, max rate",
        "fanout-1k", "per_server_cpu_s", "count", "≥ 4× nchan",
        lambda v, r: None if r["nchan"] is None else r["nchan"] >= 4)
    target_row(
        "same at 20 msg/s (nothing queues, one write per delivery)",
        "latency", "per_server_cpu_s", "count", "≥ 1.2× nchan",
        lambda v, r: None if r["nchan"] is None else r["nchan"] >= 1.2)
    target_row(
        "p99 latency, 20 msg/s to 1,000 subscribers",
        "latency", "p99", "ms", "≤ 0.75× nchan's",
        lambda v, r: None if r["nchan"] is None else r["nchan"] <= 0.75,
        lower_is_better=True)
    target_row(
        "idle subscriber, KiB per connection (server RSS)",
        "idle", "kib_per_connection", "kib", "≤ 4, nothing in Redis",
        lambda v, r: None if v["lightrelay"] is None else (
            v["lightrelay"] <= 4
            and (figure("idle", "lightrelay", "redis_kib_per_connection") or 0) < 0.5),
        lower_is_better=True)
    target_row(
        "idle publisher, KiB per connection (server RSS; presence and downlink on)",
        "idle-pub", "kib_per_connection", "kib", "≤ 4",
        lambda v, r: None if v["lightrelay"] is None else v["lightrelay"] <= 4,
        lower_is_better=True)
    ingest_ours = figure("ingest-plain", "lightrelay", "per_s")
    target_row(
        "ingest, 50 publishers, messages/s reaching Redis",
        "ingest-plain", "per_s", "count",
        "≥ 25% of the redis-benchmark -P 16 ceiling"
        + (f" ({ceiling * 0.25:,.0f}/s)" if ceiling else ""),
        lambda v, r: None if (ceiling is None or v["lightrelay"] is None)
        else v["lightrelay"] >= 0.25 * ceiling)

    target_row(
        "ingest with --history 100 (SPEC §9), messages/s reaching Redis",
        "ingest-history", "per_s", "count",
        "≥ 60% of lightrelay's plain ingest"
        + (f" ({ingest_ours * 0.6:,.0f}/s)" if ingest_ours else ""),
        lambda v, r: None if (ingest_ours is None or v["lightrelay"] is None)
        else v["lightrelay"] >= 0.6 * ingest_ours)

    def cell(value, fmt, scenario=None, peer=None):
        if value is None:
            r = run(scenario, peer) if scenario else None
            if r is not None and not r.get("ok"):
                return "not counted: " + "; ".join(r.get("problems", []))[:80]
            if scenario and (scenario, peer) in errors:
                return "failed"
            return "—"
        if fmt == "ms":
            return ms(value)
        if fmt == "kib":
            extra = ""
            if scenario:
                red = figure(scenario, peer, "redis_kib_per_connection")
                if red is not None:
                    extra = f" (+{max(red, 0):.1f} in Redis)"
            return f"{value:.2f}{extra}"
        return num(value)

    lines = []
    add = lines.append
    quick = machine.get("quick") == "1"
    add("# lightrelay benchmarks, side by side" + (" (quick smoke run: not figures to quote)" if quick else ""))
    add("")
    add(f"Machine: {machine.get('nproc', '?')} cores, {machine.get('cpu', '?')}, Linux "
        f"{machine.get('kernel', '?')}; {machine.get('date', '?')}; load average at the start "
        f"{machine.get('load', '?')}. Redis {machine.get('redis', '?')}, nginx "
        f"{machine.get('nginx', '?')} with libnginx-mod-nchan {machine.get('nchan', '?')}, "
        f"Python {machine.get('python', '?')} with {machine.get('python_packages', '?').strip()}.")
    add("")
    add("Servers are compared by their own CPU time per delivery (utime + stime from "
        "/proc/PID/stat), because on two cores the load generator shares the machine and caps "
        "the raw rates any server can show. Only runs with zero loss count. nchan runs with "
        "`nchan_message_buffer_length 1000` (its default of 10 loses part of a burst) and "
        "`nchan_subscriber_first_message newest`; its figures include its own publishing "
        "(HTTP POST into its Redis store), since nchan cannot take a plain Redis PUBLISH. "
        "lightrelay and the Python relay are fed by PUBLISH straight to Redis and measured on "
        "their subscribe process (ingest: their publish process). The classic Python relay "
        "holds two files per subscriber (its WebSocket and its own Redis connection), so "
        "under this machine's 20,000 open-file limit it runs 9,000 subscribers where the "
        "others run 10,000.")
    add("")
    add("## Targets (issue 6)")
    add("")
    add("| figure | lightrelay | nchan (1 worker) | classic Python relay | ours ÷ nchan | ours ÷ Python | target | met |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for t in targets:
        v = t["values"]
        met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
        add(f"| {t['figure']} | "
            + " | ".join(cell(v[p], t["format"], t["scenario"], p) for p in PEERS)
            + f" | {fmt_ratio(t['ratios']['nchan'])} | {fmt_ratio(t['ratios']['python'])}"
            + f" | {t['target']} | {met} |")
    if ceiling:
        ack = figure("ingest-ack", "lightrelay", "per_s")
        add("")
        add(f"Ingest ceiling: `redis-benchmark -c 50 -P 16` PUBLISH of 100 bytes reached "
            f"{ceiling:,.0f}/s on this machine. lightrelay reached "
            f"{num(ingest_ours)}/s plain ({num(100 * ingest_ours / ceiling, 1) if ingest_ours else '—'}%) "
            f"and {num(ack)}/s with acks ({num(100 * ack / ceiling, 1) if ack else '—'}%).")

    # ---- auth (issue 13) ------------------------------------------------------------------------
    auth_runs = [(sc, t) for sc, t in AUTH_SCENARIOS
                 if run(sc, "lightrelay") is not None or (sc, "lightrelay") in errors]
    if auth_runs:
        add("")
        add("## Auth (issue 13, lightrelay only: the peers have no equivalent token check)")
        add("")
        add("| run | figure | value | target | met |")
        add("| --- | --- | --- | --- | --- |")
        off = figure("storm-off", "lightrelay", "per_server_cpu_s")
        for sc, title in auth_runs:
            r = run(sc, "lightrelay")
            if sc == "idle-auth":
                value = figure(sc, "lightrelay", "kib_per_connection")
                met = None if value is None else value <= 4
                add(f"| {title} | KiB per connection (server RSS) | "
                    f"{cell(value, 'kib', sc, 'lightrelay')} | ≤ 4 | "
                    f"{ {True: 'yes', False: '**no**', None: '—'}[met]} |")
                continue
            value = figure(sc, "lightrelay", "per_server_cpu_s")
            done = ""
            if counted(r) and r["storm"].get("all_connected_s") is not None:
                done = f" ({r['storm']['clients']:,} clients connected in {r['storm']['all_connected_s']:.2f} s)"
            add(f"| {title} | connections per server CPU-second{done} | "
                f"{cell(value, 'count', sc, 'lightrelay')} | | |")
            if sc != "storm-off":
                cpu_ratio = ratio(off, value)
                goal = "≤ 1.3×" if sc == "storm-hs256" else ""
                met = None if (cpu_ratio is None or not goal) else cpu_ratio <= 1.3
                add(f"| {title} | server CPU per connection ÷ auth off | {fmt_ratio(cpu_ratio)} | "
                    f"{goal} | { {True: 'yes', False: '**no**', None: '—'}[met]} |")

    # ---- history (issue 14) --------------------------------------------------------------------
    history_runs = [(sc, t) for sc, t in HISTORY_SCENARIOS
                    if run(sc, "lightrelay") is not None or (sc, "lightrelay") in errors]
    if history_runs:
        yes_no = {True: "yes", False: "**no**", None: "—"}
        add("")
        add("## History (issue 14, lightrelay only: the peers have no envelopes or history)")
        add("")
        add("| run | figure | value | target | met |")
        add("| --- | --- | --- | --- | --- |")
        raw = figure("fanout-1k", "lightrelay", "per_server_cpu_s")
        same = figure("fanout-json-base", "lightrelay", "per_server_cpu_s")
        off = figure("storm-off", "lightrelay", "per_server_cpu_s")
        base = figure("storm-last-base", "lightrelay", "per_server_cpu_s")
        for sc, title in history_runs:
            value = figure(sc, "lightrelay", "per_server_cpu_s")
            if sc == "fanout-json":
                add(f"| {title} | deliveries per server CPU-second | "
                    f"{cell(value, 'count', sc, 'lightrelay')} | | |")
                r = ratio(value, same)
                add(f"| {title} | ÷ raw, same path and history ({num(same)}) | {fmt_ratio(r)} | ≥ 0.70× | "
                    f"{yes_no[None if r is None else r >= 0.7]} |")
                add(f"| {title} | ÷ fan-out 1 × 1,000 (raw, PUBLISH to Redis, no history: {num(raw)}) | "
                    f"{fmt_ratio(ratio(value, raw))} | | |")
                continue
            if sc == "fanout-json-base":
                add(f"| {title} | deliveries per server CPU-second | "
                    f"{cell(value, 'count', sc, 'lightrelay')} | | |")
                continue
            r = run(sc, "lightrelay")
            add(f"| {title} | connections per server CPU-second | "
                f"{cell(value, 'count', sc, 'lightrelay')} | | |")
            if sc != "storm-last":
                continue
            for label, other in (("÷ the same storm without ?last=1", base),
                                 ("÷ connection storm, auth off (a channel per client)", off)):
                add(f"| {title} | {label} | {fmt_ratio(ratio(value, other))} | | |")
            if counted(r) and r["storm"].get("redis_calls") is not None:
                x = r["storm"]["redis_calls"].get("xrevrange", 0)
                clients, channels = r["storm"]["clients"], r["channels"]
                add(f"| {title} | XREVRANGE calls for {clients:,} clients on {channels} channels | "
                    f"{x:,} ({x / max(channels, 1):.1f} per channel, {x / max(clients, 1):.3f} per client) | "
                    f"one per channel per batch of arrivals | — |")

    # ---- cores (issue 18) -----------------------------------------------------------------------
    table = cores_lines(runs, cores_rows(out))
    if table:
        add("")
        add("## Cores (issue 18, lightrelay only): fan-out 1 × 1,000, 100 B, by --worker-threads")
        add("")
        add("The subscribe server pinned with taskset to as many CPUs as it has worker threads "
            "(plus the hub's own thread, on the same CPUs); Redis and the load generator on the "
            "other CPUs, or unpinned when the server has them all. *Cores used* is the server's "
            "CPU-seconds per second of the run; *per core ÷ 1 thread* is its deliveries per "
            "server CPU-second over the 1-thread row's at the same window.")
        add("")
        lines.extend(table)
    # ---- the deployed stack (issue 18) ---------------------------------------------------------
    deployed_runs = [(sc, t) for sc, t in DEPLOYED_SCENARIOS
                     if any(run(sc, p) is not None or (sc, p) in errors for p in ("lightrelay", "nchan"))]
    if deployed_runs:
        add("")
        add("## The deployed stack (issue 18)")
        add("")
        add("Fan-out 1 × 1,000, 100 B, each stack as users run it: the server's CPU counts nginx's "
            "master and worker with the relay's (lightrelay's proxy rows: relay + nginx; nchan runs "
            "inside nginx). TLS is nginx's (the shipped site's settings, a self-signed P-256 "
            "certificate); the generator's side of it is not counted. Messages go into Redis "
            "directly (nchan: POSTed to it, as in fan-out 1 × 1,000), so only subscribers meet nginx.")
        add("")
        add("| run | lightrelay per stack CPU-s | relay CPU-s | nginx CPU-s | nginx share | nchan per CPU-s | ours ÷ nchan |")
        add("| --- | --- | --- | --- | --- | --- | --- |")
        for sc, title in deployed_runs:
            ours = figure(sc, "lightrelay", "per_server_cpu_s")
            theirs = figure(sc, "nchan", "per_server_cpu_s")
            r = run(sc, "lightrelay")
            relay = ngx = share = "—"
            if counted(r) and len(r["servers"]) > 1:
                cpu = r["server_cpu_s"]
                relay_cpu = r["servers"][0]["cpu_s"]
                relay, ngx = f"{relay_cpu:.2f}", f"{cpu - relay_cpu:.2f}"
                share = f"{(cpu - relay_cpu) / cpu:.0%}" if cpu else "—"
            elif counted(r):
                relay, ngx = f"{r['server_cpu_s']:.2f}", "0"
            add(f"| {title.removeprefix('deployed: ')} | {cell(ours, 'count', sc, 'lightrelay')} | {relay} | {ngx} | "
                f"{share} | {cell(theirs, 'count', sc, 'nchan') if 'proxy' not in sc else ''} | "
                f"{fmt_ratio(ratio(ours, theirs))} |")
        for suffix, label in (("", "at fanout-1k's window"), ("-w10", "at 10 in flight")):
            d = figure(f"deployed-direct{suffix}", "lightrelay", "per_server_cpu_s")
            p = figure(f"deployed-proxy{suffix}", "lightrelay", "per_server_cpu_s")
            t = figure(f"deployed-tls{suffix}", "lightrelay", "per_server_cpu_s")
            nd = figure(f"deployed-direct{suffix}", "nchan", "per_server_cpu_s")
            nt = figure(f"deployed-tls{suffix}", "nchan", "per_server_cpu_s")
            said = []
            if t and p:
                said.append(f"terminating TLS elsewhere (nginx still proxying) saves {1 - t / p:.0%} of our "
                            "stack's CPU per delivery")
            if t and d:
                said.append(f"with the proxy gone too (the relay alone) {1 - t / d:.0%}")
            if nt and nd:
                said.append(f"nchan's TLS costs it {1 - nt / nd:.0%}")
            if said:
                add("")
                add(f"{label.capitalize()}: " + "; ".join(said) + ".")

    # ---- every run ------------------------------------------------------------------------------
    add("")
    add("## Every run")
    add("")
    add("| scenario | server | delivered/s | lost | p50 | p99 | p99.9 | max | server CPU-s | per server CPU-s | server RSS peak | note |")
    add("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for scenario, title in SCENARIOS + AUTH_SCENARIOS + HISTORY_SCENARIOS + DEPLOYED_SCENARIOS:
        for peer in PEERS:
            r = run(scenario, peer)
            if r is None:
                if (scenario, peer) in errors:
                    add(f"| {title} | {PEER_NAMES[peer]} | failed: {errors[(scenario, peer)]} |||||||||| |")
                continue
            peak = sum(p["rss_kib_peak"] for p in r["servers"])
            note = "OK" if r["ok"] else "NOT COUNTED: " + "; ".join(r["problems"])[:120]
            steal = r.get("host_steal_pct")
            if steal is not None and steal >= STEAL_WARN:
                note += f"; host stole {steal:.0f}% of the CPU (disturbed)"
            if scenario.startswith("storm"):
                st = r["storm"]
                note = (f"{st['connected']:,} of {st['clients']:,} connected, {st['refused']} refused, "
                        f"{st['failed'] + st['not_started']} failed, last in {st['storm_s']:.2f} s; " + note)
                add(f"| {title} | {PEER_NAMES[peer]} | | | | | | | {r['server_cpu_s']:.2f} | "
                    f"{num(r.get('per_server_cpu_s'))} | {peak:,} KiB | {note} |")
                continue
            if scenario.startswith("idle"):
                red = r.get("redis_kib_per_connection")
                note = (f"{r['connections']:,} connections: {r.get('kib_per_connection', 0):.2f} KiB each"
                        f" (+{max(red or 0, 0):.2f} in Redis); " + note)
                add(f"| {title} | {PEER_NAMES[peer]} | | | | | | | {r['server_cpu_s']:.2f} | | {peak:,} KiB | {note} |")
                continue
            l = r["latency"]
            has_l = l["count"] > 0
            if scenario.startswith(("fanout", "deployed")) or scenario in ("channels", "frames-256k", "latency"):
                note = f"{r['connections']:,} subscribers; " + note
            add(f"| {title} | {PEER_NAMES[peer]} | {num(r['per_s'])} | {r['lost']:,} | "
                + " | ".join(ms(l[k]) if has_l else "—" for k in ("p50_us", "p99_us", "p999_us", "max_us"))
                + f" | {r['server_cpu_s']:.2f} | {num(r.get('per_server_cpu_s'))} | {peak:,} KiB | {note} |")
    add("")
    add(f"A run marked *disturbed* lost {STEAL_WARN:.0f}% or more of the machine's CPU time to "
        "the hypervisor (`steal` in /proc/stat): other guests ran on our cores, and its figures "
        "say more about them than about the server.")
    add("")
    add("Latency is from the publisher's send to the subscriber's read, in one process with one "
        "clock. At max rate the publisher keeps a window of messages per channel not yet "
        "delivered to every subscriber (100, or 20 with 1,000 channels; 16 for 256 KiB), so "
        "latency there is mostly queueing by design; the 20 msg/s run is the latency figure. "
        "Ingest latency is from send to ack (or HTTP response).")
    add("")
    add("![deliveries per server CPU-second](chart.png)")
    add("")
    add("Run it: `bin/bench` (full, ~7 minutes on 2 cores), `bin/bench --quick` (smoke), "
        "`bin/bench --only latency --peers lightrelay,nchan`.")

    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({
            "machine": machine,
            "ceiling_publish_per_s": ceiling,
            "targets": targets,
            "runs": {f"{s}.{p}": r for (s, p), r in sorted(runs.items())},
            "failed": {f"{s}.{p}": e for (s, p), e in sorted(errors.items())},
        }, f, indent=2)
    chart(out, run)
    print("\n".join(lines[:lines.index("## Every run")]))
    print(f"wrote {out}/report.md, {out}/report.json, {out}/chart.png")


def chart(out, run):
    """Grouped bars: per server CPU-second for each scenario (log scale), one bar per server."""
    rows = []
    not_counted = []
    for scenario, _ in SCENARIOS:
        if scenario.startswith("idle"):
            continue
        values = []
        for peer in PEERS:
            r = run(scenario, peer)
            if r is not None and not r.get("ok"):
                not_counted.append(f"{scenario} · {peer}")
            v = r.get("per_server_cpu_s") if counted(r) else None
            values.append("?" if v is None or v <= 0 else f"{v:.0f}")
        if any(v != "?" for v in values):
            rows.append(f'"{scenario}" ' + " ".join(values))
    if not rows:
        return
    data = os.path.join(out, "chart.dat")
    with open(data, "w") as f:
        f.write("\n".join(rows) + "\n")
    colours = {"lightrelay": "#1f77b4", "nchan": "#ff7f0e", "python": "#2ca02c"}
    # Only the servers that have a bar somewhere (gnuplot complains about empty columns).
    present = [i for i in range(len(PEERS)) if any(r.split()[1 + i] != "?" for r in rows)]
    plots = ", ".join(
        f'"{data}" using {2 + i}' + (":xtic(1)" if k == 0 else "")
        + f' title "{PEER_NAMES[PEERS[i]]}" lc rgb "{colours[PEERS[i]]}"'
        for k, i in enumerate(present))
    note = ("no bar: not counted (lost messages): " + ", ".join(not_counted)) if not_counted else ""
    script = f"""
set terminal pngcairo size 1200,640 font "sans,11"
set label 1 "{note}" at screen 0.01, screen 0.02 font "sans,10" noenhanced
set bmargin 4
set output "{os.path.join(out, 'chart.png')}"
set title "Deliveries (ingest: messages) per server CPU-second — higher is better"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y
set format y "%.0s%c"
set yrange [1000:*]
set grid ytics
set key top right
set datafile missing "?"
set xtics noenhanced
plot {plots}
"""
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"chart: gnuplot failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
