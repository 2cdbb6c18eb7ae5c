"""The async load generator: closed loop (fixed concurrency) and open loop (Poisson).

It knows nothing about the systems under test: a system hands it a ``send`` coroutine
that performs one request and returns the number of output tokens. Every request is
recorded (start, latency, tokens, error); ``summarize`` turns records into the numbers
the report prints.
"""

import asyncio
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.workload import Request

Send = Callable[[Request], Awaitable[int]]


@dataclass
class Record:
    index: int
    prompt_id: int
    start_s: float  # since the level began
    latency_s: float
    output_tokens: int = 0
    status: str = "ok"  # ok | error | cancelled (still running at the hard deadline)
    error: str | None = None
    # Filled by systems that can tell (the engine's own time for this request).
    engine_latency_s: float | None = None


@dataclass
class LevelResult:
    system: str
    mode: str  # "closed" or "open"
    concurrency: int  # closed: clients; open: 0
    rate: float | None  # open: requests per second offered
    elapsed_s: float
    records: list[Record] = field(default_factory=list)
    loadavg_before: float | None = None
    loadavg_after: float | None = None
    repetition: int = 0
    # How many requests the level was allowed (the bound), for the report.
    request_bound: int = 0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["summary"] = summarize(self)
        return data


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(level: LevelResult) -> dict[str, Any]:
    ok = [r for r in level.records if r.status == "ok"]
    lat = [r.latency_s for r in ok]
    tokens = sum(r.output_tokens for r in ok)
    elapsed = level.elapsed_s or float("nan")
    return {
        "requests_ok": len(ok),
        "errors": sum(r.status == "error" for r in level.records),
        "cancelled": sum(r.status == "cancelled" for r in level.records),
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / elapsed,
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "latency_p99_s": percentile(lat, 99),
        "latency_mean_s": sum(lat) / len(lat) if lat else None,
        "first_error": next((r.error for r in level.records if r.error), None),
    }


class Progress:
    """One status line per level, refreshed in place on a terminal, every few s otherwise."""

    def __init__(self, label: str, total: int, deadline_s: float) -> None:
        self.label = label
        self.total = total
        self.deadline_s = deadline_s
        self.done = 0
        self.errors = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, record: Record) -> None:
        self.done += 1
        self.errors += record.status == "error"
        self.tokens += record.output_tokens
        now = time.perf_counter()
        if self._tty or now - self._last >= 10 or self.done == self.total:
            self._last = now
            self.show(now)

    def show(self, now: float | None = None, end: str = "") -> None:
        elapsed = (now or time.perf_counter()) - self.t0
        line = (
            f"  {self.label}: {self.done}/{self.total} done, {self.errors} errors, "
            f"{elapsed:5.1f}s of <= {self.deadline_s:.0f}s, "
            f"{self.tokens / max(elapsed, 1e-9):6.1f} tok/s"
        )
        if self._tty:
            print("\r" + line.ljust(100), end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tty:
            self.show(end="\n")


async def _timed(send: Send, request: Request, index: int, t_level: float) -> Record:
    start = time.perf_counter()
    record = Record(
        index=index, prompt_id=request.prompt_id, start_s=start - t_level, latency_s=0.0
    )
    try:
        record.output_tokens = await send(request)
    except asyncio.CancelledError:
        record.status = "cancelled"
        record.latency_s = time.perf_counter() - start
        raise
    except Exception as exc:  # any failure is a counted error, never a crash
        record.status = "error"
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    record.latency_s = time.perf_counter() - start
    return record


async def closed_loop(
    send: Send,
    requests: Sequence[Request],
    concurrency: int,
    max_seconds: float,
    grace_seconds: float,
    label: str,
) -> tuple[list[Record], float]:
    """``concurrency`` clients, each sending its next request as soon as the last returns.

    Stops launching after ``len(requests)`` requests or ``max_seconds``; requests still
    running ``grace_seconds`` after that are cancelled and recorded as such. Returns the
    records and the elapsed time (first launch to last completion, or to the cut-off).
    """
    records: list[Record] = []
    running: dict[int, Record] = {}
    next_index = 0
    t_level = time.perf_counter()
    deadline = t_level + max_seconds
    progress = Progress(label, len(requests), max_seconds)
    last_done = t_level

    async def client() -> None:
        nonlocal next_index, last_done
        while next_index < len(requests) and time.perf_counter() < deadline:
            index = next_index
            next_index += 1
            request = requests[index]
            running[index] = Record(index, request.prompt_id, time.perf_counter() - t_level, 0.0)
            record = await _timed(send, request, index, t_level)
            del running[index]
            records.append(record)
            last_done = time.perf_counter()
            progress.update(record)

    tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
    cut_off = False
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=max_seconds + grace_seconds)
    except TimeoutError:
        cut_off = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.close()
    now = time.perf_counter()
    for pending in running.values():
        pending.status = "cancelled"
        pending.latency_s = now - t_level - pending.start_s
        records.append(pending)
    records.sort(key=lambda r: r.index)
    return records, (now if cut_off else last_done) - t_level


async def open_loop(
    send: Send,
    requests: Sequence[Request],
    rate: float,
    max_seconds: float,
    grace_seconds: float,
    label: str,
    seed: int = 0,
) -> tuple[list[Record], float]:
    """Poisson arrivals at ``rate`` requests/s whatever the server does (no back-pressure)."""
    rng = random.Random(seed)
    t_level = time.perf_counter()
    progress = Progress(label, len(requests), max_seconds)
    records: list[Record] = []
    tasks: list[asyncio.Task[Record]] = []
    starts: dict[int, float] = {}

    async def one(index: int, request: Request) -> Record:
        record = await _timed(send, request, index, t_level)
        records.append(record)
        progress.update(record)
        return record

    arrival = 0.0
    for index, request in enumerate(requests):
        arrival += rng.expovariate(rate)
        if arrival > max_seconds:
            break
        delay = t_level + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        starts[index] = time.perf_counter() - t_level
        tasks.append(asyncio.ensure_future(one(index, request)))
    cut_off = False
    if tasks:
        remaining = max(0.0, t_level + max_seconds + grace_seconds - time.perf_counter())
        _, pending = await asyncio.wait(tasks, timeout=remaining)
        cut_off = bool(pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    progress.close()
    done = {r.index for r in records}
    now = time.perf_counter()
    for index, start in starts.items():
        if index not in done:
            records.append(
                Record(
                    index,
                    requests[index].prompt_id,
                    start,
                    now - t_level - start,
                    status="cancelled",
                )
            )
    records.sort(key=lambda r: r.index)
    finished = [r.start_s + r.latency_s for r in records if r.status != "cancelled"]
    elapsed = (now - t_level) if cut_off or not finished else max(finished)
    return records, elapsed
