"""Who may talk to whom, as the manifests say it: the namespace denies by default,
each service's egress and ingress are allowed only where it needs them, each service
signs in to Kafka as its own user whose ACLs are the topics and groups its code uses,
and ingest's TLS certificate comes from cert-manager."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest

from deploy.manifests import ROOT, Obj, named, of_kind, render
from deploy.test_manifests import AUDIT_TOPIC, SERVICES
from ledger.settings import LedgerSettings
from radflow_core import events
from radflow_core.events import Lane
from radflow_core.topics import STAT_LANE, Topic
from report_return.settings import ReportReturnSettings
from router.previews import GROUP_SUFFIX as PREVIEW_GROUP_SUFFIX
from router.settings import RouterSettings
from stow_forwarder.settings import ForwarderSettings
from transcode.settings import TranscodeSettings

PACKAGES = {
    "radflow-ingest": "ingest/src/ingest",
    "radflow-transcode": "transcode/src/transcode",
    "radflow-router": "router/src/router",
    "radflow-stow-forwarder": "stow-forwarder/src/stow_forwarder",
    "radflow-report-return": "report-return/src/report_return",
    "radflow-ledger": "ledger/src/ledger",
}
"""Deployment → its service's source package (under services/)."""
GROUPS: dict[str, tuple[set[str], set[str]]] = {
    "radflow-ingest": (set(), set()),
    "radflow-transcode": (
        {lane.group(TranscodeSettings.model_fields["group_id"].default) for lane in Lane},
        set(),
    ),
    "radflow-router": (
        {lane.group(RouterSettings.model_fields["group_id"].default) for lane in Lane}
        | {RouterSettings.model_fields["group_id"].default + PREVIEW_GROUP_SUFFIX},
        set(),
    ),
    "radflow-stow-forwarder": (
        set(),
        {ForwarderSettings.model_fields["group_prefix"].default + "."},
    ),
    "radflow-report-return": (
        set(),
        {ReportReturnSettings.model_fields["group_prefix"].default + "."},
    ),
    "radflow-ledger": ({LedgerSettings.model_fields["group_id"].default}, set()),
}
"""Deployment → (literal consumer groups, group prefixes), from the settings' defaults."""
SENDER_PORTS = {"dev": {11112, 2762, 8080, 8443}, "prod": {2762, 8443}}
"""ingest's doors for senders: prod serves TLS only."""
WORKLIST_PORTS = {2576, 11113}
"""The worklist's doors: HL7 orders (MLLP) from the sites' RIS, C-FIND from modalities."""
ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


@pytest.fixture(params=("dev", "prod"))
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pod_labels(deployment: Obj) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _policies_for(objects: list[Obj], deployment: Obj, kind: str) -> list[Obj]:
    """NetworkPolicies that select the Deployment's pods for ``kind`` (Ingress/Egress)."""
    labels = _pod_labels(deployment)
    return [
        p
        for p in of_kind(objects, "NetworkPolicy")
        if kind in p["spec"]["policyTypes"]
        and all(
            labels.get(k) == v for k, v in p["spec"]["podSelector"].get("matchLabels", {}).items()
        )
    ]


def _container_ports(deployment: Obj) -> dict[str, int]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_the_namespace_denies_every_connection_no_policy_allows(overlay: str) -> None:
    objects = render(overlay)
    deny = named(objects, "NetworkPolicy", "radflow-default-deny")
    assert deny["spec"]["podSelector"] == {}
    assert sorted(deny["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for name in SERVICES:
        deployment = named(objects, "Deployment", name)
        allowing = [
            p for p in _policies_for(objects, deployment, "Egress") if p["spec"].get("egress")
        ]
        assert allowing, f"{name}: no egress allowed at all"


def test_each_service_reaches_dns_kafka_s3_and_only_its_own_peers(overlay: str) -> None:
    objects = render(overlay)
    peers = {
        "radflow-stow-forwarder": "radflow-stow-forwarder-destinations",
        "radflow-report-return": "radflow-report-return-ris",
        "radflow-ingest": "radflow-ingest-identity-provider",
    }
    for name in SERVICES:
        policies = _policies_for(objects, named(objects, "Deployment", name), "Egress")
        rules = [rule for p in policies for rule in p["spec"].get("egress", [])]
        for rule in rules:
            assert rule.get("to"), f"{name}: an egress rule without `to` allows everywhere"
            for peer in rule["to"]:
                if "ipBlock" in peer:
                    network = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                    assert network not in ANYWHERE, f"{name}: egress to {network}"
                else:
                    assert peer.get("podSelector", {}).get("matchLabels"), (
                        f"{name}: egress to every pod of {peer}"
                    )
        reached = {
            label
            for rule in rules
            for peer in rule["to"]
            for label in (peer.get("podSelector", {}).get("matchLabels", {}).items())
        }
        assert ("k8s-app", "kube-dns") in reached, name
        assert ("strimzi.io/kind", "Kafka") in reached, name
        assert {p["metadata"]["name"] for p in policies} >= {
            "radflow-egress",
            "radflow-s3-egress",
            "radflow-audit-repository-egress",
        }
        assert (name in peers) == any(p["metadata"]["name"] == peers.get(name) for p in policies)


def test_ingress_is_only_on_the_ports_each_service_serves(overlay: str) -> None:
    objects = render(overlay)
    for name, ops_port in SERVICES.items():
        deployment = named(objects, "Deployment", name)
        ports = _container_ports(deployment)
        allowed: dict[int, list[object]] = {}
        for policy in _policies_for(objects, deployment, "Ingress"):
            for rule in policy["spec"].get("ingress", []):
                assert rule.get("ports"), f"{name}: an ingress rule open on every port"
                for port in rule["ports"]:
                    number = ports.get(port["port"], port["port"])
                    allowed.setdefault(number, []).extend(rule.get("from", [None]))
        senders = {"radflow-ingest": SENDER_PORTS[overlay], "radflow-worklist": WORKLIST_PORTS}.get(
            name, set()
        )
        assert set(allowed) == senders | {ops_port}, name
        assert allowed[ops_port] == [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
        ], f"{name}: the ops port is for Prometheus only"


def test_probes_and_scrapes_use_the_ops_port_apart_from_senders(overlay: str) -> None:
    objects = render(overlay)
    for name, ops_port in SERVICES.items():
        deployment = named(objects, "Deployment", name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["port"] == "ops", (name, probe)
        assert _container_ports(deployment)["ops"] == ops_port
    ingest = named(objects, "Deployment", "radflow-ingest")
    (container,) = ingest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["RADFLOW_INGEST_OPS_PORT"] == str(SERVICES["radflow-ingest"])
    assert SERVICES["radflow-ingest"] not in SENDER_PORTS["dev"]


# --- Kafka users ---------------------------------------------------------------------


LIBRARY_READERS = {"OrderTable": {Topic.WORKLIST_ITEMS}}
"""Shared readers a service builds that read topics of their own (without a group)."""


def _topics_used(package: Path) -> tuple[set[str], set[str]]:
    """(topics a service writes, topics it otherwise names), read from its code:
    written are the topics of the events it constructs, its dead-letter topics and the
    topic it computes to publish on (``topic = ...``); every topic with a STAT twin is
    used in both lanes."""
    models = {
        name: model.topic
        for name, model in vars(events).items()
        if isinstance(model, type)
        and issubclass(model, events.EventModel)
        and getattr(model, "topic", None) is not None
    }
    written: set[Topic] = set()
    named_: set[Topic] = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                topic = models.get(node.func.id)
                if topic is not None:
                    written.add(topic)
                named_.update(LIBRARY_READERS.get(node.func.id, ()))
            if isinstance(node, ast.keyword) and node.arg == "dead_letter_topic":
                written.update(_topic_refs(node.value))
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in ("topic", "dead_letter_topic")
                for t in node.targets
            ):
                written.update(_topic_refs(node.value))
            if isinstance(node, ast.Attribute):
                named_.update(_topic_refs(node))

    def lanes(topics: set[Topic]) -> set[str]:
        return {t.value for t in topics} | {STAT_LANE[t].value for t in topics if t in STAT_LANE}

    return lanes(written), lanes(named_ - written)


def _topic_refs(node: ast.AST) -> set[Topic]:
    return {
        Topic[n.attr]
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "Topic"
        and n.attr in Topic.__members__
    }


def _acls(user: Obj) -> dict[tuple[str, str, str], set[str]]:
    """(resource type, name, pattern type) → operations."""
    return {
        (
            acl["resource"]["type"],
            acl["resource"].get("name", ""),
            acl["resource"].get("patternType", "literal"),
        ): set(acl["operations"])
        for acl in user["spec"]["authorization"]["acls"]
    }


def test_each_service_s_kafka_user_allows_exactly_the_topics_and_groups_its_code_uses() -> None:
    objects = render("prod")
    services_root = ROOT / "services"
    for name, package in PACKAGES.items():
        written, read = _topics_used(services_root / package)
        assert written, f"{name}: no topic found in its code"
        acls = _acls(named(objects, "KafkaUser", name))
        topics = {n: ops for (kind, n, pattern), ops in acls.items() if kind == "topic"}
        assert all(p == "literal" for (k, _, p) in acls if k == "topic"), name
        assert set(topics) == written | read | {AUDIT_TOPIC}, name
        for topic in written | {AUDIT_TOPIC}:
            assert "Write" in topics[topic], (name, topic)
        # radflow.audit carries Patient IDs (PS3.15 requires them in some messages):
        # services only write it; the audit shipper reads it with a user of its own.
        assert "Read" not in topics[AUDIT_TOPIC], (name, "may read the audit trail")
        for topic in read:
            assert "Read" in topics[topic], (name, topic)
        literal, prefixes = GROUPS[name]
        groups = {(n, p) for (kind, n, p) in acls if kind == "group"}
        assert groups == {(g, "literal") for g in literal} | {(g, "prefix") for g in prefixes}
        assert {k for (k, _, _) in acls} <= {"topic", "group", "cluster"}, name


OPERATOR = "radflow-operator"
"""The Kafka user of the operator CLI (radflow dlq, radflow trace)."""
REPLAYED_TO = {
    Topic.INSTANCE_RECEIVED,  # dicom.instance.failed: what transcode could not normalize
    Topic.INSTANCE_NORMALIZED,  # dicom.instance.held: routed again under the rules in force
    Topic.FORWARD_REQUESTED,  # dicom.forward.failed
    Topic.REPORTS_FINALIZED,  # report.failed
}


def test_the_operator_user_reads_all_but_the_audit_trail_and_writes_only_replay_targets() -> None:
    acls = _acls(named(render("prod"), "KafkaUser", OPERATOR))
    topics = {n: ops for (kind, n, _), ops in acls.items() if kind == "topic"}
    assert set(topics) == {t.value for t in Topic} - {AUDIT_TOPIC}
    assert all("Read" in ops for ops in topics.values())
    writable = {n for n, ops in topics.items() if "Write" in ops}
    lanes = {t.value for t in REPLAYED_TO} | {
        STAT_LANE[t].value for t in REPLAYED_TO if t in STAT_LANE
    }
    assert writable == lanes
    assert {kind for (kind, _, _) in acls} == {"topic"}, "no consumer group, no cluster rights"


def test_each_deployment_signs_in_to_kafka_as_its_own_user() -> None:
    objects = render("prod")
    users = {u["metadata"]["name"] for u in of_kind(objects, "KafkaUser")}
    assert users == set(SERVICES) | {OPERATOR}, "one KafkaUser per service (and operators)"
    site = named(objects, "ConfigMap", "radflow-site")["data"]
    assert "RADFLOW_KAFKA_SASL_USERNAME" not in site
    assert site["RADFLOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    for name in SERVICES:
        (container,) = named(objects, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RADFLOW_KAFKA_SASL_USERNAME"]["value"] == name
        secret = env["RADFLOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert secret == {"name": name, "key": "password"}, name


# --- certificates and the doors of prod ----------------------------------------------


def test_ingest_serves_tls_with_the_certificate_cert_manager_issues(overlay: str) -> None:
    objects = render(overlay)
    certificate = named(objects, "Certificate", "radflow-ingest-tls")
    spec = named(objects, "Deployment", "radflow-ingest")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (tls,) = [
        n
        for n, v in volumes.items()
        if "secret" in v and v["secret"]["secretName"] == certificate["spec"]["secretName"]
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    for variable, key in (
        ("CERT_FILE", "tls.crt"),
        ("KEY_FILE", "tls.key"),
        ("CLIENT_CA_FILE", "ca.crt"),
    ):
        assert env[f"RADFLOW_INGEST_TLS_{variable}"] == f"{mounts[tls]}/{key}"
    issuer = certificate["spec"]["issuerRef"]
    if overlay == "dev":
        assert issuer["kind"] == "Issuer"
        assert named(objects, "Issuer", issuer["name"])["spec"]["ca"]
    else:
        assert issuer["kind"] == "ClusterIssuer", "prod names the hospital's issuer"
        assert "stow.radflow.hospital.example" in certificate["spec"]["dnsNames"]


def test_prod_takes_senders_over_tls_only_and_authenticated() -> None:
    objects = render("prod")
    site = named(objects, "ConfigMap", "radflow-site")["data"]
    assert site["RADFLOW_INGEST_DIMSE_PLAIN"] == "false"
    assert site["RADFLOW_INGEST_HTTP_ENABLED"] == "false"
    assert site["RADFLOW_INGEST_AUTH_MODE"] == "required"
    assert site["RADFLOW_INGEST_AUTH_JWT_JWKS_URL"].startswith("https://")
    assert site["RADFLOW_INGEST_ALLOWED_PEERS"] and site["RADFLOW_INGEST_AUTH_ALLOWED_IDENTITIES"]
    ingress = named(objects, "Ingress", "radflow-stow")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"]["port"]["name"] == "https"
    balancer = named(objects, "Service", "radflow-ingest-dimse")
    assert [p["port"] for p in balancer["spec"]["ports"]] == [2762]
