"""The real server: vLLM engine on the default model (started once per session)."""

import asyncio
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.pipeline_text import PipelineDecoder
from bench.workload import continuation_prompts
from tests.integration.scrape import metric

pytestmark = pytest.mark.integration

PROMPTS = continuation_prompts()[:12]


def chat(url: str, payload: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + "/chat", json=payload, timeout=timeout)


def test_curl_example_minimal(server_url):
    r = httpx.post(
        server_url + "/chat",
        headers={"accept": "application/json", "Content-Type": "application/json"},
        content='{"prompt":"YOUR_PROMPT_HERE"}',
        timeout=300,
    )
    assert r.status_code == 200
    assert r.json()["Result"].startswith("YOUR_PROMPT_HERE")
    assert len(r.json()["Result"]) > len("YOUR_PROMPT_HERE")


def test_curl_example_full(server_url):
    from tests.api.test_chat_api import FULL_EXAMPLE

    r = chat(server_url, FULL_EXAMPLE, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["Result"]


def test_max_length_is_a_total(server_url, hf_tokenizer):
    prompt = "Tell me a long story about dragons."
    r = chat(server_url, {"prompt": prompt, "generate_kwargs": {"max_length": 40}})
    assert r.status_code == 200
    prompt_len = len(hf_tokenizer.encode(prompt))
    assert prompt_len + r.json()["usage"]["completion_tokens"] <= 40


def test_min_and_max_length(server_url, hf_tokenizer):
    prompt = "Hi"
    prompt_len = len(hf_tokenizer.encode(prompt))
    for _ in range(3):
        r = chat(
            server_url, {"prompt": prompt, "generate_kwargs": {"min_length": 30, "max_length": 40}}
        )
        total = prompt_len + r.json()["usage"]["completion_tokens"]
        assert 30 <= total <= 40


@pytest.fixture(scope="module")
def reference(hf_model, hf_tokenizer):
    """transformers greedy `generate` on the same model: the oracle."""

    def generate(prompt: str, max_new_tokens: int, **kwargs) -> list[int]:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=hf_tokenizer.eos_token_id,
                **kwargs,
            )
        return out[0, ids.shape[1] :].tolist()

    return generate


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(server_url, reference, hf_tokenizer, prompt):
    new_tokens = 24
    expected_ids = reference(prompt, new_tokens)
    r = chat(
        server_url,
        {
            "prompt": prompt,
            "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "max_new_tokens": new_tokens},
        },
    )
    assert r.status_code == 200, r.text
    prompt_ids = hf_tokenizer.encode(prompt)
    expected = PipelineDecoder(hf_tokenizer, prompt_ids, clean_up=False).new_text(expected_ids)
    assert r.json()["Result"] == expected
    assert r.json()["usage"]["completion_tokens"] == len(expected_ids)
    # Token for token: the ids themselves, which the reply carries with output_scores.
    r = chat(
        server_url,
        {
            "prompt": prompt,
            "return_full_text": False,
            "generate_kwargs": {
                "do_sample": False,
                "max_new_tokens": new_tokens,
                "output_scores": True,
            },
        },
    )
    assert r.status_code == 200, r.text
    assert [t["id"] for t in r.json()["sequences"][0]["tokens"]] == expected_ids


def test_greedy_with_repetition_penalty_matches_transformers(server_url, reference, hf_tokenizer):
    for prompt in PROMPTS[:4]:
        expected_ids = reference(prompt, 20, repetition_penalty=1.3)
        r = chat(
            server_url,
            {
                "prompt": prompt,
                "return_full_text": False,
                "generate_kwargs": {
                    "do_sample": False,
                    "max_new_tokens": 20,
                    "repetition_penalty": 1.3,
                },
            },
        )
        expected = PipelineDecoder(hf_tokenizer, hf_tokenizer.encode(prompt), False).new_text(
            expected_ids
        )
        assert r.json()["Result"] == expected


def test_concurrent_requests_are_batched(server_url):
    async def run() -> tuple[list[httpx.Response], float]:
        peak = 0.0
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [
                asyncio.create_task(
                    client.post(
                        server_url + "/chat",
                        json={
                            "prompt": p,
                            "generate_kwargs": {"max_new_tokens": 48, "min_new_tokens": 48},
                        },
                    )
                )
                for p in (PROMPTS + PROMPTS)[:16]
            ]
            while not all(t.done() for t in tasks):
                peak = max(
                    peak, await asyncio.to_thread(metric, server_url, "vllm:num_requests_running")
                )
                await asyncio.sleep(0.2)
            return [t.result() for t in tasks], peak

    replies, peak = asyncio.run(run())
    assert all(r.status_code == 200 for r in replies)
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in replies)
    assert peak > 1, "the engine never ran more than one request at once"


def test_metrics_parse_and_name_engine_and_server_series(server_url):
    chat(server_url, {"prompt": "Hello", "generate_kwargs": {"max_new_tokens": 4}})
    time.sleep(0.5)
    text = httpx.get(server_url + "/metrics", timeout=10).text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for expected in [
        "vllm:num_requests_running",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "kaito_requests_total",
        "kaito_request_duration_seconds_count",
        "kaito_backend_requests_total",
    ]:
        assert expected in names, expected


def test_health(server_url):
    assert httpx.get(server_url + "/health").json() == {"status": "Healthy"}
