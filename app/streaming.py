"""Server-sent events under the server's rules.

``open_stream`` is the streaming twin of routes.run_generation, used by /chat and the
OpenAI routes alike:

- admission: the slot is taken before anything is sent (429 / 503 as a JSON reply) and
  held until the stream ends, however it ends;
- errors found before the first event (bad parameters, a dead engine) are normal 4xx /
  503 JSON replies: the first event is produced before the response starts;
- timeout: past request_timeout_seconds from admission the engine request is aborted and
  the stream ends with an error event;
- disconnect: while the first event is awaited (queued, prefill), a watcher cancels
  the wait when the client goes away; once the stream runs, Starlette cancels the
  response. Either way the event iterator is closed, which aborts the engine request
  (AsyncLLM aborts on GeneratorExit / CancelledError) and frees its batch slot, and
  the admission slot is released.
"""

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from app import tracing
from app.admission import Admission
from app.errors import HTTPError

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
# Proxies (nginx) buffer responses unless told not to; events must flow as they come.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# An exception met mid-stream -> the text of the error event that ends the stream.
ErrorEvent = Callable[[int, str, str | None], str]


async def until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectWatch:
    """While entered, cancels the task that entered it when the client goes away.

    Starlette only notices a disconnect once the response has started, so a request
    still waiting on the engine (queued, in prefill, or a whole non-streamed
    generation) would otherwise hold its admission slot and engine request until the
    engine answers. ``client_gone`` tells this cancellation from a server shutdown's.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self._watcher: asyncio.Future[None] | None = None
        self.client_gone = False

    async def __aenter__(self) -> "DisconnectWatch":
        task = asyncio.current_task()
        assert task is not None

        async def watch() -> None:
            await until_disconnect(self._request)
            self.client_gone = True
            task.cancel()

        self._watcher = asyncio.ensure_future(watch())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._watcher is not None
        self._watcher.cancel()
        if self.client_gone and exc_info[0] is asyncio.CancelledError:
            # Ours, not the server's: the caller handles it as a disconnect.
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()


def sse(data: Any) -> str:
    """One server-sent event carrying ``data`` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def describe(exc: BaseException) -> tuple[int, str, str | None]:
    """(status, message, parameter) for an exception, as app/errors.py maps them."""
    from app.engines.base import EngineDeadError
    from param_mapping import ParameterError

    if isinstance(exc, HTTPError):
        return exc.status_code, exc.detail, exc.parameter
    if isinstance(exc, ParameterError):
        return 400, exc.message, exc.parameter
    if isinstance(exc, EngineDeadError):
        return 503, f"Engine unavailable: {exc}", None
    return 500, "Internal server error", None


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that, however it ends (done, client gone, error), closes its
    event iterator (aborting the engine request) and then releases the admission slot."""

    def __init__(self, events: AsyncIterator[str], release: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._events = events
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()  # type: ignore[attr-defined]
            finally:
                await self._release()


async def open_stream(
    request: Request,
    start: Callable[[], Awaitable[AsyncIterator[str] | Any]],
    error_event: ErrorEvent,
) -> Any:
    """Admits, calls ``start`` for the event iterator and reads its first event, then
    answers with the stream. ``start`` may return a finished reply instead (a vLLM
    ErrorResponse, say): it is returned as is and the slot released.
    """
    settings = request.app.state.settings
    admission: Admission = request.app.state.admission
    timeout = settings.request_timeout_seconds or None
    stack = AsyncExitStack()
    with tracing.span("admission"):
        await stack.enter_async_context(admission.admit())  # 429 / 503: nothing to release
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    events: AsyncIterator[str] | None = None
    watch = DisconnectWatch(request)
    try:
        # The work runs in this task (no task of its own, as in routes.run_generation);
        # the watch cancels it if the client goes away before the first event.
        async with watch, asyncio.timeout_at(deadline):
            started = await start()
            if not hasattr(started, "__anext__"):
                await stack.aclose()
                return started
            events = started
            first = await anext(events)
    except TimeoutError:
        await _close(events)
        await stack.aclose()
        raise HTTPError(
            504, f"Generation took longer than {timeout:g} s and was aborted."
        ) from None
    except BaseException as exc:
        await _close(events)
        await stack.aclose()
        if isinstance(exc, asyncio.CancelledError) and watch.client_gone:
            # Nobody reads this (499 is nginx's "client closed request").
            return Response(status_code=499)
        raise
    return EventStreamResponse(_relay(first, events, deadline, timeout, error_event), stack.aclose)


async def _close(events: AsyncIterator[str] | None) -> None:
    if events is not None:
        await events.aclose()  # type: ignore[attr-defined]


async def _relay(
    first: str,
    events: AsyncIterator[str],
    deadline: float | None,
    timeout: float | None,
    error_event: ErrorEvent,
) -> AsyncIterator[str]:
    try:
        yield first
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            yield event
    except TimeoutError:
        yield error_event(504, f"Generation took longer than {timeout:g} s and was aborted.", None)
    except Exception as exc:
        status, message, parameter = describe(exc)
        if status == 500:
            log.error("error while streaming", exc_info=exc)
        yield error_event(status, message, parameter)
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def chat_sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """/chat's stream: its events as SSE, then ``data: [DONE]``."""
    try:
        async for event in events:
            yield sse(event)
        yield DONE
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def chat_error_event(status: int, message: str, parameter: str | None) -> str:
    """An error mid-stream on /chat: the JSON error body, as an ``error`` event."""
    body: dict[str, Any] = {"detail": message, "status": status}
    if parameter is not None:
        body["parameter"] = parameter
    return f"event: error\n{sse(body)}"
