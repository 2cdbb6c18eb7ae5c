"""Reading one series from the live server's /metrics."""

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels`` (0 if none)."""
    return snapshot(url, (name,), labels)[name]


def snapshot(
    url: str, names: tuple[str, ...], labels: dict[str, str] | None = None
) -> dict[str, float]:
    """Several series from one scrape: each name's sum, as `metric` gives it. One scrape
    keeps a fast-moving set of gauges consistent with each other and samples them often."""
    text = httpx.get(url + "/metrics", timeout=30).text
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                totals[sample.name] += sample.value
    return totals
