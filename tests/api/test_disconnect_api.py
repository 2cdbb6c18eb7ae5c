"""A client that goes away before its reply starts (queued, in prefill): the engine
request is aborted and the admission slot freed at once, not when the engine answers.

TestClient and httpx's ASGITransport only report a disconnect after the response is
complete, so these drive the ASGI app directly with a client that drops mid-request.
"""

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import pytest

from app.engines.base import GenerationRequest, SequenceDelta
from app.server import create_app
from app.settings import Settings
from tests.api.conftest import FakeEngine


class StallingEngine(FakeEngine):
    """Its first output never comes (the request waits in the queue or in prefill)."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.closed: list[str] = []

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[SequenceDelta, None]:
        self.requests.append(request)
        try:
            await asyncio.Event().wait()
            yield SequenceDelta(0, [0], "length")
        finally:
            self.closed.append(request.request_id)


class StallingOpenAIServer:
    def __init__(self) -> None:
        self.started = 0
        self.closed = 0

    async def completions(self, body: dict[str, Any], raw: Any) -> Any:
        return self._stream()

    async def _stream(self) -> AsyncIterator[str]:
        self.started += 1
        try:
            await asyncio.Event().wait()
            yield "data: [DONE]\n\n"
        finally:
            self.closed += 1


class StallingOpenAIEngine(StallingEngine):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.openai = StallingOpenAIServer()

    async def openai_server(self) -> StallingOpenAIServer:
        return self.openai


async def post_then_drop(
    app: Any, path: str, payload: dict[str, Any], started: Callable[[], bool]
) -> list[dict[str, Any]]:
    """POSTs ``payload``, drops the connection once ``started()``, and returns what the
    app sent; fails if the app has not finished within 2 s of the drop."""
    body = json.dumps(payload).encode()
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    for _ in range(200):
        if started():
            break
        await asyncio.sleep(0.01)
    assert started(), "the request never reached the engine"
    await asyncio.sleep(0.05)  # well inside the wait for the first output
    gone.set()
    try:
        await asyncio.wait_for(task, 2)
    except TimeoutError:
        pytest.fail("the app was still waiting on the engine 2 s after the client left")
    return sent


@pytest.fixture
def stalling(tokenizer) -> StallingOpenAIEngine:
    return StallingOpenAIEngine(tokenizer)


async def test_chat_stream_dropped_before_the_first_event_is_aborted(stalling):
    app = create_app(Settings(), engine=stalling)
    payload = {"prompt": "Hi", "stream": True}
    sent = await post_then_drop(app, "/chat", payload, lambda: bool(stalling.requests))
    assert stalling.closed == [stalling.last.request_id]
    assert app.state.admission.in_flight == 0
    assert sent[0]["status"] == 499


async def test_v1_stream_dropped_before_the_first_event_is_aborted(stalling):
    app = create_app(Settings(), engine=stalling)
    payload = {"model": "m", "prompt": "Hi", "stream": True}
    openai = stalling.openai
    sent = await post_then_drop(app, "/v1/completions", payload, lambda: openai.started > 0)
    assert openai.closed == 1
    assert app.state.admission.in_flight == 0
    assert sent[0]["status"] == 499


async def test_plain_chat_dropped_while_generating_is_aborted(stalling):
    stalling.delay = 30
    app = create_app(Settings(), engine=stalling)
    sent = await post_then_drop(app, "/chat", {"prompt": "Hi"}, lambda: bool(stalling.requests))
    assert stalling.aborted == [stalling.last.request_id]
    assert app.state.admission.in_flight == 0
    assert sent[0]["status"] == 499
