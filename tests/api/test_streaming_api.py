"""/chat with stream and messages, on a fake engine that streams."""

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, Iterator

import pytest
from fastapi.testclient import TestClient

from app.engines.base import (
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
    SequenceDelta,
)
from app.server import create_app
from app.settings import Settings
from param_mapping import ParameterError
from tests.api.conftest import FakeEngine


class StreamingFakeEngine(FakeEngine):
    """Streams output_text token by token; can pause per token or fail mid-stream."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.token_delay = 0.0
        self.fail_after: int | None = None
        self.fail_with: Exception = RuntimeError("boom")
        self.closed: list[str] = []

    @staticmethod
    def logprobs(request: GenerationRequest, ids: list[int]) -> list[float] | None:
        """Made-up log-probabilities, when the request asks for scores."""
        if request.sampling.logprobs is None:
            return None
        return [-0.5 - k / 8 for k in range(len(ids))]

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        result = await super().generate(request)
        return GenerationResult(
            sequences=[
                GeneratedSequence(s.token_ids, s.finish_reason, self.logprobs(request, s.token_ids))
                for s in result.sequences
            ]
        )

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[SequenceDelta, None]:
        self.requests.append(request)
        ids = self._tokenizer.encode(self.output_text, add_special_tokens=False)
        ids = ids[: request.sampling.max_tokens]
        logprobs = self.logprobs(request, ids)
        try:
            for k, token in enumerate(ids):
                if self.fail_after is not None and k == self.fail_after:
                    raise self.fail_with
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                last = k == len(ids) - 1
                chosen = None if logprobs is None else [logprobs[k]]
                for i in range(request.sampling.n):
                    yield SequenceDelta(i, [token], "length" if last else None, chosen)
        finally:
            self.closed.append(request.request_id)


@pytest.fixture
def sengine(tokenizer) -> StreamingFakeEngine:
    return StreamingFakeEngine(tokenizer)


def make_client(engine, **settings) -> TestClient:
    return TestClient(create_app(Settings(**settings), engine=engine))


@pytest.fixture
def sclient(sengine) -> Iterator[TestClient]:
    with make_client(sengine) as c:
        yield c


def events(text: str) -> list[tuple[str, object]]:
    """(event name, data) per server-sent event; data parsed as JSON unless [DONE]."""
    out = []
    for block in text.strip().split("\n\n"):
        name, data = "message", ""
        for line in block.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((name, data if data == "[DONE]" else json.loads(data)))
    return out


def test_stream_joins_into_the_non_streamed_reply(sclient, sengine):
    sengine.output_text = " Paris is the capital, café ☕ and 東京."
    payload = {"prompt": "The capital of France is", "generate_kwargs": {"max_new_tokens": 40}}
    plain = sclient.post("/chat", json=payload).json()
    r = sclient.post("/chat", json={**payload, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == ("message", "[DONE]")
    tokens = [d for _, d in evs[:-2]]
    final = evs[-2][1]
    assert all(set(t) == {"token", "index"} and set(t["token"]) == {"id", "text"} for t in tokens)
    assert "".join(t["token"]["text"] for t in tokens) == sengine.output_text
    assert final["Result"] == plain["Result"] == payload["prompt"] + sengine.output_text
    assert final["finish_reason"] == "length"
    assert final["usage"] == plain["usage"]


def test_stream_of_several_sequences_is_indexed(sclient, sengine):
    r = sclient.post(
        "/chat",
        json={
            "prompt": "Hi",
            "stream": True,
            "return_full_text": False,
            "generate_kwargs": {"do_sample": True, "num_return_sequences": 2},
        },
    )
    evs = events(r.text)
    for i in (0, 1):
        assert (
            "".join(d["token"]["text"] for _, d in evs[:-2] if d["index"] == i)
            == sengine.output_text
        )
    assert evs[-2][1]["Result"] == sengine.output_text * 2


def test_without_stream_the_reply_is_json_as_before(sclient):
    r = sclient.post("/chat", json={"prompt": "Hi"})
    assert r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"Result", "sequences", "usage", "backend"}


def test_stream_null_is_no_stream(sclient):
    # Before streaming existed, "stream" was an ignored field: null must still be a 200.
    r = sclient.post("/chat", json={"prompt": "Hi", "stream": None})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["Result"] == "Hi" + " Paris."


def test_empty_messages_is_a_400(sclient):
    for stream in (False, True):
        r = sclient.post("/chat", json={"messages": [], "stream": stream})
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/json"


@pytest.mark.parametrize("n", [1, 2])
def test_stream_with_output_scores_ends_with_the_non_streamed_scores(sclient, n):
    payload = {
        "prompt": "The capital of France is",
        "generate_kwargs": {
            "do_sample": n > 1,
            "num_return_sequences": n,
            "output_scores": True,
            "max_new_tokens": 8,
        },
    }
    plain = sclient.post("/chat", json=payload).json()
    final = events(sclient.post("/chat", json={**payload, "stream": True}).text)[-2][1]
    assert all(s["sequence_score"] is not None for s in plain["sequences"])
    assert all(t["logprob"] is not None for s in plain["sequences"] for t in s["tokens"])
    assert final["sequences"] == plain["sequences"]


def test_beam_search_cannot_stream(sclient):
    r = sclient.post(
        "/chat", json={"prompt": "Hi", "stream": True, "generate_kwargs": {"num_beams": 2}}
    )
    assert r.status_code == 400
    assert r.json()["parameter"] == "stream"
    assert "beam" in r.json()["detail"]


def test_errors_before_generation_are_json(sclient, sengine):
    r = sclient.post(
        "/chat", json={"prompt": "Hi", "stream": True, "generate_kwargs": {"top_p": 5}}
    )
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    # The engine refusing at the first step is still before anything was sent.
    sengine.fail_after, sengine.fail_with = 0, ParameterError("generate_kwargs.x", "x is wrong")
    r = sclient.post("/chat", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 400 and r.json() == {
        "detail": "x is wrong",
        "parameter": "generate_kwargs.x",
    }
    r = sclient.post("/chat", json={"stream": True})
    assert r.status_code == 400


def test_error_mid_stream_is_an_error_event_then_the_end(sclient, sengine):
    sengine.output_text = " one two three four"
    sengine.fail_after = 2
    r = sclient.post("/chat", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 200
    evs = events(r.text)
    assert [name for name, _ in evs] == ["message", "message", "error"]
    assert evs[-1][1] == {"detail": "Internal server error", "status": 500}


def test_stream_timeout_ends_with_504_event_and_aborts(sengine):
    sengine.output_text = " one two three four five six seven eight"
    sengine.token_delay = 0.1
    with make_client(sengine, request_timeout_seconds=0.35) as c:
        r = c.post("/chat", json={"prompt": "Hi", "stream": True})
        name, data = events(r.text)[-1]
        assert name == "error" and data["status"] == 504
        assert sengine.closed == [sengine.last.request_id]
        assert c.app.state.admission.in_flight == 0


def test_admission_slot_is_held_until_the_stream_ends(sengine):
    sengine.output_text = " one two three four five six seven eight"
    sengine.token_delay = 0.1
    with make_client(sengine, max_concurrent_requests=1) as c:
        done = {}
        t = threading.Thread(
            target=lambda: done.setdefault(
                "r", c.post("/chat", json={"prompt": "Hi", "stream": True})
            )
        )
        t.start()
        time.sleep(0.3)
        busy = c.post("/chat", json={"prompt": "Hi"})
        t.join()
        assert busy.status_code == 429
        assert events(done["r"].text)[-1][1] == "[DONE]"
        assert c.app.state.admission.in_flight == 0
        assert c.post("/chat", json={"prompt": "Hi", "stream": True}).status_code == 200


def test_stream_needs_the_api_key(sengine):
    with make_client(sengine, api_key="k") as c:
        assert c.post("/chat", json={"prompt": "Hi", "stream": True}).status_code == 401
        ok = c.post(
            "/chat", json={"prompt": "Hi", "stream": True}, headers={"Authorization": "Bearer k"}
        )
        assert ok.status_code == 200 and "x-request-id" in ok.headers


# --- messages ---

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
]


def test_messages_use_the_chat_template_and_reply_with_new_text_only(sclient, sengine, tokenizer):
    r = sclient.post("/chat", json={"messages": MESSAGES})
    assert r.status_code == 200, r.text
    expected = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert sengine.last.prompt_token_ids == tokenizer.encode(expected, add_special_tokens=False)
    assert r.json()["Result"] == sengine.output_text
    streamed = events(sclient.post("/chat", json={"messages": MESSAGES, "stream": True}).text)
    assert streamed[-2][1]["Result"] == sengine.output_text


def test_messages_with_prompt_is_refused(sclient):
    r = sclient.post("/chat", json={"messages": MESSAGES, "prompt": "Hi"})
    assert r.status_code == 400 and r.json()["parameter"] == "messages"


def test_messages_without_a_template_is_a_400_saying_so(sengine, tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with make_client(sengine) as c:
        r = c.post("/chat", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert "chat template" in r.json()["detail"] and "KAITO_CHAT_TEMPLATE" in r.json()["detail"]


def test_a_template_file_replaces_the_tokenizers(sengine, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}ASSISTANT:"
    )
    with make_client(sengine, chat_template=str(template)) as c:
        assert c.post("/chat", json={"messages": MESSAGES}).status_code == 200
    text = sengine._tokenizer.decode(sengine.last.prompt_token_ids)
    assert text == "<system>Be brief.\n<user>Capital of France?\nASSISTANT:"
