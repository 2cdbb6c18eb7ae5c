"""KAITO_ENGINE_ARGS checked against vLLM's own engine arguments, before the engine starts.

Any field of vLLM's ``AsyncEngineArgs`` dataclass may be set (Kaito's vLLM runtime allows
the same through its config file); nothing is passed on unchecked:

- a key that is not a field of ``AsyncEngineArgs`` is refused (a typo would otherwise
  fail deep inside vLLM, or not at all);
- a value is validated against the field's annotation, strictly, as JSON (``"16"`` is
  not an int, ``"yes"`` not a bool, a Literal takes only its listed values);
- a key that one of the server's settings controls is refused with the setting to use
  instead, and the few the server must set itself are refused with the reason.

Imports vLLM only inside the functions (``app/engines/vllm_engine.py`` calls them).
"""

import dataclasses
import functools
import json
from typing import Any

from pydantic import ConfigDict, PydanticUserError, TypeAdapter, ValidationError

# Engine arguments that a server setting controls: set them there.
SETTING_FOR = {
    "model": "KAITO_MODEL (--model)",
    "served_model_name": "KAITO_SERVED_MODEL_NAME (--served-model-name)",
    "dtype": "KAITO_DTYPE (--dtype)",
    "max_model_len": "KAITO_MAX_MODEL_LEN (--max-model-len)",
    "max_num_seqs": "KAITO_MAX_NUM_SEQS (--max-num-seqs)",
    "block_size": "KAITO_BLOCK_SIZE (--block-size)",
    "gpu_memory_utilization": "KAITO_GPU_MEMORY_UTILIZATION (--gpu-memory-utilization)",
    "tensor_parallel_size": "KAITO_TENSOR_PARALLEL_SIZE (--tensor-parallel-size)",
    "pipeline_parallel_size": "KAITO_PIPELINE_PARALLEL_SIZE (--pipeline-parallel-size)",
    "distributed_executor_backend": (
        "KAITO_DISTRIBUTED_EXECUTOR_BACKEND (--distributed-executor-backend)"
    ),
    "enforce_eager": "KAITO_ENFORCE_EAGER (--enforce-eager)",
    "attention_backend": "KAITO_ATTENTION_BACKEND (--attention-backend)",
    "otlp_traces_endpoint": "KAITO_OTLP_TRACES_ENDPOINT (--otlp-traces-endpoint)",
    # raw_logprobs without scores, processed_logprobs with them; the logits modes would
    # break both the scores and the beam step loop, which read log-probabilities.
    "logprobs_mode": "KAITO_OUTPUT_SCORES (--output-scores)",
    # Sized from the adapters found there (app/adapters.py).
    "enable_lora": "KAITO_ADAPTERS_DIR (--adapters-dir)",
    "max_lora_rank": "KAITO_ADAPTERS_DIR (--adapters-dir)",
    "max_loras": "KAITO_ADAPTERS_DIR (--adapters-dir)",
}

# Engine arguments the server sets itself, and why a different value would break it.
SERVER_OWNED = {
    "disable_log_stats": "the server's /metrics serves vLLM's vllm:* metrics, which need stats on",
    "logits_processors": "the server installs its transformers-rules processor; a list "
    "here would replace it",
    "tokenizer": "the server tokenizes with the model's own tokenizer (KAITO_MODEL); the "
    "engine must use the same one",
    "skip_tokenizer_init": "stop strings need the engine's tokenizer",
}

# On CPU, vLLM sizes the KV cache from VLLM_CPU_KVCACHE_SPACE, which the server sets from
# KAITO_KV_CACHE_SPACE_GIB; that variable overwrites kv_cache_memory_bytes there.
CPU_SETTING_FOR = {"kv_cache_memory_bytes": "KAITO_KV_CACHE_SPACE_GIB (--kv-cache-space-gib)"}


class EngineArgsError(ValueError):
    """A KAITO_ENGINE_ARGS entry the server refuses; the message names the key."""


def _resolve(annotation: Any, namespace: dict[str, Any]) -> Any:
    """A dataclass field's annotation as a type. vLLM's module imports a few names only
    under TYPE_CHECKING (string annotations that name them cannot be evaluated): those
    parts are taken as Any, the rest of the annotation is still checked."""
    if not isinstance(annotation, str):
        return annotation
    namespace = dict(namespace)
    while True:
        try:
            return eval(annotation, namespace)  # noqa: S307 - vLLM's own annotation text
        except NameError as exc:
            if exc.name is None or exc.name in namespace:
                return Any
            namespace[exc.name] = Any


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(annotation, config=ConfigDict(arbitrary_types_allowed=True))
    except PydanticUserError:
        # vLLM's config classes (pydantic dataclasses) carry their own config.
        return TypeAdapter(annotation)


@functools.cache
def engine_arg_adapters() -> dict[str, TypeAdapter[Any]]:
    """Every AsyncEngineArgs field -> a validator for its annotation."""
    import vllm.engine.arg_utils as arg_utils
    from vllm.engine.arg_utils import AsyncEngineArgs

    namespace = dict(vars(arg_utils))
    return {
        f.name: _adapter(_resolve(f.type, namespace))
        for f in dataclasses.fields(AsyncEngineArgs)
        if f.init
    }


def check_engine_args(
    overrides: dict[str, Any],
    on_gpu: bool,
    adapters: dict[str, TypeAdapter[Any]] | None = None,
) -> None:
    """Raises EngineArgsError for the first entry the server refuses (see the module
    docstring). ``adapters`` defaults to vLLM's AsyncEngineArgs fields."""
    known = engine_arg_adapters() if adapters is None else adapters
    for key, value in overrides.items():
        where = f"KAITO_ENGINE_ARGS: {key!r}"
        if key in SETTING_FOR:
            raise EngineArgsError(f"{where} is controlled by {SETTING_FOR[key]}; set it there")
        if not on_gpu and key in CPU_SETTING_FOR:
            raise EngineArgsError(
                f"{where} is controlled on CPU by {CPU_SETTING_FOR[key]}; set it there"
            )
        if key in SERVER_OWNED:
            raise EngineArgsError(f"{where} cannot be set: {SERVER_OWNED[key]}")
        if key not in known:
            raise EngineArgsError(
                f"{where} is not a vLLM engine argument (a field of vllm's AsyncEngineArgs)"
            )
        try:
            text = json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise EngineArgsError(f"{where} has a value JSON cannot hold: {exc}") from exc
        try:
            # As JSON, strictly: the values come from JSON or YAML, and lax coercion would
            # turn "yes" into True without a word.
            known[key].validate_json(text, strict=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise EngineArgsError(
                f"{where} has the wrong type or value {value!r}: {first['msg']}"
            ) from exc
