"""Streamed /chat text: per-token pieces from an incremental decode join into
exactly the non-streamed reply's text, at a cost per token that does not grow.

Two tokenizers, as in test_text_codec.py: the default model's byte-level BPE (multi-byte
characters split across tokens) and a SentencePiece-style one (word boundaries).
"""

from collections.abc import AsyncGenerator

import pytest
from transformers import AutoTokenizer

from app import text_codec
from app.engines.base import GeneratedSequence, GenerationRequest, GenerationResult, SequenceDelta
from app.schemas import ChatRequest
from app.serving import ChatService, token_texts
from app.settings import DEFAULT_MODEL_DIR
from tests.api.conftest import FakeEngine
from tests.unit.test_text_codec import sentencepiece_style

OUTPUTS = [
    " Paris is the capital of France.",
    " café ☕, 東京 and 🤖👍🏽 split over byte tokens",
    "The quick brown fox jumps over the lazy dog. Hello, world!",
    "  double  spaces\nand new\n\nlines ",
]


@pytest.fixture(scope="module", params=["byte-level BPE", "SentencePiece-style"])
def tokenizer(request):
    if request.param == "byte-level BPE":
        return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    return sentencepiece_style()


def with_specials(tokenizer, text: str) -> list[int]:
    """``text``'s ids with special tokens in the middle and a run of EOS at the end."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    half = len(ids) // 2
    specials = [tokenizer.eos_token_id, tokenizer.bos_token_id]
    return ids[:half] + specials + ids[half:] + [tokenizer.eos_token_id] * 5


class ScriptedEngine(FakeEngine):
    """Answers with given token ids and log-probabilities, streamed ``chunk`` at a time."""

    def __init__(self, tokenizer, ids: list[int], chunk: int = 1) -> None:
        super().__init__(tokenizer, max_model_len=8192)
        self.ids = ids
        self.chunk = chunk

    def _logprobs(self, request: GenerationRequest) -> list[float] | None:
        if request.sampling.logprobs is None:
            return None
        return [-0.01 * (k + 1) for k in range(len(self.ids))]

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        seq = GeneratedSequence(self.ids, "length", self._logprobs(request))
        return GenerationResult(sequences=[seq])

    async def generate_stream(
        self, request: GenerationRequest
    ) -> AsyncGenerator[SequenceDelta, None]:
        logprobs = self._logprobs(request)
        for start in range(0, len(self.ids), self.chunk):
            end = start + self.chunk
            yield SequenceDelta(
                0,
                self.ids[start:end],
                "length" if end >= len(self.ids) else None,
                None if logprobs is None else logprobs[start:end],
            )


async def stream_and_reply(engine, request: ChatRequest) -> tuple[list[str], dict, dict]:
    """(streamed pieces, the stream's final event, the non-streamed reply)."""
    service = ChatService(engine)
    pieces, final = [], {}
    async for event in service.stream(request.model_copy(update={"stream": True}), "s"):
        if "token" in event:
            pieces.append(event["token"]["text"])
        else:
            final = event
    plain = (await service.chat(request, "p")).model_dump()
    return pieces, final, plain


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("prefix", [None, "Answer briefly. "])
@pytest.mark.parametrize("chunk", [1, 3])
async def test_pieces_join_into_the_non_streamed_result(tokenizer, output, full, prefix, chunk):
    ids = with_specials(tokenizer, output)
    request = ChatRequest(
        prompt="The capital of France is",
        prefix=prefix,
        return_full_text=full,
        generate_kwargs={"max_new_tokens": len(ids)},
    )
    pieces, final, plain = await stream_and_reply(ScriptedEngine(tokenizer, ids, chunk), request)
    assert len(pieces) == len(ids)
    joined = "".join(pieces)
    assert (request.prompt + joined if full else joined) == plain["Result"] == final["Result"]
    # A half character is held back, never sent as U+FFFD.
    assert all("\ufffd" not in piece for piece in pieces)
    assert {k: v for k, v in final.items() if k != "finish_reason"} == plain


async def test_a_character_cut_off_at_the_end_goes_out_as_the_reply_has_it():
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    ids = tokenizer.encode(" 東京", add_special_tokens=False)[:-1]  # 京 lacks its last byte
    request = ChatRequest(prompt="Hi", return_full_text=False)
    pieces, final, plain = await stream_and_reply(ScriptedEngine(tokenizer, ids), request)
    assert "".join(pieces) == plain["Result"] == final["Result"] == " 東\ufffd"


async def test_the_final_event_has_the_non_streamed_scores(tokenizer):
    ids = with_specials(tokenizer, OUTPUTS[1])
    request = ChatRequest(
        prompt="Hi", generate_kwargs={"max_new_tokens": len(ids), "output_scores": True}
    )
    _, final, plain = await stream_and_reply(ScriptedEngine(tokenizer, ids, chunk=2), request)
    (seq,) = final["sequences"]
    assert seq["sequence_score"] is not None
    assert [t["logprob"] for t in seq["tokens"]] == [-0.01 * (k + 1) for k in range(len(ids))]
    assert final["sequences"] == plain["sequences"]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_decode_equals_the_whole_decode(tokenizer, skip_special_tokens):
    context = tokenizer.encode("A prompt, 日本語 ending in the middle of 🤖")[:-1]
    for output in OUTPUTS:
        ids = with_specials(tokenizer, output)
        decoder = text_codec.IncrementalDecoder(
            tokenizer, context, skip_special_tokens=skip_special_tokens, clean_up=False
        )
        pieces = [decoder.push(token) for token in ids]
        whole = tokenizer.decode(context + ids, skip_special_tokens=skip_special_tokens)
        start = len(tokenizer.decode(context, skip_special_tokens=skip_special_tokens))
        assert "".join(pieces) == whole[start:]


def test_token_texts_write_special_tokens_out(tokenizer):
    ids = with_specials(tokenizer, "Hello there")
    texts = token_texts(tokenizer, tokenizer.encode("Hi"), ids)
    assert texts.count(tokenizer.eos_token) == 6 and "Hello" in "".join(texts)


async def test_each_token_decodes_a_short_window(monkeypatch):
    """The cost per token stays flat: before, each token decoded prompt + everything so
    far (2000 tokens: ~2 million tokens decoded for one stream)."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    text = " ".join(f"word{k} ☕ 東京" for k in range(600))
    ids = tokenizer.encode(text, add_special_tokens=False)[:1800]
    ids += [tokenizer.eos_token_id] * 200  # a run of skipped tokens must not grow the window
    request = ChatRequest(prompt="Tell me a long story. " * 30)
    decoded: list[int] = []
    real_decode = text_codec.decode

    def counting_decode(tok, token_ids, skip_special_tokens, clean_up):
        decoded.append(len(token_ids))
        return real_decode(tok, token_ids, skip_special_tokens, clean_up)

    monkeypatch.setattr(text_codec, "decode", counting_decode)
    service = ChatService(ScriptedEngine(tokenizer, ids))
    request = request.model_copy(update={"stream": True})
    events = [event async for event in service.stream(request, "s")]
    assert len(events) == len(ids) + 1
    # The whole sequence is decoded once, for the final reply, and the prompt once.
    long_decodes = [n for n in decoded if n > 32]
    assert len(long_decodes) <= 2, long_decodes[:10]
    assert len(decoded) <= 2 * len(ids) + 2


def test_a_special_token_added_later_is_dropped_from_the_window_too():
    # The special ids are kept per tokenizer between streams; adding tokens refreshes them.
    tokenizer = sentencepiece_style()
    before = text_codec.IncrementalDecoder(tokenizer, [], skip_special_tokens=True, clean_up=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<late>"]})
    late = tokenizer.convert_tokens_to_ids("<late>")
    assert late not in before._dropped
    after = text_codec.IncrementalDecoder(tokenizer, [], skip_special_tokens=True, clean_up=False)
    assert late in after._dropped and after.push(late) == ""
