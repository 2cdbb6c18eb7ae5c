"""Beam search throughput: our server against transformers ``generate``, same run.

    .venv/bin/python bench/bench_beam.py [--beam-backends vllm] [--block-sizes 32,128]
        [--repetitions 2] [--enforce-eager] [--concurrency 8] [--requests 16]
        [--num-beams 4] [--max-new-tokens 24]

It starts one ``python -m app`` per (beam backend, KV block size) on a free port
(KAITO_BEAM_BACKEND, KAITO_BLOCK_SIZE), loads the same model with transformers in this
process, warms everything up with the workload, then runs ``--repetitions`` rounds; each
round runs, one after the other (an idle server costs no CPU): every server with
``--requests`` beam-search requests from ``--concurrency`` clients, transformers
``generate`` one request at a time (what Kaito's pipeline server does), and transformers
on static batches of ``--concurrency`` prompts (left-padded). Interleaving puts the same
machine load on every system of a round; the ratios are of total wall times.

Prints one JSON line per system and round, the ratios, and each server's fork fraction
(beams that needed a new engine request, from the servers' debug log); bench/NOTES_beam.md
has measured runs.

    .venv/bin/python bench/bench_beam.py --hf-max-batch 1,8 [--repetitions 2]

measures the transformers backend's batching instead: one server per
KAITO_HF_MAX_BATCH value, transformers alone (KAITO_BACKEND=hf, no vLLM engine), all
started first; then, per repetition, the same plain-beam and group-beam (2 groups,
diversity_penalty 1.0) workloads on each server in turn, the order alternating, so
each runs while the others idle.
"""

import argparse
import asyncio
import json
import re
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
            server = beam_server(args, "hf", int(args.block_sizes.split(",")[0]))
            server.extra_env.update(KAITO_BACKEND="hf", KAITO_HF_MAX_BATCH=str(size))
            server.start(f"beam-hf-batch{size}")
            assert server.url is not None
            servers[size] = server
            for kwargs in workloads.values():  # warm-up: the model loads at start-up
                asyncio.run(run_clients(server.url, prompts[:1], kwargs, 1))
        for rep in range(args.repetitions):
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
            for rep in range(args.repetitions):
                wall = {
                    r["system"]: r["wall_s"]
                    for r in rows
                    if r["rep"] == rep and name in r["system"]
                }
                before = wall[f"{name}, KAITO_HF_MAX_BATCH={sizes[0]}"]
                after = wall[f"{name}, KAITO_HF_MAX_BATCH={size}"]
                print(f"{name} rep {rep}: batch {size} vs {sizes[0]}: {before / after:.2f}x")
    return rows


class BeamServer(OurServer):
    """Our server at debug log level, so its log holds each beam search's fork count."""

    def argv(self, port: int) -> list[str]:
        argv = super().argv(port)
        argv[argv.index("--log-level") + 1] = "debug"
        return argv


def beam_server(args: argparse.Namespace, beam_backend: str, block_size: int) -> OurServer:
    """Our server as bench/systems.py runs it (CPU settings, process group, clean-up),
    with the beam backend and block size under test."""
    config = BenchConfig(
        model=args.model,
        enforce_eager=args.enforce_eager,
        kv_cache_gib=args.kv_cache_gib,
        log_dir=Path(args.log_dir),
    )
    server = BeamServer(config)
    # No request timeout: a queue of beam requests on a busy CPU may take long.
    server.extra_env = {
        "KAITO_BEAM_BACKEND": beam_backend,
        "KAITO_BLOCK_SIZE": str(block_size),
        "KAITO_REQUEST_TIMEOUT_SECONDS": "0",
        # Our debug lines only: vLLM at debug logs every engine step, which slows it.
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    return server


FORKS = re.compile(r"(\d+) forks of (\d+) beams continued")


def fork_fraction(log_path: Path | None) -> dict[str, Any]:
    """Forks / beams continued over every beam search in a server's log (warm-up too)."""
    forks = kept = searches = 0
    if log_path is not None and log_path.exists():
        for match in FORKS.finditer(log_path.read_text(errors="replace")):
            forks, kept, searches = forks + int(match[1]), kept + int(match[2]), searches + 1
    return {
        "searches": searches,
        "forks": forks,
        "beams_continued": kept,
        "fork_fraction": round(forks / kept, 3) if kept else None,
    }


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


class Transformers:
    """The same model and settings in transformers ``generate``, in this process."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.kwargs = dict(generate_kwargs(args), eos_token_id=[eos], pad_token_id=pad)
        self.batch_size = args.concurrency

    def one(self, prompt: str) -> int:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), **self.kwargs)
        return int(out.shape[-1] - ids.shape[-1])

    def batch(self, group: list[str]) -> int:
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(group, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(**enc, **self.kwargs)
        return int((out.shape[-1] - enc.input_ids.shape[-1]) * len(group))

    def run_one_at_a_time(self, prompts: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        tokens = sum(self.one(p) for p in prompts)
        return self._row("one request at a time", prompts, time.perf_counter() - t0, tokens)

    def run_batches(self, prompts: list[str]) -> dict[str, Any]:
        t0 = time.perf_counter()
        n = self.batch_size
        tokens = sum(self.batch(prompts[i : i + n]) for i in range(0, len(prompts), n))
        name = f"static batches of {n}"
        return self._row(name, prompts, time.perf_counter() - t0, tokens)

    @staticmethod
    def _row(name: str, prompts: list[str], wall: float, tokens: int) -> dict[str, Any]:
        return {
            "system": f"transformers generate, {name}",
            "requests": len(prompts),
            "wall_s": round(wall, 2),
            "req_per_s": round(len(prompts) / wall, 4),
            "tokens_upper_bound": tokens,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--beam-backends", default="vllm", help="KAITO_BEAM_BACKEND values")
    parser.add_argument("--block-sizes", default="32", help="KAITO_BLOCK_SIZE values")
    parser.add_argument("--repetitions", type=int, default=2)
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="start the servers eager (faster start, slower run)",
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--kv-cache-gib",
        type=int,
        default=int(Settings.model_fields["kv_cache_space_gib"].default),
        help="KV cache per server, whole GiB (1 holds ~23k tokens, plenty for beams)",
    )
    parser.add_argument("--log-dir", default="/tmp/bench_beam")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--hf-max-batch",
        default="",
        help="KAITO_HF_MAX_BATCH values (e.g. 1,8): measure the transformers backend's "
        "batching instead (see above)",
    )
    args = parser.parse_args(argv)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    kwargs = generate_kwargs(args)
    print(
        json.dumps({"workload": kwargs, "requests": args.requests, "concurrency": args.concurrency})
    )
    if args.hf_max_batch:
        hf_batching(args, prompts)
        return 0
    servers: dict[str, OurServer] = {}
    walls: dict[str, list[float]] = {}
    try:
        for backend in [b for b in args.beam_backends.split(",") if b]:
            for size in [int(b) for b in args.block_sizes.split(",") if b]:
                name = f"ours, KAITO_BEAM_BACKEND={backend}, KAITO_BLOCK_SIZE={size}"
                server = beam_server(args, backend, size)
                servers[name] = server
                server.start(f"beam-{backend}-{size}")
                assert server.url is not None and server.startup_s is not None
                print(json.dumps({"system": name, "startup_s": round(server.startup_s, 1)}))
                # Warm-up with the workload itself (compiled shapes, the lazy HF load).
                warm = prompts[: args.concurrency]
                asyncio.run(run_clients(server.url, warm, kwargs, args.concurrency))
        hf = None if args.skip_transformers else Transformers(args)
        if hf is not None:
            hf.one(prompts[0])
        for rep in range(args.repetitions):
            for name, server in servers.items():
                assert server.url is not None
                row = asyncio.run(run_clients(server.url, prompts, kwargs, args.concurrency))
                row = {"system": name, "repetition": rep, **row}
                print(json.dumps(row), flush=True)
                walls.setdefault(name, []).append(row["wall_s"])
            if hf is not None:
                for row in (hf.run_one_at_a_time(prompts), hf.run_batches(prompts)):
                    row["repetition"] = rep
                    print(json.dumps(row), flush=True)
                    walls.setdefault(row["system"], []).append(row["wall_s"])
    finally:
        for server in servers.values():
            server.stop()
    for name, server in servers.items():
        print(json.dumps({"system": name, **fork_fraction(server.log_path)}))
    totals = {name: sum(w) for name, w in walls.items()}
    for name in servers:
        for other, wall in totals.items():
            if other.startswith("transformers"):
                ratio = wall / totals[name]
                print(f"{name} vs {other}: {ratio:.2f}x (its total wall time / ours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
