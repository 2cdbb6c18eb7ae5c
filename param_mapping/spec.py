"""What the translation produces: engine-neutral generation parameters.

``SamplingSpec`` uses vLLM ``SamplingParams`` field names so the vLLM backend can pass
it through unchanged, but it is a plain dataclass: this package never imports vLLM.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

EarlyStopping = bool | Literal["never"]


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special ids that transformers falls back to."""

    eos_token_id: int | None
    pad_token_id: int | None
    bos_token_id: int | None
    vocab_size: int


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1
    # 0.0 means greedy, as in vLLM.
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_tokens: int = 16
    min_tokens: int = 0
    # transformers stops only at the eos ids it is given, so we always pass them
    # explicitly and tell vLLM to ignore its own idea of EOS.
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = True
    stop: list[str] | None = None
    # Single-token bans: a logit bias of -inf, which is exactly what transformers'
    # NoBadWordsLogitsProcessor does for one-token entries.
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    # transformers rules that vLLM has no parameter for, in transformers' names and
    # only when not neutral: typical_p, no_repeat_ngram_size,
    # encoder_no_repeat_ngram_size, bad_words_ids (the multi-token words),
    # forced_bos_token_id, forced_eos_token_id, remove_invalid_values. The vLLM backend
    # runs them in its logits processor (app/engines/processors).
    extra_args: dict[str, Any] = field(default_factory=dict)
    # 0: return each generated token's log-probability under the processed distribution
    # (transformers' output_scores, normalized); None: no scores.
    logprobs: int | None = None


@dataclass(frozen=True)
class BeamSpec:
    """transformers' beam parameters, validated. Only built when ``num_beams > 1``."""

    num_beams: int
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    num_return_sequences: int = 1
    do_sample: bool = False

    @property
    def is_group(self) -> bool:
        return self.num_beam_groups > 1


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the serving layer needs to run one /chat request."""

    sampling: SamplingSpec
    # Prompt tokens to keep from the end (handle_long_generation="hole"); None keeps all.
    keep_last_prompt_tokens: int | None = None
    # Which path serves it: "vllm" (the primary engine) or "hf" (transformers), and the
    # parameter that needs transformers (for logs and errors).
    backend: str = "vllm"
    backend_reason: str | None = None
    # Beam search parameters; None without beams (num_beams == 1).
    beam: BeamSpec | None = None
    # The request in transformers' own terms (lengths resolved), for the transformers path.
    transformers_kwargs: dict[str, Any] = field(default_factory=dict)
