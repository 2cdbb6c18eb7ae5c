"""The transformers backend's batches give every request its lone result.

Beam requests with equal settings that wait together run as one left-padded batch
(app/engines/hf_engine.py). These run the real backend (``HFEngine`` on the default
model, no server) and compare, token for token, with the lone oracle:

- plain beam search: transformers 5 ``generate`` on one prompt (the session's reference
  model), which is also what the backend runs for a lone request; with scores, the reply's
  ``sequences_scores`` and per-token log-probabilities (``compute_transition_scores`` with
  ``beam_indices``) equal transformers' within float noise;
- group beam search: the transformers 4.x outputs in
  tests/fixtures/group_beam_reference.json, one prompt at a time there, in batches here,
  sequence scores included.

The worker is held busy while the requests arrive, so they all wait and batch; the
engine records each batch's size to prove it.
"""

import asyncio
import json
import math
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from app.engines.base import GenerationRequest
from app.engines.group_beam import group_beam_search_batch
from app.engines.hf_engine import HFEngine
from app.settings import Settings
from bench.workload import continuation_prompts
from param_mapping import to_generation_plan
from tests.integration.test_beam_parity import group_kwargs

pytestmark = pytest.mark.integration

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "group_beam_reference.json"
PROMPTS = continuation_prompts()[:6]
PLAIN_SETTINGS = [
    {"num_beams": 4, "num_return_sequences": 2, "max_new_tokens": 10},
    {
        "num_beams": 3,
        "length_penalty": 2.0,
        "early_stopping": True,
        "num_return_sequences": 3,
        "max_new_tokens": 8,
    },
    {"num_beams": 2, "length_penalty": 0.5, "early_stopping": "never", "max_new_tokens": 8},
]


class RecordingHFEngine(HFEngine):
    """The real backend, recording the size of each batch it runs."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.batch_sizes: list[int] = []

    def _generate_batch(self, jobs):
        self.batch_sizes.append(len(jobs))
        return super()._generate_batch(jobs)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = RecordingHFEngine(Settings(model=str(model_dir), backend="hf", hf_max_batch=8))
    asyncio.run(engine.start())
    yield engine
    asyncio.run(engine.stop())


def make_request(engine, rid: str, prompt_ids: list[int], kwargs: dict) -> GenerationRequest:
    plan = to_generation_plan(
        {"do_sample": False, **kwargs},
        prompt_tokens=len(prompt_ids),
        prefix_tokens=0,
        special=engine.special_tokens,
        max_model_len=engine.max_model_len,
    )
    assert plan.beam is not None
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=prompt_ids,
        sampling=plan.sampling,
        backend=plan.backend,
        backend_reason=plan.backend_reason,
        beam=plan.beam,
        transformers_kwargs=plan.transformers_kwargs,
    )


async def run_together(engine, requests: list[GenerationRequest]):
    """Sends every request while the worker is busy, so they wait and batch."""
    hold = threading.Event()
    engine._executor.submit(hold.wait, 60)
    tasks = [asyncio.create_task(engine.generate(r)) for r in requests]
    await asyncio.sleep(0.2)
    hold.set()
    return await asyncio.gather(*tasks)


def lone_generate(hf_model, prompt_ids: list[int], request: GenerationRequest):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            return_dict_in_generate=True,
            output_scores=True,
            **request.transformers_kwargs,
        )
        transition = hf_model.compute_transition_scores(
            out.sequences, out.scores, out.beam_indices, normalize_logits=False
        )
    lengths = (out.beam_indices >= 0).sum(dim=-1).tolist()
    rows = out.sequences[:, ids.shape[-1] :].tolist()
    return [
        (row[:n], transition[i, :n].tolist(), float(out.sequences_scores[i]))
        for i, (row, n) in enumerate(zip(rows, lengths, strict=True))
    ]


def test_concurrent_plain_beam_requests_batch_and_equal_lone_generate(
    engine, hf_model, hf_tokenizer
):
    requests, expected = [], []
    for s, setting in enumerate(PLAIN_SETTINGS):
        for p, prompt in enumerate(PROMPTS):
            ids = hf_tokenizer(prompt).input_ids
            # Half the requests ask for scores (the other half must not get them).
            kwargs = {**setting, "output_scores": p % 2 == 0}
            request = make_request(engine, f"plain-{s}-{p}", ids, kwargs)
            requests.append(request)
            expected.append(lone_generate(hf_model, ids, request))
    engine.batch_sizes.clear()
    results = asyncio.run(run_together(engine, requests))
    # One batch per setting (6 prompts each, under the limit of 8).
    assert sorted(engine.batch_sizes) == [6, 6, 6], engine.batch_sizes
    assert len({len(hf_tokenizer(p).input_ids) for p in PROMPTS}) > 1  # padding happened
    mismatches = []
    for request, result, lone in zip(requests, results, expected, strict=True):
        got = [s.token_ids for s in result.sequences]
        if got != [tokens for tokens, _, _ in lone]:
            mismatches.append((request.request_id, got, [t for t, _, _ in lone]))
            continue
        wants = request.sampling.logprobs is not None
        for seq, (_, logprobs, score) in zip(result.sequences, lone, strict=True):
            if not wants:
                assert seq.logprobs is None and seq.sequence_score is None
                continue
            assert seq.sequence_score == pytest.approx(score, abs=1e-4)
            assert seq.logprobs == pytest.approx(logprobs, abs=1e-4)
    assert not mismatches, mismatches


@pytest.fixture(scope="module")
def group_reference() -> dict:
    data = json.loads(FIXTURE.read_text())
    assert data["transformers"].startswith("4."), data["transformers"]
    return data


def group_settings(group_reference) -> dict[str, list[dict]]:
    by_setting: dict[str, list[dict]] = defaultdict(list)
    for case in group_reference["cases"]:
        by_setting[json.dumps(case["generate_kwargs"], sort_keys=True)].append(case)
    return by_setting


def check_group_result(case: dict, sequences, length_penalty: float = 1.0) -> None:
    assert [s.token_ids for s in sequences] == case["sequences"], case
    for seq, score in zip(sequences, case["sequence_scores"], strict=True):
        assert seq.sequence_score == pytest.approx(score, abs=1e-4)
        # The beam score is the processed log-probabilities' sum over length ** penalty.
        assert seq.logprobs is not None and len(seq.logprobs) == len(seq.token_ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in seq.logprobs)
        total = sum(seq.logprobs) / len(seq.token_ids) ** length_penalty
        assert total == pytest.approx(seq.sequence_score, abs=1e-4)


def test_group_beam_search_in_one_batch_equals_transformers_4(group_reference, hf_model):
    """Every fixture case, each setting's prompts (different lengths) in one batch."""
    eos, pad = group_reference["eos_token_id"], group_reference["pad_token_id"]
    for cases in group_settings(group_reference).values():
        kwargs = group_kwargs(cases[0], eos, pad)
        assert len({len(c["prompt_ids"]) for c in cases}) > 1
        results = group_beam_search_batch(hf_model, [c["prompt_ids"] for c in cases], kwargs)
        for case, sequences in zip(cases, results, strict=True):
            check_group_result(case, sequences, kwargs["length_penalty"])


def test_concurrent_group_beam_requests_batch_through_the_engine(engine, group_reference):
    cases = next(iter(group_settings(group_reference).values()))
    requests = [
        make_request(
            engine,
            f"group-{i}",
            case["prompt_ids"],
            {**case["generate_kwargs"], "output_scores": True},
        )
        for i, case in enumerate(cases)
    ]
    kwargs = requests[0].transformers_kwargs
    assert kwargs["eos_token_id"] == [group_reference["eos_token_id"]]
    assert kwargs["pad_token_id"] == group_reference["pad_token_id"]
    engine.batch_sizes.clear()
    results = asyncio.run(run_together(engine, requests))
    assert engine.batch_sizes == [8, len(cases) - 8], engine.batch_sizes
    for case, result in zip(cases, results, strict=True):
        check_group_result(
            case, result.sequences, cases[0]["generate_kwargs"].get("length_penalty", 1.0)
        )
