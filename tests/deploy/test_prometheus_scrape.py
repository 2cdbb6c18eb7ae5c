"""A real Prometheus scrapes the running server the way the manifests tell it to, and
finds the server's request counter for a real POST /chat and vLLM's engine metrics.

The scrape job is Prometheus' usual `kubernetes-pods` job (its example
prometheus-kubernetes.yml): the relabel rules keep a pod whose prometheus.io/scrape
annotation is "true" and take the metrics path and port from prometheus.io/path and
prometheus.io/port. No cluster here, so the pod is a static target carrying the
`__meta_kubernetes_pod_*` labels Kubernetes service discovery would give it, with the
values of the rendered manifest. Two departures from the pod, both in `scrape_config`:
the server under test listens on a random loopback port, not the annotation's 5000 (one
relabel rule at the end maps that address), and the job scrapes every second.

Needs Debian's `prometheus` binary (`apt-get install -y prometheus`); it listens on
loopback only, keeps its data in a temporary directory and is killed at the end.
"""

import contextlib
import re
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

JOB = "kubernetes-pods"
SCRAPE_INTERVAL = "1s"
WAIT_S = 60
# Where the pod serves (its container port and its annotation) and where the test
# server does: loopback, as the fixture started it.
POD_IP = "127.0.0.1"

# Prometheus' kubernetes-pods job, as its example configuration has it.
KUBERNETES_PODS_RELABEL = [
    {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
        "action": "keep",
        "regex": "true",
    },
    {
        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
        "action": "replace",
        "target_label": "__metrics_path__",
        "regex": "(.+)",
    },
    {
        "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
        "action": "replace",
        "regex": r"([^:]+)(?::\d+)?;(\d+)",
        "replacement": "$1:$2",
        "target_label": "__address__",
    },
    {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"},
    {
        "source_labels": ["__meta_kubernetes_namespace"],
        "action": "replace",
        "target_label": "kubernetes_namespace",
    },
    {
        "source_labels": ["__meta_kubernetes_pod_name"],
        "action": "replace",
        "target_label": "kubernetes_pod_name",
    },
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sanitize(name: str) -> str:
    """A Kubernetes label or annotation name as service discovery writes it into a
    Prometheus label name: every character outside [a-zA-Z0-9_] becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def pod_target(r: Rendered) -> dict[str, Any]:
    """The target Kubernetes service discovery would make of one of this Deployment's
    pods: its IP and container port, and its labels and annotations as meta labels."""
    template = r.deployment["spec"]["template"]
    (port,) = r.container["ports"]
    labels = {
        "__meta_kubernetes_namespace": "default",
        "__meta_kubernetes_pod_name": f"{r.deployment['metadata']['name']}-0",
        "__meta_kubernetes_pod_container_name": r.container["name"],
        "__meta_kubernetes_pod_container_port_name": port["name"],
        "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
    }
    for key, value in template["metadata"].get("annotations", {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{sanitize(key)}"] = value
        labels[f"__meta_kubernetes_pod_annotationpresent_{sanitize(key)}"] = "true"
    for key, value in template["metadata"].get("labels", {}).items():
        labels[f"__meta_kubernetes_pod_label_{sanitize(key)}"] = value
    return {"targets": [f"{POD_IP}:{port['containerPort']}"], "labels": labels}


def scrape_config(r: Rendered, server_port: int) -> dict[str, Any]:
    """The kubernetes-pods job over this manifest's pod, every second."""
    (port,) = r.container["ports"]
    serving = f"{POD_IP}:{port['containerPort']}"
    # The one change for the test: the pod serves on its container port; the test
    # server is on a random one. Only that exact address is mapped, so an annotation
    # naming another port than the container's fails to scrape.
    to_test_server = {
        "source_labels": ["__address__"],
        "action": "replace",
        "regex": re.escape(serving),
        "replacement": f"{POD_IP}:{server_port}",
        "target_label": "__address__",
    }
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": JOB,
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "static_configs": [pod_target(r)],
                "relabel_configs": [*KUBERNETES_PODS_RELABEL, to_test_server],
            }
        ],
    }


@pytest.fixture
def cpu_render(renders: list[Rendered]) -> Rendered:
    """The overlay the test server stands for (the CPU image's default model); every
    overlay has the same annotations (test_deploy_manifests checks)."""
    return next(r for r in renders if r.name == "cpu" and not r.components)


@contextlib.contextmanager
def run_prometheus(config: dict[str, Any], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real Prometheus with this configuration, on loopback, its data in tmp_path;
    yields its base URL and log file, and kills it at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the `prometheus` binary is not installed: this test runs a real Prometheus "
            "against the server (Debian: `apt-get install -y prometheus`)"
        )
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as log_file:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
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


@pytest.fixture
def prometheus(cpu_render: Rendered, server_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus scraping the server; yields its base URL and log file."""
    server = urlsplit(server_url)
    assert server.hostname == POD_IP and server.port, "loopback only"
    with run_prometheus(scrape_config(cpu_render, server.port), tmp_path) as running:
        yield running


def query(base: str, promql: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_engine_and_server_metrics(
    prometheus: tuple[str, Path], server_url: str, cpu_render: Rendered
) -> None:
    base, log = prometheus
    # One real generation: it counts in our request counter and in vLLM's token counters.
    reply = httpx.post(
        server_url + "/chat",
        json={"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 4, "do_sample": False}},
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    wanted = {
        "up": f'up{{job="{JOB}"}} == 1',
        "chat requests": (
            f'kaito_requests_total{{job="{JOB}",route="/chat",method="POST",status="200"}} > 0'
        ),
        "generated tokens": f'vllm:generation_tokens_total{{job="{JOB}"}} > 0',
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
    # The relabelling really ran: the pod's labels reached the series, and the metrics
    # path is the annotation's.
    (sample,) = found["chat requests"]
    pod_labels = cpu_render.deployment["spec"]["template"]["metadata"]["labels"]
    for key, value in pod_labels.items():
        assert sample["metric"][sanitize(key)] == value, sample["metric"]
    (target,) = httpx.get(f"{base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    annotations = cpu_render.deployment["spec"]["template"]["metadata"]["annotations"]
    assert urlsplit(target["scrapeUrl"]).path == annotations["prometheus.io/path"], target
