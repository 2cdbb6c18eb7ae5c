"""Where a /chat request's time goes in the live server, stage by stage.

Starts our server (``python -m app``) with timestamps wrapped around each stage of
/chat (the outermost middleware, the handler, the engine call, ``AsyncLLM.add_request``,
vLLM's output processing, the response messages), sends requests one at a time with
aiohttp, and prints the median wall time of each stage, plus the event-loop thread's CPU
time for the stretch before the engine. bench/NOTES.md has a run and what it showed.

    python -m bench.stage_probe [--requests 30] [--max-new-tokens 32] [--compiled]

The wrappers cost a few microseconds per stage. The stage table explains the
"server overhead" line of ``make bench``; it does not replace it.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.systems import BenchConfig, OurServer
from bench.workload import Workload, chat_payload, load_prompts

# (label, start mark, end mark): each stage is the time between two marks.
STAGES = [
    ("middleware -> /chat handler (ASGI, body, validation)", "asgi_in", "handler_in"),
    ("handler -> engine call (tokenize, limits, mapping)", "handler_in", "engine_in"),
    ("engine call -> AsyncLLM.add_request (render)", "engine_in", "add_in"),
    ("AsyncLLM.add_request", "add_in", "add_out"),
    ("engine's last output processed -> engine call returns", "last_output", "engine_out"),
    ("engine call returns -> reply built (decode)", "engine_out", "handler_out"),
    ("reply built -> response start (serialize)", "handler_out", "response_start"),
    ("response start -> response body", "response_start", "body_start"),
    ("response body sent", "body_start", "body_out"),
]


def serve(marks_path: str, argv: list[str]) -> int:
    """Runs ``python -m app`` with the stage wrappers; one JSON line of marks per /chat."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    import app.engines.vllm_engine as vllm_engine
    import app.middleware as middleware
    import app.serving as serving

    marks: dict[str, Any] = {}
    out = open(marks_path, "a")  # noqa: SIM115 (open for the server's lifetime)
    now = time.perf_counter

    def wrap_async(cls: Any, name: str, before: str, after: str) -> None:
        original = getattr(cls, name)

        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            marks[before] = now()
            marks["cpu_" + before] = time.thread_time()
            result = await original(*args, **kwargs)
            marks[after] = now()
            return result

        setattr(cls, name, wrapped)

    wrap_async(serving.ChatService, "chat", "handler_in", "handler_out")
    wrap_async(vllm_engine.VLLMEngine, "generate", "engine_in", "engine_out")
    wrap_async(AsyncLLM, "add_request", "add_in", "add_out")

    process_outputs = OutputProcessor.process_outputs

    def timed_process_outputs(*args: Any, **kwargs: Any) -> Any:
        result = process_outputs(*args, **kwargs)
        marks["last_output"] = now()
        return result

    OutputProcessor.process_outputs = timed_process_outputs  # type: ignore[method-assign]

    outermost = middleware.RequestIdMiddleware.__call__

    async def timed_call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/chat":
            await outermost(self, scope, receive, send)
            return
        marks.clear()
        marks["asgi_in"] = now()
        marks["cpu_asgi_in"] = time.thread_time()

        async def timed_send(message: Any) -> None:
            first = message["type"] == "http.response.start"
            marks["response_start" if first else "body_start"] = now()
            await send(message)
            if not first:
                marks["body_out"] = now()

        await outermost(self, scope, receive, timed_send)
        out.write(json.dumps(marks) + "\n")
        out.flush()

    middleware.RequestIdMiddleware.__call__ = timed_call  # type: ignore[method-assign]

    from app.__main__ import main

    return main(argv)


async def send_requests(url: str, bodies: list[dict[str, Any]]) -> list[float]:
    import aiohttp

    latencies = []
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            t0 = time.perf_counter()
            async with session.post(url + "/chat", json=body) as response:
                await response.text()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            latencies.append(time.perf_counter() - t0)
    return latencies


class StagedServer(OurServer):
    """Our server as the harness starts it (process group, health wait, clean-up), run
    through ``serve`` so that it writes the stage marks."""

    def __init__(self, config: BenchConfig, marks_path: str) -> None:
        super().__init__(config)
        self.marks_path = marks_path

    def argv(self, port: int) -> list[str]:
        python, _, _, *options = super().argv(port)  # python -m app <options>
        return [python, "-m", "bench.stage_probe", "--serve", self.marks_path, *options]


def report(rows: list[dict[str, Any]], latencies: list[float]) -> None:
    def median_ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.3f}"

    print(f"{len(rows)} requests, one at a time; medians in ms")
    print(f"  client latency: {median_ms(latencies)}")
    server = [r["body_out"] - r["asgi_in"] for r in rows]
    print(f"  server (outermost middleware in -> body sent): {median_ms(server)}")
    for label, start, end in STAGES:
        values = [r[end] - r[start] for r in rows if start in r and end in r]
        if values:
            print(f"  {label}: {median_ms(values)}")
    cpu = [r["cpu_add_in"] - r["cpu_asgi_in"] for r in rows if "cpu_add_in" in r]
    wall = [r["add_in"] - r["asgi_in"] for r in rows]
    print(f"  before the engine: {median_ms(wall)} wall, {median_ms(cpu)} event-loop CPU")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        sys.exit(serve(sys.argv[2], sys.argv[3:]))
    parser = argparse.ArgumentParser(description="Stage timings of /chat in the live server.")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compiled", action="store_true", help="compiled engine (default eager)")
    args = parser.parse_args()

    from app.settings import DEFAULT_MODEL_DIR

    config = BenchConfig(
        model=str(DEFAULT_MODEL_DIR),
        enforce_eager=not args.compiled,
        kv_cache_gib=1,
        log_dir=Path(tempfile.mkdtemp(prefix="stage-probe-")),
    )
    marks_path = str(config.log_dir / "marks.jsonl")
    server = StagedServer(config, marks_path)
    server.start("stage")
    try:
        assert server.url is not None
        workload = Workload(load_prompts(), args.max_new_tokens)
        requests = workload.requests("stage", args.warmup + args.requests)
        bodies = [chat_payload(r) for r in requests]
        latencies = asyncio.run(send_requests(server.url, bodies))
    finally:
        server.stop()
    rows = [json.loads(line) for line in Path(marks_path).read_text().splitlines()]
    report(rows[args.warmup :], latencies[args.warmup :])


if __name__ == "__main__":
    main()
