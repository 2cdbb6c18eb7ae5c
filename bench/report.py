"""Turns level results into the report: a markdown table, ratios, the goals, a JSON file
and a PNG plot. Absolute numbers drift on a shared machine; ratios between systems
measured in the same run are what to compare."""

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import LevelResult, percentile, summarize

# The goals, at this concurrency.
GOAL_CONCURRENCY = 32
GOAL_VS_OFFLINE = 0.95
GOAL_VS_VLLM = 1.0
GOAL_VS_KAITO = 15.0
GOAL_OVERHEAD_MS = 2.0


@dataclass
class Aggregate:
    system: str
    mode: str
    concurrency: int
    rate: float | None
    levels: list[LevelResult] = field(default_factory=list)

    @property
    def summaries(self) -> list[dict[str, Any]]:
        return [summarize(level) for level in self.levels]

    def mean(self, key: str) -> float:
        return statistics.fmean(s[key] for s in self.summaries)

    def per_rep(self, key: str) -> dict[int, float]:
        return {level.repetition: summarize(level)[key] for level in self.levels}

    def latencies(self) -> list[float]:
        return [r.latency_s for level in self.levels for r in level.records if r.status == "ok"]

    def count(self, status: str) -> int:
        return sum(r.status == status for level in self.levels for r in level.records)

    def sent(self) -> int:
        return sum(len(level.records) for level in self.levels)

    def to_json(self) -> dict[str, Any]:
        lat = self.latencies()
        return {
            "system": self.system,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "repetitions": len(self.levels),
            "requests_sent": self.sent(),
            "requests_ok": self.count("ok"),
            "errors": self.count("error"),
            "cancelled": self.count("cancelled"),
            "requests_per_s": self.mean("requests_per_s"),
            "output_tokens_per_s": self.mean("output_tokens_per_s"),
            "output_tokens_per_s_by_rep": self.per_rep("output_tokens_per_s"),
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "latency_p99_s": percentile(lat, 99),
        }


def aggregate(levels: list[LevelResult]) -> list[Aggregate]:
    groups: dict[tuple[str, str, int, float | None], Aggregate] = {}
    for level in levels:
        key = (level.system, level.mode, level.concurrency, level.rate)
        if key not in groups:
            groups[key] = Aggregate(level.system, level.mode, level.concurrency, level.rate)
        groups[key].levels.append(level)
    return list(groups.values())


def _find(aggs: list[Aggregate], system: str, concurrency: int) -> Aggregate | None:
    for agg in aggs:
        if agg.system == system and agg.mode == "closed" and agg.concurrency == concurrency:
            return agg
    return None


def ratios(aggs: list[Aggregate], ours: str = "ours") -> list[dict[str, Any]]:
    """ours ÷ other, on output tokens/s, per closed-loop concurrency and other system."""
    out = []
    for agg in aggs:
        if agg.system != ours or agg.mode != "closed":
            continue
        mine = agg.per_rep("output_tokens_per_s")
        for other in aggs:
            if (
                other.system == ours
                or other.mode != "closed"
                or other.concurrency != agg.concurrency
            ):
                continue
            theirs = other.per_rep("output_tokens_per_s")
            per_rep = {r: mine[r] / theirs[r] for r in mine if r in theirs and theirs[r] > 0}
            other_mean = other.mean("output_tokens_per_s")
            out.append(
                {
                    "concurrency": agg.concurrency,
                    "system": ours,
                    "other": other.system,
                    "ratio": agg.mean("output_tokens_per_s") / other_mean
                    if other_mean > 0
                    else None,
                    "ratio_by_rep": per_rep,
                }
            )
    return out


def overheads(levels: list[LevelResult]) -> dict[str, Any]:
    """Server overhead at concurrency 1, two ways.

    ``in_server``: a request's latency at the client minus vLLM's own e2e latency for
    that same request (read from the server's /metrics around it): HTTP, JSON, our
    tokenizing, mapping and decoding. ``vs_offline``: our latency minus the offline
    engine's for the same request (same index, same repetition); noisier, since the two
    ran at different times.
    """
    result: dict[str, Any] = {}
    systems = list(dict.fromkeys(level.system for level in levels))
    for system in systems:
        diffs = [
            (r.latency_s - r.engine_latency_s) * 1000
            for level in levels
            if level.system == system and level.mode == "closed" and level.concurrency == 1
            for r in level.records
            if r.status == "ok" and r.engine_latency_s is not None
        ]
        if diffs:
            result[f"{system}_in_server_ms"] = {
                "median": statistics.median(diffs),
                "p90": percentile(diffs, 90),
                "n": len(diffs),
            }
    offline = {
        (level.repetition, r.index): r.latency_s
        for level in levels
        if level.system == "offline" and level.mode == "closed" and level.concurrency == 1
        for r in level.records
        if r.status == "ok"
    }
    for system in systems:
        if system == "offline":
            continue
        paired = [
            (r.latency_s - offline[(level.repetition, r.index)]) * 1000
            for level in levels
            if level.system == system and level.mode == "closed" and level.concurrency == 1
            for r in level.records
            if r.status == "ok" and (level.repetition, r.index) in offline
        ]
        if paired:
            result[f"{system}_vs_offline_ms"] = {
                "median": statistics.median(paired),
                "p90": percentile(paired, 90),
                "n": len(paired),
            }
    return result


def goals(
    aggs: list[Aggregate], ratio_rows: list[dict[str, Any]], over: dict[str, Any]
) -> list[dict[str, Any]]:
    def ratio(other: str) -> float | None:
        for row in ratio_rows:
            if row["other"] == other and row["concurrency"] == GOAL_CONCURRENCY:
                return row["ratio"]  # type: ignore[no-any-return]
        return None

    checks: list[dict[str, Any]] = []
    for other, target, text in (
        ("offline", GOAL_VS_OFFLINE, "raw engine (offline)"),
        ("vllm", GOAL_VS_VLLM, "vLLM's OpenAI server"),
        ("kaito", GOAL_VS_KAITO, "Kaito-style baseline"),
    ):
        value = ratio(other)
        checks.append(
            {
                "goal": f"our /chat >= {target:g}x {text} "
                f"at concurrency {GOAL_CONCURRENCY} (output tok/s)",
                "value": value,
                "met": None if value is None else value >= target,
                "shown": "n/a (not measured)" if value is None else f"{value:.3f}x",
            }
        )
    in_server = over.get("ours_in_server_ms")
    value = None if in_server is None else in_server["median"]
    checks.append(
        {
            "goal": f"median server overhead at concurrency 1 < {GOAL_OVERHEAD_MS:g} ms "
            "(our latency minus the engine's for the same request)",
            "value": value,
            "met": None if value is None else value < GOAL_OVERHEAD_MS,
            "shown": "n/a" if value is None else f"{value:.2f} ms",
        }
    )
    return checks


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cells(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table_head(first: list[str]) -> list[str]:
    columns = [*first, "ok / sent", "errors", "req/s", "output tok/s", "p50 s", "p95 s", "p99 s"]
    return [_cells(columns), _cells(["---"] + ["---:"] * (len(columns) - 1))]


def _row(first: list[object], agg: Aggregate) -> str:
    row = agg.to_json()
    cancelled = f" ({row['cancelled']} cut off)" if row["cancelled"] else ""
    return _cells(
        [
            *first,
            f"{row['requests_ok']} / {row['requests_sent']}{cancelled}",
            row["errors"],
            f"{row['requests_per_s']:.3f}",
            f"{row['output_tokens_per_s']:.1f}",
            _fmt(row["latency_p50_s"]),
            _fmt(row["latency_p95_s"]),
            _fmt(row["latency_p99_s"]),
        ]
    )


def markdown(result: dict[str, Any], aggs: list[Aggregate]) -> str:
    meta = result["meta"]
    lines = [
        f"## Benchmark {meta['date']} ({meta['profile']})",
        "",
        f"Machine: {meta['machine']}. Versions: {meta['versions']}.",
        f"Workload: {meta['workload']}.",
        "",
        "### Closed loop (fixed concurrency)",
        "",
        *_table_head(["system", "concurrency"]),
    ]
    titles = meta["systems"]
    for agg in sorted(aggs, key=lambda a: (a.mode, list(titles).index(a.system), a.concurrency)):
        if agg.mode == "closed":
            lines.append(_row([agg.system, agg.concurrency], agg))
    open_aggs = [a for a in aggs if a.mode == "open"]
    if open_aggs:
        lines += [
            "",
            "### Open loop (Poisson arrivals)",
            "",
            *_table_head(["system", "offered req/s"]),
        ]
        lines += [_row([agg.system, f"{agg.rate:g}"], agg) for agg in open_aggs]
    if result["ratios"]:
        others = sorted({r["other"] for r in result["ratios"]}, key=list(titles).index)
        lines += [
            "",
            f"### Ratios: {result['ratios'][0]['system']} ÷ other system "
            "(output tok/s, same run; per repetition in brackets)",
            "",
            "| concurrency | " + " | ".join(f"vs {o}" for o in others) + " |",
            "| ---: | " + " | ".join("---:" for _ in others) + " |",
        ]
        for conc in sorted({r["concurrency"] for r in result["ratios"]}):
            cells = []
            for other in others:
                row = next(
                    (
                        r
                        for r in result["ratios"]
                        if r["concurrency"] == conc and r["other"] == other
                    ),
                    None,
                )
                if row is None or row["ratio"] is None:
                    cells.append("-")
                    continue
                reps = ", ".join(f"{v:.2f}" for _, v in sorted(row["ratio_by_rep"].items()))
                cells.append(f"{row['ratio']:.2f}x [{reps}]")
            lines.append(f"| {conc} | " + " | ".join(cells) + " |")
    over = result["overhead"]
    if over:
        lines += ["", "### Server overhead at concurrency 1 (ms; median, p90, n)", ""]
        for key, v in over.items():
            if key.endswith("_in_server_ms"):
                system = key.removesuffix("_in_server_ms")
                text = f"{system}: client latency − vLLM's e2e latency for the same request"
            else:
                system = key.removesuffix("_vs_offline_ms")
                text = f"{system} − offline engine, same request (different runs: noisy)"
            lines.append(f"- {text}: {v['median']:.2f}, {v['p90']:.2f}, n={v['n']}")
        lines.append(
            "- latencies are the POST alone; at concurrency 1 the HTTP systems' req/s and "
            "tok/s above also pay for the two /metrics reads around each request"
        )
    lines += ["", "### Goals", ""]
    for check in result["goals"]:
        mark = {True: "MET", False: "NOT MET", None: "n/a"}[check["met"]]
        lines.append(f"- {mark}: {check['goal']}: {check['shown']}")
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(aggs: list[Aggregate], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [a for a in aggs if a.mode == "closed"]
    systems = list(dict.fromkeys(a.system for a in closed))
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in systems:
        points = sorted((a for a in closed if a.system == system), key=lambda a: a.concurrency)
        conc = [a.concurrency for a in points]
        ax_tp.plot(conc, [a.mean("output_tokens_per_s") for a in points], marker="o", label=system)
        lat = [a.to_json() for a in points]
        (line,) = ax_lat.plot(
            conc, [p["latency_p50_s"] for p in lat], marker="o", label=f"{system} p50"
        )
        ax_lat.plot(
            conc,
            [p["latency_p99_s"] for p in lat],
            marker="x",
            linestyle="--",
            color=line.get_color(),
            label=f"{system} p99",
        )
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, which="both", alpha=0.3)
    ax_tp.set_ylabel("output tokens/s")
    ax_tp.set_title("Throughput")
    ax_tp.legend()
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("request latency (s)")
    ax_lat.set_title("Latency p50 (solid) and p99 (dashed)")
    ax_lat.legend(fontsize="small", ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
