"""The server's own Prometheus metrics, beside vLLM's in the same (default) registry.

vLLM's engine metrics (``vllm:*``) register in this process's default registry when
AsyncLLM runs embedded with stats on, so one ``/metrics`` serves both.
"""

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "kaito_requests",
    "HTTP requests by route, method and status code.",
    ["route", "method", "status"],
)
REQUEST_LATENCY = Histogram(
    "kaito_request_duration_seconds",
    "HTTP request latency by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
)
# adapter: the LoRA adapter's name (app/adapters.py), empty for the base model; Prometheus
# drops an empty label, so base-model series read as they did before adapters existed.
BACKEND_REQUESTS = Counter(
    "kaito_backend_requests",
    "Generation requests by the path that served them and the LoRA adapter they used.",
    ["backend", "adapter"],
)
# The transformers backend runs one batch at a time (beam requests with equal settings
# batch together), started first come, first served.
HF_QUEUE_DEPTH = Gauge(
    "kaito_hf_queue_depth", "Requests waiting for the transformers backend (not yet running)."
)
# What /health says, as a number: alerts and dashboards see "up but not ready" (loading,
# engine dead, draining), which `up` alone cannot. Set when /metrics is scraped.
READY = Gauge(
    "kaito_ready", "1 when the server is ready (engine loaded and alive, not draining), else 0."
)
HF_RUNNING = Gauge(
    "kaito_hf_running", "Requests the transformers backend is generating now (the running batch)."
)


class MetricsMiddleware:
    """Counts every response by route and status; a plain ASGI middleware (cheap)."""

    def __init__(self, app: ASGIApp, known_routes: frozenset[str]) -> None:
        self.app = app
        # Only known paths become labels, so a scanner cannot blow up cardinality.
        self.known_routes = known_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.known_routes else "other"
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            REQUESTS.labels(route, scope["method"], str(status)).inc()
            REQUEST_LATENCY.labels(route).observe(time.perf_counter() - start)
