"""The transformers backend: ``AutoModelForCausalLM`` on the same weights and tokenizer.

It serves what vLLM cannot (group beam search, beam sampling, beam search with
processors the step loop does not reproduce), everything when ``KAITO_BACKEND=hf``, and
models whose architecture vLLM does not support (``KAITO_BACKEND=auto``).

- ``model.generate`` is called with the request in transformers' own terms
  (``GenerationRequest.transformers_kwargs``), so transformers' rules apply by
  construction; group beam search, which transformers 5 no longer has in core, runs our
  4.x-semantics loop (engines/group_beam.py).
- One request at a time, in a single worker thread, so the event loop keeps serving and
  requests are served first come, first served (the executor's queue is FIFO). Running
  requests one by one also keeps each result identical to a lone ``generate`` call
  (batching pads and changes the floating-point sums).
- A request whose client goes away leaves the queue (its future is cancelled before it
  starts); a running one stops at the next step through a stopping criterion.
- torch and transformers are imported only here, when the model loads.
"""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from app.adapters import NO_ADAPTERS, ServedAdapters, active_adapter, load_into_peft
from app.engines.base import (
    EngineDeadError,
    GeneratedSequence,
    GenerationRequest,
    GenerationResult,
    LoadedModel,
)
from app.metrics import HF_QUEUE_DEPTH, HF_RUNNING
from app.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: GenerationRequest
    lock: threading.Lock = field(default_factory=threading.Lock)
    started: bool = False
    cancelled: bool = False


def _torch_dtype(settings: Settings, on_gpu: bool) -> Any:
    import torch

    if settings.dtype == "auto":
        # float32 on CPU, as the vLLM backend (no bf16 kernels on AVX2 machines).
        return "auto" if on_gpu else torch.float32
    return {
        "float32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
    }[settings.dtype]


def trim_generated(
    tokens: list[int], eos_ids: frozenset[int], pad_id: int | None, generated_len: int | None = None
) -> list[int]:
    """One returned row of ``generate`` without its padding.

    transformers pads a finished row (pad, or eos without a pad id): a row ends at its
    first eos (kept, as vLLM keeps it), else before its trailing pads. Beam search says
    each row's length itself (``generated_len``), which wins.
    """
    if generated_len is not None:
        return tokens[:generated_len]
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    if pad_id is not None:
        end = len(tokens)
        while end > 0 and tokens[end - 1] == pad_id:
            end -= 1
        return tokens[:end]
    return tokens


class HFEngine(LoadedModel):
    name = "hf"
    # Set by the dispatcher before the model loads (engines/dispatch.py).
    adapters: ServedAdapters = NO_ADAPTERS

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._model: Any = None
        self._device = "cpu"
        # One worker: generation is serial and FIFO.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._load_lock: asyncio.Lock | None = None
        self._jobs: dict[str, _Job] = {}
        self._failed: str | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self._settings
        on_gpu = s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
        self._device = "cuda" if on_gpu else "cpu"
        log.info("loading the transformers backend: %s on %s", s.model, self._device)
        tokenizer = AutoTokenizer.from_pretrained(s.model)
        model = AutoModelForCausalLM.from_pretrained(s.model, dtype=_torch_dtype(s, on_gpu))
        model.to(self._device)  # type: ignore[arg-type]  # transformers' .to wrapper typing
        model.eval()
        config = model.config
        context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
        self._model_loaded(
            tokenizer, int(config.vocab_size), min(s.max_model_len or context, context)
        )
        # With LoRA adapters, a PEFT model holding each one and the combined default.
        self._model = load_into_peft(model, self.adapters)

    async def ensure_loaded(self) -> None:
        """Loads the model on first use (seconds for small models, in a thread)."""
        if self._model is not None:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if self._model is None:
                try:
                    await asyncio.to_thread(self._load)
                except Exception as exc:
                    self._failed = str(exc)
                    raise EngineDeadError(
                        f"the transformers backend failed to load: {exc}"
                    ) from exc

    async def start(self) -> None:
        await self.ensure_loaded()

    async def stop(self) -> None:
        for job in list(self._jobs.values()):
            self._cancel(job)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._model = None

    def is_ready(self) -> bool:
        return self._model is not None

    def _cancel(self, job: _Job) -> None:
        with job.lock:
            if job.cancelled:
                return
            job.cancelled = True
            if not job.started:
                HF_QUEUE_DEPTH.dec()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self.ensure_loaded()
        job = _Job(request)
        self._jobs[request.request_id] = job
        HF_QUEUE_DEPTH.inc()
        loop = asyncio.get_running_loop()
        try:
            sequences = await loop.run_in_executor(self._executor, self._run, job)
        except asyncio.CancelledError:
            # The awaiting task was cancelled (client gone): a queued job leaves the
            # queue, a running one stops at its next step.
            self._cancel(job)
            raise
        finally:
            self._jobs.pop(request.request_id, None)
        return GenerationResult(sequences=sequences, backend=self.name)

    async def abort(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            self._cancel(job)

    # --- the worker thread ---

    def _run(self, job: _Job) -> list[GeneratedSequence]:
        with job.lock:
            if job.cancelled:
                return []
            job.started = True
            HF_QUEUE_DEPTH.dec()
        HF_RUNNING.inc()
        try:
            with active_adapter(self._model, job.request.adapter):
                return self._generate(job)
        finally:
            HF_RUNNING.dec()

    def _generate(self, job: _Job) -> list[GeneratedSequence]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        request = job.request
        kwargs = dict(request.transformers_kwargs)
        if not kwargs:
            raise ValueError("the transformers backend needs GenerationRequest.transformers_kwargs")
        beam = request.beam
        if beam is not None and beam.is_group:
            from app.engines.group_beam import group_beam_search

            return group_beam_search(
                self._model, request.prompt_token_ids, kwargs, should_stop=lambda: job.cancelled
            )
        # Neutral group values only matter to group beam search (transformers 5 refuses
        # num_beam_groups > 1 without the hub).
        if kwargs.get("num_beam_groups") == 1:
            kwargs.pop("num_beam_groups")
        if kwargs.get("diversity_penalty") == 0.0:
            kwargs.pop("diversity_penalty")

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
                done = job.cancelled
                return torch.full(
                    (input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device
                )

        extra: dict[str, Any] = {}
        if kwargs.get("stop_strings"):
            extra["tokenizer"] = self._tokenizer
        is_beam = beam is not None
        ids = torch.tensor([request.prompt_token_ids], dtype=torch.long, device=self._device)
        with torch.inference_mode():
            out = self._model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                return_dict_in_generate=True,
                output_scores=False,
                **extra,
                **kwargs,
            )
        prompt_len = ids.shape[-1]
        rows = out.sequences[:, prompt_len:].tolist()
        lengths: list[int | None] = [None] * len(rows)
        if is_beam and getattr(out, "beam_indices", None) is not None:
            # -1 marks steps a returned beam did not take.
            lengths = [int(n) for n in (out.beam_indices >= 0).sum(dim=-1).tolist()]
        eos_ids = frozenset(kwargs.get("eos_token_id") or [])
        pad = kwargs.get("pad_token_id")
        max_new = int(kwargs["max_new_tokens"])
        sequences = []
        for row, length in zip(rows, lengths, strict=True):
            tokens = trim_generated(row, eos_ids, pad, length)
            finished = bool(tokens) and (tokens[-1] in eos_ids or len(tokens) < max_new)
            sequences.append(
                GeneratedSequence(token_ids=tokens, finish_reason="stop" if finished else "length")
            )
        return sequences
