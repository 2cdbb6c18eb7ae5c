"""The transformers backend's batching queue, without loading a model: which waiting
requests run together (``batch_key``, ``KAITO_HF_MAX_BATCH``) and that the queue gauge
counts every waiting request while batches run. ``_generate_batch`` is replaced by a
fake that records each batch and blocks until the test releases it; that results equal
one-by-one ones is tests/integration/test_hf_batching.py's job (real model)."""

import asyncio
import dataclasses
import threading

import pytest
from pydantic import ValidationError

from app.engines.base import GeneratedSequence, GenerationRequest
from app.engines.hf_engine import HFEngine, batch_key
from app.metrics import HF_QUEUE_DEPTH, HF_RUNNING
from app.settings import Settings
from param_mapping import SamplingSpec
from param_mapping.spec import BeamSpec
from tests.unit.test_hf_engine import request as plain_request


def gauge(g) -> float:
    return g._value.get()


# What the mapping sends for a beam request with Kaito's defaults: neutral penalties and
# warpers included.
BEAM = {
    "num_beams": 4,
    "do_sample": False,
    "max_new_tokens": 8,
    "eos_token_id": [2],
    "top_k": 10,
    "temperature": 1.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
}


def beam_request(rid: str, prompt: list[int], **kwargs) -> GenerationRequest:
    transformers_kwargs = {**BEAM, **kwargs}
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingSpec(),
        backend="hf",
        beam=BeamSpec(
            num_beams=transformers_kwargs["num_beams"],
            do_sample=bool(transformers_kwargs["do_sample"]),
        ),
        transformers_kwargs=transformers_kwargs,
    )


class RecordingEngine(HFEngine):
    """HFEngine whose batches block until the test releases them."""

    def __init__(self, max_batch: int = 8, wait_ms: int = 50) -> None:
        super().__init__(Settings(hf_max_batch=max_batch, hf_batch_wait_ms=wait_ms))
        self._model = object()  # "loaded"
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.step = threading.Event()

    def _generate_batch(self, jobs):  # runs in the worker thread
        self.batches.append([job.request.request_id for job in jobs])
        self.step.set()
        self.release.wait(10)
        self.release.clear()
        return [
            [GeneratedSequence(token_ids=[len(job.request.prompt_token_ids)], finish_reason="stop")]
            for job in jobs
        ]

    async def next_batch(self) -> None:
        for _ in range(500):
            if self.step.is_set():
                self.step.clear()
                await asyncio.sleep(0.02)
                return
            await asyncio.sleep(0.01)
        raise AssertionError("no batch started")


def test_batch_key_equal_settings_batch_and_anything_else_does_not():
    a = beam_request("a", [1, 2, 3])
    assert batch_key(a) == batch_key(beam_request("b", [4, 5]))
    assert batch_key(a) != batch_key(beam_request("c", [4, 5], num_beams=3))
    assert batch_key(a) != batch_key(beam_request("d", [4, 5], length_penalty=2.0))
    assert batch_key(a) != batch_key(beam_request("e", [4, 5], num_return_sequences=2))
    # One adapter is active per batch: requests of another adapter wait for their own.
    assert batch_key(a) != batch_key(dataclasses.replace(a, adapter="beta"))
    # Not batched: no beams, beam sampling, stop strings.
    assert batch_key(plain_request("f")) is None
    assert batch_key(beam_request("g", [1], do_sample=True)) is None
    assert batch_key(beam_request("h", [1], stop_strings=["."])) is None
    # A setting that reads the prompt's tokens batches only prompts of the same length.
    rep = batch_key(beam_request("i", [1, 2, 3], repetition_penalty=1.3))
    assert rep == batch_key(beam_request("j", [7, 8, 9], repetition_penalty=1.3))
    assert rep != batch_key(beam_request("k", [7, 8], repetition_penalty=1.3))
    ngram = batch_key(beam_request("l", [1, 2, 3], no_repeat_ngram_size=2))
    assert ngram != batch_key(beam_request("m", [1, 2], no_repeat_ngram_size=2))
    assert batch_key(beam_request("n", [1, 2, 3], top_k=50)) != batch_key(a)  # settings differ


async def test_waiting_compatible_requests_run_as_one_batch_and_the_gauge_counts_them():
    engine = RecordingEngine(max_batch=3)
    first = asyncio.create_task(engine.generate(beam_request("r0", [1])))
    await engine.next_batch()
    assert engine.batches == [["r0"]]
    # While r0 runs: five compatible requests and one with other settings wait.
    tasks = [
        asyncio.create_task(engine.generate(beam_request(f"r{i}", [1] * i))) for i in range(1, 4)
    ]
    tasks.append(asyncio.create_task(engine.generate(beam_request("other", [1], num_beams=2))))
    tasks += [
        asyncio.create_task(engine.generate(beam_request(f"r{i}", [1] * i))) for i in range(4, 6)
    ]
    await asyncio.sleep(0.05)
    assert gauge(HF_QUEUE_DEPTH) == 6 and gauge(HF_RUNNING) == 1
    engine.release.set()
    await engine.next_batch()
    # The oldest waiting request and the next compatible ones, up to the limit of 3.
    assert engine.batches[1] == ["r1", "r2", "r3"]
    assert gauge(HF_QUEUE_DEPTH) == 3 and gauge(HF_RUNNING) == 3
    engine.release.set()
    await engine.next_batch()
    assert engine.batches[2] == ["other"]  # now the oldest
    assert gauge(HF_QUEUE_DEPTH) == 2 and gauge(HF_RUNNING) == 1
    engine.release.set()
    await engine.next_batch()
    assert engine.batches[3] == ["r4", "r5"]
    engine.release.set()
    results = await asyncio.gather(first, *tasks)
    # Each request got its own result back.
    assert [r.sequences[0].token_ids for r in results] == [[1], [1], [2], [3], [1], [4], [5]]
    assert gauge(HF_QUEUE_DEPTH) == 0 and gauge(HF_RUNNING) == 0
    await engine.stop()


async def test_a_cancelled_waiting_request_leaves_the_batch_it_would_have_joined():
    engine = RecordingEngine()
    first = asyncio.create_task(engine.generate(beam_request("a", [1])))
    await engine.next_batch()
    b = asyncio.create_task(engine.generate(beam_request("b", [1, 2])))
    c = asyncio.create_task(engine.generate(beam_request("c", [1, 2, 3])))
    d = asyncio.create_task(engine.generate(beam_request("d", [1, 2, 3, 4])))
    await asyncio.sleep(0.05)
    assert gauge(HF_QUEUE_DEPTH) == 3
    c.cancel()
    await asyncio.gather(c, return_exceptions=True)
    await engine.abort("d")  # an abort by id too
    assert gauge(HF_QUEUE_DEPTH) == 1
    assert (await asyncio.wait_for(d, 5)).sequences == []
    engine.release.set()
    await engine.next_batch()
    assert engine.batches[1] == ["b"]
    engine.release.set()
    await asyncio.gather(first, b)
    assert gauge(HF_QUEUE_DEPTH) == 0 and gauge(HF_RUNNING) == 0
    await engine.stop()


async def burst(engine: RecordingEngine, count: int, gap_s: float) -> list[asyncio.Task]:
    tasks = []
    for i in range(count):
        tasks.append(asyncio.create_task(engine.generate(beam_request(f"b{i}", [1] * (i + 1)))))
        await asyncio.sleep(gap_s)
    return tasks


async def test_a_burst_arriving_milliseconds_apart_runs_as_one_batch():
    engine = RecordingEngine(max_batch=8, wait_ms=300)
    tasks = await burst(engine, 3, gap_s=0.03)
    await engine.next_batch()
    assert engine.batches == [["b0", "b1", "b2"]]
    engine.release.set()
    await asyncio.gather(*tasks)
    await engine.stop()


async def test_without_the_window_the_first_of_a_burst_runs_alone():
    engine = RecordingEngine(max_batch=8, wait_ms=0)
    # Gaps wide enough that the worker surely took the first before the second arrives.
    tasks = await burst(engine, 3, gap_s=0.2)
    await engine.next_batch()
    engine.release.set()
    await engine.next_batch()
    engine.release.set()
    await asyncio.gather(*tasks)
    assert engine.batches == [["b0"], ["b1", "b2"]]
    await engine.stop()


async def test_a_full_batch_starts_without_waiting_out_the_window():
    engine = RecordingEngine(max_batch=2, wait_ms=1000)
    start = asyncio.get_running_loop().time()
    tasks = await burst(engine, 2, gap_s=0.0)
    await engine.next_batch()
    assert engine.batches == [["b0", "b1"]]
    assert asyncio.get_running_loop().time() - start < 0.5
    engine.release.set()
    await asyncio.gather(*tasks)
    await engine.stop()


@pytest.mark.parametrize("bad", ["0", "-1", "x", "257"])
def test_hf_max_batch_is_validated(monkeypatch, bad):
    monkeypatch.setenv("KAITO_HF_MAX_BATCH", bad)
    with pytest.raises(ValidationError, match="hf_max_batch"):
        Settings()
