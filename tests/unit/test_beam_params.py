"""Beam parameters in the mapping (param_mapping/beam.py): validation, spec, routing."""

import pytest

from param_mapping import BeamSpec, ParameterError, SamplingSpec, SpecialTokens, to_generation_plan
from param_mapping.beam import beam_route

SPECIAL = SpecialTokens(eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=100)


def plan(kwargs=None, max_num_beams=8, prompt_tokens=5):
    return to_generation_plan(
        kwargs,
        prompt_tokens=prompt_tokens,
        prefix_tokens=0,
        special=SPECIAL,
        max_model_len=1000,
        max_num_beams=max_num_beams,
    )


def test_no_beams_by_default():
    p = plan()
    assert p.beam is None and p.backend == "vllm" and p.backend_reason is None


def test_plain_beam_search_spec():
    p = plan(
        {
            "num_beams": 4,
            "do_sample": False,
            "length_penalty": 0.5,
            "early_stopping": "never",
            "num_return_sequences": 3,
            "max_new_tokens": 7,
        }
    )
    assert p.beam == BeamSpec(
        num_beams=4, length_penalty=0.5, early_stopping="never", num_return_sequences=3
    )
    assert p.backend == "vllm"  # the step loop reproduces it
    assert p.sampling.temperature == 0.0 and p.sampling.max_tokens == 7


def test_group_beam_search_spec():
    p = plan({"num_beams": 6, "num_beam_groups": 3, "diversity_penalty": 1.5, "do_sample": False})
    assert p.beam == BeamSpec(num_beams=6, num_beam_groups=3, diversity_penalty=1.5)
    assert p.beam.is_group
    assert (p.backend, p.backend_reason) == ("hf", "generate_kwargs.num_beam_groups")


def test_beam_sampling_goes_to_transformers():
    p = plan({"num_beams": 3, "do_sample": True, "top_k": 5})
    assert p.beam == BeamSpec(num_beams=3, do_sample=True)
    assert (p.backend, p.backend_reason) == ("hf", "generate_kwargs.do_sample")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"repetition_penalty": 1.2}, "generate_kwargs.repetition_penalty"),
        ({"stop_strings": ["."]}, "generate_kwargs.stop_strings"),
        ({"bad_words_ids": [[7]]}, "generate_kwargs.bad_words_ids"),
    ],
)
def test_beam_search_with_rules_the_step_loop_lacks_goes_to_transformers(extra, reason):
    p = plan({"num_beams": 2, "do_sample": False, **extra})
    assert (p.backend, p.backend_reason) == ("hf", reason)


def test_beam_route_sends_other_processors_to_transformers():
    beam = BeamSpec(num_beams=2)
    assert beam_route(beam, SamplingSpec()) == ("vllm", None)
    assert beam_route(beam, SamplingSpec(extra_args={"no_repeat_ngram_size": 2}))[0] == "hf"
    assert beam_route(None, SamplingSpec(repetition_penalty=1.3)) == ("vllm", None)


def test_greedy_beams_may_return_several_sequences():
    p = plan({"num_beams": 4, "num_return_sequences": 4, "do_sample": False})
    assert p.beam is not None and p.beam.num_return_sequences == 4


def test_transformers_kwargs_resolve_lengths_and_ids():
    p = plan(
        {
            "num_beams": 3,
            "do_sample": False,
            "max_length": 20,
            "min_length": 8,
            "length_penalty": 2.0,
        },
        prompt_tokens=5,
    )
    kw = p.transformers_kwargs
    assert kw["max_new_tokens"] == 15 and kw["min_new_tokens"] == 3
    assert "max_length" not in kw and "min_length" not in kw
    assert kw["eos_token_id"] == [2] and kw["pad_token_id"] == 2
    assert kw["num_beams"] == 3 and kw["length_penalty"] == 2.0 and kw["do_sample"] is False
    assert "output_scores" not in kw and "return_dict_in_generate" not in kw


ERRORS = [
    ({"num_beams": 9}, {}, "generate_kwargs.num_beams", "<= 8"),
    ({"num_beams": 3}, {"max_num_beams": 2}, "generate_kwargs.num_beams", "KAITO_MAX_NUM_BEAMS"),
    ({"num_beams": 0}, {}, "generate_kwargs.num_beams", ">= 1"),
    (
        {"num_beams": 4, "num_beam_groups": 3, "diversity_penalty": 1.0, "do_sample": False},
        {},
        "generate_kwargs.num_beam_groups",
        "divisible",
    ),
    (
        {"num_beams": 1, "num_beam_groups": 2, "diversity_penalty": 1.0, "do_sample": False},
        {},
        "generate_kwargs.num_beam_groups",
        "divisible",
    ),
    (
        {"num_beams": 4, "num_beam_groups": 2, "do_sample": False},
        {},
        "generate_kwargs.diversity_penalty",
        "greater than 0",
    ),
    (
        {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": -1.0, "do_sample": False},
        {},
        "generate_kwargs.diversity_penalty",
        ">= 0",
    ),
    (
        {"num_beams": 4, "diversity_penalty": 1.0},
        {},
        "generate_kwargs.diversity_penalty",
        "group beam search",
    ),
    (
        {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 1.0, "do_sample": True},
        {},
        "generate_kwargs.do_sample",
        "cannot sample",
    ),
    (
        {
            "num_beams": 4,
            "num_beam_groups": 2,
            "diversity_penalty": 1.0,
            "do_sample": False,
            "stop_strings": "x",
        },
        {},
        "generate_kwargs.stop_strings",
        "group beam search",
    ),
    (
        {"num_beams": 2, "num_return_sequences": 3},
        {},
        "generate_kwargs.num_return_sequences",
        "<= num_beams",
    ),
    ({"num_beams": 2, "length_penalty": "long"}, {}, "generate_kwargs.length_penalty", "number"),
    (
        {"num_beams": 2, "early_stopping": "sometimes"},
        {},
        "generate_kwargs.early_stopping",
        "never",
    ),
    ({"num_beams": 2.5}, {}, "generate_kwargs.num_beams", "integer"),
]


@pytest.mark.parametrize(("kwargs", "extra", "parameter", "words"), ERRORS)
def test_errors_name_the_parameter(kwargs, extra, parameter, words):
    with pytest.raises(ParameterError) as err:
        plan(kwargs, **extra)
    assert err.value.parameter == parameter
    assert words in err.value.message
