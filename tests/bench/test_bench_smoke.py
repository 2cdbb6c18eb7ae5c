"""Smoke test of the benchmark harness against the session's live server (no timings
are asserted: the machine is shared and noisy). A handful of tiny requests, then the
markdown table, the JSON file and the plot must all be there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_harness_measures_our_server(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bench", "--systems", "ours", "--ours-url", server_url]
    argv += ["--levels", "1,2", "--requests", "3", "--max-new-tokens", "4", "--repeat", "1"]
    argv += ["--no-warmup", "--open-rate", "0", "--out", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    # The markdown table on stdout, one row per level.
    assert "| system | concurrency |" in done.stdout
    assert "| ours | 1 | 3 / 3 |" in done.stdout
    assert "| ours | 2 | 3 / 3 |" in done.stdout

    result = json.loads((out / "result.json").read_text())
    closed = [a for a in result["aggregates"] if a["mode"] == "closed"]
    assert sorted(a["concurrency"] for a in closed) == [1, 2]
    for agg in closed:
        assert agg["errors"] == 0 and agg["requests_ok"] == 3
        assert agg["output_tokens_per_s"] > 0
        assert agg["latency_p50_s"] is not None
    # At concurrency 1 the engine's own time is read around each request.
    assert result["overhead"]["ours_in_server_ms"]["n"] == 3
    assert (out / "report.md").read_text().startswith("## Benchmark")
    assert (out / "plot.png").stat().st_size > 0


def test_interleaved_schedule_alternates_live_systems(server_url: str, tmp_path: Path) -> None:
    # Two names for the one live server: the schedule, not the numbers, is under test.
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "bench", "--systems", "ours,twin", "--ours-url", server_url]
    argv += ["--attach", f"twin={server_url}", "--interleave", "--repeat", "2"]
    argv += ["--levels", "1,2", "--requests", "2", "--max-new-tokens", "4"]
    argv += ["--no-warmup", "--open-rate", "0", "--no-plot", "--out", str(out)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    levels = json.loads((out / "result.json").read_text())["levels"]
    # Level by level, system after system; the order reverses every repetition.
    assert [(lv["repetition"], lv["concurrency"], lv["system"]) for lv in levels] == [
        (0, 1, "ours"), (0, 1, "twin"), (0, 2, "ours"), (0, 2, "twin"),
        (1, 1, "twin"), (1, 1, "ours"), (1, 2, "twin"), (1, 2, "ours"),
    ]  # fmt: skip
    assert all(lv["summary"]["errors"] == 0 for lv in levels)


def test_streaming_bench_measures_our_server(server_url: str, tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench.bench_streaming",
        "--ours-url",
        server_url,
        "--tokens",
        "4",
        "--concurrency",
        "1",
        "2",
        "--repeat",
        "2",
        "--c1-rounds",
        "2",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "streaming.json").read_text())
    results = report["results"]
    assert set(results) == {
        f"ours {route} c={c}" for route in ("/chat", "/v1/completions") for c in (1, 2)
    }
    assert results["ours /chat c=1"]["n"] == 2 * 2  # two rounds, two repetitions
    assert len(results["ours /chat c=2"]["repetitions"]) == 2
    for r in results.values():
        assert 0 < r["ttft_median_s"] <= r["stream_median_s"]
    assert "| ours /chat | 1 |" in done.stdout
