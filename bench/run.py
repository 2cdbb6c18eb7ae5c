"""The benchmark harness: ``python -m bench [--profile quick|full] [options]``.

Starts each system in turn (one at a time, never two at once), warms it up with the
real workload, runs the closed-loop concurrency levels (and an open-loop rate), stops
it, and alternates the order across repetitions (A B C D, then D C B A) so drift on
this shared machine does not favour one system. Prints a markdown report with ratios
between systems measured in the same run, and writes JSON, markdown and a PNG plot to
bench/results/<run>/.
"""

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from app.settings import DEFAULT_MODEL_DIR
from bench import report
from bench.loadgen import LevelResult, summarize
from bench.lora_systems import LORA_SYSTEMS
from bench.systems import REPO, BenchConfig, HttpSystem, System, kill_all
from bench.systems import SYSTEMS as SERVER_SYSTEMS
from bench.workload import Workload, load_prompts

RESULTS_DIR = REPO / "bench" / "results"
SYSTEMS = SERVER_SYSTEMS | LORA_SYSTEMS


@dataclass
class Profile:
    systems: list[str]
    levels: list[int]
    repeat: int
    max_new_tokens: int
    enforce_eager: bool
    # Requests per closed-loop level, by concurrency (a level without an entry is skipped).
    requests: dict[int, int]
    # The Kaito baseline serves one request's worth of throughput whatever the
    # concurrency (no batching), so it gets far fewer requests; it is still bounded by
    # time like every level.
    kaito_requests: dict[int, int]
    max_seconds: float  # stop launching new requests after this long
    grace_seconds: float  # then cut off what is still running after this long
    kaito_max_seconds: float
    kaito_grace_seconds: float
    open_rate: float | None = None  # Poisson arrivals per second, HTTP systems but Kaito
    open_seconds: float = 40.0
    warmup: bool = True
    notes: list[str] = field(default_factory=list)


PROFILES = {
    # Under 5 minutes: the two servers a Kaito user chooses between, eager engine (starts
    # in ~90 s instead of ~150 s), short replies, two levels, one repetition.
    "quick": Profile(
        systems=["ours", "kaito"],
        levels=[1, 8],
        repeat=1,
        max_new_tokens=32,
        enforce_eager=True,
        requests={1: 4, 8: 16},
        kaito_requests={1: 2, 8: 8},
        max_seconds=60,
        grace_seconds=60,
        kaito_max_seconds=30,
        kaito_grace_seconds=120,
        notes=[
            "quick profile: eager engine, 2 systems, 1 repetition; "
            "`make bench` runs all four, compiled"
        ],
    ),
    # 30-45 minutes: four systems, compiled engine, two repetitions in alternating order.
    "full": Profile(
        systems=["ours", "kaito", "vllm", "offline"],
        levels=[1, 8, 32, 64],
        repeat=2,
        max_new_tokens=64,
        enforce_eager=False,
        requests={1: 8, 8: 32, 32: 96, 64: 128},
        kaito_requests={1: 3, 8: 8, 32: 32},
        max_seconds=150,
        grace_seconds=120,
        kaito_max_seconds=60,
        kaito_grace_seconds=420,
        open_rate=2.0,
        open_seconds=40,
        notes=[
            "kaito is not run at concurrency 64: it serves requests without batching, so "
            "its throughput is flat and 64 requests would take over 10 minutes per repetition"
        ],
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--levels", help="comma-separated concurrency levels, e.g. 1,8,32")
    p.add_argument("--repeat", type=int, help="repetitions (order alternates between them)")
    p.add_argument("--requests", type=int, help="requests per level (all levels)")
    p.add_argument("--max-new-tokens", type=int, help="tokens generated per request (min = max)")
    p.add_argument("--max-seconds", type=float, help="per level: stop launching after this long")
    engine = p.add_mutually_exclusive_group()
    engine.add_argument("--eager", dest="eager", action="store_true", default=None)
    engine.add_argument("--compiled", dest="eager", action="store_false")
    p.add_argument("--open-rate", type=float, help="open-loop Poisson rate (req/s); 0 disables")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start every system once and alternate them level by level (tighter ratios; "
        "all systems' memory at once)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass (smoke tests)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument(
        "--kv-cache-gib",
        type=int,
        default=1,
        help="KV cache per vLLM system, whole GiB (VLLM_CPU_KVCACHE_SPACE takes an integer); "
        "1 GiB holds ~23k tokens, twice what concurrency 64 needs here",
    )
    p.add_argument("--ours-url", help="attach to a running server of ours instead of starting one")
    p.add_argument(
        "--attach",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="an extra system NAME: a running server with our /chat API at URL (A/B tests "
        "of two builds of ours); list NAME in --systems",
    )
    p.add_argument("--out", type=Path, help="output directory (default: bench/results/<run>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--with-extras", action="store_true", help="then run bench/bench_*.py scripts")
    return p.parse_args(argv)


def build_profile(args: argparse.Namespace) -> Profile:
    profile = replace(PROFILES[args.profile])
    if args.systems:
        profile.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        attached = {spec.split("=", 1)[0] for spec in args.attach}
        unknown = set(profile.systems) - set(SYSTEMS) - attached
        if unknown:
            raise SystemExit(f"unknown systems {sorted(unknown)}; known: {sorted(SYSTEMS)}")
    if args.levels:
        profile.levels = [int(x) for x in args.levels.split(",")]
    if args.repeat:
        profile.repeat = args.repeat
    if args.max_new_tokens:
        profile.max_new_tokens = args.max_new_tokens
    if args.eager is not None:
        profile.enforce_eager = args.eager
    if args.max_seconds:
        profile.max_seconds = args.max_seconds
        profile.kaito_max_seconds = min(profile.kaito_max_seconds, args.max_seconds)
    if args.open_rate is not None:
        profile.open_rate = args.open_rate or None
    if args.no_warmup:
        profile.warmup = False
    default = max(profile.requests.values())
    profile.requests = {
        c: args.requests or profile.requests.get(c, max(default, 2 * c)) for c in profile.levels
    }
    profile.kaito_requests = {
        c: args.requests or profile.kaito_requests[c]
        for c in profile.levels
        if c in profile.kaito_requests
    }
    return profile


def _version(*names: str) -> str:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        mem = "?"
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {mem} RAM, no GPU, {system}"


def versions() -> str:
    return ", ".join(
        [
            f"python {platform.python_version()}",
            f"vllm {_version('vllm-cpu', 'vllm')}",
            f"torch {_version('torch')}",
            f"transformers {_version('transformers')}",
            f"fastapi {_version('fastapi')}",
            f"uvicorn {_version('uvicorn')}",
        ]
    )


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "app", "param_mapping"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+uncommitted app changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def describe_workload(model: str, prompts: list[str], profile: Profile) -> str:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        lengths = sorted(len(tokenizer.encode(p)) for p in prompts)
        spread = f"{lengths[0]}-{lengths[-1]} tokens, median {lengths[len(lengths) // 2]}"
    except Exception:  # the description is cosmetic
        spread = "lengths unknown"
    engine = "eager" if profile.enforce_eager else "compiled"
    return (
        f"{len(prompts)} prompts from bench/prompts.jsonl ({spread}), each request "
        f"generating exactly {profile.max_new_tokens} tokens greedily; "
        f"model {Path(model).name}, float32, {engine} engine"
    )


class Run:
    def __init__(self, args: argparse.Namespace, profile: Profile) -> None:
        self.args = args
        self.profile = profile
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.out: Path = args.out or RESULTS_DIR / f"{stamp}-{args.profile}"
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = BenchConfig(
            model=args.model,
            enforce_eager=profile.enforce_eager,
            kv_cache_gib=args.kv_cache_gib,
            log_dir=self.out / "logs",
        )
        self.prompts = load_prompts()
        self.workload = Workload(self.prompts, profile.max_new_tokens)
        self.levels: list[LevelResult] = []
        self.startups: list[dict[str, Any]] = []
        self.notes = list(profile.notes)
        self.meta: dict[str, Any] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": args.profile,
            "machine": machine_info(),
            "versions": versions(),
            "git": git_commit(),
            "workload": describe_workload(args.model, self.prompts, profile),
            "systems": {key: self.make(key).title for key in profile.systems},
            "profile_settings": {k: v for k, v in vars(profile).items() if k != "notes"},
        }

    def make(self, key: str) -> System:
        attached = dict(spec.split("=", 1) for spec in self.args.attach)
        if key in attached:
            system = SYSTEMS["ours"](self.config, url=attached[key])  # type: ignore[call-arg]
            system.key = key
            system.title = f"our /chat at {attached[key]}"
            return system
        cls = SYSTEMS[key]
        if key == "ours" and self.args.ours_url:
            return cls(self.config, url=self.args.ours_url)  # type: ignore[call-arg]
        return cls(self.config)

    def bounds(self, key: str) -> tuple[dict[int, int], float, float]:
        p = self.profile
        if key == "kaito":
            return p.kaito_requests, p.kaito_max_seconds, p.kaito_grace_seconds
        return p.requests, p.max_seconds, p.grace_seconds

    async def warm_up(self, system: System, key: str) -> None:
        if not self.profile.warmup:
            return
        # The first pass after start-up is slower (compiled shapes, allocator): one pass
        # at the highest level and a few single requests, not measured.
        top = max(self.profile.levels)
        passes = [(1, 1)] if key == "kaito" else [(top, top), (1, 2)]
        for concurrency, count in passes:
            requests = self.workload.requests(f"warm{concurrency}", count)
            await system.run_closed(
                requests, concurrency, 300, 300, f"{key} warm-up c={concurrency}"
            )

    async def start_system(self, system: System, key: str, tag: str) -> None:
        """Starts (or attaches to) one system and warms it up; stops it on failure."""
        try:
            system.start(tag=tag)
            if system.startup_s is not None:
                print(f"  {key}: ready in {system.startup_s:.0f}s", file=sys.stderr, flush=True)
                self.startups.append({"system": key, "tag": tag, "startup_s": system.startup_s})
            await self.warm_up(system, key)
        except BaseException:
            system.stop()
            raise

    async def closed_level(self, system: System, key: str, rep: int, concurrency: int) -> None:
        counts, max_s, grace_s = self.bounds(key)
        if concurrency not in counts:
            return
        requests = self.workload.requests(f"r{rep}c{concurrency}", counts[concurrency])
        level = LevelResult(key, "closed", concurrency, None, 0.0, repetition=rep)
        level.request_bound = len(requests)
        level.loadavg_before = os.getloadavg()[0]
        level.records, level.elapsed_s = await system.run_closed(
            requests, concurrency, max_s, grace_s, f"{key} c={concurrency}"
        )
        level.loadavg_after = os.getloadavg()[0]
        self._finish_level(level)

    async def open_level(self, system: System, key: str, rep: int) -> None:
        rate = self.profile.open_rate
        if not rate or not system.supports_open_loop or key == "kaito":
            return
        seconds = self.profile.open_seconds
        requests = self.workload.requests(f"r{rep}open", int(rate * seconds * 2) + 10)
        level = LevelResult(key, "open", 0, rate, 0.0, repetition=rep)
        level.loadavg_before = os.getloadavg()[0]
        level.records, level.elapsed_s = await system.run_open(
            requests, rate, seconds, self.profile.grace_seconds, f"{key} open {rate:g} req/s"
        )
        level.loadavg_after = os.getloadavg()[0]
        self._finish_level(level)

    def _failed(self, key: str, when: str, exc: Exception) -> None:
        # One system failing must not lose the others' results.
        note = f"{key} ({when}) failed: {type(exc).__name__}: {exc}"
        print(f"  {note[:2000]}", file=sys.stderr, flush=True)
        self.notes.append(note.splitlines()[0][:300])

    async def run_system(self, key: str, rep: int) -> None:
        """One repetition of one system: start, every level, stop."""
        system = self.make(key)
        print(
            f"\n[{rep + 1}/{self.profile.repeat}] {key}: {system.title}",
            file=sys.stderr,
            flush=True,
        )
        t0 = time.monotonic()
        try:
            await self.start_system(system, key, tag=f"rep{rep + 1}")
            for concurrency in self.profile.levels:
                await self.closed_level(system, key, rep, concurrency)
            await self.open_level(system, key, rep)
        except Exception as exc:
            self._failed(key, f"repetition {rep + 1}", exc)
        finally:
            system.stop()
            print(
                f"  {key}: stopped ({time.monotonic() - t0:.0f}s in all)",
                file=sys.stderr,
                flush=True,
            )
            self.save()

    async def run_interleaved(self) -> None:
        """Every system started once and kept alive; each repetition runs level by level,
        system after system, in an order reversed every repetition.

        The numbers a ratio compares are then a minute or two apart instead of a whole
        system's run (start-up included) apart, so the machine's drift cancels far better.
        An idle system costs the others nothing measurable: its engine blocks on its
        input queue (bench/NOTES.md has the check).
        """
        live: dict[str, System] = {}
        try:
            for key in self.profile.systems:
                system = self.make(key)
                print(f"\n{key}: {system.title}", file=sys.stderr, flush=True)
                try:
                    await self.start_system(system, key, tag="interleaved")
                    live[key] = system
                except Exception as exc:
                    self._failed(key, "start-up", exc)
            for rep in range(self.profile.repeat):
                keys = [k for k in self.profile.systems if k in live]
                order = keys if rep % 2 == 0 else list(reversed(keys))
                print(f"\n[{rep + 1}/{self.profile.repeat}] {' '.join(order)}", file=sys.stderr)
                for concurrency in self.profile.levels:
                    for key in order:
                        await self._guarded(live, key, rep, self.closed_level, concurrency)
                for key in order:
                    await self._guarded(live, key, rep, self.open_level)
                self.save()
        finally:
            for system in live.values():
                system.stop()
            self.save()

    async def _guarded(
        self, live: dict[str, System], key: str, rep: int, step: Any, *args: Any
    ) -> None:
        """Runs one level of a live system; a failure stops and drops that system."""
        if key not in live:
            return
        try:
            await step(live[key], key, rep, *args)
        except Exception as exc:
            self._failed(key, f"repetition {rep + 1}", exc)
            live.pop(key).stop()

    def _finish_level(self, level: LevelResult) -> None:
        self.levels.append(level)
        s = summarize(level)
        where = f"c={level.concurrency}" if level.mode == "closed" else f"open {level.rate:g}/s"
        extra = f", {s['cancelled']} cut off" if s["cancelled"] else ""
        error = f" (first error: {s['first_error']})" if s["errors"] else ""
        print(
            f"  -> {level.system} {where}: {s['output_tokens_per_s']:.1f} tok/s, "
            f"{s['requests_per_s']:.2f} req/s, "
            f"p50 {s['latency_p50_s'] or 0:.2f}s, {s['errors']} errors{extra}{error}, "
            f"load {level.loadavg_before:.1f}->{level.loadavg_after:.1f}",
            file=sys.stderr,
            flush=True,
        )

    async def run(self) -> None:
        if self.args.interleave:
            await self.run_interleaved()
            return
        systems = self.profile.systems
        for rep in range(self.profile.repeat):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            for key in order:
                await self.run_system(key, rep)

    def result(self) -> tuple[dict[str, Any], list[report.Aggregate]]:
        aggs = report.aggregate(self.levels)
        systems = self.profile.systems
        ratio_rows = report.ratios(aggs, "ours" if "ours" in systems else systems[0])
        over = report.overheads(self.levels)
        notes = list(self.notes)
        loads = [x for level in self.levels for x in (level.loadavg_before, level.loadavg_after)]
        loads = [x for x in loads if x is not None]
        if loads:
            cores = os.cpu_count() or 1
            busy = (
                " (other work shared the CPU: absolute numbers inflated)"
                if max(loads) > cores
                else ""
            )
            notes.append(
                f"1-minute load average during the measurements: {min(loads):.1f} to "
                f"{max(loads):.1f} on {cores} cores{busy}"
            )
        meta = {**self.meta, "notes": notes, "startups": self.startups}
        result = {
            "meta": meta,
            "aggregates": [a.to_json() for a in aggs],
            "ratios": ratio_rows,
            "overhead": over,
            "goals": report.goals(aggs, ratio_rows, over),
            "levels": [level.to_json() for level in self.levels],
        }
        return result, aggs

    def save(self) -> str:
        result, aggs = self.result()
        (self.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
        text = report.markdown(result, aggs)
        (self.out / "report.md").write_text(text)
        if not self.args.no_plot and any(a.mode == "closed" for a in aggs):
            title = f"{Path(self.args.model).name}, {self.meta['date']}, {self.args.profile}"
            report.plot(aggs, self.out / "plot.png", title)
        return text


def extras_hint(run_them: bool) -> None:
    scripts = sorted(p for p in (REPO / "bench").glob("bench_*.py"))
    if not scripts:
        return
    print("\nOther benchmarks in bench/ (not part of this comparison):", file=sys.stderr)
    for script in scripts:
        command = [sys.executable, "-m", f"bench.{script.stem}"]
        print(f"  {' '.join(command[1:])}", file=sys.stderr)
        if run_them:
            subprocess.run(command, cwd=REPO, check=False)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = build_profile(args)
    # Ctrl-C and SIGTERM interrupt at once, even while a system is starting (asyncio.run
    # would only cancel its task once the loop gets control back).
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run: Run | None = None
    try:
        run = Run(args, profile)
        print(f"bench: {args.profile} profile, results in {run.out}", file=sys.stderr, flush=True)
        started = time.monotonic()
        asyncio.run(run.run())
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every system", file=sys.stderr)
        kill_all()
        if run is not None and run.levels:
            print(run.save())
            print(f"partial results in {run.out}", file=sys.stderr)
        return 130
    text = run.save()
    print(text)
    print(
        f"bench: done in {(time.monotonic() - started) / 60:.1f} min; "
        f"JSON, report and plot in {run.out}",
        file=sys.stderr,
    )
    extras_hint(args.with_extras)
    return 0


__all__ = ["HttpSystem", "main"]
