"""Beam search through the real server equals transformers, token for token.

- Plain beam search: the reply's sequences against transformers 5 ``generate`` on the
  same model (the session's reference model), over 10 prompts and several
  (num_beams, length_penalty, early_stopping, num_return_sequences, min_new_tokens)
  settings. The live server runs the defaults, so these go wherever the routing sends
  them (the vLLM step loop).
- Group (diverse) beam search: against transformers 4.x outputs recorded in
  tests/fixtures/group_beam_reference.json (transformers 5 has it no more; see
  tests/fixtures/make_group_beam_reference.py): every recorded case on our
  implementation in-process, token for token, and one case per setting through the
  server (routing to the transformers backend included).
"""

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import torch

from app.engines.group_beam import group_beam_search
from app.pipeline_text import PipelineDecoder
from bench.workload import continuation_prompts

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "group_beam_reference.json"

PROMPTS = continuation_prompts()[:10]
MAX_NEW_TOKENS = 10
SETTINGS = [
    {"num_beams": 4, "num_return_sequences": 2},
    {"num_beams": 3, "length_penalty": 2.0, "early_stopping": True, "num_return_sequences": 3},
    {"num_beams": 2, "length_penalty": 0.5, "early_stopping": "never"},
    {"num_beams": 4, "length_penalty": -1.0, "num_return_sequences": 4, "min_new_tokens": 5},
    {"num_beams": 3, "length_penalty": 0.0, "early_stopping": "never", "num_return_sequences": 2},
]
# Every prompt under two settings, every setting on four prompts: 20 requests, which the
# step loop on a shared 2-core CPU serves in minutes (each step recomputes the beams).
CASES = [(p, SETTINGS[(i + j) % len(SETTINGS)]) for i, p in enumerate(PROMPTS) for j in (0, 1)]
CONCURRENCY = 8


def reference(hf_model, hf_tokenizer, prompt: str, setting: dict) -> list[list[int]]:
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
            **setting,
        )
    # beam_indices is -1 where a returned beam took no step: each row's length.
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    rows = out.sequences[:, ids.shape[1] :].tolist()
    return [row[:n] for row, n in zip(rows, lengths, strict=True)]


async def post_all(url: str, payloads: list[dict]) -> list[dict]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(http: httpx.AsyncClient, payload: dict) -> dict:
        async with gate:
            r = await http.post(url + "/chat", json=payload)
            assert r.status_code == 200, r.text
            return r.json()

    async with httpx.AsyncClient(timeout=900) as http:
        return await asyncio.gather(*(one(http, p) for p in payloads))


def token_ids(reply: dict) -> list[list[int]]:
    # output_scores puts each token (id, text) in the reply.
    return [[t["id"] for t in seq["tokens"]] for seq in reply["sequences"]]


def test_plain_beam_search_matches_transformers(server_url, hf_model, hf_tokenizer):
    cases = CASES
    payloads = [
        {
            "prompt": p,
            "return_full_text": False,
            "generate_kwargs": {
                "do_sample": False,
                "max_new_tokens": MAX_NEW_TOKENS,
                "output_scores": True,
                **s,
            },
        }
        for p, s in cases
    ]
    replies = asyncio.run(post_all(server_url, payloads))
    mismatches = []
    for (prompt, setting), reply in zip(cases, replies, strict=True):
        want = reference(hf_model, hf_tokenizer, prompt, setting)
        got = token_ids(reply)
        if got != want:
            mismatches.append((prompt, setting, got, want))
        n = setting.get("num_return_sequences", 1)
        assert len(reply["sequences"]) == n
        assert reply["backend"] == "vllm"  # the step loop, batched with everything else
    assert not mismatches, mismatches


def test_beam_search_text_is_the_pipelines(server_url, hf_model, hf_tokenizer):
    """The reply text is what Kaito's pipeline makes of transformers' sequences."""
    prompt, setting = PROMPTS[0], SETTINGS[0]
    reply = asyncio.run(
        post_all(
            server_url,
            [
                {
                    "prompt": prompt,
                    "generate_kwargs": {
                        "do_sample": False,
                        "max_new_tokens": MAX_NEW_TOKENS,
                        **setting,
                    },
                }
            ],
        )
    )[0]
    decoder = PipelineDecoder(hf_tokenizer, hf_tokenizer(prompt).input_ids, clean_up=False)
    texts = [
        decoder.generated_text(prompt, seq, True)
        for seq in reference(hf_model, hf_tokenizer, prompt, setting)
    ]
    assert [s["text"] for s in reply["sequences"]] == texts
    assert reply["Result"] == "".join(texts)


@pytest.fixture(scope="module")
def group_reference() -> dict:
    data = json.loads(FIXTURE.read_text())
    assert data["transformers"].startswith("4."), data["transformers"]
    return data


def group_kwargs(case: dict, eos: int, pad: int) -> dict:
    return {
        "do_sample": False,
        "length_penalty": 1.0,
        "early_stopping": False,
        "num_return_sequences": 1,
        **case["generate_kwargs"],
        "eos_token_id": [eos],
        "pad_token_id": pad,
    }


def test_group_fixture_covers_the_brief(group_reference):
    cases = group_reference["cases"]
    prompts = {c["prompt"] for c in cases}
    settings = {
        (
            c["generate_kwargs"]["num_beams"],
            c["generate_kwargs"]["num_beam_groups"],
            c["generate_kwargs"]["diversity_penalty"],
        )
        for c in cases
    }
    assert len(prompts) >= 10 and len(settings) >= 3


def test_group_beam_search_matches_transformers_4(group_reference, hf_model, hf_tokenizer):
    eos, pad = group_reference["eos_token_id"], group_reference["pad_token_id"]
    mismatches = []
    for case in group_reference["cases"]:
        # The fixture's prompt ids came from the same tokenizer.json under transformers 4.
        assert hf_tokenizer(case["prompt"]).input_ids == case["prompt_ids"]
        got = group_beam_search(hf_model, case["prompt_ids"], group_kwargs(case, eos, pad))
        if [s.token_ids for s in got] != case["sequences"]:
            mismatches.append((case["prompt"], case["generate_kwargs"]))
    assert not mismatches, mismatches


def test_group_beam_search_through_the_server(server_url, group_reference):
    seen = set()
    cases = []
    for case in group_reference["cases"]:
        key = json.dumps(case["generate_kwargs"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            cases.append(case)
    payloads = [
        {
            "prompt": c["prompt"],
            "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "output_scores": True, **c["generate_kwargs"]},
        }
        for c in cases
    ]
    replies = asyncio.run(post_all(server_url, payloads))
    for case, reply in zip(cases, replies, strict=True):
        assert reply["backend"] == "hf"
        assert token_ids(reply) == case["sequences"], case["prompt"]


def test_beam_search_totals_and_eos_ids(server_url, hf_model, hf_tokenizer):
    """max_length / min_length count the prompt; an explicit eos_token_id list wins."""
    period = hf_tokenizer.convert_tokens_to_ids(".")
    prompt = PROMPTS[0]
    prompt_len = len(hf_tokenizer(prompt).input_ids)
    cases = [
        {"num_beams": 3, "max_length": prompt_len + 10, "min_length": prompt_len + 6},
        {"num_beams": 3, "max_new_tokens": 12, "eos_token_id": [period, hf_tokenizer.eos_token_id]},
    ]
    payloads = [
        {
            "prompt": prompt,
            "return_full_text": False,
            "generate_kwargs": {"do_sample": False, "output_scores": True, **c},
        }
        for c in cases
    ]
    replies = asyncio.run(post_all(server_url, payloads))
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    for case, reply in zip(cases, replies, strict=True):
        kwargs = {"eos_token_id": [hf_tokenizer.eos_token_id], **case}
        with torch.inference_mode():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                pad_token_id=hf_tokenizer.pad_token_id,
                return_dict_in_generate=True,
                **kwargs,
            )
        n = int((out.beam_indices[0] >= 0).sum())
        assert token_ids(reply) == [out.sequences[0, ids.shape[1] :].tolist()[:n]], case


def test_beam_sampling_and_beam_rules_go_to_transformers(server_url, hf_model, hf_tokenizer):
    prompt = PROMPTS[1]
    sampling = {"do_sample": True, "num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 8}
    penalty = {"do_sample": False, "num_beams": 3, "repetition_penalty": 1.3, "max_new_tokens": 10}
    payloads = [
        {
            "prompt": prompt,
            "return_full_text": False,
            "generate_kwargs": {**kw, "output_scores": True},
        }
        for kw in (sampling, penalty)
    ]
    sampled, penalised = asyncio.run(post_all(server_url, payloads))
    assert sampled["backend"] == "hf" and len(sampled["sequences"]) == 2
    assert all(1 <= s["generated_tokens"] <= 8 for s in sampled["sequences"])
    assert penalised["backend"] == "hf"
    ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            eos_token_id=[hf_tokenizer.eos_token_id],
            pad_token_id=hf_tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **penalty,
        )
    n = int((out.beam_indices[0] >= 0).sum())
    assert token_ids(penalised) == [out.sequences[0, ids.shape[1] :].tolist()[:n]]
