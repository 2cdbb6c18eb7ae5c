"""HTTP routes. Thin: read the engine from app.state, call the service, shape the reply."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app import tracing
from app.admission import Admission
from app.auth import require_api_key
from app.errors import HTTPError
from app.metrics import READY
from app.schemas import ChatRequest, ChatResponse, ErrorResponse
from app.serving import ChatService, new_request_id
from app.streaming import DisconnectWatch, chat_error_event, chat_sse, open_stream

T = TypeVar("T")

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid parameter value; names the parameter."},
    401: {"model": ErrorResponse, "description": "API key required (when KAITO_API_KEY is set)."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    429: {"model": ErrorResponse, "description": "Too many requests in flight; see Retry-After."},
    503: {
        "model": ErrorResponse,
        "description": "The engine is loading, down, or the server is draining.",
    },
    504: {"model": ErrorResponse, "description": "Generation exceeded the request timeout."},
}


async def run_generation(request: Request, work: Coroutine[Any, Any, T]) -> T | None:
    """Runs one generation under the server's rules; every generation route uses it.

    - admission: past the in-flight bound, 429 at once (503 while draining);
    - timeout: past request_timeout_seconds, the work is cancelled and the reply is 504;
    - disconnect: if the client goes away first, the work is cancelled and None returned.
    Cancelling the engine call aborts the request inside vLLM (AsyncLLM.generate aborts
    on CancelledError), which frees its batch slot and KV cache at once.
    """
    settings = request.app.state.settings
    admission: Admission = request.app.state.admission
    timeout = settings.request_timeout_seconds or None
    try:
        async with contextlib.AsyncExitStack() as admitted:
            # A span of its own: a 429 shows in the trace as a failed admission.
            with tracing.span("admission"):
                await admitted.enter_async_context(admission.admit())
            # The work runs in this task, not a task of its own (a task and two switches
            # less per request: bench/NOTES.md, change 5); the watch cancels this task
            # if the client goes away.
            watch = DisconnectWatch(request)
            try:
                async with watch, asyncio.timeout(timeout):
                    return await work
            except asyncio.CancelledError:
                if not watch.client_gone:
                    raise  # the server is stopping: not ours to swallow
                return None
            except TimeoutError:
                raise HTTPError(
                    504, f"Generation took longer than {timeout:g} s and was aborted."
                ) from None
    finally:
        # If admission refused, the coroutine never ran: close it quietly.
        work.close()


@router.get("/", summary="Liveness message (Kaito's)")
async def home() -> dict[str, str]:
    return {"message": "Server is running"}


@router.get("/health", summary="Ready: 200 only when the engine is loaded and alive")
@router.get("/healthz", include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    # Draining counts as not ready, so Kubernetes stops sending traffic here.
    if request.app.state.engine.is_ready() and not request.app.state.admission.draining:
        return JSONResponse({"status": "Healthy"})
    return JSONResponse({"status": "Unhealthy"}, status_code=503)


@router.get("/livez", summary="Process alive: 200 whenever the server answers HTTP")
async def livez() -> dict[str, str]:
    # Not tied to the engine: a busy or loading engine must not get the pod restarted.
    return {"status": "alive"}


@router.get("/metrics", summary="Prometheus metrics: vLLM's engine metrics and the server's")
async def metrics(request: Request) -> Response:
    state = request.app.state
    READY.set(1 if state.engine.is_ready() and not state.admission.draining else 0)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses=ERROR_RESPONSES,
    summary="Kaito text generation: transformers pipeline semantics on vLLM",
    dependencies=[Depends(require_api_key)],
)
async def chat(body: ChatRequest, request: Request) -> ChatResponse | Response:
    service: ChatService = request.app.state.chat_service
    if body.stream:
        # Server-sent events, under the same admission, timeout and disconnect rules.
        request_id = new_request_id()

        async def start() -> AsyncIterator[str]:
            return chat_sse(service.stream(body, request_id))

        return await open_stream(request, start, chat_error_event)  # type: ignore[no-any-return]
    reply = await run_generation(request, service.chat(body, new_request_id()))
    if reply is None:
        # The client is gone; nobody reads this (499 is nginx's "client closed request").
        return Response(status_code=499)
    return reply
