"""The app factory. Nothing happens at import time: ``create_app`` builds the app, and
its lifespan starts and stops the engine."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import tracing
from app.admission import Admission
from app.chat_template import load_chat_template
from app.engines.base import Engine
from app.errors import register_error_handlers
from app.metrics import MetricsMiddleware
from app.middleware import BodySizeLimitMiddleware, RequestIdMiddleware
from app.openai_api import router as openai_router
from app.routes import router
from app.serving import ChatService
from app.settings import Settings
from app.tracing import TracingMiddleware
from param_mapping.limits import Limits

log = logging.getLogger(__name__)

# How often the watchdog looks at the engine: /health must turn 503 within 5 s of a death.
WATCHDOG_INTERVAL_S = 0.5


def build_engine(settings: Settings) -> Engine:
    # vLLM, transformers, or both, per KAITO_BACKEND and each request's plan.
    from app.engines.dispatch import DispatchEngine

    return DispatchEngine(settings)


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """``on_fatal`` is called when the engine fails to start or dies; the CLI then exits
    non-zero so that Kubernetes restarts the pod."""
    # Before the engine: vLLM's spans then use our tracer provider (app/tracing.py).
    tracing.configure(settings.otlp_traces_endpoint, settings.otlp_traces_protocol)
    engine = engine or build_engine(settings)
    admission = Admission(settings.max_concurrent_requests)

    def fatal(reason: str) -> None:
        log.error("fatal: %s", reason)
        if on_fatal is not None:
            on_fatal(reason)

    async def start_then_watch() -> None:
        try:
            await engine.start()
        except Exception as exc:
            log.exception("engine failed to start")
            fatal(f"engine failed to start: {exc}")
            return
        log.info("engine ready")
        while engine.is_ready():
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
        fatal("the engine died")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine loads in the background so /livez and /health (503) answer while a
        # large model loads.
        supervisor = asyncio.create_task(start_then_watch())
        try:
            yield
        finally:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
            await engine.stop()
            tracing.shutdown()

    app = FastAPI(
        title="Kaito chat on vLLM",
        description=(
            "Kaito's transformers-style POST /chat API served by a continuous-batching vLLM engine."
        ),
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.admission = admission
    app.state.chat_service = ChatService(
        engine,
        Limits(max_num_return_sequences=settings.max_num_return_sequences),
        max_num_beams=settings.max_num_beams,
        chat_template=load_chat_template(settings.chat_template),
        base_model_name=settings.model_name,
    )
    register_error_handlers(app)
    app.include_router(router)
    app.include_router(openai_router)
    known = frozenset(getattr(r, "path", "") for r in app.routes)
    # Added last = outermost: request ids cover everything, including 413s.
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, known_routes=known)
    if tracing.enabled():
        # Inside RequestIdMiddleware: the span gets the request id.
        app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
