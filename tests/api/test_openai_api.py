"""The /v1 routes' own rules on a fake of vLLM's OpenAI layer: what reaches it,
the shape of every error, admission, the API key, streaming plumbing, metrics. vLLM's
layer itself is exercised on the real engine (tests/integration/test_openai_live.py)."""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.server import create_app
from app.settings import Settings
from param_mapping import ParameterError
from tests.api.conftest import FakeEngine


class FakeOpenAIServer:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.request_ids: list[str | None] = []  # the header vLLM's layer names requests by
        self.delay = 0.0
        self.closed = 0

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    async def completions(self, body: dict[str, Any], raw: Any) -> Any:
        self.bodies.append(body)
        self.request_ids.append(raw.headers.get("X-Request-Id"))
        if body.get("max_tokens") == -1:
            raise ParameterError("max_tokens", "max_tokens must be at least 1, got -1.")
        if body.get("stream"):
            return self._stream()
        await asyncio.sleep(self.delay)
        return 200, {"object": "text_completion", "choices": [{"text": " Paris."}]}

    async def chat_completions(self, body: dict[str, Any], raw: Any) -> Any:
        self.bodies.append(body)
        if body.get("model") == "nope":
            return 404, {
                "error": {
                    "message": "The model `nope` does not exist.",
                    "type": "NotFoundError",
                    "param": "model",
                    "code": 404,
                }
            }
        if body.get("stream"):
            return self._stream()
        return 200, {
            "object": "chat.completion",
            "choices": [{"message": {"role": "assistant", "content": "Hi"}}],
        }

    async def _stream(self) -> AsyncIterator[str]:
        try:
            for piece in ("Hel", "lo"):
                await asyncio.sleep(self.delay)
                yield f"data: {json.dumps({'choices': [{'delta': {'content': piece}}]})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.closed += 1


class OpenAIFakeEngine(FakeEngine):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.openai = FakeOpenAIServer()

    async def openai_server(self) -> FakeOpenAIServer:
        return self.openai


@pytest.fixture
def oengine(tokenizer) -> OpenAIFakeEngine:
    return OpenAIFakeEngine(tokenizer)


def client_for(engine, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), engine=engine))


def assert_openai_error(r, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_models_and_completions_pass_through(oengine):
    with client_for(oengine) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "m"
        body = {
            "model": "m",
            "prompt": "The capital of France is",
            "max_tokens": 5,
            "temperature": 0,
        }
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " Paris."
        assert oengine.openai.bodies[-1] == body
        assert "x-request-id" in r.headers
        r = c.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]},
        )
        assert r.json()["choices"][0]["message"]["content"] == "Hi"


def test_streams_are_event_streams(oengine):
    with client_for(oengine) as c:
        r = c.post("/v1/chat/completions", json={"model": "m", "messages": [], "stream": True})
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.endswith("data: [DONE]\n\n") and '"Hel"' in r.text
        assert oengine.openai.closed == 1 and c.app.state.admission.in_flight == 0


def test_errors_have_openai_shape(oengine):
    with client_for(oengine) as c:
        assert (
            assert_openai_error(c.post("/v1/completions", content=b"{not json"), 400)["type"]
            == "BadRequestError"
        )
        error = assert_openai_error(
            c.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400
        )
        assert error["param"] == "max_tokens" and "got -1" in error["message"]
        assert_openai_error(c.post("/v1/chat/completions", json={"model": "nope"}), 404)
        oengine.ready = False
        assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503)
        assert_openai_error(c.get("/v1/models"), 503)


def test_api_key_applies(oengine):
    with client_for(oengine, api_key="k") as c:
        assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 401)
        assert_openai_error(c.get("/v1/models"), 401)
        ok = c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


def test_admission_is_shared_with_chat(oengine):
    oengine.openai.delay = 0.3
    with client_for(oengine, max_concurrent_requests=1) as c:
        t = threading.Thread(
            target=lambda: c.post("/v1/completions", json={"prompt": "x", "stream": True})
        )
        t.start()
        time.sleep(0.15)
        busy_chat = c.post("/chat", json={"prompt": "Hi"})
        busy_v1 = c.post("/v1/completions", json={"prompt": "x"})
        t.join()
        assert busy_chat.status_code == 429
        assert assert_openai_error(busy_v1, 429)["type"] == "RateLimitError"
        assert busy_v1.headers["retry-after"] == "1"
        assert c.app.state.admission.in_flight == 0


def test_timeout_is_a_504(oengine):
    oengine.openai.delay = 1.0
    with client_for(oengine, request_timeout_seconds=0.2) as c:
        assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 504)


def test_a_server_without_vllm_says_so(engine):
    with client_for(engine) as c:  # the plain fake has no OpenAI layer, like transformers
        assert (
            "vLLM"
            in assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 501)["message"]
        )


def served_by_vllm(c: TestClient) -> float:
    """Requests vLLM served, over every adapter label (other tests leave adapter series)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(c.get("/metrics").text)
        for sample in family.samples
        if sample.name == "kaito_backend_requests_total" and sample.labels["backend"] == "vllm"
    )


def test_metrics_label_the_routes_and_the_path_that_served(oengine):
    with client_for(oengine) as c:
        before = served_by_vllm(c)
        c.post("/v1/chat/completions", json={"model": "m", "messages": []})
        c.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
        c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": -1})  # 400
        text = c.get("/metrics").text
        assert served_by_vllm(c) == before + 2
    assert 'route="/v1/chat/completions"' in text


def test_vllms_layer_sees_the_request_id_we_echo(oengine):
    # vLLM's OpenAI layer names its engine request (and the reply's id) after the
    # X-Request-Id header: it must be the one we log and echo, never an unsafe one.
    body = {"model": "m", "prompt": "x", "max_tokens": 1}
    with client_for(oengine) as c:
        given = c.post("/v1/completions", json=body, headers={"X-Request-Id": "req-7"})
        made = c.post("/v1/completions", json=body)
        odd = c.post("/v1/completions", json=body, headers={"X-Request-Id": "bad id\n"})
    assert oengine.openai.request_ids[0] == given.headers["x-request-id"] == "req-7"
    assert oengine.openai.request_ids[1] == made.headers["x-request-id"]
    assert oengine.openai.request_ids[2] == odd.headers["x-request-id"] != "bad id\n"
