"""Shared fixtures. The real server (vLLM engine on the default model, eager mode) starts
once per test session, on demand, as a subprocess on a free loopback port."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.settings import DEFAULT_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = float(os.environ.get("TEST_SERVER_STARTUP_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (DEFAULT_MODEL_DIR / ".prepared").exists():
        pytest.fail(
            f"default model missing at {DEFAULT_MODEL_DIR}: run `make model` (make test does)"
        )
    return DEFAULT_MODEL_DIR


class ServerProcess:
    """A `python -m app` subprocess; its log goes to a file the tests can read."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **(env or {})}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(self.port), *args],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """For a fixture: waits until ``server`` is healthy (failing the test with its log's
    tail when it is not), yields it, and stops it afterwards, whatever the outcome."""
    try:
        server.wait_healthy()
    except RuntimeError as exc:
        server.stop()
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def live_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    # Scores on: many live tests read token ids and log-probs from output_scores.
    args = ["--enforce-eager", "--output-scores", "--model", str(model_dir)]
    # The vLLM beam step loop (the GPU default) under test; on CPU auto would pick the
    # transformers backend, which tests/integration/test_hf_batching.py covers.
    args += ["--beam-backend", "vllm"]
    yield from running(ServerProcess(args, log))


@pytest.fixture(scope="session")
def server_url(live_server: ServerProcess) -> str:
    """Base URL of the real server, e.g. http://127.0.0.1:PORT."""
    return live_server.url
