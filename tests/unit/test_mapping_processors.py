"""Table tests: generate_kwargs served by the logits processor, their errors, and how
the vLLM backend routes them (app/engines/processors/routing.py). Pure functions."""

import math

import pytest

from app.engines.processors import EXTRA_ARGS_KEY
from app.engines.processors.routing import processor_rules
from param_mapping import ParameterError, SpecialTokens, to_generation_plan

SPECIAL = SpecialTokens(eos_token_id=2, pad_token_id=2, bos_token_id=1, vocab_size=100)


def plan(kwargs=None, prompt_tokens=5, max_model_len=1000):
    return to_generation_plan(
        kwargs,
        prompt_tokens=prompt_tokens,
        prefix_tokens=0,
        special=SPECIAL,
        max_model_len=max_model_len,
    )


# (generate_kwargs, expected SamplingSpec.extra_args)
EXTRA_ARGS = [
    ({}, {}),
    ({"typical_p": 0.5}, {"typical_p": 0.5}),
    ({"typical_p": 1.0}, {}),  # transformers builds no TypicalLogitsWarper at 1
    ({"typical_p": 0.5, "do_sample": False}, {}),  # no warpers in greedy search
    ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 3}),
    ({"no_repeat_ngram_size": 0}, {}),
    ({"no_repeat_ngram_size": 1000}, {"no_repeat_ngram_size": 1000}),  # = context length
    ({"encoder_no_repeat_ngram_size": 2}, {"encoder_no_repeat_ngram_size": 2}),
    ({"forced_bos_token_id": 0}, {"forced_bos_token_id": 0}),
    ({"forced_eos_token_id": 99}, {"forced_eos_token_id": 99}),
    ({"remove_invalid_values": True}, {"remove_invalid_values": True}),
    ({"remove_invalid_values": False}, {}),
    ({"remove_invalid_values": None}, {}),
    ({"bad_words_ids": [[7]]}, {}),  # one token: a logit bias
    ({"bad_words_ids": [[7, 8], [9], [7, 8], [1, 2, 3]]}, {"bad_words_ids": [[7, 8], [1, 2, 3]]}),
    ({"bad_words_ids": [[2, 5]]}, {"bad_words_ids": [[2, 5]]}),  # eos only dropped alone
]


@pytest.mark.parametrize(("kwargs", "expected"), EXTRA_ARGS)
def test_processor_values_travel_in_extra_args(kwargs, expected):
    assert plan(kwargs).sampling.extra_args == expected


# (generate_kwargs, expected logit_bias)
BAD_WORD_BIAS = [
    ({"bad_words_ids": [[7], [9]]}, {7: -math.inf, 9: -math.inf}),
    # transformers' NoBadWordsLogitsProcessor drops one-token words equal to an eos id.
    ({"bad_words_ids": [[2], [9]]}, {9: -math.inf}),
    ({"bad_words_ids": [[7], [9]], "eos_token_id": [9, 3]}, {7: -math.inf}),
    ({"bad_words_ids": [[7, 8]]}, None),
]


@pytest.mark.parametrize(("kwargs", "expected"), BAD_WORD_BIAS)
def test_single_token_bad_words(kwargs, expected):
    assert plan(kwargs).sampling.logit_bias == expected


@pytest.mark.parametrize(
    ("kwargs", "logprobs"),
    [
        ({}, None),
        ({"output_scores": True}, 0),
        ({"return_dict_in_generate": True}, 0),
        ({"output_scores": True, "return_dict_in_generate": True}, 0),
        ({"output_scores": False, "return_dict_in_generate": False}, None),
    ],
)
def test_scores_ask_for_logprobs(kwargs, logprobs):
    assert plan(kwargs).sampling.logprobs == logprobs


def test_every_processor_value_stays_on_vllm():
    kwargs = {
        "typical_p": 0.4,
        "no_repeat_ngram_size": 2,
        "encoder_no_repeat_ngram_size": 3,
        "bad_words_ids": [[5], [6, 7]],
        "forced_bos_token_id": 1,
        "forced_eos_token_id": 2,
        "remove_invalid_values": True,
        "output_scores": True,
    }
    assert plan(kwargs).backend == "vllm"


# (generate_kwargs, extra arguments, generate_kwargs.<parameter> named, words in the message)
ERRORS = [
    ({"no_repeat_ngram_size": -1}, {}, "no_repeat_ngram_size", ">= 0"),
    ({"no_repeat_ngram_size": 2.5}, {}, "no_repeat_ngram_size", "integer"),
    ({"no_repeat_ngram_size": True}, {}, "no_repeat_ngram_size", "integer"),
    ({"no_repeat_ngram_size": 1001}, {}, "no_repeat_ngram_size", "context length 1000"),
    ({"encoder_no_repeat_ngram_size": -2}, {}, "encoder_no_repeat_ngram_size", ">= 0"),
    ({"encoder_no_repeat_ngram_size": 10**9}, {}, "encoder_no_repeat_ngram_size", "never repeat"),
    ({"forced_bos_token_id": 100}, {}, "forced_bos_token_id", "[0, 100)"),
    ({"forced_bos_token_id": -1}, {}, "forced_bos_token_id", "[0, 100)"),
    ({"forced_eos_token_id": True}, {}, "forced_eos_token_id", "[0, 100)"),
    ({"forced_eos_token_id": [2]}, {}, "forced_eos_token_id", "[0, 100)"),
    ({"forced_eos_token_id": "2"}, {}, "forced_eos_token_id", "[0, 100)"),
    ({"remove_invalid_values": "yes"}, {}, "remove_invalid_values", "true or false"),
    ({"remove_invalid_values": 1}, {}, "remove_invalid_values", "true or false"),
    ({"typical_p": 1.5}, {}, "typical_p", "(0, 1]"),
    ({"typical_p": -0.1}, {}, "typical_p", "(0, 1]"),
    ({"typical_p": "high"}, {}, "typical_p", "number"),
    ({"bad_words_ids": [[1, [2]]]}, {}, "bad_words_ids", "token ids"),
    ({"bad_words_ids": [[[1]]]}, {}, "bad_words_ids", "token ids"),
    ({"bad_words_ids": [[1, -1]]}, {}, "bad_words_ids", "[0, 100)"),
    ({"bad_words_ids": [[3, 100]]}, {}, "bad_words_ids", "[0, 100)"),
    ({"bad_words_ids": [[True]]}, {}, "bad_words_ids", "token ids"),
    ({"bad_words_ids": [[4], []]}, {}, "bad_words_ids", "must not be empty"),
    ({"bad_words_ids": [[4], 5]}, {}, "bad_words_ids", "list of lists"),
    ({"bad_words_ids": {"a": [1]}}, {}, "bad_words_ids", "non-empty list"),
    # transformers drops the eos entry, then refuses an empty list of bad words.
    ({"bad_words_ids": [[2]]}, {}, "bad_words_ids", "only lists eos ids"),
    ({"output_scores": "yes"}, {}, "output_scores", "true or false"),
    ({"return_dict_in_generate": 1}, {}, "return_dict_in_generate", "true or false"),
]


@pytest.mark.parametrize(("kwargs", "extra", "parameter", "words"), ERRORS)
def test_errors_name_the_parameter(kwargs, extra, parameter, words):
    with pytest.raises(ParameterError) as err:
        plan(kwargs, **extra)
    assert err.value.parameter == f"generate_kwargs.{parameter}"
    assert words in err.value.message


# --- routing to vLLM: what the processor runs and what vLLM must not do twice ----------


def route(kwargs, **extra):
    return processor_rules(plan(kwargs, **extra).sampling)


def test_plain_requests_do_not_touch_the_processor():
    for kwargs in (
        {},
        {"do_sample": False},
        {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
        {"bad_words_ids": [[7]]},
        {"output_scores": True},
        {"stop_strings": "x"},
    ):
        assert route(kwargs) == ({}, {}), kwargs


def test_repetition_penalty_is_ours_and_vllms_is_off():
    overrides, extra = route({"repetition_penalty": 1.3})
    assert overrides == {"repetition_penalty": 1.0}
    assert extra == {EXTRA_ARGS_KEY: {"repetition_penalty": 1.3}}


def test_min_length_is_ours_with_exactly_the_eos_ids():
    overrides, extra = route({"min_new_tokens": 4, "eos_token_id": [2, 7]})
    assert overrides == {"min_tokens": 0}
    assert extra[EXTRA_ARGS_KEY] == {"min_new_tokens": 4, "eos_token_ids": [2, 7]}
    # min_length counts the prompt (5 tokens here).
    assert route({"min_length": 8})[1][EXTRA_ARGS_KEY]["min_new_tokens"] == 3
    # No eos ids: transformers builds no MinLength processor; nothing to ban.
    assert route({"min_new_tokens": 4, "eos_token_id": []}) == ({"min_tokens": 0}, {})


def test_min_length_uses_vllms_builtin_when_it_bans_the_same_ids():
    # The engine adds eos 2 to every stop set: a client whose eos ids include it gets
    # vLLM's vectorised min_tokens, the same ban as transformers'.
    engine_eos = frozenset({2})
    assert processor_rules(plan({"min_new_tokens": 4}).sampling, engine_eos) == ({}, {})
    spec = plan({"min_new_tokens": 4, "eos_token_id": [2, 7]}).sampling
    assert processor_rules(spec, engine_eos) == ({}, {})
    # vLLM would also ban 2, which this client does not treat as eos: ours.
    spec = plan({"min_new_tokens": 4, "eos_token_id": 7}).sampling
    assert processor_rules(spec, engine_eos)[1][EXTRA_ARGS_KEY]["eos_token_ids"] == [7]
    # vLLM's minimum also holds stop strings back; transformers' does not: ours.
    spec = plan({"min_new_tokens": 4, "stop_strings": ["x"]}).sampling
    assert processor_rules(spec, engine_eos)[0] == {"min_tokens": 0}
    # Unknown engine ids: ours, as before.
    assert processor_rules(plan({"min_new_tokens": 4}).sampling, None)[0] == {"min_tokens": 0}


def test_builtin_min_tokens_never_exceeds_max_tokens():
    # transformers accepts a minimum past the maximum (eos is simply never allowed);
    # vLLM refuses it: the mapping clamps it, which changes nothing.
    spec = plan({"min_new_tokens": 50, "max_new_tokens": 10}).sampling
    assert (spec.min_tokens, spec.max_tokens) == (10, 10)
    assert processor_rules(spec, frozenset({2})) == ({}, {})


def test_typical_p_takes_the_whole_warper_chain():
    overrides, extra = route({"typical_p": 0.6, "temperature": 0.7, "top_k": 20, "top_p": 0.9})
    assert overrides == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert extra[EXTRA_ARGS_KEY] == {
        "warpers": {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "typical_p": 0.6}
    }


def test_forced_eos_is_due_at_the_last_new_token():
    # transformers forces it when cur_len == max_length - 1: max_length 40 with a
    # 5-token prompt leaves 35 new tokens, the last one at 34 tokens generated.
    _, extra = route({"forced_eos_token_id": 2, "max_length": 40})
    assert extra[EXTRA_ARGS_KEY] == {"forced_eos_token_id": 2, "forced_eos_at": 34}
    _, extra = route({"forced_eos_token_id": 3, "max_new_tokens": 1})
    assert extra[EXTRA_ARGS_KEY]["forced_eos_at"] == 0


def test_bans_and_forced_tokens_leave_vllm_sampling_alone():
    kwargs = {
        "no_repeat_ngram_size": 2,
        "bad_words_ids": [[5], [6, 7]],
        "forced_bos_token_id": 1,
        "remove_invalid_values": True,
        "temperature": 0.5,
        "top_k": 3,
    }
    overrides, extra = route(kwargs)
    assert overrides == {}
    assert extra[EXTRA_ARGS_KEY] == {
        "no_repeat_ngram_size": 2,
        "bad_words_ids": [[6, 7]],
        "forced_bos_token_id": 1,
        "remove_invalid_values": True,
    }


def test_other_extra_args_pass_through():
    spec = plan({"no_repeat_ngram_size": 2}).sampling
    spec.extra_args["someone_elses"] = 1
    _, extra = processor_rules(spec)
    assert extra["someone_elses"] == 1 and "no_repeat_ngram_size" not in extra


def test_temperature_above_vllms_range_takes_the_whole_warper_chain():
    # transformers takes any positive temperature; vLLM's SamplingParams stop at 2.
    overrides, extra = route({"temperature": 3.0, "top_k": 5})
    assert overrides == {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    warpers = next(iter(extra.values()))["warpers"]
    assert warpers == {"temperature": 3.0, "top_k": 5, "top_p": 1.0, "typical_p": 1.0}
    assert route({"temperature": 2.0}) == ({}, {})  # vLLM's own range: vLLM does it
