"""Overload, timeouts, limits, API keys, body size and request ids, with the fake engine."""

import asyncio
import json
import logging

import httpx
import pytest
from fastapi.testclient import TestClient

from app.admission import Admission
from app.logs import configure_logging
from app.server import create_app
from app.settings import Settings


def make_client(engine, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), engine=engine))


async def burst(app, n: int, payload: dict) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await asyncio.gather(*(client.post("/chat", json=payload) for _ in range(n)))


def test_overload_is_429_with_retry_after_and_health_stays_open(engine):
    engine.delay = 0.3
    app = create_app(Settings(max_concurrent_requests=2), engine=engine)
    replies = asyncio.run(burst(app, 8, {"prompt": "hi"}))
    codes = sorted(r.status_code for r in replies)
    assert codes.count(200) == 2 and codes.count(429) == 6
    rejected = next(r for r in replies if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1"
    assert "in flight" in rejected.json()["detail"]
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.post("/chat", json={"prompt": "hi"}).status_code == 200  # slots freed
        metrics = client.get("/metrics").text
    assert 'kaito_rejected_requests_total{reason="overload"} 6.0' in metrics


def test_timeout_is_504_and_aborts_the_engine_request(engine):
    engine.delay = 5
    with make_client(engine, request_timeout_seconds=0.2) as client:
        r = client.post("/chat", json={"prompt": "hi"})
    assert r.status_code == 504
    assert engine.aborted == [engine.last.request_id]


def test_draining_refuses_new_requests_and_fails_readiness(engine):
    with make_client(engine) as client:
        client.app.state.admission.draining = True
        assert client.post("/chat", json={"prompt": "hi"}).status_code == 503
        assert client.get("/health").status_code == 503
        assert client.get("/livez").status_code == 200


def test_drain_waits_for_in_flight_requests():
    async def scenario() -> tuple[bool, bool]:
        admission = Admission(limit=4)

        async def request() -> None:
            async with admission.admit():
                await asyncio.sleep(0.2)

        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        finished = await admission.drain(grace_seconds=2)
        await task
        late = Admission(limit=4)
        async with late.admit():
            timed_out = not await late.drain(grace_seconds=0.05)
        return finished, timed_out

    assert asyncio.run(scenario()) == (True, True)


@pytest.mark.parametrize(
    ("kwargs", "parameter", "limit"),
    [
        ({"num_return_sequences": 17}, "generate_kwargs.num_return_sequences", "<= 16"),
        ({"bad_words_ids": [[1]] * 1025}, "generate_kwargs.bad_words_ids", "<= 1024"),
        ({"bad_words_ids": [[1] * 65]}, "generate_kwargs.bad_words_ids", "<= 64"),
        ({"no_repeat_ngram_size": 65}, "generate_kwargs.no_repeat_ngram_size", "<= 64"),
        ({"max_length": 10**30}, "generate_kwargs.max_length", "context length"),
    ],
)
def test_limits_are_400_naming_parameter_and_limit(client, engine, kwargs, parameter, limit):
    r = client.post("/chat", json={"prompt": "hi", "generate_kwargs": kwargs})
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == parameter
    assert limit in r.json()["detail"]
    assert engine.requests == []


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "hi", "generate_kwargs": {"temperature": NaN}}',
        '{"prompt": "hi", "generate_kwargs": {"top_p": Infinity}}',
        '{"prompt": "hi", "generate_kwargs": {"top_k": 1e400}}',
        '{"prompt": {"nested": ["junk"]}}',
        "[1, 2, 3]",
        '"just a string"',
        '{"prompt": "hi", "generate_kwargs": {"eos_token_id": [[1]]}}',
        '{"prompt": "hi", "generate_kwargs": {"bad_words_ids": [["a"]]}}',
    ],
)
def test_hostile_json_is_4xx(client, engine, body):
    r = client.post("/chat", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert engine.requests == []


def test_unicode_prompt_round_trips(client):
    prompt = "日本語 ✓ émoji 🙂 \u0000 zero"
    r = client.post("/chat", json={"prompt": prompt})
    assert r.status_code == 200
    assert r.json()["Result"].startswith(prompt)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_is_4xx(client, content_type):
    r = client.post("/chat", content=b"prompt=hi", headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500


def test_api_key_guards_generation_only(engine):
    with make_client(engine, api_key="s3cret") as client:
        assert client.post("/chat", json={"prompt": "hi"}).status_code == 401
        wrong = client.post(
            "/chat", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = client.post("/chat", json={"prompt": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        for path in ("/", "/health", "/livez", "/metrics"):
            assert client.get(path).status_code == 200


def test_body_size_limit(engine):
    with make_client(engine, max_body_bytes=2048) as client:
        big = {"prompt": "x" * 5000}
        assert client.post("/chat", json=big).status_code == 413

        def chunks():  # no Content-Length: the limit still holds
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = client.post("/chat", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert client.post("/chat", json={"prompt": "small"}).status_code == 200


def test_request_id_is_accepted_or_made_and_echoed(client):
    r = client.post("/chat", json={"prompt": "hi"}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32
    odd = client.get("/health", headers={"X-Request-Id": "bad id\twith spaces"})
    assert odd.headers["x-request-id"] != "bad id\twith spaces"


def test_the_engine_request_is_named_after_the_request_id(client, engine):
    # vLLM logs the engine's id: named after X-Request-Id, and unique when ids repeat.
    for _ in range(2):
        client.post("/chat", json={"prompt": "hi"}, headers={"X-Request-Id": "abc-123"})
    first, second = (r.request_id for r in engine.requests[-2:])
    assert first.startswith("chat-abc-123-") and second.startswith("chat-abc-123-")
    assert first != second
    made = client.post("/chat", json={"prompt": "hi"})
    assert engine.last.request_id.startswith(f"chat-{made.headers['x-request-id']}-")


def test_json_logs_carry_the_request_id_and_never_the_prompt(engine, capsys):
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("info", "json")
        with make_client(engine, api_key="k3y-secret") as client:
            client.post(
                "/chat",
                json={"prompt": "my secret prompt"},
                headers={"X-Request-Id": "req-42", "Authorization": "Bearer k3y-secret"},
            )
        lines = [
            json.loads(line)
            for line in capsys.readouterr().err.splitlines()
            if line.startswith("{")
        ]
    finally:
        root.handlers, root.level = saved
    access = [e for e in lines if e["logger"] == "app.access" and e["request_id"] == "req-42"]
    assert access and access[0]["status"] == 200 and "duration_ms" in access[0]
    everything = json.dumps(lines)
    assert "my secret prompt" not in everything
    assert "k3y-secret" not in everything
