"""The /chat request schema: Kaito's fields and defaults, what parses (422 otherwise),
and what is left for the mapping to judge (400 naming the parameter)."""

import pytest
from pydantic import ValidationError

from app.schemas import ChatRequest, ChatResponse, GenerateKwargs, Sequence, Usage
from param_mapping import KAITO_DEFAULTS


def test_top_level_defaults_are_kaitos():
    r = ChatRequest(prompt="hi")
    assert r.return_full_text is True
    assert r.clean_up_tokenization_spaces is False
    assert (r.prefix, r.handle_long_generation, r.generate_kwargs, r.messages) == (None,) * 4


def test_generate_kwargs_defaults_are_kaitos_field_for_field():
    defaults = GenerateKwargs().model_dump()
    assert {name: defaults[name] for name in KAITO_DEFAULTS} == KAITO_DEFAULTS


def test_only_what_the_client_sent_goes_to_the_mapping():
    # The mapping adds the defaults, and must see unknown names to refuse them by name.
    r = ChatRequest(prompt="hi", generate_kwargs={"top_k": 5, "colour": "red"})
    assert r.generate_kwargs_given() == {"top_k": 5, "colour": "red"}
    assert ChatRequest(prompt="hi").generate_kwargs_given() == {}


def test_a_missing_prompt_parses_so_the_server_can_answer_kaitos_400():
    assert ChatRequest().prompt is None
    assert ChatRequest(prompt="").prompt == ""


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "generate_kwargs": {"max_length": "abc"}}, "max_length"),
        ({"prompt": "x", "generate_kwargs": {"do_sample": "maybe"}}, "do_sample"),
        ({"prompt": "x", "generate_kwargs": {"temperature": [1]}}, "temperature"),
        ({"prompt": "x", "generate_kwargs": {"early_stopping": "sometimes"}}, "early_stopping"),
        ({"prompt": "x", "generate_kwargs": {"bad_words_ids": "12"}}, "bad_words_ids"),
        ({"prompt": "x", "generate_kwargs": {"eos_token_id": "eos"}}, "eos_token_id"),
        ({"prompt": 12}, "prompt"),
        ({"prompt": "x", "return_full_text": "perhaps"}, "return_full_text"),
        ({"prompt": "x", "generate_kwargs": "top_k=5"}, "generate_kwargs"),
        ({"messages": [{"role": "user"}]}, "content"),
    ],
)
def test_type_errors_name_the_field(body, field):
    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate(body)
    assert any(field in map(str, e["loc"]) for e in err.value.errors())


@pytest.mark.parametrize(
    "generate_kwargs",
    [
        {"early_stopping": "never"},
        {"bad_words_ids": [[1], [2, 3]]},
        {"bad_words_ids": [1, 2]},  # Kaito's schema type; the mapping explains the shape
        {"eos_token_id": [1, 2]},
        {"stop_strings": "END"},
        {"max_length": 200, "top_p": 1, "typical_p": 1},  # ints for floats, as clients send
    ],
)
def test_shapes_clients_send_parse(generate_kwargs):
    ChatRequest.model_validate({"prompt": "x", "generate_kwargs": generate_kwargs})


def test_the_reply_keeps_kaitos_result_field():
    reply = ChatResponse(
        Result="a b",
        sequences=[Sequence(text="a b", finish_reason="length", generated_tokens=1)],
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
        backend="vllm",
    )
    assert reply.model_dump()["Result"] == "a b"
