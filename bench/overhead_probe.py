"""Our server's own CPU time per /chat request, without an engine.

Drives the real ASGI app (``create_app`` with every middleware, the real tokenizer,
mapping, decoding and JSON) with a fake engine that answers at once with N fixed
tokens, and times each request in CPU time, which other processes on a shared machine
do not inflate the way they inflate wall time. With ``--profile`` it prints a
pyinstrument profile of the same loop: where the server's part of a request goes.

    python -m bench.overhead_probe [--requests 400] [--max-new-tokens 64] [--profile]

Not included: uvicorn's HTTP parsing, and vLLM's own front-end work in this process
(AsyncLLM.add_request, the output handler); the live benchmark's "server overhead"
line measures those too.
"""

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from bench.workload import Request, Workload, chat_payload, load_prompts


class InstantEngine:
    """Answers every request at once with ``max_tokens`` copies of one token."""

    name = "vllm"

    def __init__(self, tokenizer: Any) -> None:
        from param_mapping import SpecialTokens

        self._tokenizer = tokenizer
        self.max_model_len = 8192
        self.special_tokens = SpecialTokens(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            vocab_size=len(tokenizer),
        )
        self._token = tokenizer.encode(" the", add_special_tokens=False)[0]

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def is_ready(self) -> bool:
        return True

    async def generate(self, request: Any) -> Any:
        from app.engines.base import GeneratedSequence, GenerationResult

        ids = [self._token] * request.sampling.max_tokens
        return GenerationResult(
            sequences=[GeneratedSequence(token_ids=ids, finish_reason="length")]
        )

    async def abort(self, request_id: str) -> None:
        pass


async def call(app: Any, body: bytes) -> tuple[int, bytes]:
    """One POST /chat through the ASGI app, as uvicorn would make it."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/chat",
        "raw_path": b"/chat",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 5000),
    }
    sent = False
    never = asyncio.Event()
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def measure(app: Any, bodies: list[bytes]) -> list[float]:
    cpu = []
    for body in bodies:
        t0 = time.thread_time()
        status, reply = await call(app, body)
        cpu.append(time.thread_time() - t0)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {reply[:300]!r}")
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description="Our server's CPU time per /chat request.")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--profile", action="store_true", help="print a pyinstrument profile")
    args = parser.parse_args()

    import logging

    from transformers import AutoTokenizer

    from app.server import create_app
    from app.settings import DEFAULT_MODEL_DIR, Settings

    logging.disable(logging.INFO)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    app = create_app(Settings(model=str(DEFAULT_MODEL_DIR)), engine=InstantEngine(tokenizer))
    workload = Workload(load_prompts(), args.max_new_tokens)
    requests: list[Request] = workload.requests("probe", args.requests)
    bodies = [json.dumps(chat_payload(r)).encode() for r in requests]

    asyncio.run(measure(app, bodies[:50]))  # warm caches and lazy imports
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002)
        profiler.start()
        cpu = asyncio.run(measure(app, bodies))
        profiler.stop()
        print(profiler.output_text(unicode=True, color=False, show_all=False))
    else:
        cpu = asyncio.run(measure(app, bodies))
    ms = sorted(c * 1000 for c in cpu)
    print(
        f"server CPU per /chat request ({len(ms)} requests, {args.max_new_tokens} new tokens): "
        f"median {statistics.median(ms):.3f} ms, mean {statistics.fmean(ms):.3f} ms, "
        f"p90 {ms[int(len(ms) * 0.9)]:.3f} ms"
    )


if __name__ == "__main__":
    main()
