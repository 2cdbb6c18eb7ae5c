"""Which transformers rules our logits processor runs for a request, and which vLLM
sampling steps must step aside so the final distribution is transformers'.

vLLM's sampler (v1/sample/sampler.py) runs, per step: the built-in min-tokens and
logit-bias processors, then custom processors like ours, then the repetition penalty,
then temperature, min-p, top-k / top-p, then sampling. transformers runs the penalty
first and the warpers in the order temperature -> top_k -> top_p -> typical_p. So:

- ``repetition_penalty``: ours, always (vLLM multiplies by 1/penalty where transformers
  divides: a last-bit difference that can flip a greedy tie). vLLM's is set to 1.
- ``min_tokens``: vLLM's built-in when it bans exactly what transformers would, ours
  otherwise. transformers' MinLength/MinNewTokens ban exactly the eos ids it was given.
  vLLM's built-in (one vectorised ban for the whole batch; ours is a Python step per
  row) bans the request's stop ids plus the tokenizer's and generation_config's EOS ids
  even when the client named others, and keeps stop strings from matching before the
  minimum. So it is used only when the client's eos ids include every id vLLM adds and
  there are no stop strings.
- ``typical_p`` (sampling): ours, with the warpers before it (temperature, top_k,
  top_p), because vLLM would run its own after our processor. vLLM's temperature,
  top_k and top_p are set to neutral for that request.
- Everything else (n-gram bans, multi-token bad words, forced tokens, inf/nan removal)
  is ours and commutes with vLLM's later steps: a -inf stays -inf under a penalty or a
  temperature, and a forced row (all -inf but one 0) stays forced.
- Single-token bad words stay vLLM ``logit_bias`` entries of -inf: added before our
  processor, which is where transformers adds them too (after the penalty, which they
  commute with).

No vLLM import: a plain function over ``SamplingSpec``.
"""

from typing import Any

from app.engines.processors import EXTRA_ARGS_KEY
from param_mapping import SamplingSpec

# vLLM's SamplingParams accept temperature in [0, 2] only.
VLLM_MAX_TEMPERATURE = 2.0

# SamplingSpec.extra_args keys (transformers names) that this processor serves.
RULE_KEYS = (
    "typical_p",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
)


def vllm_min_tokens_agrees(spec: SamplingSpec, vllm_eos_ids: frozenset[int] | None) -> bool:
    """Whether vLLM's built-in min_tokens bans exactly the client's eos ids.

    ``vllm_eos_ids``: the ids vLLM adds to every request's stop set (the engine's
    tokenizer and generation_config EOS ids); None when unknown.
    """
    return (
        vllm_eos_ids is not None
        and bool(spec.stop_token_ids)
        and not spec.stop
        and vllm_eos_ids <= set(spec.stop_token_ids)
    )


def processor_rules(
    spec: SamplingSpec, vllm_eos_ids: frozenset[int] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SamplingParams field overrides, extra_args) for one request.

    Both are empty when the request needs none of our rules: such requests never reach
    the processor and pay nothing for it. ``vllm_eos_ids``: see vllm_min_tokens_agrees.
    """
    extra = dict(spec.extra_args)
    given = {key: extra.pop(key) for key in RULE_KEYS if key in extra}
    rules: dict[str, Any] = {}
    overrides: dict[str, Any] = {}

    if spec.repetition_penalty != 1.0:
        rules["repetition_penalty"] = spec.repetition_penalty
        overrides["repetition_penalty"] = 1.0
    for key in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
        if given.get(key):
            rules[key] = given[key]
    if given.get("bad_words_ids"):
        rules["bad_words_ids"] = [list(word) for word in given["bad_words_ids"]]
    if spec.min_tokens > 0 and not vllm_min_tokens_agrees(spec, vllm_eos_ids):
        overrides["min_tokens"] = 0
        if spec.stop_token_ids:  # transformers: no eos ids, no MinLength processor
            rules["min_new_tokens"] = spec.min_tokens
            rules["eos_token_ids"] = list(spec.stop_token_ids)
    if given.get("forced_bos_token_id") is not None:
        rules["forced_bos_token_id"] = given["forced_bos_token_id"]
    if given.get("forced_eos_token_id") is not None:
        rules["forced_eos_token_id"] = given["forced_eos_token_id"]
        rules["forced_eos_at"] = spec.max_tokens - 1
    if given.get("remove_invalid_values"):
        rules["remove_invalid_values"] = True

    typical_p = given.get("typical_p", 1.0)
    # vLLM refuses temperatures above 2; transformers takes any positive one. Either
    # case runs transformers' whole warper chain here, with vLLM's steps neutral.
    if spec.temperature > 0 and (typical_p < 1.0 or spec.temperature > VLLM_MAX_TEMPERATURE):
        rules["warpers"] = {
            "temperature": spec.temperature,
            "top_k": spec.top_k,
            "top_p": spec.top_p,
            "typical_p": typical_p,
        }
        overrides.update(temperature=1.0, top_k=0, top_p=1.0)

    if rules:
        extra[EXTRA_ARGS_KEY] = rules
    return overrides, extra
