"""From the runs bench/run.py measured to what it reports: medians over rounds, ratios as the
median of per-round ratios (neighbours in time share the machine's noise), and the targets'
verdicts.  Every verdict rests on figures that do not depend on the scheduler's tick sampling:
user-space instructions per request (callgrind), system calls per request (perf) and CPU ns
per request (schedstat)."""
from __future__ import annotations

import statistics

HEADLINE = "pingpong"   # the workload the asyncio-loop targets are judged on
TOO_SHORT = "too short to judge"
# figure -> (the pass that measures it, its key in a run's "cost" dict, the instrument)
FIGURES = {
    "instructions": ("callgrind", "instructions_per_request", "callgrind"),
    "syscalls": ("native", "syscalls_per_request", "perf"),
    "cpu_ns": ("native", "cpu_ns_per_request", "schedstat"),
}


def median_of(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _get(run, path):
    for key in path:
        run = run.get(key) if isinstance(run, dict) else None
    return run


NATIVE_PATHS = {
    "requests_per_second": ("requests_per_second",),
    "p50": ("latency_us", "p50"), "p90": ("latency_us", "p90"),
    "p99": ("latency_us", "p99"), "p99.9": ("latency_us", "p99.9"),
    "cpu_ns": ("cost", "cpu_ns_per_request"),
    "syscalls": ("cost", "syscalls_per_request"),
    "server_busy": ("cost", "busy"),
    "tick_user_us": ("cost", "tick_user_us_per_request"),
    "tick_system_us": ("cost", "tick_system_us_per_request"),
    "client_user_us": ("client_cpu", "user_us_per_request"),
    "client_system_us": ("client_cpu", "system_us_per_request"),
    "client_busy": ("client_cpu", "busy"),
    "connected": ("connected",),
}


def summarize(runs: list[dict], group: str) -> dict:
    """{group value (workload, or "http"): {server: medians}} over the rounds; `runs` holds both
    passes, "native" (req/s, latency, CPU ns, system calls, tick CPU) and "callgrind"
    (instructions)."""
    out: dict = {}
    for run in runs:
        out.setdefault(run.get(group, "http"), {}).setdefault(run["server"], []).append(run)
    for by_server in out.values():
        for server, server_runs in by_server.items():
            native = [r for r in server_runs if r["pass"] == "native" and "failed" not in r]
            grind = [r for r in server_runs if r["pass"] == "callgrind" and "failed" not in r]
            m = {name: median_of([_get(r, path) for r in native])
                 for name, path in NATIVE_PATHS.items()}
            m["instructions"] = median_of([_get(r, ("cost", "instructions_per_request"))
                                           for r in grind])
            m["openssl_instructions"] = median_of([
                _get(r, ("cost", "openssl_instructions_per_request")) for r in grind])
            m["instructions_per_openssl"] = median_of([
                _get(r, ("cost", "instructions_per_request")) / openssl for r in grind
                if (openssl := _get(r, ("cost", "openssl_instructions_per_request")))])
            m["callgrind_requests"] = median_of([r.get("requests") for r in grind])
            m["errors"] = sum(r.get("errors", 0) for r in native + grind)
            m["rounds"] = len(native)
            m["callgrind_rounds"] = len(grind)
            m["min_connected"] = min((r["connected"] for r in native if "connected" in r),
                                     default=None)
            m["failed"] = [r["failed"] for r in server_runs if "failed" in r]
            by_server[server] = m
    return out


def per_round_ratio(runs: list[dict], a: str, b: str, figure: str,
                    workload: str | None = None) -> float | None:
    """The median over rounds of a's figure / b's in the same round."""
    pass_, key, _ = FIGURES[figure]
    by_round: dict = {}
    for run in runs:
        if (run["pass"] == pass_ and run["server"] in (a, b) and "failed" not in run
                and run.get("workload") == workload):
            value = _get(run, ("cost", key))
            if value is not None:
                by_round.setdefault(run["round"], {})[run["server"]] = value
    return median_of([pair[a] / pair[b] for pair in by_round.values()
                      if len(pair) == 2 and pair[b]])


# (key, label, server, reference): the ratios reported by workload
PAIRS = [
    ("native_vs_c", "kqfast ECHO ÷ C", "kqfast-echo", "c"),
    ("server_vs_uvloop", "kqfast Server Protocol ÷ uvloop Protocol", "kqfast-python", "uvloop"),
    ("loop_vs_uvloop", "kqfast loop Protocol ÷ uvloop Protocol", "kqfast-loop", "uvloop"),
    ("loop_streams_vs_uvloop", "kqfast loop streams ÷ uvloop streams", "kqfast-loop-streams",
     "uvloop-streams"),
]
HTTP_PAIRS = [("uvicorn_loop_vs_uvloop", "uvicorn: kqfast loop ÷ uvloop", "uvicorn-kqfast-loop",
               "uvicorn-uvloop")]
TLS_PAIRS = [
    ("tls_loop_vs_uvloop", "kqfast loop ÷ uvloop, over TLS", "kqfast-loop-tls", "uvloop-tls"),
    ("tls_loop_vs_aiofastnet_uvloop", "kqfast loop ÷ aiofastnet on uvloop, over TLS",
     "kqfast-loop-tls", "aiofastnet-uvloop-tls"),
    ("tls_loop_vs_asyncio", "kqfast loop ÷ asyncio, over TLS", "kqfast-loop-tls", "asyncio-tls"),
    ("tls_native_vs_loop", "kqfast ECHO ÷ kqfast loop, over TLS", "kqfast-echo-tls",
     "kqfast-loop-tls"),
]
TLS_WORKLOADS = ("tls-pingpong", "tls-1k", "tls-latency")


def ratios(load_runs: list[dict], http_runs: list[dict], workloads: list[str],
           tls_runs: list[dict] = ()) -> dict:
    out = {w: {key: {fig: per_round_ratio(load_runs, a, b, fig, w) for fig in FIGURES}
               for key, _, a, b in PAIRS} for w in workloads}
    out["http"] = {key: {fig: per_round_ratio(http_runs, a, b, fig) for fig in FIGURES}
                   for key, _, a, b in HTTP_PAIRS}
    out.update({w: {key: {fig: per_round_ratio(list(tls_runs), a, b, fig, w) for fig in FIGURES}
                    for key, _, a, b in TLS_PAIRS} for w in TLS_WORKLOADS})
    return out


def summarize_gil(runs: list[dict]) -> list[dict]:
    """Per handler and workload: req/s without a spinner, with one at nice 19 and at nice 0,
    each spinner's cost as the median of per-round ratios, and the spinner's own speed."""
    rows: dict = {}
    for run in runs:
        rows.setdefault((run["handler"], run["workload"]), {}).setdefault(run["round"], {})[
            run["spin"]] = run
    out = []
    for (handler, workload), by_round in rows.items():
        row = {"handler": handler, "workload": workload}
        for spin in ("none", "nice", "equal"):
            row[f"rps_{spin}"] = median_of([r[spin].get("requests_per_second")
                                            for r in by_round.values() if spin in r])
        for spin in ("nice", "equal"):
            row[f"kept_{spin}"] = median_of([
                r[spin]["requests_per_second"] / r["none"]["requests_per_second"]
                for r in by_round.values()
                if spin in r and "none" in r and r["none"].get("requests_per_second")
                and "failed" not in r[spin]])
            row[f"spinner_speed_{spin}"] = median_of([r[spin].get("spinner_speed_under_load")
                                                      for r in by_round.values() if spin in r])
        out.append(row)
    return out


def summarize_idle(runs: list[dict], servers: list[str]) -> dict:
    idle = {}
    for key in servers:
        ok = [run for run in runs if run["server"] == key and "failed" not in run]
        if ok:
            idle[key] = {
                "bytes_per_connection": median_of([run["bytes_per_connection"] for run in ok]),
                "connections": ok[0]["connections"],
                "rss": [median_of([run["rss"][i] for run in ok]) for i in (0, 1)]}
    return idle


def _check(name, value, op, limit, unit, needs=(), why_not=None) -> dict:
    return {"target": name, "value": value, "op": op, "limit": limit, "unit": unit,
            "needs": list(needs), "why_not": why_not}


def targets(results: dict) -> list[dict]:
    """The targets, each with "met" (True/False, or None when not judged) and "status": met,
    missed, too short to judge, or why there is no verdict (a server or instrument missing)."""
    r = results["ratios"]
    wl = results["workloads"]
    labels = {"pingpong": "16 B ping-pong", "1k": "1 KiB ping-pong",
              "pipelined": "16-deep pipelining", "latency": "16 B ping-pong, 1 connection"}
    checks = []
    for w, limit in (("pingpong", 1.5), ("1k", 1.5), ("pipelined", 2.0), ("latency", 1.5)):
        checks.append(_check(f"kqfast ECHO user instructions/request ÷ C server's, {labels[w]}",
                             r.get(w, {}).get("native_vs_c", {}).get("instructions"), "≤",
                             limit, "ratio", ("kqfast-echo", "c"),
                             None if w in wl else f"workload {w} not run"))
    for w in ("pingpong", "1k", "pipelined"):
        checks.append(_check(f"kqfast ECHO system calls/request ÷ C server's, {labels[w]}",
                             r.get(w, {}).get("native_vs_c", {}).get("syscalls"), "≤", 1.02,
                             "ratio", ("kqfast-echo", "c"),
                             None if w in wl else f"workload {w} not run"))
    h = HEADLINE
    checks += [
        # Over 50 connections many events share a wake; over 1 each request is a wake.
        _check("kqfast loop Protocol echo instructions/request ÷ uvloop's (16 B ping-pong)",
               r.get(h, {}).get("loop_vs_uvloop", {}).get("instructions"), "≤", 0.35, "ratio",
               ("kqfast-loop", "uvloop"), None if h in wl else f"workload {h} not run"),
        _check("kqfast loop Protocol echo instructions/request ÷ uvloop's (16 B ping-pong, "
               "1 connection)",
               r.get("latency", {}).get("loop_vs_uvloop", {}).get("instructions"), "≤", 0.5,
               "ratio", ("kqfast-loop", "uvloop"),
               None if "latency" in wl else "workload latency not run"),
        _check("kqfast loop streams echo instructions/request ÷ uvloop's (16 B ping-pong)",
               r.get(h, {}).get("loop_streams_vs_uvloop", {}).get("instructions"), "≤", 0.6,
               "ratio", ("kqfast-loop-streams", "uvloop-streams"),
               None if h in wl else f"workload {h} not run"),
        _check("uvicorn + httptools on the kqfast loop: server CPU/request ÷ on uvloop",
               r["http"]["uvicorn_loop_vs_uvloop"]["cpu_ns"], "≤", 0.85, "ratio",
               ("uvicorn-kqfast-loop", "uvicorn-uvloop")),
    ]
    tw = results.get("tls_workloads", {})
    tls_h = "tls-pingpong"
    why_tls = None if tls_h in tw else f"workload {tls_h} not run"
    native_tls = results.get("tls", {}).get(tls_h, {}).get("kqfast-echo-tls") or {}
    checks += [
        _check("kqfast loop TLS echo instructions/request ÷ uvloop's (TLS 16 B ping-pong, "
               "50 connections)", r.get(tls_h, {}).get("tls_loop_vs_uvloop", {}).get(
                   "instructions"), "≤", 0.5, "ratio", ("kqfast-loop-tls", "uvloop-tls"),
               why_tls),
        _check("kqfast loop TLS echo server CPU/request ÷ aiofastnet on uvloop's (TLS 16 B "
               "ping-pong, 50 connections)", r.get(tls_h, {}).get(
                   "tls_loop_vs_aiofastnet_uvloop", {}).get("cpu_ns"), "<", 1.0, "ratio",
               ("kqfast-loop-tls", "aiofastnet-uvloop-tls"), why_tls),
        _check("kqfast ECHO over TLS: instructions/request ÷ OpenSSL's own share of them "
               "(TLS 16 B ping-pong, 50 connections)", native_tls.get("instructions_per_openssl"),
               "≤", 1.3, "ratio", ("kqfast-echo-tls",), why_tls),
    ]
    idle = results["idle_memory"]
    high = results["config"]["idle_connections"][1]
    for key, name, limit in (("kqfast-echo", "kqfast ECHO", 64),
                             ("kqfast-python", "kqfast Server Protocol", 400)):
        checks.append(_check(f"{name} memory per idle connection (at {high:,})",
                             idle.get(key, {}).get("bytes_per_connection"), "≤", limit, "bytes",
                             (key,), None if results["parts"]["idle"] else "idle part skipped"))
    many = wl.get("c10k")
    for key, name in (("kqfast-echo", "kqfast ECHO"), ("kqfast-loop", "kqfast loop Protocol")):
        m = results["load"].get("c10k", {}).get(key)
        value = m["min_connected"] if m and m["rounds"] else None
        checks.append(_check(
            f"{name}: {many['connections'] if many else 10000:,} concurrent active connections "
            "all served, no error", value, "=", many["connections"] if many else 10000,
            "connections", (key,), None if many else "workload c10k not run"))
        checks[-1]["errors"] = m["errors"] if m else None
    gil_rows = [g for g in results["gil"] if g["handler"] == "native" and g["workload"] == h]
    kept = gil_rows[0]["kept_nice"] if gil_rows else None
    checks.append(_check("kqfast ECHO round trips lost to a spinning Python thread (nice 19)",
                         None if kept is None else 1 - kept, "<", 0.2, "fraction",
                         ("kqfast-echo",), None if results["parts"]["gil"] else
                         "gil part skipped"))
    figure_of = {}
    for c in checks:
        figure_of[c["target"]] = ("callgrind" if "instructions" in c["target"] else
                                  "perf" if "system calls" in c["target"] else
                                  "schedstat" if "CPU/request" in c["target"] else None)
    out = []
    for c in checks:
        c["met"] = None
        if c["why_not"] is None:
            c["why_not"] = _why_not(results, c["needs"], figure_of[c["target"]])
        if c["why_not"] is not None:
            c["status"] = c["why_not"]
        elif c["value"] is None:
            c["status"] = "not measured"
        elif results["quick"]:
            c["status"] = TOO_SHORT
        else:
            v, lim = c["value"], c["limit"]
            c["met"] = v <= lim if c["op"] == "≤" else v < lim if c["op"] == "<" else (
                v == lim and not c.get("errors"))
            c["status"] = "met" if c["met"] else "missed"
            if c.get("errors"):
                c["status"] += f" ({c['errors']:,} errors)"
        del c["needs"], c["why_not"]
        out.append(c)
    return out


def _why_not(results: dict, needs, instrument: str | None) -> str | None:
    """Why a target has no verdict: a server missing here, not in this run, an instrument."""
    for key in needs:
        missing = results.get("unavailable") or results["missing"]
        if key in missing:
            return f"missing: {key}: {missing[key]}"
        if key not in results["servers"] and key not in results.get("http_servers", ()) \
                and key not in results.get("tls_servers", ()):
            return f"not measured: {key} not in this run"
    if instrument is not None:
        why = results["instruments"].get(instrument)
        if why is not None:
            return f"not measured: {why}"
    return None
