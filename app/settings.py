"""Every server setting in one place.

Each setting is an environment variable with the ``KAITO_`` prefix and an equivalent
command-line flag (``KAITO_MAX_MODEL_LEN`` / ``--max-model-len``). As in vLLM, the
command line takes precedence over the environment. The README lists them all.
"""

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "kaito-chat" / "models" / "SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KAITO_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="python -m app",
        protected_namespaces=(),
    )

    model: str = Field(
        default=str(DEFAULT_MODEL_DIR),
        description="Local model directory or Hugging Face hub id. The default is the "
        "SmolLM2-135M-Instruct directory that `make model` prepares.",
    )
    served_model_name: str | None = Field(
        default=None,
        description="Name reported for the model (/v1/models, the OpenAI `model` field, the "
        "metrics' model_name label). Default: a hub id as given, a local directory's last "
        "part (`/models/SmolLM2-135M-Instruct` -> `SmolLM2-135M-Instruct`).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where the engine runs; auto picks cuda when a GPU is visible."
    )
    dtype: str = Field(
        default="auto",
        description="Weights dtype. auto means float32 on CPU (no bf16 kernels on AVX2 "
        "machines) and the model's own dtype on a GPU.",
    )
    max_model_len: int | None = Field(
        default=None, gt=0, description="Context length (prompt + generated); default: the model's."
    )
    max_num_seqs: int | None = Field(
        default=None,
        gt=0,
        description="Most sequences the engine batches at once; default: vLLM's.",
    )
    block_size: int | None = Field(
        default=None,
        gt=0,
        description="Tokens per KV cache block. Prefix caching reuses whole blocks only, "
        "so smaller blocks let beam search and shared prompts reuse more. On CPU a multiple "
        "of 32 (vLLM's CPU kernels). Unset: 32 on CPU (vLLM's CPU default, 128, reuses "
        "nothing of a prompt shorter than 128 tokens; bench/NOTES_beam.md), vLLM's default "
        "on a GPU.",
    )
    kv_cache_space_gib: float = Field(
        default=2.0, gt=0, description="KV cache size on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of GPU memory vLLM may take (weights + KV cache). When the "
        "transformers backend may load too (KAITO_BACKEND, KAITO_HF_FALLBACK), leave room "
        "for a second copy of the weights plus its activations (docs/BEAM.md).",
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        description="GPUs to shard each layer over (tensor parallel): the GPUs of one node "
        "(docs/LARGE_MODELS.md).",
    )
    pipeline_parallel_size: int = Field(
        default=1,
        ge=1,
        description="Stages to split the model's layers into (pipeline parallel): the number "
        "of nodes when one node's GPUs cannot hold the model. The engine uses tensor x "
        "pipeline parallel GPUs (docs/LARGE_MODELS.md).",
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None,
        description="How vLLM runs its workers when it uses more than one device: mp "
        "(processes on this node), ray (actors on a Ray cluster, needed across nodes; "
        "install the `ray` extra). Unset: vLLM's default (mp on one node).",
    )
    ray_cluster_timeout_seconds: float = Field(
        default=600,
        gt=0,
        description="With the ray backend: how long start-up waits for the Ray cluster to "
        "offer the GPUs the engine needs (tensor x pipeline parallel) before it fails; "
        "python -m app.ray_wait uses it as its default too.",
    )
    engine_args: str | None = Field(
        default=None,
        description="More vLLM engine arguments, merged into the server's: a JSON object, "
        "or the path of a YAML or JSON file holding one (quantization, kv_cache_dtype, "
        "enable_prefix_caching, speculative_config, ...). An unknown key, a "
        "wrong type or a key another setting controls stops start-up (docs/LARGE_MODELS.md).",
    )
    attention_backend: str | None = Field(
        default=None,
        description="vLLM's attention backend on a GPU (FLASH_ATTN, FLASHINFER, TRITON_ATTN, "
        "...); default: vLLM's choice for the GPU. On Blackwell vLLM prefers FLASHINFER, "
        "which compiles kernels with nvcc, which the gpu image lacks: set FLASH_ATTN there "
        "(docs/GPU.md).",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip torch.compile / CUDA graphs: starts faster, runs slower (tests use it).",
    )
    backend: Literal["auto", "vllm", "hf"] = Field(
        default="auto",
        description="Engine that serves requests. auto: vLLM when vLLM supports the model's "
        "architecture (config.json), transformers alone when it does not; vllm: vLLM "
        "without the architecture check; hf: transformers for everything.",
    )
    hf_fallback: bool = Field(
        default=True,
        description="Load the transformers backend on first use for what vLLM cannot serve "
        "(group beam search, beam sampling, beam search with other processors). Off: those "
        "requests get a 400. It holds a second copy of the weights (docs/BEAM.md).",
    )
    hf_preload: bool = Field(
        default=False,
        description="Load the transformers backend at start-up instead of on first use.",
    )
    output_scores: bool = Field(
        default=False,
        description="Serve generate_kwargs.output_scores / return_dict_in_generate on vLLM "
        "(each token's log-probability after transformers' processing, docs/SCORES.md). "
        "It runs vLLM with processed log-probs, for every request: each sampled step pays a "
        "full-vocabulary log_softmax and, on a GPU, vLLM's FlashInfer top-k/top-p sampler is "
        "off. Off: vLLM's raw log-probs and fastest sampler; those requests get a 400.",
    )
    hf_max_batch: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Most waiting beam-search requests with equal settings the transformers "
        "backend runs together as one batch (1: one request at a time).",
    )
    hf_batch_wait_ms: int = Field(
        default=50,
        ge=0,
        le=1000,
        description="How long the transformers backend holds a request that could batch "
        "before starting it alone, so that the rest of a burst joins its batch (0: never).",
    )
    beam_backend: Literal["auto", "vllm", "hf"] = Field(
        default="auto",
        description="Where plain beam search (num_beams > 1, greedy, one group) runs when "
        "vLLM serves: vllm (a step loop in the engine, batched with other requests), hf (the "
        "transformers backend, batched), or auto: hf on CPU when KAITO_HF_FALLBACK is on "
        "(faster there, docs/BEAM.md), vllm on a GPU.",
    )
    max_num_beams: int = Field(
        default=8, ge=1, le=64, description="Largest num_beams a request may ask for."
    )
    chat_template: str | None = Field(
        default=None,
        description="A Jinja chat template file for /chat `messages` and /v1/chat/completions, "
        "used instead of the tokenizer's own (for models that ship none).",
    )
    adapters_dir: Path = Field(
        default=Path("/mnt/adapter"),
        description="LoRA adapters, one per subdirectory holding adapter_config.json (where "
        "Kaito mounts a Workspace's adapters); each adapter's strength comes from the "
        "environment variable named after it (default 1.0). Absent: the base model alone "
        "(docs/ADAPTERS.md).",
    )
    adapter_combination: Literal["svd", "linear", "cat"] = Field(
        default="svd",
        description="How PEFT's add_weighted_adapter combines the adapters into the default "
        "adapter of /chat (Kaito's combination_type).",
    )
    per_request_adapters: bool = Field(
        default=True,
        description="Requests may pick an adapter, or the base model, by `model` (vLLM's "
        "multi-LoRA serving). Off: every request runs the combined default adapter, merged "
        "into the weights at start-up (a full copy of the model under XDG_CACHE_HOME), so "
        "the engine serves at the base model's speed (docs/ADAPTERS.md).",
    )
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=5000, ge=1, le=65535, description="Port to listen on (Kaito's 5000).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Log level of the server and the engine."
    )
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="json: one JSON object per line with the request id (for log pipelines); "
        "text: plain lines. Prompts and the API key are never logged.",
    )

    # Admission, time limits and shutdown (production hardening).
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        description="Generation requests admitted at once (running + waiting in the engine). "
        "Past it, /chat answers 429 with Retry-After at once.",
    )
    request_timeout_seconds: float = Field(
        default=600,
        ge=0,
        description=(
            "A generation running longer is aborted in the engine and answered 504; 0 disables."
        ),
    )
    shutdown_grace_seconds: float = Field(
        default=30,
        ge=0,
        description="On SIGTERM: stop admitting (503), let in-flight requests finish for up to "
        "this long, then stop the engine and exit 0. Keep it below the pod's "
        "terminationGracePeriodSeconds.",
    )
    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        description="Largest request body accepted; larger ones get 413.",
    )
    max_num_return_sequences: int = Field(
        default=16, ge=1, description="Cap on generate_kwargs.num_return_sequences (400 above it)."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, generation routes need `Authorization: Bearer <key>`; "
        "/, /health, /livez and /metrics stay open.",
    )

    # Traces (app/tracing.py).
    otlp_traces_endpoint: str | None = Field(
        default=None,
        description="OpenTelemetry collector that receives traces over OTLP; unset: tracing "
        "is off and costs nothing. grpc: `http://collector:4317`; http/protobuf: "
        "`http://collector:4318/v1/traces`. A span per /chat and /v1 request with its stages, "
        "continuing the caller's `traceparent`; vLLM's engine spans join the same trace. "
        "Ids, routes, statuses and token counts only: never prompts or outputs.",
    )
    otlp_traces_protocol: Literal["grpc", "http/protobuf"] = Field(
        default="grpc",
        description="OTLP transport for KAITO_OTLP_TRACES_ENDPOINT (ours and vLLM's exporters).",
    )

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, value: str | None) -> str | None:
        from app.tracing import check_endpoint

        return None if not value else check_endpoint(value)

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        allowed = {"auto", "float32", "float16", "bfloat16", "half", "float"}
        if value not in allowed:
            raise ValueError(f"dtype must be one of {sorted(allowed)}, got {value!r}")
        return value

    @field_validator("engine_args")
    @classmethod
    def _engine_args_parse(cls, value: str | None) -> str | None:
        if value is not None:
            parse_engine_args(value)
        return value

    @model_validator(mode="after")
    def _vllm_only_settings(self) -> "Settings":
        # transformers alone has no engine arguments nor distributed executor: refusing
        # beats ignoring them.
        if self.backend == "hf":
            for name in ("engine_args", "distributed_executor_backend"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"KAITO_{name.upper()} is for the vLLM engine; KAITO_BACKEND=hf "
                        "serves with transformers alone"
                    )
            if self.pipeline_parallel_size != 1:
                raise ValueError(
                    "KAITO_PIPELINE_PARALLEL_SIZE is for the vLLM engine; KAITO_BACKEND=hf "
                    "serves with transformers alone"
                )
        return self

    @model_validator(mode="after")
    def _merge_on_this_node(self) -> "Settings":
        # The merged model is written to this pod's disk; Ray workers on other nodes
        # load the model from the same path and would not find it.
        if not self.per_request_adapters and self.distributed_executor_backend == "ray":
            raise ValueError(
                "KAITO_PER_REQUEST_ADAPTERS=false merges the adapters into a model written "
                "to this node's disk, which KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray workers on "
                "other nodes cannot read: keep per-request adapters on for multi-node serving"
            )
        return self

    @property
    def model_name(self) -> str:
        """The served name: what /v1/models lists and clients send as `model`."""
        return self.served_model_name or default_served_name(self.model)

    @property
    def engine_args_overrides(self) -> dict[str, Any]:
        """KAITO_ENGINE_ARGS as a dict (empty when unset)."""
        return {} if self.engine_args is None else parse_engine_args(self.engine_args)


def default_served_name(model: str) -> str:
    """The name a client types for KAITO_MODEL when KAITO_SERVED_MODEL_NAME is unset.

    vLLM's server reports the `--model` string itself. For a hub id that is what a client
    already knows and types (`mistralai/Mistral-7B-v0.1`; Kaito's generic Hugging Face
    presets are named by the whole hub id too), and the owner keeps two fine-tunes of one
    name apart, so a hub id stays whole. A local directory's full path names the machine's
    layout, not the model: clients would have to know where a pod mounts the weights, and
    the name would change with the mount. Its last part is the model's own name (the
    directory `hf download --local-dir` or `make model` fills). A path is what transformers
    loads as a path: an existing directory, or anything absolute or relative that cannot
    be a hub id (a hub id is `name` or `owner/name`, never starting with `/`, `.` or `~`).
    """
    path = Path(model).expanduser()
    if model.startswith(("/", ".", "~")) or model.count("/") > 1 or path.is_dir():
        # `.` or `..` have no last part of their own: name the directory they point at.
        return path.name or path.resolve().name or model
    return model


def parse_engine_args(value: str) -> dict[str, Any]:
    """KAITO_ENGINE_ARGS: a JSON object given inline, or the path of a YAML/JSON file.

    Inline means the text starts with ``{``; anything else is a path. Kaito's vLLM
    runtime reads its engine arguments from a YAML config file the same way.
    """
    text = value.strip()
    if text.startswith("{"):
        where = "KAITO_ENGINE_ARGS (inline JSON)"
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    else:
        path = Path(text)
        where = f"KAITO_ENGINE_ARGS file {path}"
        try:
            content = path.read_text()
        except OSError as exc:
            raise ValueError(
                f"KAITO_ENGINE_ARGS is neither a JSON object (it does not start with '{{') "
                f"nor a readable file: {exc}"
            ) from exc
        try:
            # YAML 1.2 is a superset of JSON: one parser for both file kinds.
            parsed = yaml.safe_load(content)
        except yaml.YAMLError as exc:
            raise ValueError(f"{where} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} must hold an object (key: value), got {type(parsed).__name__}")
    bad_keys = [k for k in parsed if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"{where}: keys must be strings, got {bad_keys}")
    return parsed


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, with command-line flags (if given) over it."""
    if argv is None:
        return Settings()
    return Settings(_cli_parse_args=argv)  # type: ignore[call-arg]
