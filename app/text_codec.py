"""Encode and decode on the /chat hot path: the Rust tokenizer directly, when that is
exactly what transformers would do.

transformers 5's ``encode`` of one string makes a batch of one (``encode_batch``, which
also computes every token's character offsets) and wraps the ids in a ``BatchEncoding``;
its ``decode`` first walks every id in Python (``to_py_obj``). That was a third of our
CPU per request (bench/NOTES.md, change 5). For a tokenizer whose class keeps
transformers' own encode and decode, with no truncation or padding set on its Rust
tokenizer, the direct calls give the same ids and text: the Rust call is the one
transformers makes. Anything else (slow tokenizers, classes that override either step,
clean-up of tokenization spaces) goes through transformers unchanged.
tests/unit/test_text_codec.py holds the two paths equal on a byte-level BPE and a
SentencePiece-style tokenizer.
"""

import weakref
from typing import Any

# Per tokenizer class: whether it encodes and decodes with transformers' own code.
_KEEPS_TRANSFORMERS_STEPS: dict[type, bool] = {}


def _keeps_transformers_steps(cls: type) -> bool:
    known = _KEEPS_TRANSFORMERS_STEPS.get(cls)
    if known is None:
        known = _KEEPS_TRANSFORMERS_STEPS[cls] = _check_steps(cls)
    return known


def _check_steps(cls: type) -> bool:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return False
    if not issubclass(cls, TokenizersBackend):
        return False
    steps = ("encode", "_encode_plus", "decode", "_decode")
    return all(getattr(cls, name) is getattr(TokenizersBackend, name) for name in steps)


def _rust(tokenizer: Any) -> Any | None:
    """The Rust tokenizer, when calling it directly is what transformers would do."""
    if not _keeps_transformers_steps(type(tokenizer)):
        return None
    return tokenizer._tokenizer


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """``tokenizer.encode(text, add_special_tokens=...)``, with no padding or truncation."""
    rust = _rust(tokenizer)
    if (
        rust is None
        or rust.truncation is not None
        or rust.padding is not None
        # transformers sets this flag from split_special_tokens before every encode.
        or rust.encode_special_tokens != bool(tokenizer.split_special_tokens)
    ):
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)  # type: ignore[no-any-return]
    # encode_batch_fast: the same ids as transformers' encode_batch, without the
    # character offsets nobody here reads (a third of the Rust call for our prompts).
    (encoding,) = rust.encode_batch_fast([text], add_special_tokens=add_special_tokens)
    return encoding.ids  # type: ignore[no-any-return]


def decode(tokenizer: Any, token_ids: list[int], skip_special_tokens: bool, clean_up: bool) -> str:
    """``tokenizer.decode`` of a list of ids, with clean_up_tokenization_spaces=clean_up."""
    rust = _rust(tokenizer)
    if rust is None or clean_up:
        # Clean-up has rules of its own in transformers 5 (skipped for BPE with a
        # warning): leave them to it.
        return tokenizer.decode(  # type: ignore[no-any-return]
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=clean_up,
        )
    return rust.decode(token_ids, skip_special_tokens=skip_special_tokens)  # type: ignore[no-any-return]


# Tokens of context an incremental decode starts from: enough for the decoder to place
# word boundaries (SentencePiece's leading space) as the whole decode would. vLLM's
# detokenizer uses 5 (INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
CONTEXT_TOKENS = 6


# Per tokenizer: (its vocabulary size with added tokens, its special added ids). Listing
# the added tokens costs ~10 µs for SmolLM2's 17 and grows with their number; it was paid
# for every streamed sequence. The size tells when tokens were added since.
_SPECIAL_IDS: "weakref.WeakKeyDictionary[Any, tuple[int, frozenset[int]]]" = (
    weakref.WeakKeyDictionary()
)


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` drops before decoding: the Rust
    tokenizer's special added tokens (a superset of ``all_special_ids``: SmolLM2 has 17,
    all_special_ids 3). Empty when that is not the decode in use: nothing is dropped
    from the window then, which is still exact, only slower over runs of them."""
    rust = _rust(tokenizer)
    if rust is None:
        return frozenset()
    size = rust.get_vocab_size(with_added_tokens=True)
    cached = _SPECIAL_IDS.get(tokenizer)
    if cached is None or cached[0] != size:
        ids = frozenset(i for i, t in rust.get_added_tokens_decoder().items() if t.special)
        cached = _SPECIAL_IDS[tokenizer] = (size, ids)
    return cached[1]


class IncrementalDecoder:
    """The text each new token adds to ``decode(context + tokens so far)``, for the cost
    of decoding a short window per token: the prefix_offset / read_offset scheme of
    vLLM's detokenizer and transformers' TextStreamer. Decoding everything again per
    token made a 2000-token stream quadratic.

    The window starts a few tokens back so that word boundaries come out as in the whole
    decode. A token that ends inside a multi-byte character adds "" (the window's text
    ends in U+FFFD) and the token that completes it carries the whole character.
    """

    def __init__(
        self,
        tokenizer: Any,
        context_ids: list[int],
        skip_special_tokens: bool,
        clean_up: bool,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._clean_up = clean_up
        # decode drops these before decoding anything, so leaving them out of the window
        # changes no text; kept in, a run of them (EOS after EOS) would grow the window.
        self._dropped = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        context: list[int] = []
        for token in reversed(context_ids):
            if len(context) == CONTEXT_TOKENS:
                break
            if token not in self._dropped:
                context.append(token)
        context.reverse()
        self._window = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, token_ids: list[int]) -> str:
        return decode(self._tokenizer, token_ids, self._skip_special_tokens, self._clean_up)

    def push(self, token: int) -> str:
        """What ``token`` adds to the text; "" while it waits for the rest of a character."""
        if token in self._dropped:
            return ""
        window = self._window
        window.append(token)
        prefix_text = self._decode(window[self._prefix_offset : self._read_offset])
        new_text = self._decode(window[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # What was read becomes the next window's context; what came before it is done.
        del window[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(window)
        return new_text[len(prefix_text) :]
