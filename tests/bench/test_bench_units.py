"""The harness's pure parts: load generation against a fake sender, and the report."""

import asyncio

from bench import report
from bench.loadgen import LevelResult, closed_loop, open_loop, percentile, summarize
from bench.workload import Request, Workload, chat_payload, completions_payload


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_payloads_ask_every_system_for_the_same_work() -> None:
    request = Request(prompt_id=0, text="Hi", max_new_tokens=7)
    kwargs = chat_payload(request)["generate_kwargs"]
    assert kwargs == {"max_new_tokens": 7, "min_new_tokens": 7, "do_sample": False}
    completion = completions_payload(request, "m", eos_token_id=2)
    assert completion["max_tokens"] == completion["min_tokens"] == 7
    assert completion["temperature"] == 0.0 and completion["stop_token_ids"] == [2]


def test_requests_are_tagged_per_level_and_cycle_over_prompts() -> None:
    requests = Workload(["a", "b"], 4).requests("r0c8", 3)
    assert [r.text for r in requests] == ["[r0c8-0] a", "[r0c8-1] b", "[r0c8-2] a"]
    assert [r.prompt_id for r in requests] == [0, 1, 0]


def test_closed_loop_keeps_concurrency_and_counts_errors() -> None:
    in_flight = 0
    peak = 0

    async def send(request: Request) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if request.prompt_id == 1:
            raise RuntimeError("boom")
        return request.max_new_tokens

    requests = Workload(["a", "b", "c"], 5).requests("t", 9)
    records, elapsed = asyncio.run(closed_loop(send, requests, 3, 10, 10, "test"))
    assert peak == 3 and len(records) == 9 and elapsed > 0
    level = LevelResult("fake", "closed", 3, None, elapsed, records)
    summary = summarize(level)
    assert summary["errors"] == 3 and summary["requests_ok"] == 6
    assert summary["output_tokens"] == 30
    assert "boom" in summary["first_error"]


def test_closed_loop_cuts_off_requests_past_the_deadline() -> None:
    async def send(request: Request) -> int:
        await asyncio.sleep(5)
        return 1

    requests = Workload(["a"], 1).requests("t", 4)
    records, elapsed = asyncio.run(closed_loop(send, requests, 2, 0.05, 0.05, "test"))
    assert [r.status for r in records] == ["cancelled", "cancelled"]
    assert elapsed < 1


def test_open_loop_sends_at_its_own_pace() -> None:
    async def send(request: Request) -> int:
        await asyncio.sleep(0.01)
        return 2

    requests = Workload(["a"], 2).requests("t", 1000)
    records, _ = asyncio.run(
        open_loop(send, requests, rate=200, max_seconds=0.2, grace_seconds=1, label="t")
    )
    assert 10 < len(records) < 100
    assert all(r.status == "ok" for r in records)


def _level(system: str, conc: int, tokens: int, rep: int = 0) -> LevelResult:
    from bench.loadgen import Record

    records = [Record(i, 0, 0.0, 1.0, tokens) for i in range(4)]
    return LevelResult(system, "closed", conc, None, 2.0, records, repetition=rep)


def test_report_ratios_goals_and_markdown() -> None:
    levels = [
        _level("ours", 32, 100),
        _level("offline", 32, 100),
        _level("vllm", 32, 90),
        _level("kaito", 32, 5),
    ]
    aggs = report.aggregate(levels)
    rows = report.ratios(aggs)
    by_other = {r["other"]: r["ratio"] for r in rows}
    assert by_other == {"offline": 1.0, "vllm": 100 / 90, "kaito": 20.0}
    checks = report.goals(aggs, rows, {})
    assert [c["met"] for c in checks] == [True, True, True, None]
    result = {
        "meta": {
            "date": "today",
            "profile": "test",
            "machine": "m",
            "versions": "v",
            "workload": "w",
            "systems": {"ours": "", "kaito": "", "vllm": "", "offline": ""},
        },
        "ratios": rows,
        "overhead": {},
        "goals": checks,
    }
    text = report.markdown(result, aggs)
    assert "| ours | 32 | 4 / 4 | 0 | 2.000 | 200.0 |" in text
    assert "20.00x [20.00]" in text


def test_otlp_sink_accepts_the_real_exporters_batches() -> None:
    """The traced system's sink answers OpenTelemetry's own OTLP/HTTP exporter as a
    collector does, so the traced server's exporter succeeds (no retries, no errors)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult

    from bench.otlp_sink import OTLPSink

    sink = OTLPSink()
    try:
        exporter = OTLPSpanExporter(endpoint=sink.url)
        results: list[SpanExportResult] = []

        class Recording(SimpleSpanProcessor):
            def on_end(self, span) -> None:  # type: ignore[no-untyped-def]
                results.append(exporter.export([span]))

        provider = TracerProvider()
        provider.add_span_processor(Recording(exporter))
        with provider.get_tracer("bench").start_as_current_span("request"):
            pass
        assert results == [SpanExportResult.SUCCESS]
        assert sink.exports == 1
    finally:
        sink.stop()


def test_sampler_step_bench_times_every_configuration() -> None:
    """The step benchmark runs vLLM's real Sampler in each configuration, with the
    log-probs mode the server would give it."""
    from bench.bench_logits_processors import STEP_CONFIGS, sampler_step_cost

    results = sampler_step_cost(batch=2, vocab=1000, iterations=3)
    for workload in ("greedy", "sampled"):
        times = results[workload]["min"]
        assert all(times[f"{name}_us"] > 0 for name in STEP_CONFIGS)
        assert times["extra_us"] == times["ours_us"] - times["vanilla_us"]
