"""Payload -> the vLLM SamplingParams the engine would submit: the HTTP layer and the mapping
together, with the fake engine's recorded spec put through the vLLM backend's own
conversion (real vllm.SamplingParams; no engine)."""

import math

import pytest
from vllm.sampling_params import RequestOutputKind

from app.engines.processors import EXTRA_ARGS_KEY
from app.engines.vllm_engine import to_sampling_params

PROMPT = "The capital of France is"


def params_for(client, engine, generate_kwargs=None, **body):
    r = client.post("/chat", json={"prompt": PROMPT, "generate_kwargs": generate_kwargs, **body})
    assert r.status_code == 200, r.text
    # The engine's own stop set (tokenizer + generation_config EOS): the model's eos.
    return to_sampling_params(
        engine.last.sampling, vllm_eos_ids=frozenset({engine.special_tokens.eos_token_id})
    )


def test_kaito_defaults(client, engine, tokenizer):
    p = params_for(client, engine)
    prompt_len = len(tokenizer.encode(PROMPT))
    assert (p.n, p.temperature, p.top_k, p.top_p) == (1, 1.0, 10, 1.0)
    assert (p.max_tokens, p.min_tokens) == (200 - prompt_len, 0)
    assert p.repetition_penalty == 1.0
    assert p.stop_token_ids == [tokenizer.eos_token_id]
    assert p.logprobs is None and not p.logit_bias
    # A plain request never reaches our logits processor.
    assert not (p.extra_args or {}).get(EXTRA_ARGS_KEY)
    assert p.output_kind == RequestOutputKind.FINAL_ONLY
    assert p.include_stop_str_in_output and not p.detokenize


@pytest.mark.parametrize(
    ("generate_kwargs", "expected"),
    [
        (
            {"do_sample": False, "temperature": 0.3, "top_k": 3, "top_p": 0.5},
            {"temperature": 0.0, "top_k": 0, "top_p": 1.0},
        ),
        (
            {"temperature": 0.7, "top_k": 0, "top_p": 0.9},
            {"temperature": 0.7, "top_k": 0, "top_p": 0.9},
        ),
        ({"max_new_tokens": 5, "min_new_tokens": 3}, {"max_tokens": 5, "min_tokens": 3}),
        ({"num_return_sequences": 3}, {"n": 3}),
        ({"eos_token_id": [5, 6]}, {"stop_token_ids": [5, 6]}),
        ({"bad_words_ids": [[7], [9]]}, {"logit_bias": {7: -math.inf, 9: -math.inf}}),
        ({"stop_strings": "END"}, {"stop": ["END"], "detokenize": True}),
        ({"output_scores": True}, {"logprobs": 0}),
    ],
)
def test_each_field_reaches_sampling_params(client, engine, generate_kwargs, expected):
    p = params_for(client, engine, generate_kwargs)
    assert {name: getattr(p, name) for name in expected} == expected


def test_min_length_is_vllms_builtin_when_it_bans_the_same_eos(client, engine, tokenizer):
    prompt_len = len(tokenizer.encode(PROMPT))
    p = params_for(client, engine, {"min_length": prompt_len + 4})
    assert p.min_tokens == 4
    assert not (p.extra_args or {}).get(EXTRA_ARGS_KEY)


def test_rules_vllm_lacks_go_to_the_processor_and_vllms_step_is_neutral(client, engine):
    p = params_for(
        client, engine, {"repetition_penalty": 1.3, "typical_p": 0.5, "no_repeat_ngram_size": 2}
    )
    rules = p.extra_args[EXTRA_ARGS_KEY]
    assert rules["repetition_penalty"] == 1.3 and rules["no_repeat_ngram_size"] == 2
    # typical_p comes last in transformers' warper chain: the whole chain runs in ours.
    assert rules["warpers"] == {"temperature": 1.0, "top_k": 10, "top_p": 1.0, "typical_p": 0.5}
    # transformers divides by the penalty where vLLM multiplies by 1/penalty: ours only.
    assert (p.repetition_penalty, p.temperature, p.top_k, p.top_p) == (1.0, 1.0, 0, 1.0)
