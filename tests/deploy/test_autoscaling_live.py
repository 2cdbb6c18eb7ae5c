"""The autoscaler's inputs, live: a server of its own with a small `max_num_seqs` is
overloaded, vLLM's queue gauges move on /metrics, and a real Prometheus scraping it (as
test_prometheus_scrape runs it, through the kubernetes-pods relabelling) evaluates the
exact query that components/keda-autoscaling's ScaledObject carries: above the
ScaledObject's threshold during the burst, 0 when idle.

One server for both tests (module scope): an engine start costs about 90 s of both cores.
"""

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, running
from tests.deploy.deploy_support import Rendered, render_overlay
from tests.deploy.test_prometheus_scrape import JOB, cpu_render, prometheus, query
from tests.integration.scrape import metric, snapshot

pytestmark = pytest.mark.integration

# The fixtures this module takes from test_prometheus_scrape (pytest finds them by name);
# listed so linters see them used.
__all__ = ["cpu_render", "prometheus"]

# Small, so a burst of a few requests makes a queue: sequences past it wait in vLLM.
MAX_NUM_SEQS = 4
# Every request generates exactly this many tokens, so the queue lasts many engine steps
# (one per token for each running batch) whatever the model would say: seconds even on a
# fast machine, where 16 tokens let a whole burst finish between two samples of /metrics.
# A burst still ends within minutes on a busy 2-core machine.
NEW_TOKENS = 64
WAIT_S = 120

# What the endpoint picker and the autoscaler read (docs/SCALING.md).
ROUTING_METRICS = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "kaito_hf_queue_depth",
)


@pytest.fixture(scope="module")
def scaling_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("scaling-server") / "server.log"
    server = ServerProcess(
        ["--enforce-eager", "--model", str(model_dir), "--max-num-seqs", str(MAX_NUM_SEQS)], log
    )
    for started in running(server):
        yield started.url


@pytest.fixture(scope="module")
def server_url(scaling_server: str) -> str:
    """This module's server, for the Prometheus fixture (it scrapes `server_url`)."""
    return scaling_server


@pytest.fixture(scope="module")
def scaled_object(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The ScaledObject as the CPU overlay with the KEDA component renders it (the test
    server stands for that overlay's pod)."""
    rendered: Rendered = render_overlay(
        "cpu", ("keda-autoscaling",), tmp_path_factory.mktemp("keda")
    )
    return rendered.one("ScaledObject")


class Burst:
    """`n` concurrent /chat requests of NEW_TOKENS tokens each, in a background thread."""

    def __init__(self, url: str, n: int) -> None:
        self.url = url
        self.n = n
        self.statuses: list[int | str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, client: httpx.Client) -> None:
        payload = {
            "prompt": "Once upon a time",
            "generate_kwargs": {
                "max_new_tokens": NEW_TOKENS,
                "min_new_tokens": NEW_TOKENS,
                "do_sample": False,
            },
        }
        try:
            self.statuses.append(client.post(self.url + "/chat", json=payload).status_code)
        except httpx.HTTPError as exc:
            self.statuses.append(repr(exc))

    def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.n)
        with httpx.Client(timeout=600, limits=limits) as client:
            workers = [threading.Thread(target=self._one, args=(client,)) for _ in range(self.n)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

    def __enter__(self) -> "Burst":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=900)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


def wait_for(check: Any, what: str, timeout: float = WAIT_S) -> Any:
    """Polls `check()` until it returns something truthy; fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {timeout:.0f}s (last: {last!r})")


def test_queue_metrics_move_under_overload(scaling_server: str) -> None:
    text = httpx.get(scaling_server + "/metrics", timeout=30).text
    for name in ROUTING_METRICS:
        assert f"\n{name}{{" in text or f"\n{name} " in text, f"{name} missing from /metrics"
    assert metric(scaling_server, "vllm:num_requests_waiting") == 0

    n = 3 * MAX_NUM_SEQS
    gauges = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")
    samples: list[dict[str, float]] = []
    with Burst(scaling_server, n) as burst:
        while not burst.done:
            samples.append(snapshot(scaling_server, gauges))
            time.sleep(0.05)
    peak = {name: max((s[name] for s in samples), default=0.0) for name in gauges}
    assert burst.statuses == [200] * n, burst.statuses
    assert peak["vllm:num_requests_waiting"] > 0, (
        f"vllm:num_requests_waiting never rose above 0 past max_num_seqs; "
        f"{len(samples)} samples, peaks {peak}"
    )
    # Never more running than the engine batches: the rest waited.
    assert peak["vllm:num_requests_running"] == MAX_NUM_SEQS, peak
    assert peak["vllm:kv_cache_usage_perc"] > 0, f"KV cache usage stayed 0 while running: {peak}"
    wait_for(
        lambda: (
            metric(scaling_server, "vllm:num_requests_waiting") == 0
            and metric(scaling_server, "vllm:num_requests_running") == 0
        ),
        "the queue back at 0 after the burst",
    )
    assert metric(scaling_server, "kaito_hf_queue_depth") == 0


def test_scaledobject_query_crosses_threshold_in_real_prometheus(
    prometheus: tuple[str, Path], scaling_server: str, scaled_object: dict[str, Any]
) -> None:
    base, log = prometheus
    (trigger,) = scaled_object["spec"]["triggers"]
    promql = trigger["metadata"]["query"]
    threshold = float(trigger["metadata"]["threshold"])

    def value() -> float | None:
        try:
            result = query(base, promql)
        except httpx.HTTPError:  # Prometheus still starting
            return None
        if not result:
            return None
        (sample,) = result  # sum() without `by`: one series
        return float(sample["value"][1])

    def scraped() -> bool:
        try:
            return bool(query(base, f'up{{job="{JOB}"}} == 1'))
        except httpx.HTTPError:
            return False

    wait_for(scraped, f"Prometheus scraping {scaling_server}; its log:\n{log.read_text()[-2000:]}")
    # Idle: the query reads 0 (both series exist at 0), not "no data".
    assert wait_for(lambda: value() is not None, "the query's first value") is True
    assert value() == 0, promql

    # Enough requests that more than `threshold` wait behind the MAX_NUM_SEQS running.
    n = int(threshold) + MAX_NUM_SEQS + 6
    peak = 0.0
    with Burst(scaling_server, n) as burst:
        while not burst.done:
            peak = max(peak, value() or 0.0)
            time.sleep(0.2)
    assert peak > threshold, (
        f"{promql} peaked at {peak} during a burst of {n} (max_num_seqs {MAX_NUM_SEQS}); "
        f"the ScaledObject's threshold is {threshold}"
    )
    assert burst.statuses == [200] * n, burst.statuses
    # After the burst: back to 0 once Prometheus scrapes again, so the pool scales down.
    wait_for(lambda: value() == 0, f"{promql} back at 0 after the burst")
