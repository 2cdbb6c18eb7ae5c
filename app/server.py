"""The app factory. Nothing happens at import time: ``create_app`` builds the app, and
its lifespan starts and stops the engine."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.engines.base import Engine
from app.errors import register_error_handlers
from app.metrics import MetricsMiddleware
from app.routes import router
from app.serving import ChatService
from app.settings import Settings

log = logging.getLogger(__name__)


def build_engine(settings: Settings) -> Engine:
    from app.engines.vllm_engine import VLLMEngine

    return VLLMEngine(settings)


def create_app(
    settings: Settings,
    engine: Engine | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """``on_fatal`` is called when the engine cannot start; the CLI uses it to exit non-zero."""
    engine = engine or build_engine(settings)

    async def start_engine() -> None:
        try:
            await engine.start()
            log.info("engine ready")
        except Exception as exc:
            log.exception("engine failed to start")
            if on_fatal is not None:
                on_fatal(f"engine failed to start: {exc}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine loads in the background so /livez and /health (503) answer while a
        # large model loads.
        starting = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await engine.stop()

    app = FastAPI(
        title="Kaito chat on vLLM",
        description="Kaito's transformers-style POST /chat API served by a continuous-batching vLLM engine.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.chat_service = ChatService(engine)
    register_error_handlers(app)
    app.include_router(router)
    known = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(MetricsMiddleware, known_routes=known)
    return app
