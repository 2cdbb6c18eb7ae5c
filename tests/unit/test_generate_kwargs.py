"""Table tests for param_mapping: each field, each default, each error."""

import math

import pytest

from param_mapping import KAITO_DEFAULTS, ParameterError, SpecialTokens, to_generation_plan

SPECIAL = SpecialTokens(eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=100)


def plan(kwargs=None, prompt_tokens=5, prefix_tokens=0, max_model_len=1000, hole=None):
    return to_generation_plan(
        kwargs,
        prompt_tokens=prompt_tokens,
        prefix_tokens=prefix_tokens,
        special=SPECIAL,
        max_model_len=max_model_len,
        handle_long_generation=hole,
    )


def test_kaito_defaults_verbatim():
    assert KAITO_DEFAULTS == {
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
        "pad_token_id": None,
        "eos_token_id": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "remove_invalid_values": None,
    }


def test_defaults_sample_with_kaito_values():
    s = plan().sampling
    assert (s.n, s.temperature, s.top_k, s.top_p, s.repetition_penalty) == (1, 1.0, 10, 1.0, 1.0)
    assert s.max_tokens == 195  # max_length 200 counts the 5 prompt tokens
    assert s.min_tokens == 0
    assert s.stop_token_ids == [2] and s.ignore_eos  # the tokenizer's eos, only it
    assert s.stop is None and s.logit_bias is None


# (generate_kwargs, prompt tokens, prefix tokens, expected (max_tokens, min_tokens))
LENGTHS = [
    ({"max_length": 40}, 5, 0, (35, 0)),
    ({"max_length": 40, "min_length": 30}, 5, 0, (35, 25)),
    ({"min_length": 3}, 5, 0, (195, 0)),  # minimum already reached by the prompt
    ({"max_new_tokens": 7}, 5, 0, (7, 0)),
    ({"max_length": 40, "max_new_tokens": 7}, 5, 0, (7, 0)),  # max_new_tokens wins
    ({"min_new_tokens": 4, "min_length": 100}, 5, 0, (195, 4)),  # min_new_tokens wins
    ({"max_length": 20, "min_length": 50}, 5, 0, (15, 15)),  # min above max: max wins
    # The pipeline adds the prefix's length to both totals.
    ({"max_length": 40, "min_length": 30}, 9, 4, (35, 25)),
    ({"max_new_tokens": 6, "min_new_tokens": 6}, 9, 4, (6, 6)),
]


@pytest.mark.parametrize(("kwargs", "prompt", "prefix", "expected"), LENGTHS)
def test_lengths(kwargs, prompt, prefix, expected):
    s = plan(kwargs, prompt_tokens=prompt, prefix_tokens=prefix).sampling
    assert (s.max_tokens, s.min_tokens) == expected


def test_greedy_ignores_sampling_values():
    s = plan({"do_sample": False, "temperature": 0.0, "top_k": 3, "top_p": 0.5}).sampling
    assert (s.temperature, s.top_k, s.top_p) == (0.0, 0, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"temperature": 0},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"typical_p": 0.0},
        {"typical_p": 2.0},
        {"num_beams": 2, "top_p": 0},
    ],
)
def test_greedy_and_plain_beams_ignore_out_of_range_warper_values(kwargs):
    # transformers 5 generate(do_sample=False, ...) warns and ignores these (checked on
    # the default model); only sampling builds the warpers that would reject them.
    s = plan({"do_sample": False, **kwargs}).sampling
    assert (s.temperature, s.top_k, s.top_p) == (0.0, 0, 1.0)
    assert "typical_p" not in s.extra_args


def test_sampling_values_pass_through():
    s = plan(
        {
            "temperature": 0.7,
            "top_k": 0,
            "top_p": 0.9,
            "repetition_penalty": 1.3,
            "num_return_sequences": 3,
        }
    ).sampling
    assert (s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.n) == (0.7, 0, 0.9, 1.3, 3)


@pytest.mark.parametrize(("eos", "expected"), [(5, [5]), ([5, 6], [5, 6]), ([], []), (None, [2])])
def test_eos_token_id(eos, expected):
    assert plan({"eos_token_id": eos}).sampling.stop_token_ids == expected


def test_single_token_bad_words_are_banned():
    assert plan({"bad_words_ids": [[7], [9]]}).sampling.logit_bias == {7: -math.inf, 9: -math.inf}


def test_stop_strings():
    assert plan({"stop_strings": "END"}).sampling.stop == ["END"]
    assert plan({"stop_strings": ["a", "b"]}).sampling.stop == ["a", "b"]


def test_neutral_values_are_accepted():
    # Kaito's full-parameter example: every neutral value must pass.
    full = {**KAITO_DEFAULTS, "pad_token_id": None, "use_cache": True}
    assert plan(full).sampling.max_tokens == 195
    # Warpers do not exist in greedy search, so typical_p is neutral there.
    assert plan({"do_sample": False, "typical_p": 0.5}).sampling.temperature == 0.0
    # Beam-only values do nothing without beams (transformers too).
    plan({"early_stopping": True, "length_penalty": 2.0})
    plan({"early_stopping": "never", "output_scores": True, "return_dict_in_generate": True})


def test_hole_keeps_the_newest_prompt_tokens():
    p = plan({"max_new_tokens": 10}, prompt_tokens=995, max_model_len=1000, hole="hole")
    assert p.keep_last_prompt_tokens == 990
    assert p.sampling.max_tokens == 10
    assert plan({"max_new_tokens": 10}, hole="hole").keep_last_prompt_tokens is None


# (generate_kwargs, extra keyword arguments, parameter named, words in the message)
ERRORS = [
    ({"top_p": 1.5}, {}, "generate_kwargs.top_p", "(0, 1], got 1.5"),
    ({"top_p": 0}, {}, "generate_kwargs.top_p", "(0, 1]"),
    ({"top_k": -1}, {}, "generate_kwargs.top_k", ">= 0"),
    ({"temperature": 0}, {}, "generate_kwargs.temperature", "strictly positive"),
    ({"temperature": -1}, {}, "generate_kwargs.temperature", "strictly positive"),
    ({"temperature": math.nan}, {}, "generate_kwargs.temperature", "finite"),
    ({"repetition_penalty": 0}, {}, "generate_kwargs.repetition_penalty", "strictly positive"),
    ({"typical_p": 0}, {}, "generate_kwargs.typical_p", "(0, 1]"),
    (
        {"num_return_sequences": 2, "do_sample": False},
        {},
        "generate_kwargs.num_return_sequences",
        "greedy",
    ),
    ({"num_return_sequences": 0}, {}, "generate_kwargs.num_return_sequences", ">= 1"),
    ({"max_length": 5}, {}, "generate_kwargs.max_length", "leave room"),
    ({"max_length": 0}, {}, "generate_kwargs.max_length", ">= 1"),
    ({"max_new_tokens": 0}, {}, "generate_kwargs.max_new_tokens", ">= 1"),
    ({"min_length": -1}, {}, "generate_kwargs.min_length", ">= 0"),
    (
        {"max_new_tokens": 10},
        {"prompt_tokens": 995, "max_model_len": 1000},
        "generate_kwargs.max_new_tokens",
        "context length 1000",
    ),
    (
        {"max_new_tokens": 1000},
        {"max_model_len": 1000, "hole": "hole"},
        "generate_kwargs.max_new_tokens",
        "even with",
    ),
    ({}, {"hole": "middle"}, "handle_long_generation", 'null or "hole"'),
    ({"max_length": "abc"}, {}, "generate_kwargs.max_length", "integer"),
    ({"do_sample": "yes"}, {}, "generate_kwargs.do_sample", "true or false"),
    ({"early_stopping": "sometimes"}, {}, "generate_kwargs.early_stopping", "never"),
    ({"eos_token_id": 100}, {}, "generate_kwargs.eos_token_id", "[0, 100)"),
    ({"eos_token_id": [1, -1]}, {}, "generate_kwargs.eos_token_id", "[0, 100)"),
    ({"bad_words_ids": []}, {}, "generate_kwargs.bad_words_ids", "non-empty"),
    ({"bad_words_ids": [5, 6]}, {}, "generate_kwargs.bad_words_ids", "list of lists"),
    ({"bad_words_ids": [[]]}, {}, "generate_kwargs.bad_words_ids", "must not be empty"),
    ({"bad_words_ids": [[500]]}, {}, "generate_kwargs.bad_words_ids", "[0, 100)"),
    ({"stop_strings": []}, {}, "generate_kwargs.stop_strings", "non-empty"),
    ({"diversity_penalty": 0.5}, {}, "generate_kwargs.diversity_penalty", "group beam search"),
    ({"pad_token_id": -3}, {}, "generate_kwargs.pad_token_id", ">= 0"),
    ({"colour": "red"}, {}, "generate_kwargs.colour", "Unknown"),
    ({"min_p": 0.1}, {}, "generate_kwargs.min_p", "not supported"),
]


@pytest.mark.parametrize(("kwargs", "extra", "parameter", "words"), ERRORS)
def test_errors_name_the_parameter(kwargs, extra, parameter, words):
    with pytest.raises(ParameterError) as err:
        plan(kwargs, **extra)
    assert err.value.parameter == parameter
    assert words in err.value.message
