"""Translation of Kaito's transformers-style ``generate_kwargs`` into engine parameters.

transformers is the reference: each rule below names the transformers behaviour it
reproduces. Everything here is a pure function of its arguments.
"""

import math
from collections.abc import Mapping
from typing import Any

from param_mapping.beam import DEFAULT_MAX_NUM_BEAMS, beam_route, beam_spec
from param_mapping.errors import ParameterError
from param_mapping.hf_kwargs import transformers_generate_kwargs
from param_mapping.spec import BeamSpec, GenerationPlan, SamplingSpec, SpecialTokens

# Kaito's GenerateKwargs defaults, verbatim. pad/eos None mean "the tokenizer's".
KAITO_DEFAULTS: dict[str, Any] = {
    "max_length": 200,
    "min_length": 0,
    "do_sample": True,
    "early_stopping": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "temperature": 1.0,
    "top_k": 10,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "num_return_sequences": 1,
    "output_scores": False,
    "return_dict_in_generate": False,
    "pad_token_id": None,
    "eos_token_id": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "remove_invalid_values": None,
}

# Other transformers GenerationConfig names a decoder-only client may send, that we serve.
EXTRA_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": None,
    "min_new_tokens": None,
    "stop_strings": None,
    # Only a speed switch in transformers; the result is the same either way.
    "use_cache": True,
}

# GenerationConfig names that exist in transformers but that this server does not serve:
# refused by name rather than silently ignored.
UNSERVED_GENERATION_CONFIG = frozenset(
    {
        "max_time",
        "min_p",
        "top_h",
        "epsilon_cutoff",
        "eta_cutoff",
        "penalty_alpha",
        "dola_layers",
        "renormalize_logits",
        "sequence_bias",
        "suppress_tokens",
        "begin_suppress_tokens",
        "exponential_decay_length_penalty",
        "guidance_scale",
        "constraints",
        "force_words_ids",
        "low_memory",
        "token_healing",
        "watermarking_config",
        "cache_implementation",
        "cache_config",
        "output_attentions",
        "output_hidden_states",
        "output_logits",
        "num_assistant_tokens",
        "num_assistant_tokens_schedule",
        "assistant_confidence_threshold",
        "prompt_lookup_num_tokens",
        "max_matching_ngram_size",
        "assistant_early_exit",
        "assistant_lookbehind",
        "target_lookbehind",
        "decoder_start_token_id",
        "forced_decoder_ids",
        "compile_config",
        "disable_compile",
        "generation_kwargs",
        "is_assistant",
        "return_legacy_cache",
        "prefill_chunk_size",
    }
)

ALL_DEFAULTS = {**KAITO_DEFAULTS, **EXTRA_DEFAULTS}


def _name(key: str) -> str:
    return f"generate_kwargs.{key}"


def _int(kw: Mapping[str, Any], key: str, minimum: int | None = None) -> int:
    value = kw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(_name(key), f"{key} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ParameterError(_name(key), f"{key} must be >= {minimum}, got {value}.")
    return value


def _opt_int(kw: Mapping[str, Any], key: str, minimum: int | None = None) -> int | None:
    return None if kw[key] is None else _int(kw, key, minimum)


def _float(kw: Mapping[str, Any], key: str) -> float:
    value = kw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParameterError(_name(key), f"{key} must be a number, got {value!r}.")
    if not math.isfinite(value):
        raise ParameterError(_name(key), f"{key} must be a finite number, got {value!r}.")
    return float(value)


def _bool(kw: Mapping[str, Any], key: str) -> bool:
    value = kw[key]
    if not isinstance(value, bool):
        raise ParameterError(_name(key), f"{key} must be true or false, got {value!r}.")
    return value


def _token_id(key: str, value: Any, special: SpecialTokens) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < special.vocab_size:
        raise ParameterError(
            _name(key),
            f"{key} must hold token ids in [0, {special.vocab_size}), got {value!r}.",
        )
    return value


def merge_with_defaults(generate_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Kaito's defaults under the client's values; unknown names are refused by name.

    transformers' ``generate`` raises on kwargs the model does not use, so a typo never
    passes silently there either.
    """
    given = dict(generate_kwargs or {})
    for key in given:
        if key in ALL_DEFAULTS:
            continue
        if key in UNSERVED_GENERATION_CONFIG:
            raise ParameterError(_name(key), f"{key} is not supported by this server.")
        raise ParameterError(_name(key), f"Unknown generate_kwargs parameter {key!r}.")
    return {**ALL_DEFAULTS, **given}


def _check_beam_params(kw: Mapping[str, Any], max_num_beams: int) -> BeamSpec | None:
    # Validation and the beam rules live in param_mapping/beam.py.
    return beam_spec(kw, max_num_beams=max_num_beams)


def _bad_words(
    kw: Mapping[str, Any], special: SpecialTokens, eos_token_ids: list[int]
) -> tuple[dict[int, float] | None, list[list[int]]]:
    """(logit bias for one-token words, multi-token words) from ``bad_words_ids``.

    transformers' NoBadWordsLogitsProcessor first drops every one-token word that is an
    eos id, then adds -inf to a one-token word's logit always, and to a longer word's
    last token when the tokens before it end the sequence so far (prompt included).
    """
    bad_words_ids = kw["bad_words_ids"]
    if bad_words_ids is None:
        return None, []
    name = _name("bad_words_ids")
    if not isinstance(bad_words_ids, list) or not bad_words_ids:
        raise ParameterError(
            name,
            f"bad_words_ids must be a non-empty list of lists of token ids, got {bad_words_ids!r}.",
        )
    if not all(isinstance(word, list) for word in bad_words_ids):
        # Kaito's schema typed it list[int], which transformers itself always refused.
        raise ParameterError(
            name,
            "bad_words_ids must be a list of lists of token ids, one list per banned word "
            f"(e.g. [[12], [34, 56]]), got {bad_words_ids!r}.",
        )
    bias: dict[int, float] = {}
    sequences: list[list[int]] = []
    for word in bad_words_ids:
        if not word:
            raise ParameterError(
                name, f"bad_words_ids entries must not be empty, got {bad_words_ids!r}."
            )
        ids = [_token_id("bad_words_ids", token, special) for token in word]
        if len(ids) > 1:
            if ids not in sequences:
                sequences.append(ids)
        elif ids[0] not in eos_token_ids:
            bias[ids[0]] = -math.inf
    if not bias and not sequences:
        # transformers raises here ("`sequence_bias` has to be a non-empty dictionary").
        raise ParameterError(
            name,
            f"bad_words_ids only lists eos ids ({bad_words_ids!r}), which transformers ignores "
            "in bad_words_ids, leaving nothing to ban; use min_new_tokens to keep eos away.",
        )
    return bias or None, sequences


def _processor_rules(
    kw: Mapping[str, Any],
    special: SpecialTokens,
    *,
    do_sample: bool,
    typical_p: float,
    max_model_len: int,
) -> dict[str, Any]:
    """The transformers rules that vLLM has no parameter for, in transformers' names.

    They travel in ``SamplingSpec.extra_args``; the vLLM backend runs them in its logits
    processor (app/engines/processors). Only non-neutral values are kept, as
    transformers builds a processor only for those.
    """
    rules: dict[str, Any] = {}
    # Warpers only exist when sampling (transformers builds none for greedy search);
    # typical_p == 1 builds no TypicalLogitsWarper.
    if do_sample and typical_p < 1.0:
        rules["typical_p"] = typical_p
    for key in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        size = _int(kw, key, 0)
        if size > max_model_len:
            raise ParameterError(
                _name(key),
                f"{key} must be <= the model's context length {max_model_len} "
                f"(a longer n-gram can never repeat), got {size}.",
            )
        if size > 0:
            rules[key] = size
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        if kw[key] is not None:
            rules[key] = _token_id(key, kw[key], special)
    if kw["remove_invalid_values"] is not None and _bool(kw, "remove_invalid_values"):
        rules["remove_invalid_values"] = True
    return rules


def _stop_token_ids(kw: Mapping[str, Any], special: SpecialTokens) -> list[int]:
    eos = kw["eos_token_id"]
    if eos is None:
        # Kaito's default is the tokenizer's eos_token_id (only that one id, even when
        # the model's generation_config lists several).
        return [] if special.eos_token_id is None else [special.eos_token_id]
    ids = eos if isinstance(eos, list) else [eos]
    return [_token_id("eos_token_id", token, special) for token in ids]


def _stop_strings(kw: Mapping[str, Any]) -> list[str] | None:
    value = kw["stop_strings"]
    if value is None:
        return None
    strings = [value] if isinstance(value, str) else value
    if (
        not isinstance(strings, list)
        or not strings
        or not all(isinstance(s, str) and s for s in strings)
    ):
        raise ParameterError(
            _name("stop_strings"),
            f"stop_strings must be a non-empty string or list of them, got {value!r}.",
        )
    return strings


def _lengths(
    kw: Mapping[str, Any],
    *,
    prompt_tokens: int,
    prefix_tokens: int,
    max_model_len: int,
    handle_long_generation: str | None,
) -> tuple[int, int, int | None]:
    """(max new tokens, min new tokens, prompt tokens to keep or None).

    transformers (decoder-only): max_length / min_length are totals that include the
    prompt; max_new_tokens / min_new_tokens win when given. The text-generation pipeline
    adds the prefix's token count to both totals, so a prefix does not eat the budget.
    """
    max_length = _int(kw, "max_length", 1)
    min_length = _int(kw, "min_length", 0)
    max_new_tokens = _opt_int(kw, "max_new_tokens", 1)
    min_new_tokens = _opt_int(kw, "min_new_tokens", 0)

    max_key = "max_new_tokens" if max_new_tokens is not None else "max_length"
    if max_new_tokens is not None:
        max_new = max_new_tokens
    else:
        max_new = max_length + prefix_tokens - prompt_tokens
    if min_new_tokens is not None:
        min_new = min_new_tokens
    else:
        min_new = max(0, min_length + prefix_tokens - prompt_tokens)

    if max_new <= 0:
        raise ParameterError(
            _name(max_key),
            f"max_length (={max_length}) counts the prompt and must leave room to generate: "
            f"the prompt is {prompt_tokens - prefix_tokens} tokens. "
            "Raise max_length or use max_new_tokens.",
        )

    keep: int | None = None
    if prompt_tokens + max_new > max_model_len:
        if handle_long_generation != "hole":
            raise ParameterError(
                _name(max_key),
                "prompt tokens + new tokens must be <= the model's context length "
                f"{max_model_len}. "
                f"Given: {prompt_tokens} prompt tokens and {max_new} new tokens "
                f"(from {max_key}={kw[max_key]}). Shorten the prompt, lower {max_key}, or set "
                'handle_long_generation="hole".',
            )
        # The pipeline's "hole": drop the oldest prompt tokens so the new ones fit.
        keep = max_model_len - max_new
        if keep <= 0:
            raise ParameterError(
                _name(max_key),
                f"{max_new} new tokens do not fit the model's context length {max_model_len} "
                'even with handle_long_generation="hole".',
            )
    # A minimum above the maximum: transformers simply stops at the maximum.
    return max_new, min(min_new, max_new), keep


def to_generation_plan(
    generate_kwargs: Mapping[str, Any] | None,
    *,
    prompt_tokens: int,
    prefix_tokens: int,
    special: SpecialTokens,
    max_model_len: int,
    handle_long_generation: str | None = None,
    max_num_beams: int = DEFAULT_MAX_NUM_BEAMS,
) -> GenerationPlan:
    """Maps a /chat request's generate_kwargs to engine parameters, or raises ParameterError.

    ``prompt_tokens`` counts the tokenized ``prefix + prompt``; ``prefix_tokens`` the
    prefix tokenized alone (0 without a prefix), as the pipeline measures them.
    """
    if handle_long_generation not in (None, "hole"):
        raise ParameterError(
            "handle_long_generation",
            f'handle_long_generation must be null or "hole", got {handle_long_generation!r}.',
        )
    kw = merge_with_defaults(generate_kwargs)

    beam = _check_beam_params(kw, max_num_beams)
    for key in ("output_scores", "return_dict_in_generate", "use_cache"):
        _bool(kw, key)  # no effect on the returned text, as in Kaito's pipeline
    _opt_int(kw, "pad_token_id", 0)  # no effect on a single prompt

    do_sample = _bool(kw, "do_sample")
    temperature = _float(kw, "temperature")
    top_k = _int(kw, "top_k")
    top_p = _float(kw, "top_p")
    typical_p = _float(kw, "typical_p")
    repetition_penalty = _float(kw, "repetition_penalty")
    n = _int(kw, "num_return_sequences", 1)

    # The warpers' ranges are checked only when sampling: transformers builds no warper
    # for greedy or plain beam search and ignores these values (a warning, not an error).
    if do_sample:
        if temperature <= 0:
            raise ParameterError(
                _name("temperature"),
                f"temperature must be a strictly positive float when sampling, got {temperature}.",
            )
        if top_k < 0:
            raise ParameterError(_name("top_k"), f"top_k must be >= 0 when sampling, got {top_k}.")
        if not 0 < top_p <= 1:
            raise ParameterError(_name("top_p"), f"top_p must be in (0, 1], got {top_p}.")
        if not 0 < typical_p <= 1:
            raise ParameterError(
                _name("typical_p"), f"typical_p must be in (0, 1], got {typical_p}."
            )
    if repetition_penalty <= 0:
        raise ParameterError(
            _name("repetition_penalty"),
            f"repetition_penalty must be a strictly positive float, got {repetition_penalty}.",
        )
    if not do_sample and n > 1 and beam is None:
        # transformers: "Greedy methods without beam search do not support
        # `num_return_sequences` different than 1".
        raise ParameterError(
            _name("num_return_sequences"),
            f"num_return_sequences must be 1 with greedy decoding (do_sample=false), got {n}.",
        )
    rules = _processor_rules(
        kw, special, do_sample=do_sample, typical_p=typical_p, max_model_len=max_model_len
    )
    stop_token_ids = _stop_token_ids(kw, special)
    logit_bias, bad_sequences = _bad_words(kw, special, stop_token_ids)
    if bad_sequences:
        rules["bad_words_ids"] = bad_sequences
    # transformers returns scores only with both set; a JSON reply has room for them
    # either way, so either one asks (docs/SCORES.md).
    scores = kw["output_scores"] or kw["return_dict_in_generate"]

    max_new, min_new, keep = _lengths(
        kw,
        prompt_tokens=prompt_tokens,
        prefix_tokens=prefix_tokens,
        max_model_len=max_model_len,
        handle_long_generation=handle_long_generation,
    )

    sampling = SamplingSpec(
        n=n,
        # do_sample=False is greedy whatever temperature/top_k/top_p say.
        temperature=temperature if do_sample else 0.0,
        # transformers: top_k=0 disables the warper; a k above the vocabulary keeps it all
        # (TopKLogitsWarper takes min(top_k, vocab)), and vLLM must never see such a k.
        top_k=min(top_k, special.vocab_size) if do_sample else 0,
        top_p=top_p if do_sample else 1.0,
        repetition_penalty=repetition_penalty,
        max_tokens=max_new,
        min_tokens=min_new,
        stop_token_ids=stop_token_ids,
        stop=_stop_strings(kw),
        logit_bias=logit_bias,
        extra_args=rules,
        logprobs=0 if scores else None,
    )
    backend, backend_reason = beam_route(beam, sampling)
    return GenerationPlan(
        sampling=sampling,
        keep_last_prompt_tokens=keep,
        backend=backend,
        backend_reason=backend_reason,
        beam=beam,
        transformers_kwargs=transformers_generate_kwargs(
            kw,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            eos_token_ids=sampling.stop_token_ids,
            pad_token_id=special.pad_token_id,
        ),
    )
