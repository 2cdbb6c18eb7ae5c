"""The transformers backend: ``AutoModelForCausalLM`` on the same weights and tokenizer.

It serves what vLLM cannot (group beam search, beam sampling, beam search with
processors the step loop does not reproduce), everything when ``KAITO_BACKEND=hf``, and
models whose architecture vLLM does not support (``KAITO_BACKEND=auto``).

- ``model.generate`` is called with the request in transformers' own terms
  (``GenerationRequest.transformers_kwargs``), so transformers' rules apply by
  construction; group beam search, which transformers 5 no longer has in core, runs our
  4.x-semantics loop (engines/group_beam.py).
- One worker thread, so the event loop keeps serving; requests start first come, first
  served. When the worker is free it takes the oldest waiting request and, if it is a
  beam search without sampling, every other waiting request with the same settings
  (``batch_key``), up to ``KAITO_HF_MAX_BATCH``, and runs them as one left-padded batch
  (tests/integration/test_hf_batching.py checks that each result equals the request's
  lone result token for token). Other requests (sampling, greedy, beam sampling, stop
  strings) run alone: sampling draws from one generator, so a batch would change them.
- A request whose client goes away leaves the queue; a running one stops at the next
  step through a stopping criterion once every request of its batch is gone.
- torch and transformers are imported only here, when the model loads.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
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


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    # Settled from the worker thread (loop.call_soon_threadsafe).
    future: "asyncio.Future[list[GeneratedSequence]]"
    loop: asyncio.AbstractEventLoop
    started: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def settle(self, result: list[GeneratedSequence] | BaseException) -> None:
        def _set() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(_set)


# generate kwargs whose effect does not depend on where a row's prompt starts, so a
# left-padded row behaves as the lone prompt: lengths count from the padded prompt's end,
# eos / pad ids, the beam rules, and the sampling warpers (batched requests never sample,
# and transformers ignores warpers without sampling). Any other setting (repetition
# penalty, n-gram bans, bad words, ...) reads the row's tokens, pads included, so when it
# is not neutral the request batches only with prompts of the same length (no padding).
_POSITION_FREE = frozenset(
    {
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "length_penalty",
        "early_stopping",
        "num_return_sequences",
        "max_new_tokens",
        "min_new_tokens",
        "eos_token_id",
        "pad_token_id",
        "do_sample",
        "forced_eos_token_id",
        "remove_invalid_values",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "min_p",
        "epsilon_cutoff",
        "eta_cutoff",
    }
)
# Values with which a prompt-reading setting does nothing (transformers adds no processor).
_NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
}


def batch_key(request: GenerationRequest) -> tuple[Any, ...] | None:
    """Which waiting requests may run in one batch with this one: those with an equal key.

    None (never batched): no beams, beam sampling (a batch would draw the random numbers
    in another order), stop strings (not checked batched). Otherwise the adapter (one is
    active per batch) and every generate setting, with the prompt's length added when a
    setting reads the prompt's tokens.
    """
    beam = request.beam
    kwargs = request.transformers_kwargs
    if beam is None or beam.do_sample or kwargs.get("do_sample") or kwargs.get("stop_strings"):
        return None
    settings = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
    reads_prompt = any(
        k not in _POSITION_FREE and (k not in _NEUTRAL or v != _NEUTRAL[k])
        for k, v in kwargs.items()
    )
    prompt_len = len(request.prompt_token_ids) if reads_prompt else None
    return (request.adapter, settings, prompt_len)


def uses_gpu(settings: Settings) -> bool:
    """Whether the model runs on a GPU (KAITO_DEVICE; auto: when torch sees one)."""
    import torch

    return settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())


def torch_dtype(settings: Settings, on_gpu: bool) -> Any:
    """The dtype the model's weights are served in (KAITO_DTYPE), as transformers'
    from_pretrained takes it."""
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
        # One worker: one batch at a time, started in arrival order of its oldest request.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._load_lock: asyncio.Lock | None = None
        self._jobs: dict[str, _Job] = {}
        # Waiting requests, oldest first; the lock also guards each job's flags.
        self._waiting: list[_Job] = []
        self._queue_lock = threading.Lock()
        # Signalled when a request joins the queue (the batching window waits on it).
        self._arrival = threading.Condition(self._queue_lock)
        self._failed: str | None = None

    def serve_settings(self, settings: Settings) -> None:
        """Loads the model ``settings`` names instead of the one it was made with (the
        dispatcher's merged model); only before the model loads."""
        assert self._model is None, "the model is already loaded"
        self._settings = settings

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        s = self._settings
        on_gpu = uses_gpu(s)
        self._device = "cuda" if on_gpu else "cpu"
        log.info("loading the transformers backend: %s on %s", s.model, self._device)
        tokenizer = AutoTokenizer.from_pretrained(s.model)
        model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch_dtype(s, on_gpu))
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
        with self._queue_lock:
            if job.cancelled:
                return
            job.cancelled = True
            if not job.started:
                self._waiting.remove(job)
                HF_QUEUE_DEPTH.dec()
                job.settle([])

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await self.ensure_loaded()
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        self._jobs[request.request_id] = job
        with self._arrival:
            self._waiting.append(job)
            HF_QUEUE_DEPTH.inc()
            self._arrival.notify_all()
        # One turn of the worker per request: a turn runs the oldest waiting request and
        # whatever batches with it, so there are always at least as many turns as batches.
        self._executor.submit(self._run_next)
        try:
            sequences = await job.future
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

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting request and the waiting ones that batch with it."""
        with self._queue_lock:
            if not self._waiting:
                return []
            head = self._waiting[0]
            key = batch_key(head.request)
            batch = [head]
            if key is not None:
                for job in self._waiting[1:]:
                    if len(batch) >= self._settings.hf_max_batch:
                        break
                    if batch_key(job.request) == key:
                        batch.append(job)
            for job in batch:
                self._waiting.remove(job)
                job.started = True
            HF_QUEUE_DEPTH.dec(len(batch))
        return batch

    def _await_batch(self) -> None:
        """Holds a batchable oldest request until KAITO_HF_BATCH_WAIT_MS after its
        arrival, or until its batch is full: a burst's requests arrive milliseconds
        apart, and without the wait the first would run alone with the rest batched
        behind it (half the speed for a burst of beam requests, bench/NOTES_beam.md)."""
        wait_s = self._settings.hf_batch_wait_ms / 1000
        with self._arrival:
            if not self._waiting or wait_s <= 0 or self._settings.hf_max_batch == 1:
                return
            head = self._waiting[0]
            key = batch_key(head.request)
            if key is None:
                return
            deadline = head.arrived + wait_s
            while (remaining := deadline - time.monotonic()) > 0:
                if self._waiting[:1] != [head]:  # cancelled meanwhile
                    return
                mates = sum(1 for job in self._waiting if batch_key(job.request) == key)
                if mates >= self._settings.hf_max_batch:
                    return
                self._arrival.wait(remaining)

    def _run_next(self) -> None:
        self._await_batch()
        jobs = self._take_batch()
        if not jobs:
            return
        HF_RUNNING.inc(len(jobs))
        try:
            # Requests batch only with requests of the same adapter (batch_key).
            with active_adapter(self._model, jobs[0].request.adapter):
                results = (
                    [self._generate(jobs[0])] if len(jobs) == 1 else self._generate_batch(jobs)
                )
        except BaseException as exc:
            for job in jobs:
                job.settle(exc)
            return
        finally:
            HF_RUNNING.dec(len(jobs))
        for job, sequences in zip(jobs, results, strict=True):
            job.settle([] if job.cancelled else sequences)

    def _generate(self, job: _Job) -> list[GeneratedSequence]:
        return self._generate_batch([job])[0]

    def _generate_batch(self, jobs: list[_Job]) -> list[list[GeneratedSequence]]:
        """Runs requests that share ``batch_key`` (or one request) as one batch."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        request = jobs[0].request
        kwargs = dict(request.transformers_kwargs)
        if not kwargs:
            raise ValueError("the transformers backend needs GenerationRequest.transformers_kwargs")
        prompts = [job.request.prompt_token_ids for job in jobs]
        want_scores = [job.request.sampling.logprobs is not None for job in jobs]

        def all_cancelled() -> bool:
            return all(job.cancelled for job in jobs)

        beam = request.beam
        if beam is not None and beam.is_group:
            from app.engines.group_beam import group_beam_search_batch

            grouped = group_beam_search_batch(
                self._model, prompts, kwargs, should_stop=all_cancelled
            )
            return [
                rows if wants else [_without_scores(s) for s in rows]
                for rows, wants in zip(grouped, want_scores, strict=True)
            ]
        # Neutral group values only matter to group beam search (transformers 5 refuses
        # num_beam_groups > 1 without the hub).
        if kwargs.get("num_beam_groups") == 1:
            kwargs.pop("num_beam_groups")
        if kwargs.get("diversity_penalty") == 0.0:
            kwargs.pop("diversity_penalty")

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
                return torch.full(
                    (input_ids.shape[0],),
                    all_cancelled(),
                    dtype=torch.bool,
                    device=input_ids.device,
                )

        extra: dict[str, Any] = {}
        if kwargs.get("stop_strings"):
            extra["tokenizer"] = self._tokenizer
        is_beam = beam is not None
        scores = is_beam and any(want_scores)
        ids, mask = left_padded(prompts, _pad_id(kwargs), self._device)
        with torch.inference_mode():
            out = self._model.generate(
                ids,
                attention_mask=mask,
                stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                return_dict_in_generate=True,
                output_scores=scores,
                **extra,
                **kwargs,
            )
            prompt_len = ids.shape[-1]
            rows = out.sequences[:, prompt_len:].tolist()
            lengths: list[int | None] = [None] * len(rows)
            beam_indices = getattr(out, "beam_indices", None) if is_beam else None
            if beam_indices is not None:
                # -1 marks steps a returned beam did not take.
                lengths = [int(n) for n in (beam_indices >= 0).sum(dim=-1).tolist()]
            token_logprobs: list[list[float]] | None = None
            sequence_scores: list[float] | None = None
            if scores and beam_indices is not None:
                # transformers' recipe for beams: the processed log-probability of each
                # token on the beam that produced it (normalize_logits=False: beam
                # search's scores are log-softmax already).
                transition = self._model.compute_transition_scores(
                    out.sequences, out.scores, beam_indices, normalize_logits=False
                )
                token_logprobs = transition.tolist()
                sequence_scores = out.sequences_scores.tolist()
        eos_ids = frozenset(kwargs.get("eos_token_id") or [])
        pad = kwargs.get("pad_token_id")
        max_new = int(kwargs["max_new_tokens"])
        per_prompt = len(rows) // len(jobs)
        per_request: list[list[GeneratedSequence]] = []
        for j, wants in enumerate(want_scores):
            sequences = []
            for r in range(j * per_prompt, (j + 1) * per_prompt):
                tokens = trim_generated(rows[r], eos_ids, pad, lengths[r])
                finished = bool(tokens) and (tokens[-1] in eos_ids or len(tokens) < max_new)
                sequence = GeneratedSequence(
                    token_ids=tokens, finish_reason="stop" if finished else "length"
                )
                if wants and token_logprobs is not None and sequence_scores is not None:
                    sequence = GeneratedSequence(
                        token_ids=tokens,
                        finish_reason=sequence.finish_reason,
                        logprobs=token_logprobs[r][: len(tokens)],
                        sequence_score=sequence_scores[r],
                    )
                sequences.append(sequence)
            per_request.append(sequences)
        return per_request


def _pad_id(kwargs: Mapping[str, Any]) -> int:
    pad = kwargs.get("pad_token_id")
    if pad is not None:
        return int(pad)
    eos = kwargs.get("eos_token_id") or [0]
    return int(eos[0])


def _without_scores(sequence: GeneratedSequence) -> GeneratedSequence:
    return GeneratedSequence(token_ids=sequence.token_ids, finish_reason=sequence.finish_reason)


def left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """Prompts as one left-padded batch and its attention mask (all ones without padding,
    so a lone prompt is exactly the call it always was)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor(
        [[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device
    )
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device
    )
    return ids, mask
