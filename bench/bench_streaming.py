"""Time to first token, streamed: our /chat (and our /v1/completions) against vLLM's own
OpenAI server's streamed /v1/completions, side by side in one run.

    .venv/bin/python -m bench.bench_streaming [--compiled] [--repeat 3] [--out DIR]

Both servers start once (bench/systems) and stay up; each repetition runs every
concurrency level system after system, the order reversed every repetition, so the
numbers a ratio compares are seconds apart rather than a whole run apart (the same
interleaving as `python -m bench --interleave`). A level is a closed wave of C
simultaneous streamed requests (C=1: several in a row). TTFT is the time from sending a
request to the first event that carries generated text; the whole-stream time is
reported too. Greedy, fixed output length (min tokens = max tokens), so every system does
the same work.
"""

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from app.settings import DEFAULT_MODEL_DIR, default_served_name
from bench.systems import BenchConfig, HttpSystem, OurServer, VLLMServer, kill_all

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# vLLM's CPU worker spins for ~1 s after its last request (bench/NOTES.md): let it settle
# before the next system's wave, so one system's tail does not tax the other's start.
SETTLE_S = 1.5


def chat_request(tokens: int) -> tuple[str, dict[str, Any]]:
    kwargs = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
    return "/chat", {"prompt": PROMPT, "stream": True, "generate_kwargs": kwargs}


def completions_request(model: str, tokens: int) -> tuple[str, dict[str, Any]]:
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "min_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    return "/v1/completions", body


def has_text(data: dict[str, Any]) -> bool:
    if "token" in data:  # /chat
        return True
    return any(c.get("text") for c in data.get("choices", []))  # OpenAI


async def one(
    client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]
) -> tuple[float, float]:
    """(seconds to the first text event, seconds to the end of the stream)."""
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {await r.aread()!r}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and has_text(json.loads(line[6:])):
                first = time.perf_counter() - t0
    assert first is not None, "no text event"
    return first, time.perf_counter() - t0


async def wave(
    url: str, path: str, body: dict[str, Any], concurrency: int, rounds: int
) -> list[tuple[float, float]]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        out: list[tuple[float, float]] = []
        for _ in range(rounds):
            out += await asyncio.gather(*(one(client, url, path, body) for _ in range(concurrency)))
        return out


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    ttft = sorted(s[0] for s in samples)
    p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
    return {
        "n": len(samples),
        "ttft_median_s": round(statistics.median(ttft), 4),
        "ttft_p90_s": round(p90, 4),
        "stream_median_s": round(statistics.median(s[1] for s in samples), 4),
    }


def targets(system: HttpSystem, tokens: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, path, body) for each streamed route this system is measured on."""
    if isinstance(system, VLLMServer):
        return [("vLLM server /v1/completions", *completions_request(system.served_name, tokens))]
    # Our server runs without KAITO_SERVED_MODEL_NAME: it serves the default name.
    name = default_served_name(system.config.model)
    return [
        ("ours /chat", *chat_request(tokens)),
        ("ours /v1/completions", *completions_request(name, tokens)),
    ]


def measure(
    systems: list[HttpSystem], tokens: int, concurrencies: list[int], repeat: int, c1_rounds: int
) -> dict[str, Any]:
    per_rep: dict[str, list[dict[str, float]]] = defaultdict(list)
    pooled: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for system in systems:  # one warm-up wave each at the largest level
        for _, path, body in targets(system, tokens):
            asyncio.run(wave(system.url or "", path, body, max(concurrencies), 1))
    for rep in range(repeat):
        order = systems if rep % 2 == 0 else systems[::-1]
        for c in concurrencies:
            for system in order:
                for label, path, body in targets(system, tokens):
                    time.sleep(SETTLE_S)
                    samples = asyncio.run(
                        wave(system.url or "", path, body, c, c1_rounds if c == 1 else 1)
                    )
                    key = f"{label} c={c}"
                    per_rep[key].append(summary(samples))
                    pooled[key] += samples
                    print(f"rep {rep + 1} {key}: {per_rep[key][-1]}", flush=True)
    return {key: {**summary(pooled[key]), "repetitions": per_rep[key]} for key in pooled}


def ratios(results: dict[str, Any], concurrencies: list[int]) -> dict[str, Any]:
    """Ours ÷ vLLM's server, TTFT medians: pooled and per repetition (lower is better)."""
    out: dict[str, Any] = {}
    for route in ("ours /chat", "ours /v1/completions"):
        for c in concurrencies:
            ours, theirs = results[f"{route} c={c}"], results[f"vLLM server /v1/completions c={c}"]
            out[f"{route} c={c}"] = {
                "ttft": round(ours["ttft_median_s"] / theirs["ttft_median_s"], 3),
                "ttft_per_repetition": [
                    round(a["ttft_median_s"] / b["ttft_median_s"], 3)
                    for a, b in zip(ours["repetitions"], theirs["repetitions"], strict=True)
                ],
                "stream": round(ours["stream_median_s"] / theirs["stream_median_s"], 3),
            }
    return out


def table(results: dict[str, Any]) -> str:
    rows = [
        "| route | C | n | TTFT median (ms) | TTFT p90 (ms) | whole stream median (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in results.items():
        route, c = key.rsplit(" c=", 1)
        rows.append(
            f"| {route} | {c} | {r['n']} | {r['ttft_median_s'] * 1000:.0f} | "
            f"{r['ttft_p90_s'] * 1000:.0f} | {r['stream_median_s'] * 1000:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--compiled", action="store_true", help="torch.compile (default: eager)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--c1-rounds", type=int, default=12, help="requests in a row at C=1")
    parser.add_argument("--ours-url", help="measure this running server of ours only")
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming"))
    args = parser.parse_args(argv)
    config = BenchConfig(
        model=args.model,
        enforce_eager=not args.compiled,
        kv_cache_gib=2.0,
        log_dir=args.out / "logs",
    )
    systems: list[HttpSystem] = [OurServer(config, args.ours_url)]
    if args.ours_url is None:
        systems.append(VLLMServer(config))
    try:
        for system in systems:
            system.start("stream")
            print(f"{system.key}: healthy at {system.url}", flush=True)
        results = measure(systems, args.tokens, args.concurrency, args.repeat, args.c1_rounds)
    finally:
        for system in systems:
            system.stop()
        kill_all()
    report: dict[str, Any] = {
        "tokens": args.tokens,
        "eager": config.enforce_eager,
        "repeat": args.repeat,
        "results": results,
    }
    if len(systems) > 1:
        report["ours_over_vllm_server"] = ratios(results, args.concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "streaming.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    print(json.dumps(report.get("ours_over_vllm_server", {}), indent=2))


if __name__ == "__main__":
    main()
