"""The transformers backend's queue (FIFO, cancellation, metrics) and its output trimming,
without loading a model: ``_generate`` is replaced by a controllable fake."""

import asyncio
import threading

import pytest

from app.engines.base import GeneratedSequence, GenerationRequest
from app.engines.hf_engine import HFEngine, trim_generated
from app.metrics import HF_QUEUE_DEPTH, HF_RUNNING
from app.settings import Settings
from param_mapping import SamplingSpec


def gauge(g) -> float:
    return g._value.get()


class FakeModelEngine(HFEngine):
    """HFEngine whose generation blocks until the test releases it."""

    def __init__(self) -> None:
        super().__init__(Settings())
        self._model = object()  # "loaded"
        self.ran: list[str] = []
        self.release: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.saw_cancel: dict[str, bool] = {}

    def gate(self, request_id: str) -> None:
        self.release[request_id] = threading.Event()
        self.started[request_id] = threading.Event()

    def _generate(self, job):  # runs in the worker thread
        rid = job.request.request_id
        self.ran.append(rid)
        self.started[rid].set()
        while not self.release[rid].wait(0.01):
            if job.cancelled:
                self.saw_cancel[rid] = True
                return []
        return [GeneratedSequence(token_ids=[1, 2], finish_reason="stop")]


def request(rid: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=[1],
        sampling=SamplingSpec(),
        backend="hf",
        transformers_kwargs={"max_new_tokens": 2},
    )


async def wait_for(event: threading.Event) -> None:
    for _ in range(500):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_requests_run_one_at_a_time_first_come_first_served():
    engine = FakeModelEngine()
    for rid in ("a", "b", "c"):
        engine.gate(rid)
    tasks = [asyncio.create_task(engine.generate(request(rid))) for rid in ("a", "b", "c")]
    await wait_for(engine.started["a"])
    await asyncio.sleep(0.05)
    assert engine.ran == ["a"]  # b and c wait
    assert gauge(HF_QUEUE_DEPTH) == 2 and gauge(HF_RUNNING) == 1
    for rid in ("a", "b", "c"):
        engine.release[rid].set()
    results = await asyncio.gather(*tasks)
    assert engine.ran == ["a", "b", "c"]
    assert all(r.backend == "hf" and r.sequences[0].token_ids == [1, 2] for r in results)
    assert gauge(HF_QUEUE_DEPTH) == 0 and gauge(HF_RUNNING) == 0
    await engine.stop()


async def test_a_cancelled_queued_request_leaves_the_queue():
    engine = FakeModelEngine()
    for rid in ("a", "b", "c"):
        engine.gate(rid)
    ta = asyncio.create_task(engine.generate(request("a")))
    tb = asyncio.create_task(engine.generate(request("b")))
    tc = asyncio.create_task(engine.generate(request("c")))
    await wait_for(engine.started["a"])
    await asyncio.sleep(0.05)
    assert gauge(HF_QUEUE_DEPTH) == 2
    tb.cancel()  # what the route does when b's client disconnects
    await asyncio.gather(tb, return_exceptions=True)
    assert gauge(HF_QUEUE_DEPTH) == 1
    engine.release["a"].set()
    engine.release["c"].set()
    await asyncio.gather(ta, tc)
    assert engine.ran == ["a", "c"]  # b never ran
    assert gauge(HF_QUEUE_DEPTH) == 0
    await engine.stop()


async def test_a_cancelled_running_request_stops_at_its_next_step():
    engine = FakeModelEngine()
    engine.gate("a")
    engine.gate("b")
    ta = asyncio.create_task(engine.generate(request("a")))
    await wait_for(engine.started["a"])
    ta.cancel()
    await asyncio.gather(ta, return_exceptions=True)
    # The worker sees the flag (the stopping criterion reads it each step) and is free
    # for the next request without anyone releasing a.
    engine.release["b"].set()
    result = await asyncio.wait_for(engine.generate(request("b")), timeout=5)
    assert engine.saw_cancel == {"a": True}
    assert result.sequences[0].token_ids == [1, 2]
    assert gauge(HF_RUNNING) == 0 and gauge(HF_QUEUE_DEPTH) == 0
    await engine.stop()


async def test_abort_by_request_id_cancels_too():
    engine = FakeModelEngine()
    engine.gate("a")
    ta = asyncio.create_task(engine.generate(request("a")))
    await wait_for(engine.started["a"])
    await engine.abort("a")
    result = await asyncio.wait_for(ta, timeout=5)
    assert result.sequences == [] and engine.saw_cancel == {"a": True}
    await engine.stop()


@pytest.mark.parametrize(
    ("row", "eos", "pad", "length", "expected"),
    [
        ([5, 6, 2, 2, 2], {2}, 2, None, [5, 6, 2]),  # eos kept, pads (= eos) dropped
        ([5, 6, 7], {2}, 2, None, [5, 6, 7]),  # no eos: full length
        ([5, 6, 0, 0], {2}, 0, None, [5, 6]),  # a stop string's row: trailing pads
        ([5, 2, 9, 9], {2, 9}, 9, None, [5, 2]),
        ([5, 6, 7, 2, 2], {2}, 2, 4, [5, 6, 7, 2]),  # beam search says its length
        ([5, 6, 2, 2], {2}, 2, 2, [5, 6]),
    ],
)
def test_trim_generated(row, eos, pad, length, expected):
    assert trim_generated(row, frozenset(eos), pad, length) == expected
