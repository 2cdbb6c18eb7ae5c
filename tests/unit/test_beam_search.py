"""BeamSearch (app/engines/beam_search.py) against transformers 5 ``generate``.

The oracle is transformers' own ``_beam_search`` on a tiny random Llama in float64: the
state machine is driven with that model's log-probs (recomputed per beam, as the vLLM
step loop gets them), so any difference is a rule, not rounding. Float64 weights keep
the cached (transformers) and recomputed (ours) logits equal to far below float32's
resolution, which both sides use for the beam scores.
"""

import itertools

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from app.engines.beam_search import BeamSearch  # noqa: E402
from param_mapping import BeamSpec  # noqa: E402
from tests.unit.tiny_llama import tiny_llama, top_logprobs, transformers_beams  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model():
    # A tiny model gains nothing from threads; on a shared 2-core machine they only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_llama(seed=0)
    torch.set_num_threads(threads)


_OURS: dict[tuple, list[list[int]]] = {}


def ours_cached(model, prompt, setting):
    """Our sequences for one table row (the coverage test reuses the parity test's runs)."""
    key = (tuple(prompt), tuple(map(str, setting)))
    if key not in _OURS:
        num_beams, lp, es, n, min_new, eos = setting
        spec = BeamSpec(
            num_beams=num_beams, length_penalty=lp, early_stopping=es, num_return_sequences=n
        )
        _OURS[key] = run_ours(model, prompt, spec, 12, min_new, eos)
    return _OURS[key]


def run_ours(model, prompt, spec, max_new, min_new, eos):
    search = BeamSearch(
        spec,
        prompt_len=len(prompt),
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        eos_token_ids=eos,
    )
    steps = 0
    while not search.done:
        beams = search.beams()
        search.step(top_logprobs(model, prompt, beams, search.logprobs_needed))
        steps += 1
        assert steps <= max_new
    return [s.token_ids for s in search.results()]


def run_transformers(model, prompt, spec, max_new, min_new, eos):
    return transformers_beams(model, prompt, spec, max_new, min_new, eos)[1]


PROMPTS = [[5, 6, 7, 8], [2, 11], [30, 31, 32, 33, 34, 35], [12], [20, 9, 9, 17, 4]]
# (num_beams, length_penalty, early_stopping, num_return_sequences, min_new, eos ids)
SETTINGS = [
    (2, 1.0, False, 1, 0, [9]),
    (3, 1.0, True, 2, 0, [9]),
    (4, 1.0, "never", 4, 0, [39]),
    (4, 2.0, False, 3, 0, [9, 39]),
    (4, 0.0, "never", 2, 0, [36]),
    (3, -1.0, False, 3, 2, [9]),
    (4, 1.5, True, 1, 3, [39, 36]),
    (5, 1.0, "never", 5, 0, [9]),
    (4, -0.5, "never", 4, 0, [9]),
    (2, 1.0, False, 2, 0, [3]),
]


@pytest.mark.parametrize(("prompt", "setting"), list(itertools.product(PROMPTS, SETTINGS)))
def test_matches_transformers_beam_search(tiny_model, prompt, setting):
    num_beams, length_penalty, early_stopping, n, min_new, eos = setting
    spec = BeamSpec(
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=n,
    )
    ours = ours_cached(tiny_model, prompt, setting)
    theirs = run_transformers(tiny_model, prompt, spec, 12, min_new, eos)
    assert ours == theirs


def test_the_table_covers_eos_and_length_endings(tiny_model):
    ended = {"eos": 0, "length": 0}
    for prompt, setting in itertools.product(PROMPTS, SETTINGS):
        eos = setting[-1]
        for seq in ours_cached(tiny_model, prompt, setting):
            ended["eos" if seq and seq[-1] in eos else "length"] += 1
    assert ended["eos"] >= 10 and ended["length"] >= 10, ended


def test_first_step_expands_one_beam_and_asks_enough_logprobs():
    spec = BeamSpec(num_beams=4)
    search = BeamSearch(spec, prompt_len=3, max_new_tokens=5, min_new_tokens=0, eos_token_ids=[2])
    assert search.beams() == [[]]
    assert search.logprobs_needed == 8  # max(2, 1 + 1 eos) * 4
    banned = BeamSearch(
        spec, prompt_len=3, max_new_tokens=5, min_new_tokens=2, eos_token_ids=[2, 7]
    )
    assert banned.logprobs_needed == 12 + 2  # 3 * 4, plus the eos ids min length bans


def test_refuses_group_and_sampling_specs():
    with pytest.raises(ValueError):
        BeamSearch(
            BeamSpec(num_beams=4, num_beam_groups=2),
            prompt_len=1,
            max_new_tokens=2,
            min_new_tokens=0,
            eos_token_ids=[2],
        )
    with pytest.raises(ValueError):
        BeamSearch(
            BeamSpec(num_beams=4, do_sample=True),
            prompt_len=1,
            max_new_tokens=2,
            min_new_tokens=0,
            eos_token_ids=[2],
        )


def test_one_token_budget_finishes_in_one_step():
    search = BeamSearch(
        BeamSpec(num_beams=2, num_return_sequences=2),
        prompt_len=2,
        max_new_tokens=1,
        min_new_tokens=0,
        eos_token_ids=[2],
    )
    search.step([[(5, -0.1), (2, -0.5), (7, -2.0), (8, -3.0)]])
    assert search.done
    assert [s.token_ids for s in search.results()] == [[5], [2]]
    assert [s.finish_reason for s in search.results()] == ["length", "stop"]
