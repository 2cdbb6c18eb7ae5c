"""Streamed /chat on the real engine: the same text as the plain reply, events
as they are generated, and a dropped stream frees its engine slot."""

import json
import time

import httpx
import pytest

from tests.integration.scrape import metric

pytestmark = pytest.mark.integration


def stream_events(
    client: httpx.Client, url: str, payload: dict
) -> tuple[list[tuple[float, object]], float]:
    """(arrival time, data) per event, and the request's start time."""
    out = []
    start = time.monotonic()
    with client.stream("POST", url + "/chat", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append((time.monotonic(), data if data == "[DONE]" else json.loads(data)))
    return out, start


def test_streamed_greedy_reply_is_the_plain_reply(server_url):
    payload = {
        "prompt": "Once upon a time, in a small village,",
        "return_full_text": False,
        "generate_kwargs": {"do_sample": False, "max_new_tokens": 48},
    }
    with httpx.Client(timeout=120) as client:
        plain = client.post(server_url + "/chat", json=payload).json()
        events, _ = stream_events(client, server_url, payload)
        full = client.post(
            server_url + "/chat", json={**payload, "return_full_text": True, "stream": True}
        )
    assert events[-1][1] == "[DONE]"
    tokens = [d for _, d in events[:-2]]
    final = events[-2][1]
    assert len(tokens) == plain["usage"]["completion_tokens"] == 48
    assert "".join(t["token"]["text"] for t in tokens) == plain["Result"]
    assert final["Result"] == plain["Result"]
    assert final["usage"] == plain["usage"] and final["finish_reason"] == "length"
    assert payload["prompt"] + plain["Result"] in full.text


def test_streamed_scores_are_the_plain_scores(server_url):
    payload = {
        "prompt": "The capital of France is",
        "generate_kwargs": {"do_sample": False, "max_new_tokens": 24, "output_scores": True},
    }
    with httpx.Client(timeout=120) as client:
        plain = client.post(server_url + "/chat", json=payload).json()
        events, _ = stream_events(client, server_url, payload)
    final = events[-2][1]
    (want,), (got,) = plain["sequences"], final["sequences"]
    assert [d["token"]["id"] for _, d in events[:-2]] == [t["id"] for t in got["tokens"]]
    assert [(t["id"], t["text"]) for t in got["tokens"]] == [
        (t["id"], t["text"]) for t in want["tokens"]
    ]
    assert all(t["logprob"] is not None for t in got["tokens"])
    assert [t["logprob"] for t in got["tokens"]] == pytest.approx(
        [t["logprob"] for t in want["tokens"]], abs=1e-4
    )
    assert got["sequence_score"] == pytest.approx(want["sequence_score"], abs=1e-3)
    assert final["Result"] == plain["Result"]


def test_messages_stream_on_the_real_template(server_url):
    payload = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "generate_kwargs": {"do_sample": False, "max_new_tokens": 12},
    }
    with httpx.Client(timeout=120) as client:
        plain = client.post(server_url + "/chat", json=payload).json()
        events, _ = stream_events(client, server_url, payload)
    assert (
        "".join(d["token"]["text"] for _, d in events[:-2])
        == plain["Result"]
        == events[-2][1]["Result"]
    )
    assert "Paris" in plain["Result"]


def test_first_event_arrives_long_before_the_end(server_url):
    payload = {
        "prompt": "Write a long story about a dragon.",
        "generate_kwargs": {"do_sample": False, "max_new_tokens": 150, "min_new_tokens": 150},
    }
    with httpx.Client(timeout=300) as client:
        events, start = stream_events(client, server_url, payload)
    first, total = events[0][0] - start, events[-1][0] - start
    assert len(events) == 150 + 2
    assert first < 0.2 * total, f"first event after {first:.2f}s of {total:.2f}s"


def test_dropped_stream_frees_the_engine_slot(server_url):
    payload = {
        "prompt": "Write a very long essay about the sea.",
        "stream": True,
        "generate_kwargs": {"max_new_tokens": 400, "min_new_tokens": 400},
    }
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", server_url + "/chat", json=payload) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 5:
                # Read while the stream is open: breaking out of iter_lines() closes the
                # connection at once (httpx closes the response with its iterator).
                assert metric(server_url, "vllm:num_requests_running") == 1
                break
    dropped_at = time.monotonic()
    while time.monotonic() - dropped_at < 5:
        if (
            metric(server_url, "vllm:num_requests_running") == 0
            and metric(server_url, "kaito_requests_in_flight") == 0
        ):
            break
        time.sleep(0.1)
    freed_after = time.monotonic() - dropped_at
    assert metric(server_url, "vllm:num_requests_running") == 0
    assert metric(server_url, "kaito_requests_in_flight") == 0
    assert freed_after < 2.0, f"engine slot freed after {freed_after:.2f}s"
