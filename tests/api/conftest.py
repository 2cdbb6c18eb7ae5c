"""The app with a fake engine that records what it received (no vLLM)."""

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from app.engines.base import GeneratedSequence, GenerationRequest, GenerationResult
from app.server import create_app
from app.settings import DEFAULT_MODEL_DIR, Settings
from param_mapping import SpecialTokens


class FakeEngine:
    name = "vllm"

    def __init__(self, tokenizer, max_model_len: int = 2048) -> None:
        self._tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.special_tokens = SpecialTokens(
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            vocab_size=len(tokenizer),
        )
        self.requests: list[GenerationRequest] = []
        self.output_text = " Paris."
        self.ready = True
        self.started = False
        self.delay = 0.0
        self.aborted: list[str] = []

    @property
    def tokenizer(self):
        return self._tokenizer

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        pass

    def is_ready(self) -> bool:
        return self.ready

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.aborted.append(request.request_id)
                raise
        ids = self._tokenizer.encode(self.output_text, add_special_tokens=False)
        ids = ids[: request.sampling.max_tokens]
        return GenerationResult(
            sequences=[GeneratedSequence(token_ids=ids, finish_reason="length")]
            * request.sampling.n
        )

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    @property
    def last(self) -> GenerationRequest:
        return self.requests[-1]


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture
def engine(tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(), engine=engine)) as c:
        yield c
