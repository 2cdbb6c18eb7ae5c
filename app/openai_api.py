"""OpenAI-compatible routes on the same engine as /chat.

The work is vLLM's own OpenAI serving layer on our AsyncLLM (engines/vllm_openai.py);
these routes only apply the server's rules, the same as /chat's: the API key, admission
(429), the request timeout (504), disconnect cancellation, request ids and metrics (the
middlewares). Every error here, ours included, has OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` so that OpenAI clients read it.

The body is read as JSON and validated by vLLM's own request models in the backend
(so vLLM's types stay out of the HTTP layer); /docs therefore shows no request schema for
these routes: OpenAI's API reference is theirs.
"""

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.adapters import NO_ADAPTERS
from app.auth import require_api_key
from app.errors import HTTPError
from app.metrics import BACKEND_REQUESTS
from app.routes import run_generation
from app.streaming import describe, open_stream, sse

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])


def openai_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    kind = {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        413: "BadRequestError",
        429: "RateLimitError",
        501: "NotImplementedError",
        503: "ServiceUnavailableError",
        504: "TimeoutError",
    }
    return {
        "error": {
            "message": message,
            "type": kind.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def _error_response(exc: Exception) -> JSONResponse:
    """Our errors (HTTPError, ParameterError, a dead engine, ...) in OpenAI's shape."""
    status, message, parameter = describe(exc)
    if status == 500:
        log.error("unhandled error on an OpenAI route", exc_info=exc)
    headers = exc.headers if isinstance(exc, HTTPError) else None
    return JSONResponse(
        openai_error(status, message, parameter), status_code=status, headers=headers
    )


def _stream_error_event(status: int, message: str, parameter: str | None) -> str:
    # vLLM's streams report a mid-stream error as a data event holding the error body.
    return sse(openai_error(status, message, parameter))


async def _server(request: Request) -> Any:
    """The engine's OpenAI layer; 503 while loading, 501 on a server without vLLM."""
    engine = request.app.state.engine
    if not engine.is_ready():
        raise HTTPError(503, "The model is not ready yet (loading) or the engine is down.")
    factory = getattr(engine, "openai_server", None)
    server = await factory() if factory is not None else None
    if server is None:
        raise HTTPError(
            501,
            "The OpenAI-compatible API needs the vLLM backend; this server runs transformers only.",
        )
    return server


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPError(400, f"The request body must be a JSON object: {exc}") from exc
    if not isinstance(body, dict):
        raise HTTPError(400, f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def _adapter_label(request: Request, body: dict[str, Any]) -> str:
    """The metrics label of the LoRA adapter a /v1 request used ("" for the base)."""
    adapters = getattr(request.app.state.engine, "adapters", NO_ADAPTERS)
    model = body.get("model")
    return model if isinstance(model, str) and model in adapters.paths() else ""


def _reply(result: Any) -> Response:
    status, content = result
    return JSONResponse(content, status_code=status)


async def _generate(
    request: Request, handler: Callable[[Any, dict[str, Any], Request], Coroutine[Any, Any, Any]]
) -> Response:
    try:
        await require_api_key(request)
        body = await _body(request)
        server = await _server(request)
        if body.get("stream"):

            async def start() -> Any:
                return await handler(server, body, request)

            result = await open_stream(request, start, _stream_error_event)
            reply = result if isinstance(result, Response) else _reply(result)
        else:
            result = await run_generation(request, handler(server, body, request))
            if result is None:
                return Response(status_code=499)  # the client is gone
            reply = _reply(result)
        if reply.status_code == 200:
            # /v1 runs on the vLLM engine only; ``model`` names the adapter, as in vLLM.
            BACKEND_REQUESTS.labels("vllm", _adapter_label(request, body)).inc()
        return reply
    except Exception as exc:
        return _error_response(exc)


@router.post("/completions", summary="OpenAI completions (vLLM's serving layer), with stream")
async def completions(request: Request) -> Response:
    return await _generate(request, lambda s, body, raw: s.completions(body, raw))


@router.post(
    "/chat/completions", summary="OpenAI chat completions (vLLM's serving layer), with stream"
)
async def chat_completions(request: Request) -> Response:
    return await _generate(request, lambda s, body, raw: s.chat_completions(body, raw))


@router.get("/models", summary="The served model, OpenAI's way")
async def models(request: Request) -> Response:
    try:
        await require_api_key(request)
        return JSONResponse(await (await _server(request)).models())
    except Exception as exc:
        return _error_response(exc)
