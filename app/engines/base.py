"""The engine protocol every backend implements, and what flows through it.

Like vLLM's ``EngineClient``: the HTTP layer only sees ``generate``, ``abort`` and the
health checks, so tests can plug in a fake and backends can be swapped.
"""

from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from param_mapping import BeamSpec, SamplingSpec, SpecialTokens


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    # Where the plan says it must run ("vllm": the primary engine; "hf": transformers),
    # and the parameter that made it so. The dispatcher (engines/dispatch.py) reads them.
    backend: str = "vllm"
    backend_reason: str | None = None
    # Beam search parameters (None without beams) and the request in transformers' own
    # terms, for the transformers backend and the beam step loop.
    beam: BeamSpec | None = None
    transformers_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GeneratedSequence:
    token_ids: list[int]
    finish_reason: str | None
    # Each token's log-probability under the processed distribution, when the request
    # asked for scores (SamplingSpec.logprobs); None otherwise.
    logprobs: list[float] | None = None
    # The search's own score of the sequence where it defines one (beam search:
    # transformers' sequences_scores, sum of log-probs / length ** length_penalty); None:
    # the reply sums the log-probs.
    sequence_score: float | None = None


@dataclass(frozen=True)
class GenerationResult:
    sequences: list[GeneratedSequence] = field(default_factory=list)
    # The path that served it ("vllm" or "hf") when an engine routes between several;
    # None means the engine's own ``name``.
    backend: str | None = None


@dataclass(frozen=True)
class SequenceDelta:
    """What one sequence added at one engine step, for streaming."""

    index: int  # which of the request's n sequences
    token_ids: list[int]  # the tokens new since the previous delta of this sequence
    finish_reason: str | None = None  # set on the sequence's last delta
    # The log-probabilities of token_ids, as GeneratedSequence.logprobs, when the request
    # asked for scores; the stream's final event reports them (output_scores).
    logprobs: list[float] | None = None


class EngineDeadError(RuntimeError):
    """The engine cannot serve any more requests."""


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str: ...


class LoadedModel:
    """What a backend knows once its model is loaded, and how it reads it back: the
    tokenizer, its special ids and the context length. Both engines derive from it, so
    the three properties of the protocol below are written once."""

    _tokenizer: Any = None
    _special: SpecialTokens | None = None
    _max_model_len: int = 0

    def _model_loaded(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self._special = SpecialTokens(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            vocab_size=vocab_size,
        )
        self._max_model_len = max_model_len
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        assert self._tokenizer is not None, "engine not started"
        return self._tokenizer  # type: ignore[no-any-return]

    @property
    def special_tokens(self) -> SpecialTokens:
        assert self._special is not None, "engine not started"
        return self._special

    @property
    def max_model_len(self) -> int:
        return self._max_model_len


class Engine(Protocol):
    @property
    def name(self) -> str:
        """ "vllm" or "hf": which path served a request."""
        ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def special_tokens(self) -> SpecialTokens: ...

    @property
    def max_model_len(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_stream(self, request: GenerationRequest) -> AsyncGenerator[SequenceDelta, None]:
        """The same generation, yielded as the engine produces it (vLLM's
        RequestOutputKind.DELTA). Closing the iterator early aborts the request."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def is_ready(self) -> bool:
        """Started and alive: what /health reports."""
        ...
