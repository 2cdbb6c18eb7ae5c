"""Beam search throughput: our server against transformers ``generate``, same run.

    .venv/bin/python bench/bench_beam.py [--beam-backends vllm,hf] [--enforce-eager]
        [--concurrency 8] [--requests 16] [--num-beams 4] [--max-new-tokens 24]

For each beam backend it starts ``python -m app`` (KAITO_BEAM_BACKEND=<it>) on a free
port, warms it up with the workload, then sends ``--requests`` beam-search requests from
``--concurrency`` clients and stops it. Then, with the server gone (so the two do not
share the CPU), it loads the same model with transformers and runs the same requests
with ``generate`` and the same settings: one at a time (what Kaito's pipeline server
does) and as static batches of ``--concurrency`` prompts (left-padded).

Prints one JSON line per system and the ratios; bench/NOTES_beam.md has measured runs.

    .venv/bin/python bench/bench_beam.py --hf-max-batch 1,8 [--repeats 2]

measures the transformers backend's batching instead: one server per
KAITO_HF_MAX_BATCH value, transformers alone (KAITO_BACKEND=hf, no vLLM engine), all
started first; then, per repetition, the same plain-beam and group-beam (2 groups,
diversity_penalty 1.0) workloads on each server in turn, the order alternating, so
each runs while the others idle.
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.settings import DEFAULT_MODEL_DIR, Settings  # noqa: E402
from bench.systems import BenchConfig, OurServer  # noqa: E402
from bench.workload import continuation_prompts  # noqa: E402

PROMPTS = continuation_prompts()


def generate_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "do_sample": False,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "length_penalty": 1.0,
        "early_stopping": False,
    }


def group_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Group (diverse) beam search: always the transformers backend."""
    return {**generate_kwargs(args), "num_beam_groups": 2, "diversity_penalty": 1.0}


def hf_batching(args: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    """The transformers backend at each KAITO_HF_MAX_BATCH, interleaved."""
    sizes = [int(v) for v in args.hf_max_batch.split(",") if v]
    workloads = {"beam": generate_kwargs(args), "group beam": group_kwargs(args)}
    servers = {}
    rows: list[dict[str, Any]] = []
    try:
        for size in sizes:
            server = beam_server(args, "hf")
            server.extra_env.update(KAITO_BACKEND="hf", KAITO_HF_MAX_BATCH=str(size))
            server.start(f"beam-hf-batch{size}")
            assert server.url is not None
            servers[size] = server
            for kwargs in workloads.values():  # warm-up: the model loads at start-up
                asyncio.run(run_clients(server.url, prompts[:1], kwargs, 1))
        for rep in range(args.repeats):
            order = sizes if rep % 2 == 0 else sizes[::-1]
            for name, kwargs in workloads.items():
                for size in order:
                    url = servers[size].url
                    assert url is not None
                    row = asyncio.run(run_clients(url, prompts, kwargs, args.concurrency))
                    row = {"system": f"{name}, KAITO_HF_MAX_BATCH={size}", "rep": rep, **row}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        for server in servers.values():
            server.stop()
    for name in workloads:
        for size in sizes[1:]:
            for rep in range(args.repeats):
                wall = {
                    r["system"]: r["wall_s"]
                    for r in rows
                    if r["rep"] == rep and name in r["system"]
                }
                before = wall[f"{name}, KAITO_HF_MAX_BATCH={sizes[0]}"]
                after = wall[f"{name}, KAITO_HF_MAX_BATCH={size}"]
                print(f"{name} rep {rep}: batch {size} vs {sizes[0]}: {before / after:.2f}x")
    return rows


def beam_server(args: argparse.Namespace, beam_backend: str) -> OurServer:
    """Our server as bench/systems.py runs it (CPU settings, process group, clean-up),
    with the server's default KV cache and the beam backend under test."""
    config = BenchConfig(
        model=args.model,
        enforce_eager=args.enforce_eager,
        kv_cache_gib=Settings.model_fields["kv_cache_space_gib"].default,
        log_dir=Path(args.log_dir),
    )
    server = OurServer(config)
    # No request timeout: a queue of beam requests on a busy CPU may take long.
    server.extra_env = {"KAITO_BEAM_BACKEND": beam_backend, "KAITO_REQUEST_TIMEOUT_SECONDS": "0"}
    return server


async def run_clients(
    url: str, prompts: list[str], kwargs: dict[str, Any], concurrency: int
) -> dict[str, Any]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies: list[float] = []
    tokens = 0
    backends: set[str] = set()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            prompt = queue.get_nowait()
            t0 = time.perf_counter()
            r = await http.post(
                url + "/chat",
                json={"prompt": prompt, "return_full_text": False, "generate_kwargs": kwargs},
            )
            r.raise_for_status()
            body = r.json()
            latencies.append(time.perf_counter() - t0)
            tokens += body["usage"]["completion_tokens"]
            backends.add(body["backend"])

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(prompts),
        "wall_s": round(wall, 2),
        "req_per_s": round(len(prompts) / wall, 4),
        "tokens": tokens,
        "tok_per_s": round(tokens / wall, 2),
        "p50_latency_s": round(latencies[len(latencies) // 2], 2),
        "max_latency_s": round(latencies[-1], 2),
        "served_by": sorted(backends),
    }


def run_transformers(args: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    kwargs = {k: v for k, v in generate_kwargs(args).items()}
    kwargs.update(eos_token_id=[eos], pad_token_id=pad)

    def one(prompt: str) -> int:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return int(out.shape[-1] - ids.shape[-1])

    def batch(group: list[str]) -> int:
        tokenizer.padding_side = "left"
        enc = tokenizer(group, return_tensors="pt", padding=True)
        out = model.generate(**enc, **kwargs)
        return int((out.shape[-1] - enc.input_ids.shape[-1]) * len(group))

    with torch.inference_mode():
        one(prompts[0])  # warm-up
        results = []
        t0 = time.perf_counter()
        tokens = sum(one(p) for p in prompts)
        wall = time.perf_counter() - t0
        results.append(
            {
                "system": "transformers generate, one request at a time",
                "requests": len(prompts),
                "wall_s": round(wall, 2),
                "req_per_s": round(len(prompts) / wall, 4),
                "tokens_upper_bound": tokens,
            }
        )
        t0 = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), args.concurrency):
            tokens += batch(prompts[i : i + args.concurrency])
        wall = time.perf_counter() - t0
        results.append(
            {
                "system": f"transformers generate, static batches of {args.concurrency}",
                "requests": len(prompts),
                "wall_s": round(wall, 2),
                "req_per_s": round(len(prompts) / wall, 4),
                "tokens_upper_bound": tokens,
            }
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument(
        "--beam-backends", default="vllm,hf", help="KAITO_BEAM_BACKEND values to run"
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="start the server eager (faster start, slower run)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--log-dir", default="/tmp/bench_beam")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--hf-max-batch",
        default="",
        help="KAITO_HF_MAX_BATCH values (e.g. 1,8): measure the transformers backend's "
        "batching instead (see above)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="with --hf-max-batch")
    args = parser.parse_args(argv)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    kwargs = generate_kwargs(args)
    print(
        json.dumps({"workload": kwargs, "requests": args.requests, "concurrency": args.concurrency})
    )
    if args.hf_max_batch:
        hf_batching(args, prompts)
        return 0
    results: list[dict[str, Any]] = []
    for backend in [b for b in args.beam_backends.split(",") if b]:
        server = beam_server(args, backend)
        try:
            server.start(f"beam-{backend}")
            assert server.url is not None and server.startup_s is not None
            startup = server.startup_s
            # Warm-up with the workload itself (compiled shapes, the lazy HF load).
            asyncio.run(
                run_clients(server.url, prompts[: args.concurrency], kwargs, args.concurrency)
            )
            row = asyncio.run(run_clients(server.url, prompts, kwargs, args.concurrency))
        finally:
            server.stop()
        row = {
            "system": f"ours, KAITO_BEAM_BACKEND={backend}",
            "startup_s": round(startup, 1),
            **row,
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    if not args.skip_transformers:
        for row in run_transformers(args, prompts):
            print(json.dumps(row), flush=True)
            results.append(row)
    base = {r["system"]: r["wall_s"] for r in results}
    for r in results:
        if r["system"].startswith("ours"):
            for name, wall in base.items():
                if name.startswith("transformers"):
                    ratio = wall / r["wall_s"]
                    print(f"{r['system']} vs {name}: {ratio:.2f}x (its wall time / ours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
