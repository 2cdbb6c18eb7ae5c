"""The engine the server runs: routes each request to the backend its plan names.

It implements the same ``Engine`` protocol, so the HTTP layer does not know there are
two backends. At start-up it picks the primary engine (``KAITO_BACKEND``):

- ``auto``: vLLM when vLLM's model registry supports the architecture in the model's
  config.json, transformers alone when it does not (KServe's huggingfaceserver does the
  same); ``vllm``: vLLM without the check; ``hf``: transformers for everything.

Then per request, when vLLM is the primary:

- a plan that needs transformers (``backend="hf"``: group beam search, beam sampling,
  beam search with processors the step loop does not reproduce) goes to the transformers
  backend, loaded on first use (``KAITO_HF_FALLBACK``) or at start-up
  (``KAITO_HF_PRELOAD``);
- plain beam search runs as a step loop on vLLM (engines/beam_search.py), unless
  ``KAITO_BEAM_BACKEND=hf`` or it needs more top log-probs than vLLM returns;
- everything else goes to vLLM.
"""

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from app.adapter_merge import build_merged, merged_model_dir
from app.adapters import NO_ADAPTERS, AdapterError, ServedAdapters, prepare_adapters
from app.engines.base import (
    Engine,
    GenerationRequest,
    GenerationResult,
    SequenceDelta,
    Tokenizer,
)
from app.engines.beam_search import BeamSearch, run_on_vllm
from app.engines.hf_engine import HFEngine, torch_dtype, uses_gpu
from app.settings import Settings
from param_mapping import ParameterError, SpecialTokens

log = logging.getLogger(__name__)

HF = "hf"
VLLM = "vllm"


def model_architectures(model: str) -> list[str] | None:
    """The ``architectures`` of a local model's config.json; None when unknown here."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    archs = json.loads(config.read_text()).get("architectures")
    return list(archs) if isinstance(archs, list) else None


def vllm_supports(model: str) -> bool:
    """Whether vLLM's model registry has the model's architecture (imports vLLM).

    A hub id or a config without ``architectures`` gives True: vLLM decides at load.
    """
    archs = model_architectures(model)
    if not archs:
        return True
    from vllm.model_executor.models.registry import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    return any(arch in supported for arch in archs)


def refuse_vllm_only_settings(settings: Settings) -> None:
    """Settings only the vLLM engine reads, set while transformers alone will serve: a
    start-up error, not settings silently ignored (Settings refuses them with
    KAITO_BACKEND=hf; this is the same rule when auto picks transformers)."""
    from app.distributed import StartupError

    ignored = [
        name
        for name, unset in (
            ("KAITO_ENGINE_ARGS", settings.engine_args is None),
            ("KAITO_DISTRIBUTED_EXECUTOR_BACKEND", settings.distributed_executor_backend is None),
            ("KAITO_PIPELINE_PARALLEL_SIZE", settings.pipeline_parallel_size == 1),
        )
        if not unset
    ]
    if ignored:
        raise StartupError(
            f"{', '.join(ignored)} set, but vLLM cannot serve {settings.model} (its "
            "architecture is not in vLLM's registry) and transformers alone will: unset them, "
            "or KAITO_BACKEND=vllm to try vLLM anyway"
        )


class DispatchEngine:
    def __init__(
        self,
        settings: Settings,
        *,
        vllm_factory: Callable[[Settings], Engine] | None = None,
        hf: HFEngine | Any = None,
        supports: Callable[[str], bool] = vllm_supports,
    ) -> None:
        self._settings = settings
        self._vllm_factory = vllm_factory
        self._supports = supports
        self.hf = hf if hf is not None else HFEngine(settings)
        self.vllm: Any = None
        self._primary: Any = None
        # The LoRA adapters both backends serve (app/adapters.py), found at start.
        self.adapters: ServedAdapters = NO_ADAPTERS
        # The adapters merged into the served weights (KAITO_PER_REQUEST_ADAPTERS=false):
        # a request cannot pick them alone.
        self.merged_adapters: tuple[str, ...] = ()
        # Where plain beam search runs (KAITO_BEAM_BACKEND, resolved at start).
        self._plain_beams_on_hf = settings.beam_backend == HF

    # --- what the HTTP layer sees: the primary engine's ---

    @property
    def name(self) -> str:  # type: ignore[override]
        return self._primary.name if self._primary is not None else VLLM

    @property
    def tokenizer(self) -> Tokenizer:
        assert self._primary is not None, "engine not started"
        return self._primary.tokenizer  # type: ignore[no-any-return]

    @property
    def special_tokens(self) -> SpecialTokens:
        assert self._primary is not None, "engine not started"
        return self._primary.special_tokens  # type: ignore[no-any-return]

    @property
    def max_model_len(self) -> int:
        return self._primary.max_model_len if self._primary is not None else 0

    def is_ready(self) -> bool:
        return self._primary is not None and self._primary.is_ready()

    async def start(self) -> None:
        s = self._settings
        # Before any engine: a bad adapter stops start-up before minutes of loading.
        try:
            self.adapters = await asyncio.to_thread(
                prepare_adapters, s.adapters_dir, s.adapter_combination, s.model, s.model_name
            )
            if self.adapters and not s.per_request_adapters:
                await asyncio.to_thread(self._serve_merged)
        except AdapterError as exc:
            from app.distributed import StartupError

            raise StartupError(str(exc)) from exc
        self.hf.adapters = self.adapters
        mode = self._settings.backend
        if mode == "auto":
            use_vllm = await asyncio.to_thread(self._supports, self._settings.model)
            if not use_vllm:
                log.warning(
                    "vLLM does not support %s's architecture %s: serving with transformers",
                    self._settings.model,
                    model_architectures(self._settings.model),
                )
                refuse_vllm_only_settings(self._settings)
        else:
            use_vllm = mode == VLLM
        if use_vllm:
            if self._vllm_factory is None:
                from app.engines.vllm_engine import VLLMEngine

                self._vllm_factory = VLLMEngine
            self.vllm = self._vllm_factory(self._settings)
            self.vllm.adapters = self.adapters
            await self.vllm.start()
            self._primary = self.vllm
            self._plain_beams_on_hf = self._resolve_beam_backend()
            if self._settings.hf_preload:
                await self.hf.start()
        else:
            await self.hf.start()
            self._primary = self.hf

    def _resolve_beam_backend(self) -> bool:
        """Whether plain beam search goes to the transformers backend.

        auto: on CPU, yes when the fallback may load it. There each step of the vLLM step
        loop costs an engine iteration as dear as a whole batched step of transformers,
        and forked beams wait for a second one, so the batched transformers backend is
        ~1.8x faster (bench/NOTES_beam.md). On a GPU the step loop: it batches beams with
        every other request and needs no second copy of the weights in GPU memory.
        """
        choice = self._settings.beam_backend
        if choice != "auto":
            return choice == HF
        return self._settings.hf_fallback and not uses_gpu(self._settings)

    def _serve_merged(self) -> None:
        """KAITO_PER_REQUEST_ADAPTERS=false: both engines load the model with the
        combined adapter merged into its weights (app/adapter_merge.py) and serve no
        adapters."""
        s = self._settings
        dtype = torch_dtype(s, uses_gpu(self._settings))
        assert self.adapters.combined is not None
        cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        out = merged_model_dir(cache_root, s.model, self.adapters.combined, str(dtype))
        merged = build_merged(s.model, self.adapters.combined, dtype, out)
        self.merged_adapters = tuple(a.name for a in self.adapters.adapters)
        self.adapters = NO_ADAPTERS
        # Under the base model's served name: clients see one model, as before.
        self._settings = s.model_copy(
            update={"model": str(merged), "served_model_name": s.model_name}
        )
        self.hf.serve_settings(self._settings)

    async def stop(self) -> None:
        if self.vllm is not None:
            await self.vllm.stop()
        await self.hf.stop()

    # --- routing ---

    def route(self, request: GenerationRequest) -> str:
        """Where this request runs: "hf", "vllm" or "vllm-beam"."""
        if self._primary is self.hf:
            return HF
        if request.backend == HF:
            return HF
        beam = request.beam
        if beam is not None:
            if self._plain_beams_on_hf or beam.is_group or beam.do_sample:
                return HF
            if self._beam_search(request).logprobs_needed > self._max_logprobs():
                return HF
            return "vllm-beam"
        return VLLM

    def _max_logprobs(self) -> int:
        llm = getattr(self.vllm, "_llm", None)
        config = getattr(llm, "model_config", None)
        value = getattr(config, "max_logprobs", 20)
        return int(value) if value is not None and value >= 0 else 1 << 30

    @staticmethod
    def _beam_search(request: GenerationRequest) -> BeamSearch:
        assert request.beam is not None
        spec = request.sampling
        return BeamSearch(
            request.beam,
            prompt_len=len(request.prompt_token_ids),
            max_new_tokens=spec.max_tokens,
            min_new_tokens=spec.min_tokens,
            eos_token_ids=spec.stop_token_ids,
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        target = self.route(request)
        if target == HF:
            if self._primary is not self.hf and not self._settings.hf_fallback:
                raise ParameterError(
                    request.backend_reason or "generate_kwargs",
                    "this request needs the transformers backend "
                    f"({request.backend_reason or 'beam search'}), which this server runs "
                    "without (KAITO_HF_FALLBACK=false).",
                )
            result = await self.hf.generate(request)
            return GenerationResult(sequences=result.sequences, backend=HF)
        if target == "vllm-beam":
            # The step loop reaches the backend's AsyncLLM (VLLMEngine keeps it in _llm).
            llm = getattr(self.vllm, "_llm", None)
            if llm is None:
                from app.engines.base import EngineDeadError

                raise EngineDeadError("the vLLM engine is not running")
            sequences = await run_on_vllm(
                llm,
                request.request_id,
                request.prompt_token_ids,
                self._beam_search(request),
                self.vllm.lora_request(request.adapter),
            )
            return GenerationResult(sequences=sequences, backend=VLLM)
        result = await self.vllm.generate(request)
        return GenerationResult(sequences=result.sequences, backend=VLLM)

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[SequenceDelta, None]:
        """Streams go to vLLM only: the transformers backend and the beam step
        loop produce their text at the end."""
        if self.route(request) != VLLM:
            raise ParameterError(
                "stream",
                "stream is not available for this request: "
                f"{request.backend_reason or 'beam search'} needs the transformers backend "
                "or the beam search loop, which do not stream.",
            )
        # aclosing: a consumer that stops early closes vLLM's stream now (which aborts
        # the request), not whenever the garbage collector gets to it.
        async with contextlib.aclosing(self.vllm.generate_stream(request)) as stream:
            async for delta in stream:
                yield delta

    async def openai_server(self) -> Any:
        """vLLM's OpenAI serving layer on the vLLM engine; None without vLLM."""
        if self.vllm is None or self._primary is not self.vllm:
            return None
        return await self.vllm.openai_server()

    async def abort(self, request_id: str) -> None:
        if self.vllm is not None:
            await self.vllm.abort(request_id)
        await self.hf.abort(request_id)
