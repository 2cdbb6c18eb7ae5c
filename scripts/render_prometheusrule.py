"""Writes manifests/components/prometheus-rules/prometheusrule.yaml from the plain rules
file beside it, so the two never differ: the rules file is the one source (promtool reads
it; Prometheus without the Operator loads it as is). `make prometheus-rules` runs this;
tests/deploy/test_alert_rules.py fails when the committed file is stale."""

import sys
from pathlib import Path

import yaml

COMPONENT = Path(__file__).resolve().parent.parent / "manifests" / "components" / "prometheus-rules"
RULES = COMPONENT / "kaito-chat.rules.yaml"
TARGET = COMPONENT / "prometheusrule.yaml"

HEADER = """\
# GENERATED from kaito-chat.rules.yaml by `make prometheus-rules`: edit that file, not this
# one. The Prometheus Operator's form of the same rules (its spec is the rules file).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the longer PromQL expressions) as literal blocks, as written."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "chat-alerts", "labels": {"app.kubernetes.io/name": "kaito-chat"}},
        "spec": rules,
    }
    body = yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
