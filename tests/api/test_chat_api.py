"""/chat and the other routes over HTTP, with a fake engine: status codes, the contract,
and the engine parameters built for given payloads."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

FULL_EXAMPLE = {
    "prompt": "YOUR_PROMPT_HERE",
    "return_full_text": False,
    "clean_up_tokenization_spaces": False,
    "prefix": None,
    "handle_long_generation": None,
    "generate_kwargs": {
        "max_length": 200,
        "min_length": 0,
        "do_sample": True,
        "early_stopping": False,
        "num_beams": 1,
        "num_beam_groups": 1,
        "diversity_penalty": 0.0,
        "temperature": 1.0,
        "top_k": 10,
        "top_p": 1,
        "typical_p": 1,
        "repetition_penalty": 1,
        "length_penalty": 1,
        "no_repeat_ngram_size": 0,
        "encoder_no_repeat_ngram_size": 0,
        "bad_words_ids": None,
        "num_return_sequences": 1,
        "output_scores": False,
        "return_dict_in_generate": False,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "remove_invalid_values": None,
    },
}


def test_root_and_health(client, engine):
    assert client.get("/").json() == {"message": "Server is running"}
    assert client.get("/health").json() == {"status": "Healthy"}
    assert client.get("/healthz").status_code == 200
    assert client.get("/livez").status_code == 200
    engine.ready = False
    assert client.get("/health").status_code == 503
    assert client.get("/healthz").status_code == 503
    assert client.get("/livez").status_code == 200  # loading is not dead


def test_minimal_prompt_defaults(client, engine, tokenizer):
    r = client.post("/chat", json={"prompt": "The capital of France is"})
    assert r.status_code == 200
    body = r.json()
    # return_full_text defaults to true: the reply starts with the prompt.
    assert body["Result"] == "The capital of France is Paris."
    s = engine.last.sampling
    prompt_len = len(tokenizer.encode("The capital of France is"))
    assert (s.temperature, s.top_k, s.top_p, s.n) == (1.0, 10, 1.0, 1)
    assert s.max_tokens == 200 - prompt_len
    assert s.stop_token_ids == [tokenizer.eos_token_id]
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["backend"] == "vllm"


def test_full_parameter_example(client):
    r = client.post("/chat", json=FULL_EXAMPLE)
    assert r.status_code == 200, r.text
    assert r.json()["Result"] == " Paris."  # return_full_text false: only the new text


def test_result_joins_sequences(client, engine):
    r = client.post("/chat", json={"prompt": "Q:", "generate_kwargs": {"num_return_sequences": 3}})
    assert r.json()["Result"] == "Q: Paris." * 3
    assert len(r.json()["sequences"]) == 3
    assert engine.last.sampling.n == 3


def test_prefix_is_tokenized_but_not_echoed(client, engine, tokenizer):
    r = client.post(
        "/chat", json={"prompt": "world", "prefix": "Hello ", "generate_kwargs": {"max_length": 30}}
    )
    assert r.json()["Result"] == "world Paris."
    assert engine.last.prompt_token_ids == tokenizer.encode("Hello world")
    # The pipeline adds the prefix length to max_length.
    prefix_len = len(tokenizer.encode("Hello ", add_special_tokens=False))
    assert engine.last.sampling.max_tokens == 30 + prefix_len - len(tokenizer.encode("Hello world"))


def test_greedy_payload(client, engine):
    client.post(
        "/chat", json={"prompt": "x", "generate_kwargs": {"do_sample": False, "temperature": 0}}
    )
    assert engine.last.sampling.temperature == 0.0


def test_hole_truncates_the_prompt_from_the_left(client, engine):
    engine.max_model_len = 20
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    r = client.post(
        "/chat",
        json={
            "prompt": prompt,
            "handle_long_generation": "hole",
            "generate_kwargs": {"max_new_tokens": 8},
        },
    )
    assert r.status_code == 200, r.text
    assert len(engine.last.prompt_token_ids) == 12
    r = client.post("/chat", json={"prompt": prompt, "generate_kwargs": {"max_new_tokens": 8}})
    assert r.status_code == 400


@pytest.mark.parametrize("payload", [{}, {"prompt": None}, {"prompt": ""}, {"generate_kwargs": {}}])
def test_prompt_required_is_kaitos_400(client, payload):
    r = client.post("/chat", json=payload)
    assert r.status_code == 400
    assert r.json() == {"detail": "Text generation parameter prompt required"}


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"top_p": 1.5}, "generate_kwargs.top_p"),
        ({"num_return_sequences": 2, "do_sample": False}, "generate_kwargs.num_return_sequences"),
        ({"max_length": 2}, "generate_kwargs.max_length"),
        ({"foo": 1}, "generate_kwargs.foo"),
        ({"temperature": 0}, "generate_kwargs.temperature"),
    ],
)
def test_semantic_errors_are_400_naming_the_parameter(client, engine, kwargs, parameter):
    r = client.post("/chat", json={"prompt": "hello there", "generate_kwargs": kwargs})
    assert r.status_code == 400
    assert r.json()["parameter"] == parameter
    assert parameter.split(".")[-1] in r.json()["detail"]
    assert engine.requests == []  # never reached the engine


def test_bad_handle_long_generation(client):
    r = client.post("/chat", json={"prompt": "x", "handle_long_generation": "middle"})
    assert r.status_code == 400 and r.json()["parameter"] == "handle_long_generation"


@pytest.mark.parametrize(
    "payload",
    [
        {"prompt": "x", "generate_kwargs": {"max_length": "abc"}},
        {"prompt": "x", "generate_kwargs": {"top_k": 1.5}},
        {"prompt": ["a", "b"]},
        {"prompt": "x", "generate_kwargs": "nope"},
    ],
)
def test_type_errors_are_422(client, payload):
    assert client.post("/chat", json=payload).status_code == 422


def test_not_json_is_4xx(client):
    r = client.post("/chat", content=b"{not json", headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500


def test_engine_not_ready_is_503(client, engine):
    engine.ready = False
    r = client.post("/chat", json={"prompt": "x"})
    assert r.status_code == 503
    assert engine.requests == []


def test_metrics_count_requests_by_route_and_status(client):
    client.post("/chat", json={"prompt": "x"})
    client.post("/chat", json={"prompt": ""})
    client.get("/no-such-path")
    text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert (
        samples[
            ("kaito_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "200")))
        ]
        >= 1
    )
    assert (
        samples[
            ("kaito_requests_total", (("method", "POST"), ("route", "/chat"), ("status", "400")))
        ]
        >= 1
    )
    assert (
        samples[
            ("kaito_requests_total", (("method", "GET"), ("route", "other"), ("status", "404")))
        ]
        >= 1
    )
    # The base model's series: an empty adapter label (which Prometheus drops).
    assert samples[("kaito_backend_requests_total", (("adapter", ""), ("backend", "vllm")))] >= 1
    assert any(name == "kaito_request_duration_seconds_count" for name, _ in samples)


def test_openapi_documents_every_field(client):
    schema = client.get("/openapi.json").json()
    kwargs = schema["components"]["schemas"]["GenerateKwargs"]["properties"]
    assert set(FULL_EXAMPLE["generate_kwargs"]) <= set(kwargs)
    assert all("description" in p for p in kwargs.values())
