"""Kaito's conversational mode: ``messages`` -> the prompt text the model expects.

transformers' conversational pipeline renders the conversation with the tokenizer's chat
template and ``add_generation_prompt=True`` (so the model answers as the assistant); we do
the same, with the template file of KAITO_CHAT_TEMPLATE instead when it is set.
"""

from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from app.errors import HTTPError

NO_TEMPLATE = (
    "messages need a chat template, and this model's tokenizer has none: send a plain "
    "prompt, or start the server with KAITO_CHAT_TEMPLATE=<template file>."
)


def load_chat_template(setting: str | None) -> str | None:
    """The template text from KAITO_CHAT_TEMPLATE (a file path); None when unset."""
    if not setting:
        return None
    path = Path(setting)
    if not path.is_file():
        raise ValueError(f"KAITO_CHAT_TEMPLATE must name a template file, got {setting!r}")
    return path.read_text()


def build_chat_prompt(
    tokenizer: Any, messages: list[dict[str, str]], template: str | None = None
) -> str:
    """The prompt text for ``messages``: the chat template with the generation prompt.

    It already holds the model's special tokens (BOS, turn markers), so it must be
    tokenized with ``add_special_tokens=False``, as vLLM's chat endpoint does.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise HTTPError(400, NO_TEMPLATE, parameter="messages")
    if not messages:
        raise HTTPError(
            400, "messages must hold at least one message, got [].", parameter="messages"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as exc:
        # Templates refuse conversations they cannot render with raise_exception (e.g.
        # Mistral-Instruct's "roles must alternate user/assistant/..."): the client's.
        raise HTTPError(
            400, f"The model's chat template refused these messages: {exc}", parameter="messages"
        ) from None
    return str(text)
