"""BeamSearch's scores and parents against transformers 5 ``generate`` (tiny float64 model).

- ``results()`` carry transformers' ``sequences_scores`` and each token's transition
  score (``compute_transition_scores`` with ``beam_indices``);
- ``parents`` names, after each step, the beam each running beam grew from: what the
  vLLM loop uses to hand a parent's engine request to its child.
"""

import itertools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from app.engines.beam_search import BeamSearch  # noqa: E402
from param_mapping import BeamSpec  # noqa: E402
from tests.unit.tiny_llama import tiny_llama, top_logprobs, transformers_beams  # noqa: E402

MAX_NEW = 10


@pytest.fixture(scope="module")
def tiny_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(seed=1)
    torch.set_num_threads(threads)


def run_ours(model, prompt, spec, min_new, eos):
    search = BeamSearch(
        spec,
        prompt_len=len(prompt),
        max_new_tokens=MAX_NEW,
        min_new_tokens=min_new,
        eos_token_ids=eos,
    )
    while not search.done:
        beams = search.beams()
        search.step(top_logprobs(model, prompt, beams, search.logprobs_needed))
        if not search.done:
            for parent, tokens in zip(search.parents, search.beams(), strict=True):
                assert tokens[:-1] == beams[parent]
    return search.results()


def run_transformers(model, prompt, spec, min_new, eos):
    out, rows = transformers_beams(model, prompt, spec, MAX_NEW, min_new, eos)
    transitions = model.compute_transition_scores(
        out.sequences, out.scores, out.beam_indices, normalize_logits=False
    )
    return [
        (row, transitions[i, : len(row)].tolist(), float(out.sequences_scores[i]))
        for i, row in enumerate(rows)
    ]


PROMPTS = [[5, 6, 7, 8], [2, 11], [20, 9, 9, 17, 4]]
# (num_beams, length_penalty, early_stopping, num_return_sequences, min_new, eos ids)
SETTINGS = [
    (3, 1.0, True, 2, 0, [9]),
    (4, 2.0, False, 3, 0, [9, 39]),
    (3, -1.0, False, 3, 2, [9]),
    (4, 0.0, "never", 4, 0, [36]),
]


@pytest.mark.parametrize(("prompt", "setting"), list(itertools.product(PROMPTS, SETTINGS)))
def test_scores_match_transformers(tiny_model, prompt, setting):
    num_beams, length_penalty, early_stopping, n, min_new, eos = setting
    spec = BeamSpec(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=n,
    )
    ours = run_ours(tiny_model, prompt, spec, min_new, eos)
    theirs = run_transformers(tiny_model, prompt, spec, min_new, eos)
    assert len(ours) == len(theirs)
    for seq, (ids, transitions, score) in zip(ours, theirs, strict=True):
        assert seq.token_ids == ids
        assert seq.logprobs == pytest.approx(transitions, abs=1e-5)
        assert seq.sequence_score == pytest.approx(score, abs=1e-5)
