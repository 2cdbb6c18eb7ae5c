"""transformers' logits rules for one request, in plain torch.

Each function reproduces one class of transformers ``generation/logits_process.py`` (5.x)
with the same tensor operations, so the same logits give the same result bit for bit.
``RowState.process`` applies them in the order ``GenerationMixin._get_logits_processor``
builds them:

    repetition_penalty -> no_repeat_ngram_size -> encoder_no_repeat_ngram_size
    -> bad_words_ids -> min_length / min_new_tokens -> forced_bos_token_id
    -> forced_eos_token_id -> remove_invalid_values
    -> (sampling only) temperature -> top_k -> top_p -> typical_p

Lengths follow transformers' decoder-only rule: ``cur_len`` counts the prompt and the
tokens generated so far. This module never imports vLLM; ``vllm_processor`` adapts it.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

NEG_INF = -math.inf

# Sanity bounds on what a request may carry into the engine. The mapping enforces the
# real limits (vocabulary, context length) with clear 400s; these only keep a malformed
# value from costing the engine memory or time.
_MAX_NGRAM = 1 << 20
_MAX_IDS = 1 << 20


# ---------------------------------------------------------------------------------------
# The per-request values, as they travel in SamplingParams.extra_args (JSON-like).


@dataclass(frozen=True)
class Warpers:
    """transformers' sampling warpers, applied by the processor (vLLM's are neutralised)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0


@dataclass(frozen=True)
class RuleArgs:
    """One request's rule values. Neutral values mean "rule off"."""

    repetition_penalty: float | None = None
    no_repeat_ngram_size: int = 0
    encoder_no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    # Number of generated tokens at which the forced EOS is due: transformers forces it
    # when cur_len == max_length - 1, i.e. for the last token allowed (max_tokens - 1).
    forced_eos_at: int | None = None
    remove_invalid_values: bool = False
    warpers: Warpers | None = None

    @classmethod
    def parse(cls, raw: Any) -> "RuleArgs":
        """Validates the extra_args value; raises ValueError on anything malformed."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"logits rules must be a mapping, got {type(raw).__name__}.")
        unknown = set(raw) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"unknown logits rule(s): {sorted(unknown)}.")
        penalty = raw.get("repetition_penalty")
        if penalty is not None:
            penalty = _positive_float(penalty, "repetition_penalty")
        min_new = _int(raw.get("min_new_tokens", 0), "min_new_tokens", 0, _MAX_IDS)
        eos = _ids(raw.get("eos_token_ids", ()), "eos_token_ids")
        forced_eos = raw.get("forced_eos_token_id")
        forced_eos_at = raw.get("forced_eos_at")
        if (forced_eos is None) != (forced_eos_at is None):
            raise ValueError("forced_eos_token_id and forced_eos_at go together.")
        warpers = raw.get("warpers")
        return cls(
            repetition_penalty=penalty,
            no_repeat_ngram_size=_int(
                raw.get("no_repeat_ngram_size", 0), "no_repeat_ngram_size", 0, _MAX_NGRAM
            ),
            encoder_no_repeat_ngram_size=_int(
                raw.get("encoder_no_repeat_ngram_size", 0),
                "encoder_no_repeat_ngram_size",
                0,
                _MAX_NGRAM,
            ),
            bad_words_ids=_bad_words(raw.get("bad_words_ids", ())),
            min_new_tokens=min_new,
            eos_token_ids=eos,
            forced_bos_token_id=_opt_id(raw.get("forced_bos_token_id"), "forced_bos_token_id"),
            forced_eos_token_id=_opt_id(forced_eos, "forced_eos_token_id"),
            forced_eos_at=None
            if forced_eos_at is None
            else _int(forced_eos_at, "forced_eos_at", 0, 1 << 62),
            remove_invalid_values=_bool(raw.get("remove_invalid_values", False)),
            warpers=None if warpers is None else _warpers(warpers),
        )


_KNOWN_KEYS = frozenset(f for f in RuleArgs.__dataclass_fields__)


def _int(value: Any, name: str, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}.")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"remove_invalid_values must be true or false, got {value!r}.")
    return value


def _opt_id(value: Any, name: str) -> int | None:
    return None if value is None else _int(value, name, 0, 1 << 62)


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or len(value) > _MAX_IDS:
        raise ValueError(f"{name} must be a list of token ids, got {value!r}.")
    return tuple(_int(v, name, 0, 1 << 62) for v in value)


def _bad_words(value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, list | tuple) or len(value) > _MAX_IDS:
        raise ValueError(f"bad_words_ids must be a list of lists of token ids, got {value!r}.")
    words = tuple(_ids(word, "bad_words_ids") for word in value)
    if any(not word for word in words):
        raise ValueError("bad_words_ids entries must not be empty.")
    return words


def _warpers(value: Any) -> Warpers:
    if not isinstance(value, Mapping) or set(value) - set(Warpers.__dataclass_fields__):
        raise ValueError(f"warpers must map temperature/top_k/top_p/typical_p, got {value!r}.")
    top_p = value.get("top_p", 1.0)
    typical_p = value.get("typical_p", 1.0)
    for name, v in (("top_p", top_p), ("typical_p", typical_p)):
        if _positive_float(v, name) > 1:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}.")
    return Warpers(
        temperature=_positive_float(value.get("temperature", 1.0), "temperature"),
        top_k=_int(value.get("top_k", 0), "top_k", 0, 1 << 62),
        top_p=float(top_p),
        typical_p=float(typical_p),
    )


# ---------------------------------------------------------------------------------------
# The rules. ``scores`` is 2-D (rows, vocab), as in transformers.


def _index(ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """Ids inside the logits row, as an index tensor; None when there are none.

    Ids outside the row cannot be generated (transformers clamps them to a spare
    column and drops it); never index out of range.
    """
    valid = sorted({i for i in ids if 0 <= i < vocab_size})
    if not valid:
        return None
    return torch.tensor(valid, dtype=torch.long, device=device)


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor over ``seen`` (a vocab-wide mask of the prompt's
    and output's tokens): ``score * penalty`` where negative, ``score / penalty`` otherwise.

    vLLM's built-in penalty multiplies by ``1 / penalty`` instead of dividing, which
    differs in the last bit for about one positive logit in five: hence this copy.
    """
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def set_value(scores: torch.Tensor, ids: Sequence[int], value: float) -> torch.Tensor:
    """``scores[:, ids] = value`` (NoRepeatNGram, EncoderNoRepeatNGram, MinLength)."""
    index = _index(ids, scores.shape[-1], scores.device)
    if index is not None:
        scores[:, index] = value
    return scores


def add_value(scores: torch.Tensor, ids: Sequence[int], value: float) -> torch.Tensor:
    """``scores[:, ids] += value``: NoBadWords is a SequenceBias of -inf, added."""
    index = _index(ids, scores.shape[-1], scores.device)
    if index is not None:
        scores[:, index] = scores[:, index] + value
    return scores


def force_token(scores: torch.Tensor, token_id: int) -> torch.Tensor:
    """ForcedBOS/ForcedEOS: every score -inf but the forced token's, which is 0."""
    if not 0 <= token_id < scores.shape[-1]:
        return scores
    forced = torch.full_like(scores, NEG_INF)
    forced[:, token_id] = 0
    return forced


def remove_inf_nan(scores: torch.Tensor) -> torch.Tensor:
    """InfNanRemoveLogitsProcessor."""
    out = torch.where(scores != scores, 0.0, scores)
    out = torch.where(scores == float("inf"), torch.finfo(scores.dtype).max, out)
    return torch.where(scores == -float("inf"), torch.finfo(scores.dtype).min, out)


def temperature_warp(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """TemperatureLogitsWarper."""
    return scores / temperature


def top_k_warp(scores: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """TopKLogitsWarper."""
    k = min(max(top_k, min_tokens_to_keep), scores.size(-1))
    indices_to_remove = scores < torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(indices_to_remove, NEG_INF)


def top_p_warp(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """TopPLogitsWarper."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -min_tokens_to_keep:] = 0
    indices_to_remove = sorted_indices_to_remove.scatter(
        1, sorted_indices, sorted_indices_to_remove
    )
    return scores.masked_fill(indices_to_remove, NEG_INF)


def typical_warp(scores: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """TypicalLogitsWarper."""
    normalized = torch.nn.functional.log_softmax(scores, dim=-1)
    p = torch.exp(normalized)
    ent = -(normalized * p).nansum(-1, keepdim=True)
    shifted_scores = torch.abs((-normalized) - ent)
    sorted_scores, sorted_indices = torch.sort(shifted_scores, descending=False)
    sorted_logits = scores.gather(-1, sorted_indices)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    last_ind = (cumulative_probs < mass).sum(dim=1)
    last_ind.clamp_(max=sorted_scores.shape[-1] - 1)
    sorted_indices_to_remove = sorted_scores > sorted_scores.gather(1, last_ind.view(-1, 1))
    sorted_indices_to_remove[..., :min_tokens_to_keep] = 0
    indices_to_remove = sorted_indices_to_remove.scatter(
        1, sorted_indices, sorted_indices_to_remove
    )
    return scores.masked_fill(indices_to_remove, NEG_INF)


def warp(scores: torch.Tensor, w: Warpers) -> torch.Tensor:
    """The sampling warpers in transformers' order; each exists only when not neutral."""
    if w.temperature != 1.0:
        scores = temperature_warp(scores, w.temperature)
    if w.top_k != 0:
        scores = top_k_warp(scores, w.top_k)
    if w.top_p < 1.0:
        scores = top_p_warp(scores, w.top_p)
    if w.typical_p < 1.0:
        scores = typical_warp(scores, w.typical_p)
    return scores


# ---------------------------------------------------------------------------------------
# Per-request state.


class NgramIndex:
    """The n-grams of a token list (which may grow), found by their first n - 1 tokens.

    Keys are hashes of the (n-1)-token prefixes and every hit is checked against the
    tokens themselves, so memory stays linear in the sequence length whatever ``n`` is
    (a dict keyed by the prefix tuples would hold length x n ids).
    """

    def __init__(self, n: int, tokens: list[int]) -> None:
        self.n = n
        self._tokens = tokens
        self._starts: dict[int, list[int]] = {}
        self._next_start = 0

    def extend(self) -> None:
        """Indexes the windows that the tokens appended since the last call complete."""
        tokens, k = self._tokens, self.n - 1
        last_start = len(tokens) - self.n
        for start in range(self._next_start, last_start + 1):
            self._starts.setdefault(hash(tuple(tokens[start : start + k])), []).append(start)
        self._next_start = max(self._next_start, last_start + 1)

    def followers(self, prefix: list[int]) -> set[int]:
        """The tokens that completed an indexed n-gram starting with ``prefix``."""
        tokens, k = self._tokens, self.n - 1
        found: set[int] = set()
        for start in self._starts.get(hash(tuple(prefix)), ()):
            if tokens[start : start + k] == prefix:
                found.add(tokens[start + k])
        return found


class RowState:
    """One sequence's rules and the state they need, kept up to date from the live
    ``output`` list that vLLM appends to (a reference, never copied back)."""

    def __init__(self, args: RuleArgs, prompt: Sequence[int] | None, output: list[int]) -> None:
        self.args = args
        self._prompt = list(prompt or ())
        self._output = output
        # Multi-token bad words by prefix length: {length: {prefix: [last tokens]}}.
        self._bad_words: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for word in args.bad_words_ids:
            table = self._bad_words.setdefault(len(word) - 1, {})
            table.setdefault(tuple(word[:-1]), []).append(word[-1])
        self._reset()

    def _reset(self) -> None:
        """(Re)builds everything from the prompt and the output list as it is now."""
        self._tokens = list(self._prompt)
        self._synced = 0  # output tokens copied into self._tokens
        self._ngrams = (
            NgramIndex(self.args.no_repeat_ngram_size, self._tokens)
            if self.args.no_repeat_ngram_size
            else None
        )
        self._prompt_ngrams = None
        if self.args.encoder_no_repeat_ngram_size:
            self._prompt_ngrams = NgramIndex(self.args.encoder_no_repeat_ngram_size, self._prompt)
            self._prompt_ngrams.extend()
        self._seen: torch.Tensor | None = None
        self._seen_upto = 0

    def _sync(self) -> None:
        out = self._output
        if len(out) < self._synced or (self._synced and out[self._synced - 1] != self._tokens[-1]):
            # vLLM rewrote the output (discarded tokens): start over rather than guess.
            self._reset()
        while self._synced < len(out):
            token = out[self._synced]
            if token < 0:
                break  # an async-scheduling placeholder, filled in before sampling
            self._tokens.append(token)
            self._synced += 1
        if self._ngrams is not None:
            self._ngrams.extend()

    @property
    def generated(self) -> int:
        return self._synced

    def _penalty(self, scores: torch.Tensor, penalty: float) -> torch.Tensor:
        vocab = scores.shape[-1]
        seen = self._seen
        if seen is None or seen.device != scores.device or seen.numel() != vocab:
            seen = self._seen = torch.zeros(vocab, dtype=torch.bool, device=scores.device)
            self._seen_upto = 0
        if self._seen_upto < len(self._tokens):
            index = _index(self._tokens[self._seen_upto :], vocab, scores.device)
            if index is not None:
                seen[index] = True
            self._seen_upto = len(self._tokens)
        return repetition_penalty(scores, seen, penalty)

    def _bad_word_bans(self) -> list[int]:
        tokens, cur_len = self._tokens, len(self._tokens)
        banned: list[int] = []
        for prefix_len, table in self._bad_words.items():
            # transformers matches the prefix against the whole sequence, prompt
            # included, and skips words whose prefix is longer than the sequence.
            if prefix_len > cur_len:
                continue
            banned.extend(table.get(tuple(tokens[cur_len - prefix_len :]), ()))
        return banned

    def process(self, row: torch.Tensor) -> torch.Tensor:
        """The transformers rules on one row of logits (1-D); may modify ``row``."""
        self._sync()
        a = self.args
        tokens, cur_len = self._tokens, len(self._tokens)
        scores = row.unsqueeze(0)
        if a.repetition_penalty is not None:
            scores = self._penalty(scores, a.repetition_penalty)
        if self._ngrams is not None and cur_len >= self._ngrams.n:
            k = self._ngrams.n - 1
            scores = set_value(scores, list(self._ngrams.followers(tokens[cur_len - k :])), NEG_INF)
        if self._prompt_ngrams is not None:
            k = self._prompt_ngrams.n - 1
            if cur_len >= k:
                banned = self._prompt_ngrams.followers(tokens[cur_len - k :])
                scores = set_value(scores, list(banned), NEG_INF)
        if self._bad_words:
            scores = add_value(scores, self._bad_word_bans(), NEG_INF)
        if a.min_new_tokens and self._synced < a.min_new_tokens:
            scores = set_value(scores, a.eos_token_ids, NEG_INF)
        if a.forced_bos_token_id is not None and cur_len == 1:
            scores = force_token(scores, a.forced_bos_token_id)
        if a.forced_eos_token_id is not None and self._synced == a.forced_eos_at:
            scores = force_token(scores, a.forced_eos_token_id)
        if a.remove_invalid_values:
            scores = remove_inf_nan(scores)
        if a.warpers is not None:
            scores = warp(scores, a.warpers)
        return scores[0]
