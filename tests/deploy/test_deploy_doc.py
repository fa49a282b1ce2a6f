"""docs/deploy.md says what the manifests say: the install path a DevOps engineer
follows names paths that exist, Secrets and keys the overlays read, the overlays'
namespace, resources, labels and ports they render, the CRD API versions they use,
and the operator releases the vendored CRD schemas were taken from. A wrong name in
the document fails here, not at 3 a.m. on a new cluster. No cluster: the document's
shell commands are parsed and held against ``kubectl kustomize`` output."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import yaml

from deploy.doc_commands import Command, commands, for_loop_items, is_literal
from deploy.manifests import (
    CRD_SCHEMAS,
    K8S,
    OVERLAYS,
    ROOT,
    Obj,
    is_builtin,
    of_kind,
    operator_secrets,
    render,
    secret_references,
)

DOC = ROOT / "docs" / "deploy.md"
OPERATOR_NAMESPACES = {"cert-manager", "strimzi", "keda"}
"""Where the document installs operators the manifests never address (any name would
do); the namespaces the manifests do address (monitoring, ingress-nginx, kube-system)
are read from them."""
CHARTS = {
    "strimzi-kafka-operator": "strimzi/strimzi-kafka-operator",
    "cert-manager": "cert-manager/cert-manager",
    "keda": "kedacore/keda",
}
"""Helm chart → the repository its CRD schemas were vendored from (tests/deploy/crd_schemas)."""
KIND_ALIASES = {
    "deploy": "Deployment",
    "deployment": "Deployment",
    "svc": "Service",
    "service": "Service",
    "job": "Job",
    "kafka": "Kafka",
    "kafkatopic": "KafkaTopic",
    "kafkauser": "KafkaUser",
    "kafkanodepool": "KafkaNodePool",
    "certificate": "Certificate",
    "issuer": "Issuer",
    "scaledobject": "ScaledObject",
    "triggerauthentication": "TriggerAuthentication",
    "servicemonitor": "ServiceMonitor",
    "prometheusrule": "PrometheusRule",
    "configmap": "ConfigMap",
    "networkpolicy": "NetworkPolicy",
    "ingress": "Ingress",
}
"""kubectl's resource names → the kinds they denote, for names checked against renders."""
FENCE_FREE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.MULTILINE | re.DOTALL)
"""Fenced blocks, whose ``#`` lines are comments, not headings."""
API_VERSION = re.compile(r"\b([a-z0-9-]+(?:\.[a-z0-9-]+)+)/(v\d+(?:(?:alpha|beta)\d+)?)\b")


@functools.cache
def _commands() -> tuple[Command, ...]:
    return tuple(commands(DOC))


def kubectl_commands() -> list[Command]:
    return [c for c in _commands() if c.program == "kubectl"]


def helm_commands() -> list[Command]:
    return [c for c in _commands() if c.program == "helm"]


@functools.cache
def _all_objects() -> tuple[Obj, ...]:
    return tuple(o for overlay in OVERLAYS for o in render(overlay))


def all_objects() -> list[Obj]:
    """Every object of every overlay (read-only: shared between tests)."""
    return list(_all_objects())


def app_namespace() -> str:
    """The one namespace both overlays deploy into."""
    names = {
        n["metadata"]["name"] for overlay in OVERLAYS for n in of_kind(render(overlay), "Namespace")
    }
    assert len(names) == 1, f"the overlays deploy into several namespaces: {names}"
    return str(names.pop())


def in_app_namespace() -> list[Command]:
    namespace = app_namespace()
    return [c for c in kubectl_commands() if c.namespace == namespace]


def secrets_created(command: Command) -> tuple[str, set[str]] | None:
    """(name, keys) of a ``kubectl create secret generic|tls NAME ...``."""
    if command.args[:2] != ["create", "secret"] or len(command.args) < 4:
        return None
    kind, name = command.args[2], command.args[3]
    if kind == "tls":
        return name, {"tls.crt", "tls.key"}
    keys = {v.split("=", 1)[0] for v in command.values("--from-literal")}
    for source in command.values("--from-file"):
        keys.add(source.split("=", 1)[0] if "=" in source else Path(source).name)
    return name, keys


def resources_named(command: Command) -> list[tuple[str, str]]:
    """(kubectl resource, name) pairs a get/describe/wait/logs/exec/... addresses:
    ``kind/name`` words, or ``kind name name ...``."""
    args = command.args[1:]
    if command.args and command.args[0] == "rollout":
        args = command.args[2:]
    if not args:
        return []
    if any("/" in a for a in args):
        pairs = [a.split("/", 1) for a in args if "/" in a]
        return [(kind, name) for kind, name in pairs]
    kind, names = args[0], args[1:]
    return [(kind, name) for name in names]


def rendered(kind: str, name: str) -> bool:
    return any(o["kind"] == kind and o["metadata"]["name"] == name for o in all_objects())


# --- paths -----------------------------------------------------------------------------


def test_every_path_the_install_applies_exists() -> None:
    paths = []
    for command in kubectl_commands():
        sub = command.args[0] if command.args else ""
        if sub in ("apply", "delete", "create"):
            paths += command.values("-k", "--kustomize", "-f", "--filename")
        if sub == "kustomize":
            paths += command.args[1:]
    literal = [p for p in paths if is_literal(p)]
    assert "deploy/k8s/overlays/dev" in literal and "deploy/k8s/overlays/prod" in literal
    missing = [p for p in literal if not (ROOT / p).exists()]
    assert not missing, f"docs/deploy.md applies paths that do not exist: {missing}"


def test_every_file_the_document_names_exists() -> None:
    text = DOC.read_text()
    spans = {s for s in re.findall(r"`([^`\s]+)`", text) if is_literal(s)}
    from_root = [s for s in spans if re.match(r"(deploy|docs|tests|services|libs)/", s)]
    from_k8s = [s for s in spans if re.match(r"(base|overlays)/", s)]
    bare = [s for s in spans if re.fullmatch(r"[\w.-]+\.(yaml|env)", s)]
    assert from_root and from_k8s and bare, "the path patterns no longer match the document"
    missing = [s for s in from_root if not (ROOT / s.rstrip("/")).exists()]
    missing += [s for s in from_k8s if not (K8S / s.rstrip("/")).exists()]
    missing += [s for s in bare if not any(K8S.rglob(s))]
    assert not missing, f"docs/deploy.md names files that do not exist: {missing}"


def test_every_link_within_the_document_reaches_a_heading() -> None:
    text = DOC.read_text()
    headings = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#{1,6} (.+)$", FENCE_FREE.sub("", text), re.MULTILINE)
    }
    anchors = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert anchors, "no link within the document: the pattern no longer matches"
    assert anchors <= headings, f"links to no heading: {sorted(anchors - headings)}"


# --- Secrets ---------------------------------------------------------------------------


def test_every_secret_the_reader_creates_is_one_an_overlay_reads() -> None:
    namespace = app_namespace()
    references: dict[str, frozenset[str] | None] = {}
    for overlay in OVERLAYS:
        for name, keys in secret_references(render(overlay)).items():
            known = references.get(name, frozenset())
            references[name] = None if keys is None or known is None else known | keys
    created = [(c, made) for c in kubectl_commands() if (made := secrets_created(c))]
    assert created, "docs/deploy.md no longer shows how to create a Secret"
    for command, (name, keys) in created:
        assert command.namespace == namespace, f"{command.text}: not in namespace {namespace}"
        assert name in references, f"{command.text}: no overlay reads a Secret {name}"
        wanted = references[name]
        if wanted is not None:
            assert keys == set(wanted), (
                f"{command.text}: keys {sorted(keys)}, the overlays read {sorted(wanted)}"
            )


def test_every_secret_the_prod_overlay_needs_from_people_is_created_in_the_document() -> None:
    objects = render("prod")
    needed = set(secret_references(objects)) - operator_secrets(objects)
    created = {s[0] for c in kubectl_commands() if (s := secrets_created(c))}
    assert needed, "the prod overlay reads no Secret a person creates: test out of date"
    assert needed <= created, f"docs/deploy.md never creates {sorted(needed - created)}"


def test_the_secrets_table_lists_only_secrets_the_overlays_read() -> None:
    section = DOC.read_text().split("\n## Secrets\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    deployments = [d["metadata"]["name"] for d in of_kind(render("prod"), "Deployment")]
    read: set[str] = set()
    for overlay in OVERLAYS:
        read |= set(secret_references(render(overlay)))
    assert rows
    for row in rows:
        name = row.split("`")[1]
        names = deployments if name == "radflow-<service>" else [name]
        for each in names:
            assert each in read, f"the Secrets table lists {each}, which no overlay reads"


# --- namespaces, resources, labels, ports ----------------------------------------------


def manifest_namespaces() -> set[str]:
    """Namespaces the rendered objects address: NetworkPolicy namespace selectors and
    ``<service>.<namespace>.svc`` addresses."""
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            labels = node.get("namespaceSelector", {}).get("matchLabels", {})
            if "kubernetes.io/metadata.name" in labels:
                found.add(labels["kubernetes.io/metadata.name"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            found.update(re.findall(r"[a-z0-9-]+\.([a-z0-9-]+)\.svc\b", node))

    for obj in all_objects():
        walk(obj.get("spec", {}))
    return found


def test_every_namespace_the_document_uses_is_the_overlays_or_one_they_address() -> None:
    namespace = app_namespace()
    addressed = manifest_namespaces()
    allowed = {namespace} | addressed | OPERATOR_NAMESPACES
    used = {c.namespace for c in kubectl_commands() + helm_commands() if c.namespace}
    assert namespace in used
    assert used <= allowed, (
        f"docs/deploy.md uses namespaces the manifests know nothing of: {used - allowed}"
    )


def test_the_prometheus_stack_goes_where_the_manifests_look_for_it() -> None:
    """KEDA's triggers ask prometheus-operated.<ns>.svc, and the NetworkPolicies let
    only <ns> reach the ops ports: the document installs the stack into that <ns>."""
    asked = {
        m
        for o in of_kind(render("prod"), "ScaledObject")
        for t in o["spec"]["triggers"]
        for m in re.findall(r"prometheus-operated\.([a-z0-9-]+)\.svc", json.dumps(t))
    }
    installs = [
        c
        for c in helm_commands()
        if c.args[:1] == ["install"] and "kube-prometheus-stack" in c.args[-1]
    ]
    assert len(asked) == 1 and installs
    assert {c.namespace for c in installs} == asked
    assert asked <= manifest_namespaces()


def test_strimzi_watches_the_overlays_namespace() -> None:
    strimzi = [c for c in helm_commands() if c.args[:1] == ["install"] and "strimzi" in c.args[-1]]
    assert strimzi
    for command in strimzi:
        assert f"watchNamespaces={{{app_namespace()}}}" in command.values("--set")


def test_every_resource_the_document_addresses_in_the_namespace_is_rendered() -> None:
    checked = 0
    made = {name for overlay in OVERLAYS for name in operator_secrets(render(overlay))}
    read = {name for overlay in OVERLAYS for name in secret_references(render(overlay))}
    for command in in_app_namespace():
        if not command.args or command.args[0] not in (
            "get",
            "describe",
            "wait",
            "logs",
            "exec",
            "port-forward",
            "rollout",
            "delete",
        ):
            continue
        for resource, name in resources_named(command):
            if not is_literal(name) or "," in resource:
                continue
            checked += 1
            if resource in ("secret", "secrets"):
                assert name in made | read, f"{command.text}: no overlay reads or makes {name}"
                continue
            kind = KIND_ALIASES.get(resource)
            assert kind, f"{command.text}: resource {resource!r} unknown to this test"
            assert rendered(kind, name), f"{command.text}: no overlay renders {kind} {name}"
    assert checked > 20


def test_every_label_selector_the_document_uses_selects_something() -> None:
    selectors = [s for c in in_app_namespace() for s in c.values("-l", "--selector")]
    assert selectors
    labels = [o["metadata"].get("labels", {}) for o in all_objects()]
    for selector in selectors:
        pairs = dict(p.split("=", 1) for p in selector.split(","))
        assert any(pairs.items() <= ls.items() for ls in labels), f"{selector} selects nothing"


def test_every_port_the_document_forwards_is_a_port_of_that_service() -> None:
    services = {s["metadata"]["name"]: s for s in all_objects() if s["kind"] == "Service"}

    def ports(name: str) -> set[int]:
        return {p["port"] for p in services[name]["spec"]["ports"]}

    forwarded = 0
    for command in in_app_namespace():
        if command.args[:1] != ["port-forward"] or not is_literal(command.args[1]):
            continue
        resource, name = command.args[1].split("/", 1)
        assert resource in ("svc", "service") and name in services, command.text
        for spec in command.args[2:]:
            forwarded += 1
            remote = int(spec.split(":")[-1])
            assert remote in ports(name), f"{command.text}: {name} has no port {remote}"
    for items in for_loop_items(DOC):
        for item in items:
            if re.fullmatch(r"[a-z-]+:\d+", item):
                forwarded += 1
                service, port = item.split(":")
                assert int(port) in ports(f"radflow-{service}"), (
                    f"radflow-{service} has no port {port}"
                )
    assert forwarded >= 10


# --- operators: API versions and releases ----------------------------------------------


def vendored_sources() -> list[dict[str, str]]:
    return [json.loads(p.read_text())["x-source"] for p in sorted(CRD_SCHEMAS.glob("*.json"))]


def test_the_crd_api_versions_the_document_names_are_the_manifests() -> None:
    used = {o["apiVersion"] for o in all_objects() if not is_builtin(o)}
    groups = {v.split("/")[0] for v in used}
    named = {f"{g}/{v}" for g, v in API_VERSION.findall(DOC.read_text()) if g in groups}
    assert named == used, f"the document names {sorted(named)}, the manifests use {sorted(used)}"


def test_the_install_waits_for_the_crd_of_every_custom_kind_the_overlays_use() -> None:
    wanted = {
        f"{o['kind'].lower()}s.{o['apiVersion'].split('/')[0]}"
        for o in all_objects()
        if not is_builtin(o)
    }
    waited = {
        a.split("/", 1)[1]
        for c in kubectl_commands()
        if c.args[:1] == ["wait"]
        for a in c.args[1:]
        if a.startswith("crd/")
    }
    assert waited == wanted, f"waited for {sorted(waited)}, the overlays use {sorted(wanted)}"


def test_the_operator_releases_installed_are_those_the_crd_schemas_come_from() -> None:
    tags = {s["repo"]: s["tag"].removeprefix("v") for s in vendored_sources()}
    installed = {}
    for command in helm_commands():
        if command.args[:1] != ["install"]:
            continue
        chart = command.args[-1].rsplit("/", 1)[-1]
        if chart in CHARTS:
            installed[CHARTS[chart]] = command.values("--version")[0].removeprefix("v")
    assert installed == {repo: tags[repo] for repo in CHARTS.values()}
    text = DOC.read_text()
    for source in vendored_sources():
        assert source["tag"] in text, (
            f"docs/deploy.md does not name {source['repo']} {source['tag']}"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_document_applies_each_overlay(overlay: str) -> None:
    applied = {p for c in kubectl_commands() if c.args[:1] == ["apply"] for p in c.values("-k")}
    assert f"deploy/k8s/overlays/{overlay}" in applied


def test_the_namespace_created_first_is_the_one_each_overlay_applies() -> None:
    """Step 2 applies one overlay's namespace.yaml before the operators: it must be the
    same object every overlay applies later, or the later apply changes it."""
    namespaces = {
        overlay: [o for o in render(overlay) if o["kind"] == "Namespace"] for overlay in OVERLAYS
    }
    first = [
        yaml.safe_load((ROOT / p).read_text())
        for c in kubectl_commands()
        if c.args[:1] == ["apply"]
        for p in c.values("-f")
        if p.endswith("namespace.yaml")
    ]
    assert first
    for overlay, rendered_namespaces in namespaces.items():
        assert len(rendered_namespaces) == 1
        ours = rendered_namespaces[0]
        for applied in first:
            assert applied["metadata"]["name"] == ours["metadata"]["name"]
            for key, value in applied["metadata"].get("labels", {}).items():
                assert ours["metadata"]["labels"].get(key) == value, (overlay, key)
