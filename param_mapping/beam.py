"""Beam search parameters: validation into ``BeamSpec`` (param_mapping.spec), and routing.

Pure functions of their arguments, like the rest of ``param_mapping``. The rules follow
transformers: 5.x for plain beam search and beam sampling (still in core), 4.x for group
(diverse) beam search, which transformers 5 moved out of core to the hub.
"""

from collections.abc import Mapping
from typing import Any

from param_mapping.errors import ParameterError
from param_mapping.spec import BeamSpec, SamplingSpec

# Which engine a request needs. "vllm" means "the primary engine is fine"; the dispatcher
# still sends everything to transformers when the server runs with KAITO_BACKEND=hf or
# when vLLM cannot load the model.
VLLM = "vllm"
HF = "hf"

# The server's cap when the caller does not pass one (KAITO_MAX_NUM_BEAMS).
DEFAULT_MAX_NUM_BEAMS = 8


def _name(key: str) -> str:
    return f"generate_kwargs.{key}"


def _int(kw: Mapping[str, Any], key: str, minimum: int) -> int:
    value = kw[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParameterError(_name(key), f"{key} must be an integer, got {value!r}.")
    if value < minimum:
        raise ParameterError(_name(key), f"{key} must be >= {minimum}, got {value}.")
    return value


def _float(kw: Mapping[str, Any], key: str) -> float:
    value = kw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParameterError(_name(key), f"{key} must be a number, got {value!r}.")
    if value != value or value in (float("inf"), float("-inf")):
        raise ParameterError(_name(key), f"{key} must be a finite number, got {value!r}.")
    return float(value)


def beam_spec(
    kw: Mapping[str, Any], *, max_num_beams: int = DEFAULT_MAX_NUM_BEAMS
) -> BeamSpec | None:
    """Validates the beam parameters of merged ``generate_kwargs``; None without beams.

    ``max_num_beams`` is the server's cap (a setting), passed in so this stays pure.
    """
    num_beams = _int(kw, "num_beams", 1)
    num_beam_groups = _int(kw, "num_beam_groups", 1)
    diversity_penalty = _float(kw, "diversity_penalty")
    length_penalty = _float(kw, "length_penalty")
    early_stopping = kw["early_stopping"]
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ParameterError(
            _name("early_stopping"),
            f'early_stopping must be true, false or "never", got {early_stopping!r}.',
        )
    if num_beams > max_num_beams:
        raise ParameterError(
            _name("num_beams"),
            f"num_beams must be <= {max_num_beams} on this server (KAITO_MAX_NUM_BEAMS), "
            f"got {num_beams}.",
        )
    if num_beam_groups > 1 and num_beams % num_beam_groups != 0:
        # transformers: "`num_beams` should be divisible by `num_beam_groups`".
        raise ParameterError(
            _name("num_beam_groups"),
            f"num_beams must be divisible by num_beam_groups, got num_beams={num_beams} "
            f"and num_beam_groups={num_beam_groups}.",
        )
    if diversity_penalty < 0:
        raise ParameterError(
            _name("diversity_penalty"), f"diversity_penalty must be >= 0, got {diversity_penalty}."
        )
    if diversity_penalty != 0.0 and num_beam_groups == 1:
        # transformers uses diversity_penalty only in group beam search.
        raise ParameterError(
            _name("diversity_penalty"),
            f"diversity_penalty applies only to group beam search (num_beam_groups > 1), "
            f"got {diversity_penalty} with num_beam_groups={num_beam_groups}.",
        )
    do_sample = kw["do_sample"]
    if num_beam_groups > 1:
        # transformers 4.x GenerationConfig.validate, group beam search rules.
        if do_sample is True:
            raise ParameterError(
                _name("do_sample"),
                "group beam search (num_beam_groups > 1) cannot sample: set do_sample=false.",
            )
        if diversity_penalty == 0.0:
            raise ParameterError(
                _name("diversity_penalty"),
                "diversity_penalty must be greater than 0 with num_beam_groups > 1, "
                "otherwise the groups are identical; got 0.0.",
            )
        if kw.get("stop_strings") is not None:
            raise ParameterError(
                _name("stop_strings"),
                "stop_strings cannot be combined with group beam search on this server.",
            )
    if num_beams == 1:
        return None
    n = _int(kw, "num_return_sequences", 1)
    if n > num_beams:
        # transformers: "`num_return_sequences` has to be smaller or equal to `num_beams`".
        raise ParameterError(
            _name("num_return_sequences"),
            f"num_return_sequences must be <= num_beams with beam search, got "
            f"num_return_sequences={n} and num_beams={num_beams}.",
        )
    return BeamSpec(
        num_beams=num_beams,
        num_beam_groups=num_beam_groups,
        diversity_penalty=diversity_penalty,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        num_return_sequences=n,
        do_sample=do_sample is True,
    )


def beam_route(beam: BeamSpec | None, sampling: SamplingSpec) -> tuple[str, str | None]:
    """(backend, the parameter that needs it): where a request must run.

    Only plain beam search (greedy, one group) runs as a step loop on vLLM, and only
    while every logits rule it needs is one the step loop reproduces exactly (see
    docs/BEAM.md): transformers applies its processors to the log-probabilities
    (``log_softmax`` first, then processors), which vLLM's top-k log-probabilities can
    reproduce for the min-length EOS ban but not for a repetition penalty, our own
    logits processors or stop strings.
    """
    if beam is None:
        return VLLM, None
    if beam.is_group:
        return HF, _name("num_beam_groups")
    if beam.do_sample:
        return HF, _name("do_sample")
    if sampling.repetition_penalty != 1.0:
        return HF, _name("repetition_penalty")
    if sampling.stop:
        return HF, _name("stop_strings")
    if sampling.logit_bias:
        return HF, _name("bad_words_ids")
    if sampling.extra_args:
        # Another logits processor (typical_p, no_repeat_ngram_size, ...): transformers
        # itself serves it.
        return HF, "generate_kwargs"
    return VLLM, None
