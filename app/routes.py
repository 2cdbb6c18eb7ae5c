"""HTTP routes. Thin: read the engine from app.state, call the service, shape the reply."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from app.schemas import ChatRequest, ChatResponse, ErrorResponse
from app.serving import ChatService, new_request_id

T = TypeVar("T")

router = APIRouter()

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid parameter value; names the parameter."},
    503: {"model": ErrorResponse, "description": "The engine is loading or down."},
}


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Runs ``work``; if the client disconnects first, cancels it and returns None.

    Cancelling the engine call aborts the request inside vLLM (AsyncLLM.generate aborts
    on CancelledError), which frees its batch slot and KV cache.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work_task in done:
        return work_task.result()
    work_task.cancel()
    await asyncio.gather(work_task, return_exceptions=True)
    return None


@router.get("/", summary="Liveness message (Kaito's)")
async def home() -> dict[str, str]:
    return {"message": "Server is running"}


@router.get("/health", summary="Ready: 200 only when the engine is loaded and alive")
@router.get("/healthz", include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    if request.app.state.engine.is_ready():
        return JSONResponse({"status": "Healthy"})
    return JSONResponse({"status": "Unhealthy"}, status_code=503)


@router.get("/livez", summary="Process alive: 200 whenever the server answers HTTP")
async def livez() -> dict[str, str]:
    # Not tied to the engine: a busy or loading engine must not get the pod restarted.
    return {"status": "alive"}


@router.get("/metrics", summary="Prometheus metrics: vLLM's engine metrics and the server's")
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/chat",
    response_model=ChatResponse,
    responses=ERROR_RESPONSES,
    summary="Kaito text generation: transformers pipeline semantics on vLLM",
)
async def chat(body: ChatRequest, request: Request) -> ChatResponse | Response:
    service: ChatService = request.app.state.chat_service
    reply = await cancel_on_disconnect(request, service.chat(body, new_request_id()))
    if reply is None:
        # The client is gone; nobody reads this (499 is nginx's "client closed request").
        return Response(status_code=499)
    return reply
