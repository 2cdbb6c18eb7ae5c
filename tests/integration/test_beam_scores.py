"""Beam search on the vLLM engine, through the real server: scores and engine requests.

- Scores: with output_scores, each returned beam carries transformers' numbers on the same
  model: ``sequence_score`` is ``sequences_scores`` (sum of log-probs / length **
  length_penalty) and each token's ``logprob`` is its transition score
  (``compute_transition_scores(sequences, scores, beam_indices)``).
- Engine requests: each running beam is one vLLM request, so beam load shows in
  ``vllm:num_requests_running`` while it runs (what an autoscaler reads), and nothing is
  left running in the engine once the replies are back (dropped beams are aborted).
"""

import asyncio
import time

import httpx
import pytest
import torch

from bench.workload import continuation_prompts
from tests.integration.scrape import snapshot

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 10
CASES = [
    (continuation_prompts()[0], {"num_beams": 4, "num_return_sequences": 2}),
    (
        continuation_prompts()[1],
        {
            "num_beams": 3,
            "length_penalty": 2.0,
            "early_stopping": True,
            "num_return_sequences": 3,
            "min_new_tokens": 3,
        },
    ),
    (continuation_prompts()[2], {"num_beams": 2, "length_penalty": 0.5, "num_return_sequences": 2}),
]
# vLLM's and transformers' float32 kernels differ in the last digits (docs/SCORES.md).
TOLERANCE = 2e-3


def reference(hf_model, hf_tokenizer, prompt: str, setting: dict) -> list[dict]:
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=[hf_tokenizer.eos_token_id],
            pad_token_id=hf_tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_scores=True,
            **setting,
        )
        transitions = hf_model.compute_transition_scores(
            out.sequences, out.scores, out.beam_indices, normalize_logits=False
        )
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    rows = out.sequences[:, ids.shape[1] :].tolist()
    return [
        {
            "ids": row[:n],
            "logprobs": transitions[i, :n].tolist(),
            "sequence_score": float(out.sequences_scores[i]),
        }
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True))
    ]


def payload(prompt: str, setting: dict) -> dict:
    kwargs = {"do_sample": False, "max_new_tokens": MAX_NEW_TOKENS, "output_scores": True}
    return {"prompt": prompt, "return_full_text": False, "generate_kwargs": kwargs | setting}


def test_beam_scores_match_transformers(server_url, hf_model, hf_tokenizer):
    async def run() -> list[dict]:
        async with httpx.AsyncClient(timeout=900) as http:
            replies = await asyncio.gather(
                *(http.post(server_url + "/chat", json=payload(p, s)) for p, s in CASES)
            )
        for r in replies:
            assert r.status_code == 200, r.text
        return [r.json() for r in replies]

    for (prompt, setting), reply in zip(CASES, asyncio.run(run()), strict=True):
        assert reply["backend"] == "vllm"
        expected = reference(hf_model, hf_tokenizer, prompt, setting)
        assert len(reply["sequences"]) == len(expected)
        for seq, ref in zip(reply["sequences"], expected, strict=True):
            assert [t["id"] for t in seq["tokens"]] == ref["ids"], (prompt, setting)
            got = [t["logprob"] for t in seq["tokens"]]
            assert got == pytest.approx(ref["logprobs"], abs=TOLERANCE), (prompt, setting)
            assert seq["sequence_score"] == pytest.approx(ref["sequence_score"], abs=TOLERANCE)


def test_beams_count_as_engine_requests_and_leave_none_behind(server_url):
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    prompts = continuation_prompts()[3:7]
    setting = {"num_beams": 4, "max_new_tokens": 16}

    async def run() -> float:
        most = 0.0
        async with httpx.AsyncClient(timeout=900) as http:
            jobs = asyncio.gather(
                *(http.post(server_url + "/chat", json=payload(p, setting)) for p in prompts)
            )
            while not jobs.done():
                seen = await asyncio.to_thread(snapshot, server_url, names)
                most = max(most, seen["vllm:num_requests_running"])
                await asyncio.sleep(0.05)
            for r in await jobs:
                assert r.status_code == 200, r.text
        return most

    most_running = asyncio.run(run())
    # Four searches of four beams each: more than one search's beams ran at once.
    assert most_running > setting["num_beams"]
    deadline = time.monotonic() + 10
    while (left := sum(snapshot(server_url, names).values())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == 0
