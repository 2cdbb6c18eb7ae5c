"""Server-side caps on request sizes, checked before any mapping or engine work.

transformers has no such caps (one request at a time, on the caller's own machine); a
shared server needs them so one request cannot take an unbounded share of the engine or
of a logits processor's per-step work.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from param_mapping.errors import ParameterError


@dataclass(frozen=True)
class Limits:
    max_num_return_sequences: int = 16
    # Banned words are checked at every step for every sequence.
    max_bad_words: int = 1024
    max_bad_word_tokens: int = 64
    # An n-gram ban keeps a table of every n-gram seen; larger n buys nothing in practice.
    max_ngram_size: int = 64


def _too_large(key: str, value: object, limit: int, what: str = "") -> ParameterError:
    return ParameterError(
        f"generate_kwargs.{key}", f"{key}{what} must be <= {limit} on this server, got {value}."
    )


def check_limits(generate_kwargs: Mapping[str, Any], limits: Limits) -> None:
    """Raises ParameterError naming the parameter and the limit; ignores ill-typed values
    (the mapping reports those with its own message)."""
    n = generate_kwargs.get("num_return_sequences")
    if isinstance(n, int) and n > limits.max_num_return_sequences:
        raise _too_large("num_return_sequences", n, limits.max_num_return_sequences)
    for key in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        size = generate_kwargs.get(key)
        if isinstance(size, int) and size > limits.max_ngram_size:
            raise _too_large(key, size, limits.max_ngram_size)
    bad = generate_kwargs.get("bad_words_ids")
    if isinstance(bad, list):
        if len(bad) > limits.max_bad_words:
            raise _too_large("bad_words_ids", len(bad), limits.max_bad_words, " (entries)")
        longest = max((len(w) for w in bad if isinstance(w, list)), default=0)
        if longest > limits.max_bad_word_tokens:
            raise _too_large(
                "bad_words_ids", longest, limits.max_bad_word_tokens, " (tokens per entry)"
            )
