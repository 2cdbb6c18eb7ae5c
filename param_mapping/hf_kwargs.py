"""The request in transformers' own terms, for the transformers backend.

The vLLM path needs a translation (``SamplingSpec``); the transformers path does not:
it calls ``model.generate`` with what the client sent, so every rule transformers has
(warpers, processors, beam rules) applies by construction. Only what the pipeline
resolves before calling ``generate`` is resolved here: lengths (totals include the
prompt; the pipeline adds the prefix's length) and the eos / pad ids (Kaito's default is
the tokenizer's).
"""

from collections.abc import Mapping
from typing import Any

# Resolved below, or with no effect on the returned text.
_RESOLVED = frozenset(
    {
        "max_length",
        "min_length",
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "pad_token_id",
        "output_scores",
        "return_dict_in_generate",
        "use_cache",
    }
)


def transformers_generate_kwargs(
    kw: Mapping[str, Any],
    *,
    max_new_tokens: int,
    min_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int | None,
) -> dict[str, Any]:
    """``generate`` keyword arguments from merged, validated ``generate_kwargs``.

    ``max_new_tokens`` / ``min_new_tokens`` are the mapping's resolved lengths, so the
    transformers path and the vLLM path stop at the same place.
    """
    out = {k: v for k, v in kw.items() if k not in _RESOLVED and v is not None}
    out["max_new_tokens"] = max_new_tokens
    if min_new_tokens > 0:
        out["min_new_tokens"] = min_new_tokens
    if eos_token_ids:
        out["eos_token_id"] = list(eos_token_ids)
    if kw.get("pad_token_id") is not None:
        out["pad_token_id"] = kw["pad_token_id"]
    elif pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    elif eos_token_ids:
        # transformers: "Setting `pad_token_id` to `eos_token_id`" for open-end generation.
        out["pad_token_id"] = eos_token_ids[0]
    return out
