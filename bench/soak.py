"""Soak: our server at ~70% of its capacity for a long time; memory and latency stay flat.

    python -m bench.soak [--minutes 30] [--eager] [--load 0.7]      (make soak)

1. Calibrate: a closed loop at concurrency 32 measures the request rate the server
   sustains (its capacity for this workload).
2. Soak: Poisson arrivals at ``load`` x that rate for ``minutes``, in one-minute windows.
   Each window reports requests, errors, latency p50/p95/p99 and the resident memory of
   the server process tree (API process + engine core).
3. Verdict: the last window against the first (after one warm-up window): latency
   ratio and memory growth. Results go to bench/results/soak-<time>.json.
Traffic stays on loopback; every request count and time is bounded.
"""

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path

import psutil

from app.settings import DEFAULT_MODEL_DIR
from bench.loadgen import LevelResult, percentile, summarize
from bench.systems import BenchConfig, OurServer
from bench.workload import Workload, load_prompts

RESULTS = Path(__file__).resolve().parent / "results"


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        # A child may exit between listing and reading.
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


async def soak(args: argparse.Namespace) -> dict:
    config = BenchConfig(
        model=str(DEFAULT_MODEL_DIR),
        enforce_eager=args.eager,
        kv_cache_gib=2,
        log_dir=RESULTS / "logs",
    )
    workload = Workload(load_prompts(), max_new_tokens=args.new_tokens)
    server = OurServer(config)
    server.start("soak")
    assert server.proc is not None
    try:
        calib_requests = workload.requests("calib", 96)
        records, elapsed = await server.run_closed(calib_requests, 32, 180, 60, "calibrate c=32")
        calib = summarize(LevelResult("ours", "closed", 32, None, elapsed, records))
        capacity = calib["requests_per_s"]
        rate = args.load * capacity
        print(
            f"capacity {capacity:.2f} req/s at c=32; soaking at {rate:.2f} req/s "
            f"({args.load:.0%}) for {args.minutes} min",
            flush=True,
        )

        windows = []
        for minute in range(args.minutes):
            requests = workload.requests(f"soak{minute}", int(rate * 60 * 2) + 10)
            # A new arrival schedule per window: with one seed every minute would replay
            # the same (Poisson but fixed) 60 seconds.
            records, elapsed = await server.run_open(
                requests, rate, 60, 60, f"minute {minute + 1}", seed=minute
            )
            ok = [r.latency_s for r in records if r.status == "ok"]
            window = {
                "minute": minute + 1,
                "requests": len(records),
                "errors": sum(r.status != "ok" for r in records),
                "p50_s": percentile(ok, 50),
                "p95_s": percentile(ok, 95),
                "p99_s": percentile(ok, 99),
                "rss_mib": round(tree_rss_mib(server.proc.pid), 1),
            }
            windows.append(window)
            print(json.dumps(window), flush=True)
    finally:
        server.stop()

    first = windows[1] if len(windows) > 2 else windows[0]
    last = windows[-1]
    verdict = {
        "p50_last_over_first": (last["p50_s"] or 0) / (first["p50_s"] or 1),
        "p95_last_over_first": (last["p95_s"] or 0) / (first["p95_s"] or 1),
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
        "errors": sum(w["errors"] for w in windows),
    }
    return {
        "capacity_req_s": capacity,
        "rate_req_s": rate,
        "windows": windows,
        "verdict": verdict,
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=int, default=30)
    parser.add_argument("--load", type=float, default=0.7, help="share of measured capacity")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="eager engine (faster start, slower)")
    args = parser.parse_args()
    result = asyncio.run(soak(args))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["verdict"], indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
