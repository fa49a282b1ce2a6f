"""The shipped alerts as a plain Prometheus rules file.

deploy/k8s/base/monitoring/alerts.yaml is a PrometheusRule (prometheus-operator), the
form a cluster needs; ``promtool`` and a Prometheus started without the operator
(``make run``, :mod:`radflow_devstack.prometheus`) read a rules file: the same
``groups``, without the Kubernetes envelope. Deriving it keeps the PrometheusRule the
one place an alert is written. Needs only PyYAML, so that it runs from a checkout:

    python3 libs/devstack/src/radflow_devstack/prometheus_rules.py \
        deploy/k8s/base/monitoring/alerts.yaml rules.yaml [--annotation summary]
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml

GROUP_FIELDS = ("name", "interval", "limit", "rules")
"""What a rules file's group accepts; the operator's other fields (Thanos' partial
response strategy) would make Prometheus refuse the file."""


def rules_file(manifests: str, annotations: Collection[str] | None = None) -> dict[str, Any]:
    """The rule groups of every PrometheusRule in ``manifests`` (YAML, one document or
    several) as a rules file. ``annotations`` names the annotations to keep (all when
    None): ``promtool test rules`` compares every annotation an alert carries with the
    test's, so unit tests keep only those they state."""
    groups = []
    for document in yaml.safe_load_all(manifests):
        if not document or document.get("kind") != "PrometheusRule":
            continue
        for group in document["spec"]["groups"]:
            plain = {k: group[k] for k in GROUP_FIELDS if k in group}
            if annotations is not None:
                plain["rules"] = [_keep(rule, annotations) for rule in group["rules"]]
            groups.append(plain)
    if not groups:
        raise ValueError("no PrometheusRule with rule groups found")
    return {"groups": groups}


def _keep(rule: dict[str, Any], annotations: Collection[str]) -> dict[str, Any]:
    kept = {k: v for k, v in rule.get("annotations", {}).items() if k in annotations}
    rule = {k: v for k, v in rule.items() if k != "annotations"}
    return {**rule, "annotations": kept} if kept else rule


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # PyYAML without stubs: Any
    """Multi-line strings (the expressions) as literal blocks, as they are written."""


def _string(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    )


_Dumper.add_representer(str, _string)


def write_rules_file(
    prometheus_rule: Path, out: Path, annotations: Collection[str] | None = None
) -> Path:
    """Write :func:`rules_file` of the file ``prometheus_rule`` to ``out``."""
    rules = rules_file(prometheus_rule.read_text(), annotations)
    out.write_text(yaml.dump(rules, Dumper=_Dumper, sort_keys=False, width=100))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="prometheus_rules.py",
        description="Write the rule groups of a PrometheusRule as a Prometheus rules file.",
    )
    parser.add_argument(
        "prometheus_rule", type=Path, help="e.g. deploy/k8s/base/monitoring/alerts.yaml"
    )
    parser.add_argument("out", type=Path, help="the rules file to write")
    parser.add_argument(
        "--annotation",
        action="append",
        dest="annotations",
        metavar="NAME",
        help="keep only this annotation (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    write_rules_file(args.prometheus_rule, args.out, args.annotations)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
