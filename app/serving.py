"""The /chat logic between HTTP and the engine: tokenize, map, generate, decode."""

import math
import uuid
from typing import Any

from app.engines.base import Engine, GeneratedSequence, GenerationRequest, Tokenizer
from app.errors import HTTPError
from app.metrics import BACKEND_REQUESTS
from app.pipeline_text import PipelineDecoder
from app.schemas import ChatRequest, ChatResponse, Sequence, TokenScore, Usage
from param_mapping import to_generation_plan
from param_mapping.beam import DEFAULT_MAX_NUM_BEAMS
from param_mapping.limits import Limits, check_limits

# Kaito's exact message.
PROMPT_REQUIRED = "Text generation parameter prompt required"


def token_texts(tokenizer: Tokenizer, context_ids: list[int], token_ids: list[int]) -> list[str]:
    """Each token's text, decoded the incremental way vLLM and TGI do.

    Decoding one token alone loses word boundaries (SentencePiece) and splits multi-byte
    characters, so each token is decoded after a few tokens of context and its text is
    what it adds; a token that ends inside a character adds "" and the token that
    completes it carries the whole character. Special tokens are written out.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    seq = list(context_ids[-6:])
    prefix_offset, read_offset = 0, len(seq)
    texts = []
    for token in token_ids:
        seq.append(token)
        prefix_text = decode(seq[prefix_offset:read_offset])
        new_text = decode(seq[prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            texts.append(new_text[len(prefix_text) :])
            prefix_offset, read_offset = read_offset, len(seq)
        else:
            texts.append("")
    return texts


def _scores(tokenizer: Tokenizer, prompt_ids: list[int], seq: GeneratedSequence) -> dict[str, Any]:
    """The score fields of one sequence (output_scores / return_dict_in_generate)."""
    logprobs: list[float | None] = [
        lp if lp is not None and math.isfinite(lp) else None for lp in (seq.logprobs or [])
    ]
    logprobs += [None] * (len(seq.token_ids) - len(logprobs))
    texts = token_texts(tokenizer, prompt_ids, seq.token_ids)
    total = None if None in logprobs else sum(lp for lp in logprobs if lp is not None)
    return {
        "tokens": [
            TokenScore(id=token, text=text, logprob=lp)
            for token, text, lp in zip(seq.token_ids, texts, logprobs, strict=True)
        ],
        "sequence_score": total,
    }


def new_request_id() -> str:
    return f"chat-{uuid.uuid4().hex}"


class ChatService:
    def __init__(
        self,
        engine: Engine,
        limits: Limits | None = None,
        max_num_beams: int = DEFAULT_MAX_NUM_BEAMS,
    ) -> None:
        self.engine = engine
        self.limits = limits or Limits()
        self.max_num_beams = max_num_beams

    def _check_ready(self) -> None:
        if not self.engine.is_ready():
            raise HTTPError(503, "The model is not ready yet (loading) or the engine is down.")

    async def chat(self, request: ChatRequest, request_id: str) -> ChatResponse:
        if not request.prompt:
            raise HTTPError(400, PROMPT_REQUIRED)
        self._check_ready()
        engine = self.engine
        tokenizer = engine.tokenizer

        # The pipeline tokenizes prefix + prompt with the tokenizer's default special
        # tokens, and measures the prefix alone without them (it adds that length to
        # max_length / min_length).
        prefix = request.prefix or ""
        prompt_ids = tokenizer.encode(prefix + request.prompt)
        prefix_tokens = len(tokenizer.encode(prefix, add_special_tokens=False)) if prefix else 0

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

        result = await engine.generate(
            GenerationRequest(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                sampling=plan.sampling,
                backend=plan.backend,
                backend_reason=plan.backend_reason,
                beam=plan.beam,
                transformers_kwargs=plan.transformers_kwargs,
            )
        )
        # The dispatcher says which path served it (vLLM or transformers).
        served_by = result.backend or engine.name
        BACKEND_REQUESTS.labels(served_by).inc()

        decoder = PipelineDecoder(
            tokenizer, prompt_ids, clean_up=bool(request.clean_up_tokenization_spaces)
        )
        full = request.return_full_text is not False  # null means the pipeline default (true)
        want_scores = plan.sampling.logprobs is not None
        sequences = [
            Sequence(
                text=decoder.generated_text(request.prompt, seq.token_ids, full),
                finish_reason=seq.finish_reason,
                generated_tokens=len(seq.token_ids),
                **(_scores(tokenizer, prompt_ids, seq) if want_scores else {}),
            )
            for seq in result.sequences
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
