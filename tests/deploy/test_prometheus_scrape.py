"""A real Prometheus scrapes the running server the way the manifests tell it to (the
pod's prometheus.io/* annotations; the ServiceMonitor says the same) and finds vLLM's
engine metrics and the server's request counter.

Needs Debian's `prometheus` binary (`apt-get install -y prometheus`); it listens on
loopback only, keeps its data in a temporary directory and is killed at the end.
"""

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from tests.deploy.deploy_support import Rendered

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL = "1s"
WAIT_S = 60
ENGINE_METRIC = "vllm:num_requests_running"
SERVER_METRIC = "kaito_requests_total"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_config(renders: list[Rendered], target: str) -> dict[str, Any]:
    """The scrape job the manifests ask for, aimed at `target` (host:port) instead of
    the pod: their metrics path and scheme, every second instead of every 15."""
    paths = set()
    for r in renders:
        annotations = r.deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", r.id
        paths.add(annotations.get("prometheus.io/path", "/metrics"))
        for monitor in r.of_kind("ServiceMonitor"):
            paths |= {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]}
    (path,) = paths  # every overlay and the ServiceMonitor agree
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "kaito-chat",
                "scheme": "http",
                "metrics_path": path,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


@pytest.fixture
def prometheus(
    renders: list[Rendered], server_url: str, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    """A Prometheus scraping the server; yields its base URL and log file."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` binary is not installed: this test runs a real Prometheus "
            "against the server (Debian: `apt-get install -y prometheus`)"
        )
    server = urlsplit(server_url)
    assert server.hostname in {"127.0.0.1", "localhost", "::1"}, "loopback only"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(renders, server.netloc)))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, promql: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_engine_and_server_metrics(
    prometheus: tuple[str, Path], server_url: str
) -> None:
    base, log = prometheus
    # The request counter has labels: it has a sample once the server has answered.
    httpx.get(server_url + "/", timeout=10).raise_for_status()
    wanted = {
        "up": 'up{job="kaito-chat"} == 1',
        ENGINE_METRIC: ENGINE_METRIC,
        SERVER_METRIC: SERVER_METRIC,
    }
    found: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + WAIT_S
    last_error = ""
    while time.monotonic() < deadline and len(found) < len(wanted):
        try:
            for name, promql in wanted.items():
                if name not in found and (result := query(base, promql)):
                    found[name] = result
        except httpx.HTTPError as exc:  # still starting
            last_error = repr(exc)
        time.sleep(0.5)
    missing = sorted(set(wanted) - set(found))
    assert not missing, (
        f"Prometheus did not get {missing} from {server_url} within {WAIT_S}s "
        f"(last error: {last_error or 'none'}); its log:\n{log.read_text()[-3000:]}"
    )
    assert all(s["metric"]["job"] == "kaito-chat" for s in found[SERVER_METRIC])
