"""The /chat logic between HTTP and the engine: tokenize, map, generate, decode."""

import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from app import text_codec, tracing
from app.adapters import NO_ADAPTERS, UnknownModel, select_adapter
from app.chat_template import build_chat_prompt
from app.engines.base import Engine, GeneratedSequence, GenerationRequest, Tokenizer
from app.errors import HTTPError
from app.logs import request_id_var
from app.metrics import BACKEND_REQUESTS
from app.pipeline_text import PipelineDecoder
from app.schemas import ChatRequest, ChatResponse, Sequence, TokenScore, Usage
from param_mapping import GenerationPlan, to_generation_plan
from param_mapping.beam import DEFAULT_MAX_NUM_BEAMS
from param_mapping.limits import Limits, check_limits

# Kaito's exact message.
PROMPT_REQUIRED = "Text generation parameter prompt required"


def token_texts(tokenizer: Tokenizer, context_ids: list[int], token_ids: list[int]) -> list[str]:
    """Each token's text, decoded the incremental way vLLM and TGI do.

    Decoding one token alone loses word boundaries (SentencePiece) and splits multi-byte
    characters, so each token's text is what it adds after a few tokens of context
    (text_codec.IncrementalDecoder). Special tokens are written out.
    """
    decoder = text_codec.IncrementalDecoder(
        tokenizer, context_ids, skip_special_tokens=False, clean_up=False
    )
    return [decoder.push(token) for token in token_ids]


def _scores(tokenizer: Tokenizer, prompt_ids: list[int], seq: GeneratedSequence) -> dict[str, Any]:
    """The score fields of one sequence (output_scores / return_dict_in_generate)."""
    logprobs: list[float | None] = [
        lp if lp is not None and math.isfinite(lp) else None for lp in (seq.logprobs or [])
    ]
    logprobs += [None] * (len(seq.token_ids) - len(logprobs))
    texts = token_texts(tokenizer, prompt_ids, seq.token_ids)
    if seq.sequence_score is not None:
        total: float | None = seq.sequence_score
    else:
        total = None if None in logprobs else sum(lp for lp in logprobs if lp is not None)
    return {
        "tokens": [
            TokenScore(id=token, text=text, logprob=lp)
            for token, text, lp in zip(seq.token_ids, texts, logprobs, strict=True)
        ],
        "sequence_score": total,
    }


def new_request_id() -> str:
    """The engine's id for one /chat request: named after its X-Request-Id, so vLLM's
    log lines and ours meet, plus a suffix, because the engine aborts by id and two
    clients may send the same X-Request-Id."""
    return f"chat-{request_id_var.get()}-{uuid.uuid4().hex[:8]}"


class ChatService:
    def __init__(
        self,
        engine: Engine,
        limits: Limits | None = None,
        max_num_beams: int = DEFAULT_MAX_NUM_BEAMS,
        chat_template: str | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.engine = engine
        # The name a request's ``model`` gives to ask for the base model, no adapter.
        self.base_model_name = base_model_name
        self.limits = limits or Limits()
        self.max_num_beams = max_num_beams
        # KAITO_CHAT_TEMPLATE's text; None: the tokenizer's own template.
        self.chat_template = chat_template

    def _check_ready(self) -> None:
        if not self.engine.is_ready():
            raise HTTPError(503, "The model is not ready yet (loading) or the engine is down.")

    def _prompt_ids(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids and the prefix's length in tokens."""
        tokenizer = self.engine.tokenizer
        if request.messages is not None:
            # Kaito's conversational mode: the chat template builds the prompt,
            # special tokens included (chat_template.py).
            if request.prompt is not None or request.prefix:
                raise HTTPError(
                    400,
                    "Send either prompt (with an optional prefix) or messages, not both.",
                    parameter="messages",
                )
            messages = [m.model_dump() for m in request.messages]
            text = build_chat_prompt(tokenizer, messages, self.chat_template)
            return text_codec.encode(tokenizer, text, add_special_tokens=False), 0
        if not request.prompt:
            raise HTTPError(400, PROMPT_REQUIRED)
        # The pipeline tokenizes prefix + prompt with the tokenizer's default special
        # tokens, and measures the prefix alone without them (it adds that length to
        # max_length / min_length).
        prefix = request.prefix or ""
        prompt_ids = text_codec.encode(tokenizer, prefix + request.prompt)
        prefix_tokens = (
            len(text_codec.encode(tokenizer, prefix, add_special_tokens=False)) if prefix else 0
        )
        return prompt_ids, prefix_tokens

    def _prepare(
        self, request: ChatRequest, request_id: str
    ) -> tuple[GenerationRequest, GenerationPlan]:
        """Everything before the engine: checks, tokens and the plan; raises 4xx/503."""
        if request.messages is None and not request.prompt:
            raise HTTPError(400, PROMPT_REQUIRED)
        self._check_ready()
        engine = self.engine
        adapter = self._adapter(request.model)
        with tracing.span("tokenize"):
            prompt_ids, prefix_tokens = self._prompt_ids(request)
            tracing.set_attributes({"gen_ai.usage.prompt_tokens": len(prompt_ids)})

        with tracing.span("validate_and_map"):
            check_limits(request.generate_kwargs_given(), self.limits)
            plan = to_generation_plan(
                request.generate_kwargs_given(),
                prompt_tokens=len(prompt_ids),
                prefix_tokens=prefix_tokens,
                special=engine.special_tokens,
                max_model_len=engine.max_model_len,
                handle_long_generation=request.handle_long_generation,
                max_num_beams=self.max_num_beams,
            )
        if plan.keep_last_prompt_tokens is not None:
            prompt_ids = prompt_ids[-plan.keep_last_prompt_tokens :]

        generation = GenerationRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=plan.sampling,
            backend=plan.backend,
            backend_reason=plan.backend_reason,
            beam=plan.beam,
            transformers_kwargs=plan.transformers_kwargs,
            adapter=adapter,
        )
        return generation, plan

    def _adapter(self, model: str | None) -> str | None:
        """The request's LoRA adapter (app/adapters.py select_adapter); 404 for a name
        the server does not serve, as vLLM's OpenAI server answers an unknown model."""
        served = getattr(self.engine, "adapters", NO_ADAPTERS)
        try:
            return select_adapter(model, served, self.base_model_name or "")
        except UnknownModel:
            if model in getattr(self.engine, "merged_adapters", ()):
                raise HTTPError(
                    404,
                    f"model {model!r} is merged into this server's weights with the other "
                    "adapters (KAITO_PER_REQUEST_ADAPTERS=false): every request runs that "
                    f"combination; send no model, or {self.base_model_name!r}",
                    parameter="model",
                ) from None
            known = [self.base_model_name, *served.paths()]
            raise HTTPError(
                404,
                f"model {model!r} does not exist: it is neither the base model nor a LoRA "
                f"adapter of this server (known: {', '.join(repr(k) for k in known if k)})",
                parameter="model",
            ) from None

    def _reply(
        self,
        request: ChatRequest,
        generation: GenerationRequest,
        plan: GenerationPlan,
        generated: list[GeneratedSequence],
        served_by: str,
        new_texts: list[str] | None = None,
    ) -> ChatResponse:
        """The pipeline's reply for the generated sequences; ``new_texts``: their
        PipelineDecoder.new_text when the caller has it already (a stream)."""
        tokenizer = self.engine.tokenizer
        prompt_ids = generation.prompt_token_ids
        decoder = PipelineDecoder(
            tokenizer, prompt_ids, clean_up=bool(request.clean_up_tokenization_spaces)
        )
        # null means the pipeline default (true); a conversation's reply is the new text
        # only, as in transformers' conversational pipeline.
        full = request.return_full_text is not False and request.messages is None
        want_scores = plan.sampling.logprobs is not None
        texts: list[str | None] = list(new_texts) if new_texts else [None] * len(generated)
        sequences = [
            Sequence(
                text=decoder.generated_text(request.prompt or "", seq.token_ids, full, new),
                finish_reason=seq.finish_reason,
                generated_tokens=len(seq.token_ids),
                **(_scores(tokenizer, prompt_ids, seq) if want_scores else {}),
            )
            for seq, new in zip(generated, texts, strict=True)
        ]
        completion_tokens = sum(s.generated_tokens for s in sequences)
        return ChatResponse(
            Result="".join(s.text for s in sequences),
            sequences=sequences,
            usage=Usage(
                prompt_tokens=len(prompt_ids),
                completion_tokens=completion_tokens,
                total_tokens=len(prompt_ids) + completion_tokens,
            ),
            backend=served_by,
        )

    async def chat(self, request: ChatRequest, request_id: str) -> ChatResponse:
        generation, plan = self._prepare(request, request_id)
        # The engine reads the current span for the trace headers it hands vLLM, so
        # vLLM's own span hangs under this one.
        with tracing.span("generate", {"gen_ai.request.id": request_id}):
            result = await self.engine.generate(generation)
            # The dispatcher says which path served it (vLLM or transformers).
            served_by = result.backend or self.engine.name
            tracing.set_attributes({"kaito.backend": served_by})
        BACKEND_REQUESTS.labels(served_by, generation.adapter or "").inc()
        with tracing.span("decode"):
            return self._reply(request, generation, plan, result.sequences, served_by)

    def stream(self, request: ChatRequest, request_id: str) -> AsyncIterator[dict[str, Any]]:
        """/chat with ``stream``: checks now (4xx before anything is sent), then an
        iterator of events: one per generated token, then the final reply.

        Each token event's text is what the token adds to the pipeline's decoded text
        (pipeline_text.StreamedText): the texts join into exactly the non-streamed
        reply's new text; a token that ends inside a multi-byte character adds "" and
        the one that completes it carries the character.
        """
        generation, plan = self._prepare(request, request_id)
        if plan.beam is not None:
            # Beams are only ranked at the end; transformers cannot stream them either.
            raise HTTPError(
                400,
                "stream cannot be used with beam search (generate_kwargs.num_beams > 1): "
                "the best beam is only known when generation ends.",
                parameter="stream",
            )
        if plan.backend != "vllm":
            raise HTTPError(
                400,
                f"stream is not available for this request: {plan.backend_reason or 'it'} "
                "needs the transformers backend, which does not stream.",
                parameter="stream",
            )
        return self._stream_events(request, generation, plan)

    async def _stream_events(
        self, request: ChatRequest, generation: GenerationRequest, plan: GenerationPlan
    ) -> AsyncIterator[dict[str, Any]]:
        decoder = PipelineDecoder(
            self.engine.tokenizer,
            generation.prompt_token_ids,
            clean_up=bool(request.clean_up_tokenization_spaces),
        )
        n = plan.sampling.n
        texts = [decoder.stream() for _ in range(n)]
        want_scores = plan.sampling.logprobs is not None
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        # aclosing: when the client goes away, the engine's stream (and so the engine
        # request) is closed at once, not when the garbage collector gets to it.
        async with contextlib.aclosing(self.engine.generate_stream(generation)) as deltas:
            async for delta in deltas:
                i = delta.index
                count = len(delta.token_ids)
                last = count - 1 if delta.finish_reason is not None else -1
                for j, token in enumerate(delta.token_ids):
                    piece = texts[i].push(token, last=j == last)
                    yield {"token": {"id": token, "text": piece}, "index": i}
                if want_scores:
                    # NaN (reported as null, as _scores does) keeps the scores aligned
                    # with the tokens should a delta come without them.
                    got = (delta.logprobs or [])[:count]
                    logprobs[i] += got + [math.nan] * (count - len(got))
                if delta.finish_reason is not None:
                    finish[i] = delta.finish_reason
        BACKEND_REQUESTS.labels("vllm", generation.adapter or "").inc()  # streams: vLLM only
        generated = [
            GeneratedSequence(text.token_ids, reason, logprobs[i] if want_scores else None)
            for i, (text, reason) in enumerate(zip(texts, finish, strict=True))
        ]
        new_texts = [text.finish() for text in texts]
        reply = self._reply(request, generation, plan, generated, "vllm", new_texts)
        yield {**reply.model_dump(), "finish_reason": finish[0] if n == 1 else finish}
