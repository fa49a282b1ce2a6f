"""Rendering the kustomize overlays and reading what the deployment ships: objects,
CRD schemas, the Grafana dashboard, and the PromQL in dashboards, alerts and KEDA."""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "prod")
DASHBOARDS = K8S / "base" / "monitoring" / "dashboards"
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd_schemas"

Obj = dict[str, Any]


def kubectl() -> str:
    """Path of kubectl, or skip: rendering needs its built-in kustomize."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed: overlays not rendered")
    return path


@functools.cache
def _render(directory: str) -> tuple[Obj, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", directory], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def render(overlay: str) -> list[Obj]:
    """Every object ``kubectl kustomize deploy/k8s/overlays/<overlay>`` prints (copies)."""
    return copy.deepcopy(list(_render(str(K8S / "overlays" / overlay))))


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    """The one object of ``kind`` called ``name`` (or, for generated ConfigMaps and
    Secrets, ``name`` with kustomize's content hash appended)."""
    hashed = (
        re.compile(re.escape(name) + r"-[a-z0-9]{10}") if kind in ("ConfigMap", "Secret") else None
    )
    found = [
        o
        for o in of_kind(objects, kind)
        if o["metadata"]["name"] == name or (hashed and hashed.fullmatch(o["metadata"]["name"]))
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def is_builtin(obj: Obj) -> bool:
    """Kubernetes' own kinds: core (``v1``) and groups named ``*.k8s.io`` or without dots."""
    api_version: str = obj["apiVersion"]
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


# --- CRD schemas -------------------------------------------------------------------


def crd_schemas() -> dict[tuple[str, str], Obj]:
    """(apiVersion, kind) → the vendored openAPIV3Schema, made strict (see README)."""
    schemas = {}
    for path in sorted(CRD_SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        source = schema.pop("x-source")
        schemas[(source["apiVersion"], source["kind"])] = strict_openapi(schema)
    return schemas


def strict_openapi(schema: Any) -> Any:
    """An OpenAPI v3 (Kubernetes structural) schema as a JSON Schema that rejects what
    the API server would prune or refuse with strict field validation."""
    if isinstance(schema, list):
        return [strict_openapi(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_openapi(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# --- dashboards and PromQL -----------------------------------------------------------


def dashboards() -> dict[str, Obj]:
    """Every dashboard JSON shipped in deploy/ (file name → model)."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def walk_panels(panels: list[Obj]) -> Iterator[Obj]:
    """Panels, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(dashboard: Obj) -> dict[str, str]:
    """'<panel title> / <refId>' → PromQL, for every panel target and query variable."""
    queries = {}
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # Grafana's label_values(selector, label) reads the series of its selector.
            values = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_][A-Za-z0-9_]*\)", text)
            queries[f"variable {variable['name']}"] = values.group(1) if values else text
    return queries


def alert_queries(objects: list[Obj]) -> dict[str, str]:
    """'<rule name>' → PromQL, for every PrometheusRule rule."""
    queries = {}
    for rule_set in of_kind(objects, "PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            for rule in group["rules"]:
                queries[rule.get("alert") or rule["record"]] = rule["expr"]
    return queries


def recorded_series(objects: list[Obj]) -> dict[str, set[str]]:
    """Series the recording rules create → the label names they keep: those of the
    outermost aggregation's ``by (...)`` (the left operand's, for a binary operation),
    and the rule's own ``labels``."""
    recorded: dict[str, set[str]] = {}
    for rule_set in of_kind(objects, "PrometheusRule"):
        for group in rule_set["spec"]["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    kept = _kept_labels(parse_promql(rule["expr"])) or set()
                    recorded[rule["record"]] = kept | set(rule.get("labels", {}))
    return recorded


def _kept_labels(node: Any) -> set[str] | None:
    if isinstance(node, promql_parser.AggregateExpr):
        modifier = node.modifier
        if modifier is not None and modifier.type == promql_parser.AggModifierType.By:
            return set(modifier.labels)
        return set()
    if isinstance(node, promql_parser.ParenExpr):
        return _kept_labels(node.expr)
    if isinstance(node, promql_parser.BinaryExpr):
        if isinstance(node.lhs, promql_parser.NumberLiteral):
            return _kept_labels(node.rhs)
        return _kept_labels(node.lhs)
    return None


def scaler_queries(objects: list[Obj]) -> dict[str, str]:
    """'<ScaledObject> / <n>' → PromQL, for every KEDA prometheus trigger."""
    queries = {}
    for scaled in of_kind(objects, "ScaledObject"):
        for i, trigger in enumerate(scaled["spec"]["triggers"]):
            if trigger["type"] == "prometheus":
                queries[f"{scaled['metadata']['name']} / {i}"] = trigger["metadata"]["query"]
    return queries


_GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b")
_GRAFANA_VARIABLES = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def parse_promql(expr: str) -> promql_parser.Expr:
    """Parse PromQL as Prometheus does (Grafana's variables replaced by sample values);
    raises ValueError on a syntax error."""
    expr = _GRAFANA_INTERVALS.sub("5m", expr)
    expr = _GRAFANA_VARIABLES.sub(".*", expr)
    return promql_parser.parse(expr)


def selectors(expr: str) -> dict[str, set[str]]:
    """Every series a PromQL expression reads: metric name → label names it matches on."""
    found: dict[str, set[str]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            labels = {m.name for m in node.matchers.matchers} - {"__name__"}
            found.setdefault(node.name, set()).update(labels)

    promql_parser.walk(parse_promql(expr), visit)
    return found


# --- Secrets ---------------------------------------------------------------------------

TLS_KEYS = frozenset({"tls.crt", "tls.key"})


def secret_references(objects: list[Obj]) -> dict[str, frozenset[str] | None]:
    """Secret name → the keys the objects read from it, or None where an object takes
    the whole Secret (``envFrom``, a volume without ``items``): any key will do there.
    Read from pod templates (env, envFrom, volumes), Ingress TLS, KEDA's
    TriggerAuthentication and cert-manager's CA Issuer."""
    whole: set[str] = set()
    keys: dict[str, set[str]] = {}
    generated = {
        o["metadata"]["name"]: re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"])
        for o in of_kind(objects, "Secret")
    }

    def read(name: str, key: str | None) -> None:
        name = generated.get(name, name)  # kustomize's content hash left out
        if key is None:
            whole.add(name)
        else:
            keys.setdefault(name, set()).add(key)

    for obj in objects:
        spec = obj.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    read(ref["name"], ref["key"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    read(source["secretRef"]["name"], None)
        for volume in pod.get("volumes", []):
            secret = volume.get("secret")
            if secret:
                items = secret.get("items")
                if items:
                    for item in items:
                        read(secret["secretName"], item["key"])
                else:
                    read(secret["secretName"], None)
        if obj["kind"] == "Ingress":
            for tls in spec.get("tls", []):
                for key in TLS_KEYS:
                    read(tls["secretName"], key)
        if obj["kind"] == "TriggerAuthentication":
            for ref in spec.get("secretTargetRef", []):
                read(ref["name"], ref["key"])
        if obj["kind"] in ("Issuer", "ClusterIssuer") and "ca" in spec:
            for key in TLS_KEYS:
                read(spec["ca"]["secretName"], key)
    return {
        name: None if name in whole else frozenset(keys.get(name, ())) for name in whole | set(keys)
    }


def operator_secrets(objects: list[Obj]) -> set[str]:
    """Secrets the overlay's objects make, so nobody creates them by hand: generated
    ones (kustomize), a Certificate's ``secretName`` (cert-manager), a KafkaUser's
    password and a Kafka cluster's CA (Strimzi: ``<user>``, ``<cluster>-cluster-ca-cert``)."""
    made = {o["metadata"]["name"] for o in of_kind(objects, "Secret")}
    made |= {re.sub(r"-[a-z0-9]{10}$", "", name) for name in made}
    made |= {c["spec"]["secretName"] for c in of_kind(objects, "Certificate")}
    made |= {u["metadata"]["name"] for u in of_kind(objects, "KafkaUser")}
    made |= {f"{k['metadata']['name']}-cluster-ca-cert" for k in of_kind(objects, "Kafka")}
    return made
