"""Greedy parity with transformers for the generate_kwargs our logits processor serves.

The real server (vLLM, default model, float32) against transformers ``generate`` on the
same model, prompt and kwargs: ``/chat`` with ``do_sample=false`` and
``return_full_text=false`` must return exactly the text transformers' tokens decode to,
with the same number of tokens. The ten server requests of a case run concurrently (one
continuous batch) while transformers computes the references.
"""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from app.pipeline_text import PipelineDecoder
from bench.workload import continuation_prompts

pytestmark = pytest.mark.integration

NEW_TOKENS = 16

# "Hello" is one token: forced_bos_token_id applies.
PROMPTS = [*continuation_prompts()[:9], "Hello"]


@pytest.fixture(scope="module")
def reference(hf_model, hf_tokenizer):
    """transformers greedy ``generate``: the oracle. Returns the new token ids."""

    def generate(prompt: str, **kwargs) -> list[int]:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        kwargs.setdefault("max_new_tokens", NEW_TOKENS)
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                eos_token_id=hf_tokenizer.eos_token_id,
                pad_token_id=hf_tokenizer.eos_token_id,
                **kwargs,
            )
        return out[0, ids.shape[1] :].tolist()

    return generate


@pytest.fixture(scope="module")
def plain_outputs(reference):
    """Greedy outputs without rules, to aim bad_words_ids at tokens that would appear."""
    return {p: reference(p) for p in PROMPTS}


def chat(url: str, prompt: str, kwargs: dict) -> httpx.Response:
    payload = {
        "prompt": prompt,
        "return_full_text": False,
        "generate_kwargs": {"do_sample": False, "max_new_tokens": NEW_TOKENS, **kwargs},
    }
    return httpx.post(url + "/chat", json=payload, timeout=600)


def bad_words_for(prompt_ids: list[int], plain: list[int]) -> list[list[int]]:
    """A one-token word, a two-token word from the plain output, and a word whose prefix is
    the prompt's last token (transformers matches prefixes over the prompt too)."""
    plain = plain + [13] * 5  # in case the model stopped early
    words = [[plain[1]], [plain[3], plain[4]], [prompt_ids[-1], plain[0]]]
    return [w for w in words if w != [2]]  # an eos-only word is dropped anyway


def bans(ids: list[int], plain: list[int]) -> dict:
    return {"bad_words_ids": bad_words_for(ids, plain)}


# name -> (prompt ids, plain output) -> generate_kwargs
CASES = {
    "repetition_penalty": lambda ids, plain: {"repetition_penalty": 1.3},
    "no_repeat_ngram_size": lambda ids, plain: {"no_repeat_ngram_size": 2},
    "encoder_no_repeat_ngram_size": lambda ids, plain: {"encoder_no_repeat_ngram_size": 2},
    "bad_words_ids": bans,
    "min_new_tokens": lambda ids, plain: {"min_new_tokens": NEW_TOKENS},
    "min_length": lambda ids, plain: {"min_length": len(ids) + NEW_TOKENS - 2},  # a total
    "forced_bos_token_id": lambda ids, plain: {"forced_bos_token_id": 30},
    "forced_eos_token_id=eos": lambda ids, plain: {"forced_eos_token_id": 2, "max_new_tokens": 9},
    "forced_eos_token_id=other": lambda ids, plain: {
        "forced_eos_token_id": 30,
        "max_new_tokens": 7,
    },
    "remove_invalid_values": lambda ids, plain: {
        "remove_invalid_values": True,
        "no_repeat_ngram_size": 2,
    },
    "combo: penalty + n-grams + bad words": lambda ids, plain: {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        **bans(ids, plain),
    },
    "combo: min length + forced eos + encoder n-grams": lambda ids, plain: {
        "min_new_tokens": 12,
        "forced_eos_token_id": 2,
        "max_new_tokens": 14,
        "encoder_no_repeat_ngram_size": 3,
        "remove_invalid_values": True,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_parity(server_url, reference, plain_outputs, hf_tokenizer, case):
    make = CASES[case]
    jobs = []
    for prompt in PROMPTS:
        ids = hf_tokenizer.encode(prompt)
        jobs.append((prompt, ids, make(ids, plain_outputs[prompt])))
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = [pool.submit(chat, server_url, p, kw) for p, _, kw in jobs]
        expected = [reference(p, **kw) for p, _, kw in jobs]
    mismatches = []
    for (prompt, ids, kwargs), reply, want in zip(jobs, replies, expected, strict=True):
        r = reply.result()
        assert r.status_code == 200, r.text
        want_text = PipelineDecoder(hf_tokenizer, ids, clean_up=False).new_text(want)
        got = r.json()
        if got["Result"] != want_text or got["usage"]["completion_tokens"] != len(want):
            mismatches.append((prompt, kwargs, got["Result"], want_text))
    assert not mismatches, mismatches


def test_forced_tokens_and_bans_did_fire(reference, plain_outputs, hf_tokenizer):
    """Guards the parity cases: the rules changed transformers' own output."""
    prompt = PROMPTS[0]
    ids = hf_tokenizer.encode(prompt)
    plain = plain_outputs[prompt]
    assert reference(prompt, bad_words_ids=bad_words_for(ids, plain)) != plain
    assert reference(prompt, no_repeat_ngram_size=2) != plain
    assert reference("Hello", forced_bos_token_id=30)[0] == 30
    assert reference(prompt, forced_eos_token_id=30, max_new_tokens=7)[-1] == 30


def test_scores_match_transformers_transition_scores(server_url, hf_model, hf_tokenizer):
    """output_scores: the reply's token ids are transformers' tokens, and each log-prob is
    transformers' compute_transition_scores(normalize_logits=True) for it."""
    kwargs = {"repetition_penalty": 1.2, "no_repeat_ngram_size": 3, "max_new_tokens": 12}
    for prompt in PROMPTS[:4]:
        ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                eos_token_id=hf_tokenizer.eos_token_id,
                pad_token_id=hf_tokenizer.eos_token_id,
                output_scores=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        want_logprobs = hf_model.compute_transition_scores(
            out.sequences, out.scores, normalize_logits=True
        )[0].tolist()
        r = chat(server_url, prompt, {**kwargs, "output_scores": True})
        assert r.status_code == 200, r.text
        seq = r.json()["sequences"][0]
        assert [t["id"] for t in seq["tokens"]] == out.sequences[0, ids.shape[1] :].tolist()
        got = [t["logprob"] for t in seq["tokens"]]
        assert got == pytest.approx(want_logprobs, abs=2e-3)
        assert seq["sequence_score"] == pytest.approx(sum(got), abs=1e-4)
        text = "".join(t["text"] for t in seq["tokens"]).replace(hf_tokenizer.eos_token, "")
        assert text == r.json()["Result"]
