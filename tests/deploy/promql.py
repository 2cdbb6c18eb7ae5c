"""What the dashboard and alert tests need to know about PromQL text: the metric names an
expression selects, and its label matcher blocks. Enough of the grammar for the
expressions this repo ships (checked in test_promql.py); not a general parser."""

import re

# Words in PromQL that are not metric names: aggregations, functions (always followed by
# "(", handled below), binary operators and modifiers.
KEYWORDS = frozenset(
    {
        "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
        "bool", "offset", "inf", "nan",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
# by (...), without (...), on (...), ignoring (...), group_left (...), group_right (...)
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def matcher_blocks(expr: str) -> list[str]:
    """The `{...}` label matcher blocks, in order."""
    return _MATCHERS.findall(expr)


def metric_names(expr: str) -> set[str]:
    """The metric names the expression selects (`rate(x_total{a="b"}[5m])` -> {x_total})."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _NAME.finditer(text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or an aggregation
        if word.lower() in KEYWORDS or re.fullmatch(r"\d+[a-z]*", word):
            continue
        names.add(word)
    return names
