"""The server's default, KAITO_OUTPUT_SCORES=false, on the real engine: vLLM runs raw
log-probs, scores asked for are a 400 naming the setting, Kaito's default sampled payload is
served, and beam search (which reads vLLM's log-probs) still equals transformers.

The session server runs with scores on (most live tests read them); this module starts its
own server with the default.
"""

import asyncio

import httpx
import pytest

from tests.conftest import ServerProcess, running
from tests.integration.test_beam_parity import CASES, post_all, reference, token_ids

pytestmark = pytest.mark.integration

SETTING = "KAITO_OUTPUT_SCORES=true"


@pytest.fixture(scope="module")
def default_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("no-scores") / "server.log"
    # The vLLM beam step loop (the GPU default) reads raw log-probs here; the CPU default
    # would send plain beams to the transformers backend.
    args = ["--enforce-eager", "--model", str(model_dir), "--beam-backend", "vllm"]
    yield from running(ServerProcess(args, log))


def test_the_engine_runs_raw_logprobs(default_server):
    log = default_server.log_path.read_text()
    assert "'logprobs_mode': 'raw_logprobs'" in log, "engine arguments not in the log"


@pytest.mark.parametrize("key", ["output_scores", "return_dict_in_generate"])
def test_scores_are_refused_naming_the_setting(default_server, key):
    payload = {"prompt": "Once upon a time", "generate_kwargs": {"max_new_tokens": 4, key: True}}
    r = httpx.post(default_server.url + "/chat", json=payload, timeout=120)
    assert r.status_code == 400, r.text
    assert r.json()["parameter"] == "generate_kwargs.output_scores"
    assert SETTING in r.json()["detail"]
    streamed = httpx.post(
        default_server.url + "/chat", json={**payload, "stream": True}, timeout=120
    )
    assert streamed.status_code == 400, streamed.text
    assert SETTING in streamed.json()["detail"]


def test_kaitos_default_payload_is_served(default_server):
    payload = {
        "prompt": "Once upon a time",
        "generate_kwargs": {"do_sample": True, "top_k": 10, "max_new_tokens": 16},
    }
    r = httpx.post(default_server.url + "/chat", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
    assert r.json()["sequences"][0]["tokens"] is None


def test_beam_search_on_raw_logprobs_equals_transformers(default_server, hf_model, hf_tokenizer):
    """The step loop reads vLLM's top log-probs, raw here; beam requests batch with a
    sampled one so the engine's batches are mixed."""
    cases = CASES[:4]
    payloads = [
        {
            "prompt": prompt,
            "generate_kwargs": {
                "do_sample": False,
                "max_new_tokens": 10,
                "output_scores": True,  # beam replies carry token ids (no log-probs)
                **setting,
            },
        }
        for prompt, setting in cases
    ]
    sampled = {
        "prompt": "Once upon a time",
        "generate_kwargs": {"do_sample": True, "top_k": 10, "max_new_tokens": 48},
    }
    replies = asyncio.run(post_all(default_server.url, [sampled, *payloads]))[1:]
    for (prompt, setting), reply in zip(cases, replies, strict=True):
        assert reply["backend"] == "vllm"  # the step loop
        assert token_ids(reply) == reference(hf_model, hf_tokenizer, prompt, setting), (
            prompt,
            setting,
        )
