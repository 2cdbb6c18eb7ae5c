"""OpenTelemetry traces of generation requests; off, and free, unless an OTLP endpoint is set.

The only module that imports OpenTelemetry, and only when ``KAITO_OTLP_TRACES_ENDPOINT``
is set, so the server runs without the packages while tracing is off. Off, ``span`` hands
back one shared no-op context and ``trace_headers`` returns None: a few attribute reads
per request.

On, each generation request (/chat, /v1/...) gets a SERVER span that continues the
caller's W3C ``traceparent``, with a child span per stage. The engine gets the current
context as ``traceparent`` headers (AsyncLLM.generate's ``trace_headers``; vLLM's OpenAI
layer reads the request's own header, which the middleware rewrites to our span), so
vLLM's ``llm_request`` span lands in the same trace under ours. vLLM creates that span in
this process with the global tracer provider, which is ours: one exporter for both.

Only ids, routes, statuses and token counts are recorded: never prompts or outputs.
"""

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import request_id_var

log = logging.getLogger(__name__)

SERVICE_NAME = "kaito-chat"
TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"

# One shared no-op context: nullcontext is reusable and costs no allocation per use.
_NOOP: AbstractContextManager[Any] = nullcontext()


class _Tracing:
    """The live OpenTelemetry objects, once configured."""

    def __init__(self, endpoint: str, protocol: str) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        exporter: Any
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # vLLM's exporter is insecure for grpc too; TLS belongs to the collector's sidecar
            # or an https:// endpoint.
            exporter = OTLPSpanExporter(
                endpoint=endpoint, insecure=urlsplit(endpoint).scheme != "https"
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )

            exporter = HttpExporter(endpoint=endpoint)
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still apply (Resource.create reads
        # them); the service is named only when the operator did not.
        attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
        # The sampler follows OTEL_TRACES_SAMPLER (default: parent-based, always on).
        self.provider = TracerProvider(resource=Resource.create(attributes))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        # Global, so vLLM's spans (trace.get_tracer in this process) use it too; vLLM's own
        # attempt to install a provider is then refused with a warning, and harmless.
        trace.set_tracer_provider(self.provider)
        self.tracer = self.provider.get_tracer("app")
        self.propagator = TraceContextTextMapPropagator()
        self.trace = trace
        self.server_kind = trace.SpanKind.SERVER
        self.status = trace.Status
        self.error = trace.StatusCode.ERROR

    @contextmanager
    def span(
        self, name: str, attributes: dict[str, Any] | None = None, **kwargs: Any
    ) -> Iterator[Any]:
        """A current span whose failure records the exception's type only: the SDK's
        default records its message, and a message may quote the request."""
        with self.tracer.start_as_current_span(
            name,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
            **kwargs,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(self.status(self.error, type(exc).__name__))
                raise


_state: _Tracing | None = None


def check_endpoint(endpoint: str) -> str:
    """The endpoint if it is an http(s) URL with a host; ValueError otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(
            "otlp_traces_endpoint must be an http:// or https:// URL with a host "
            f"(grpc: http://collector:4317), got {endpoint!r}"
        )
    return endpoint


def configure(endpoint: str | None, protocol: str) -> None:
    """Turns tracing on when ``endpoint`` is set. Raises RuntimeError naming the setting
    when OpenTelemetry is missing."""
    global _state
    if not endpoint or _state is not None:
        return
    try:
        _state = _Tracing(endpoint, protocol)
    except ImportError as exc:
        raise RuntimeError(
            f"KAITO_OTLP_TRACES_ENDPOINT is set but OpenTelemetry is not installed ({exc}); "
            "install opentelemetry-sdk and opentelemetry-exporter-otlp (vLLM brings them)"
        ) from exc
    log.info("tracing on: OTLP %s to %s", protocol, endpoint)


def enabled() -> bool:
    return _state is not None


def shutdown() -> None:
    """Flushes the spans still queued (the exporter batches them)."""
    if _state is not None:
        _state.provider.force_flush()


def span(name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one for one stage of a request; a no-op when off."""
    if _state is None:
        return _NOOP
    return _state.span(name, attributes)


def set_attributes(attributes: dict[str, Any]) -> None:
    """Adds attributes to the current span (when on)."""
    if _state is not None:
        _state.trace.get_current_span().set_attributes(attributes)


def trace_headers() -> dict[str, str] | None:
    """The current span's context as W3C headers, for the engine; None when off."""
    if _state is None:
        return None
    carrier: dict[str, str] = {}
    _state.propagator.inject(carrier)
    return carrier or None


# Generation routes only: probes, scrapes and /v1/models would drown the traces.
TRACED_PATHS = frozenset({"/chat", "/v1/completions", "/v1/chat/completions"})


def is_traced(path: str) -> bool:
    return path in TRACED_PATHS


class TracingMiddleware:
    """A SERVER span per generation request, continuing the caller's traceparent.

    Added only when tracing is on. It also rewrites the request's ``traceparent`` to this
    span, because vLLM's OpenAI layer hands the request's own header to the engine: the
    engine's span then hangs under ours, not beside it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _state is None or not is_traced(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = _state
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope["headers"]
            if k in (TRACEPARENT, TRACESTATE)
        }
        parent = state.propagator.extract(carrier)
        method, path = scope["method"], scope["path"]
        with state.span(
            f"{method} {path}",
            context=parent,
            kind=state.server_kind,
            attributes={
                "http.request.method": method,
                "http.route": path,
                "url.path": path,
                # X-Request-Id (RequestIdMiddleware runs first): the id in our logs.
                "request.id": request_id_var.get(),
            },
        ) as server_span:
            injected: dict[str, str] = {}
            state.propagator.inject(injected)
            headers = [h for h in scope["headers"] if h[0] not in (TRACEPARENT, TRACESTATE)]
            headers += [(k.encode(), v.encode()) for k, v in injected.items()]
            scope = {**scope, "headers": headers}

            async def send_with_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    server_span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        server_span.set_status(state.status(state.error, str(status)))
                await send(message)

            await self.app(scope, receive, send_with_status)
