"""The systems under test. Each is started by the harness (or attached to by URL), one at
a time, on the same model, machine and CPU environment, and stopped with its whole
process group, on success, error or Ctrl-C alike.

- ``ours``: this repository's server, ``python -m app``, POST /chat.
- ``ours-traced``: the same with OpenTelemetry tracing on, exporting to a local OTLP sink
  (bench/otlp_sink.py): tracing's cost, side by side with ``ours``.
- ``kaito``: the Kaito-style transformers baseline (bench/baselines), POST /chat.
- ``vllm``: vLLM's own OpenAI server, POST /v1/completions.
- ``offline``: the raw engine, ``vllm.LLM`` in a subprocess (bench/offline_engine.py).
"""

import asyncio
import atexit
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench.loadgen import Progress, Record, Send, closed_loop, open_loop
from bench.workload import Request, chat_payload, completions_payload

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 900.0

# Every live process group, so an error or a signal anywhere still cleans up.
_LIVE: dict[int, subprocess.Popen[bytes]] = {}


def _kill_group(proc: "subprocess.Popen[bytes]", timeout: float = 30) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    # The group may outlive its leader (vLLM's engine-core process): always finish it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()
    _LIVE.pop(proc.pid, None)


def kill_all() -> None:
    for proc in list(_LIVE.values()):
        _kill_group(proc, timeout=10)


atexit.register(kill_all)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class BenchConfig:
    model: str
    enforce_eager: bool
    kv_cache_gib: float
    log_dir: Path
    threads: int = os.cpu_count() or 1

    def cpu_env(self) -> dict[str, str]:
        """The CPU settings app/engines/vllm_engine.py applies, for every system alike."""
        return {
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "OMP_NUM_THREADS": str(self.threads),
            "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gib:g}",
            "VLLM_USE_V2_MODEL_RUNNER": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }


class System(ABC):
    key: str
    title: str
    supports_open_loop = True

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        # Environment for this system's process beyond the shared CPU settings.
        self.extra_env: dict[str, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        self.startup_s: float | None = None

    def _spawn(
        self, argv: list[str], tag: str, stdin: bool = False, stdout_pipe: bool = False
    ) -> None:
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.config.log_dir / f"{self.key}-{tag}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **self.config.cpu_env(), **self.extra_env, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        _LIVE[self.proc.pid] = self.proc

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @abstractmethod
    def start(self, tag: str) -> None: ...

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @abstractmethod
    async def run_closed(
        self,
        requests: Sequence[Request],
        concurrency: int,
        max_s: float,
        grace_s: float,
        label: str,
    ) -> tuple[list[Record], float]: ...

    async def run_open(
        self,
        requests: Sequence[Request],
        rate: float,
        max_s: float,
        grace_s: float,
        label: str,
        seed: int = 0,
    ) -> tuple[list[Record], float]:
        raise NotImplementedError


class HttpSystem(System):
    """A server reached over loopback HTTP with aiohttp (light on the shared CPU)."""

    health_path = "/health"
    # Scrape vLLM's per-request e2e histogram around each request at concurrency 1, to
    # split a request's latency into the engine's part and the server's.
    engine_metrics = False

    def __init__(self, config: BenchConfig, url: str | None = None) -> None:
        super().__init__(config)
        self.url = url
        self.attached = url is not None

    @abstractmethod
    def argv(self, port: int) -> list[str]: ...

    @abstractmethod
    def build(self, request: Request) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for one request."""

    @abstractmethod
    def output_tokens(self, request: Request, reply: dict[str, Any]) -> int: ...

    def start(self, tag: str) -> None:
        if self.attached:
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        self._spawn(self.argv(port), tag)
        self._wait_healthy(t0)
        self.startup_s = time.monotonic() - t0

    def stop(self) -> None:
        if not self.attached:
            super().stop()

    def _wait_healthy(self, t0: float) -> None:
        import urllib.error
        import urllib.request

        assert self.proc is not None and self.url is not None
        next_note = t0 + 30
        while time.monotonic() - t0 < STARTUP_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.key} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > next_note:
                next_note += 30
                print(
                    f"  {self.key}: starting ({time.monotonic() - t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(1)
        raise RuntimeError(
            f"{self.key} not healthy after {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
        )

    def _sender(
        self, session: aiohttp.ClientSession, with_engine_time: bool
    ) -> tuple[Send, dict[int, tuple[float, float]]]:
        engine_times: dict[int, tuple[float, float]] = {}
        assert self.url is not None
        base = self.url

        async def send(request: Request) -> int:
            before = await self._e2e_sum(session) if with_engine_time else None
            path, body = self.build(request)
            posted = time.perf_counter()
            async with session.post(base + path, json=body) as response:
                text = await response.text()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {text[:200]}")
            post_s = time.perf_counter() - posted
            tokens = self.output_tokens(request, json.loads(text))
            if tokens != request.max_new_tokens:
                # Equal work or no comparison: a short reply is a failed request here.
                raise RuntimeError(f"generated {tokens} tokens, expected {request.max_new_tokens}")
            if before is not None:
                after = await self._e2e_sum(session)
                if after is not None:
                    engine_times[id(request)] = (post_s, after - before)
            return tokens

        return send, engine_times

    async def _e2e_sum(self, session: aiohttp.ClientSession) -> float | None:
        async with session.get(self.url + "/metrics") as response:  # type: ignore[operator]
            text = await response.text()
        total = 0.0
        found = False
        for match in re.finditer(
            r"^vllm:e2e_request_latency_seconds_sum(?:\{[^}]*\})? (\S+)$", text, re.M
        ):
            total += float(match.group(1))
            found = True
        return total if found else None

    async def run_closed(
        self,
        requests: Sequence[Request],
        concurrency: int,
        max_s: float,
        grace_s: float,
        label: str,
    ) -> tuple[list[Record], float]:
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            with_engine = self.engine_metrics and concurrency == 1
            send, engine_times = self._sender(session, with_engine)
            records, elapsed = await closed_loop(send, requests, concurrency, max_s, grace_s, label)
        if engine_times:
            # The request's latency is its POST alone: the two /metrics reads around it
            # (several ms each on 2 cores) would otherwise count as server overhead.
            by_index = {id(r): i for i, r in enumerate(requests)}
            times = {by_index[k]: v for k, v in engine_times.items()}
            for record in records:
                if record.index in times:
                    record.latency_s, record.engine_latency_s = times[record.index]
        return records, elapsed

    async def run_open(
        self,
        requests: Sequence[Request],
        rate: float,
        max_s: float,
        grace_s: float,
        label: str,
        seed: int = 0,
    ) -> tuple[list[Record], float]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        ) as session:
            send, _ = self._sender(session, False)
            return await open_loop(send, requests, rate, max_s, grace_s, label, seed=seed)


class OurServer(HttpSystem):
    key = "ours"
    title = "our /chat (python -m app)"
    engine_metrics = True

    def argv(self, port: int) -> list[str]:
        argv = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port)]
        argv += [
            "--model",
            self.config.model,
            "--kv-cache-space-gib",
            f"{self.config.kv_cache_gib:g}",
        ]
        argv += ["--log-level", "warning"]
        if self.config.enforce_eager:
            argv.append("--enforce-eager")
        return argv

    def build(self, request: Request) -> tuple[str, dict[str, Any]]:
        return "/chat", chat_payload(request)

    def output_tokens(self, request: Request, reply: dict[str, Any]) -> int:
        return int(reply["usage"]["completion_tokens"])


class TracedServer(OurServer):
    """Our server exporting every request's trace over OTLP/HTTP to a sink in this process.
    Compare with ``ours`` in one interleaved run: the ratio is what tracing costs."""

    key = "ours-traced"
    title = "our /chat with tracing on (OTLP/HTTP to a local sink)"

    def start(self, tag: str) -> None:
        from bench.otlp_sink import OTLPSink

        self.sink = OTLPSink()
        try:
            super().start(tag)
        except BaseException:
            self.sink.stop()
            raise

    def argv(self, port: int) -> list[str]:
        traced = ["--otlp-traces-endpoint", self.sink.url, "--otlp-traces-protocol"]
        return [*super().argv(port), *traced, "http/protobuf"]

    def stop(self) -> None:
        super().stop()
        print(f"  {self.key}: the sink received {self.sink.exports} OTLP exports")
        self.sink.stop()


class KaitoBaseline(HttpSystem):
    key = "kaito"
    title = "Kaito-style transformers pipeline (bench/baselines)"

    def argv(self, port: int) -> list[str]:
        module = "bench.baselines.kaito_transformers"
        return [sys.executable, "-m", module, "--model", self.config.model, "--port", str(port)]

    def build(self, request: Request) -> tuple[str, dict[str, Any]]:
        return "/chat", chat_payload(request)

    def output_tokens(self, request: Request, reply: dict[str, Any]) -> int:
        if not isinstance(reply.get("Result"), str):
            raise RuntimeError(f"no Result in reply: {str(reply)[:200]}")
        # min_new_tokens = max_new_tokens: transformers generates exactly that many.
        return request.max_new_tokens


class VLLMServer(HttpSystem):
    key = "vllm"
    title = "vLLM OpenAI server (/v1/completions)"
    engine_metrics = True
    served_name = "bench-model"

    def __init__(self, config: BenchConfig, url: str | None = None) -> None:
        super().__init__(config, url)
        self.eos_token_id = _eos_token_id(config.model)

    def argv(self, port: int) -> list[str]:
        # `vllm serve` fails under vllm-cpu (its CLI looks up the "vllm" distribution);
        # the module entry point is the same server (shared/NOTES.md).
        argv = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.config.model,
        ]
        argv += ["--served-model-name", self.served_name, "--dtype", "float32"]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        if self.config.enforce_eager:
            argv.append("--enforce-eager")
        return argv

    def build(self, request: Request) -> tuple[str, dict[str, Any]]:
        return "/v1/completions", completions_payload(request, self.served_name, self.eos_token_id)

    def output_tokens(self, request: Request, reply: dict[str, Any]) -> int:
        return int(reply["usage"]["completion_tokens"])


class OfflineEngine(System):
    key = "offline"
    title = "raw engine, offline (vllm.LLM)"
    supports_open_loop = False

    def start(self, tag: str) -> None:
        argv = [sys.executable, "-m", "bench.offline_engine", "--model", self.config.model]
        if self.config.enforce_eager:
            argv.append("--enforce-eager")
        t0 = time.monotonic()
        self._spawn(argv, tag, stdin=True, stdout_pipe=True)
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        message = self._read_message(timeout=STARTUP_TIMEOUT_S, progress=None, t0=t0)
        if not message.get("ready"):
            raise RuntimeError(f"offline engine did not start:\n{self.log_tail()}")
        self.startup_s = time.monotonic() - t0

    def _pump(self) -> None:
        """Reads the worker's stdout: protocol lines to the queue, vLLM's lines to the log."""
        assert self.proc is not None and self.proc.stdout is not None
        log = self._log
        for line in self.proc.stdout:
            if line.startswith(b"@@BENCH@@ "):
                self._messages.put(json.loads(line[len(b"@@BENCH@@ ") :]))
            elif log is not None and not log.closed:
                log.write(line)
                log.flush()
        self._messages.put(None)  # end of output

    def _read_message(self, timeout: float, progress: Progress | None, t0: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                message = self._messages.get(timeout=1)
            except queue.Empty:
                if progress is None and time.monotonic() > next_note:
                    next_note += 30
                    waited = time.monotonic() - t0
                    print(f"  offline: starting ({waited:.0f}s)", file=sys.stderr, flush=True)
                continue
            if message is None:
                raise RuntimeError(f"offline engine exited:\n{self.log_tail()}")
            if "progress" in message:
                if progress is not None:
                    progress.done = message["progress"]
                    progress.tokens = message["tokens"]
                    progress.show()
                continue
            return message
        raise RuntimeError(f"offline engine: no reply within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write(b'{"cmd": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                pass
        super().stop()

    async def run_closed(
        self,
        requests: Sequence[Request],
        concurrency: int,
        max_s: float,
        grace_s: float,
        label: str,
    ) -> tuple[list[Record], float]:
        assert self.proc is not None and self.proc.stdin is not None
        command = {
            "cmd": "run",
            "concurrency": concurrency,
            "max_seconds": max_s,
            "grace_seconds": grace_s,
            "requests": [
                {"prompt_id": r.prompt_id, "text": r.text, "max_new_tokens": r.max_new_tokens}
                for r in requests
            ],
        }
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        progress = Progress(label, len(requests), max_s)
        message = await asyncio.to_thread(
            self._read_message, max_s + grace_s + 60, progress, time.monotonic()
        )
        progress.done = len(message["records"])
        progress.close()
        records = [Record(**r) for r in message["records"]]
        for record in records:
            expected = requests[record.index].max_new_tokens
            if record.status == "ok" and record.output_tokens != expected:
                record.status = "error"
                record.error = f"generated {record.output_tokens} tokens, expected {expected}"
        return records, float(message["elapsed_s"])


def _eos_token_id(model: str) -> int | None:
    """The tokenizer's eos id: what our server sends as its only stop token id."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    return None if eos is None else int(eos)


SYSTEMS: dict[str, type[System]] = {
    cls.key: cls for cls in (OurServer, TracedServer, KaitoBaseline, VLLMServer, OfflineEngine)
}
