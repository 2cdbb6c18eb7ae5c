"""The prompt builder for /chat ``messages``, against the tokenizer itself."""

import pytest
from transformers import AutoTokenizer

from app.chat_template import build_chat_prompt, load_chat_template
from app.errors import HTTPError
from app.settings import DEFAULT_MODEL_DIR

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Tell me a joke"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_text_as_apply_chat_template(tokenizer, messages):
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert build_chat_prompt(tokenizer, messages) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_template_file(tmp_path, tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    template = load_chat_template(str(path))
    assert (
        build_chat_prompt(tokenizer, CONVERSATIONS[0], template)
        == "user: What is the capital of France?\n"
    )
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="KAITO_CHAT_TEMPLATE"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_no_template_is_a_400(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", None)
    with pytest.raises(HTTPError) as err:
        build_chat_prompt(tokenizer, CONVERSATIONS[0])
    assert err.value.status_code == 400 and "chat template" in err.value.detail


# Mistral-7B-Instruct's template refuses what it cannot render, like this.
ALTERNATING_ONLY = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}[{{ m.role }}] {{ m.content }} {% endfor %}"
)


def test_a_template_that_refuses_the_conversation_is_a_400(tokenizer):
    ok = [{"role": "user", "content": "Hi"}]
    assert build_chat_prompt(tokenizer, ok, ALTERNATING_ONLY) == "[user] Hi "
    with pytest.raises(HTTPError) as err:
        build_chat_prompt(tokenizer, CONVERSATIONS[1], ALTERNATING_ONLY)  # has a system turn
    assert err.value.status_code == 400 and err.value.parameter == "messages"
    assert "roles must alternate" in err.value.detail
