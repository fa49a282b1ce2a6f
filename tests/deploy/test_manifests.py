"""The kustomize overlays render, every object is valid offline (built-in kinds against
Kubernetes' schemas, custom resources against their operators' published CRDs), and
what they say agrees with the services: topics, groups, ports, settings, rule files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from deploy.manifests import (
    K8S,
    OVERLAYS,
    Obj,
    crd_schemas,
    is_builtin,
    named,
    of_kind,
    render,
)
from ingest.settings import IngestConfig, IngestSettings
from ledger.settings import LedgerConfig, LedgerSettings
from radflow_core.events import Lane
from radflow_core.settings import Section
from radflow_core.topics import Topic
from radflow_rules.loader import load_text
from router.settings import RouterConfig, RouterSettings
from stow_forwarder.settings import ForwarderConfig, ForwarderSettings
from transcode.settings import TranscodeConfig, TranscodeSettings
from worklist.settings import WorklistConfig, WorklistSettings

KUBERNETES_VERSIONS = ("1.29", "1.33")
"""Oldest and a recent Kubernetes the manifests are checked against (strict schemas)."""
AUDIT_TOPIC: str = Topic.AUDIT.value
"""The audit topic every service writes."""
SERVICES = {
    "radflow-ingest": IngestSettings.model_fields["ops_port"].default,
    "radflow-transcode": TranscodeSettings.model_fields["http_port"].default,
    "radflow-router": RouterSettings.model_fields["http_port"].default,
    "radflow-stow-forwarder": ForwarderSettings.model_fields["http_port"].default,
    "radflow-report-return": 8084,
    "radflow-ledger": LedgerSettings.model_fields["http_port"].default,
    "radflow-worklist": WorklistSettings.model_fields["http_port"].default,
}
"""Deployment → its operations port (/metrics, /healthz, /readyz), named "ops"."""
HAS_REPORT_RETURN = importlib.util.find_spec("report_return") is not None
NOT_SCALED = {"radflow-ledger": 1}
"""Deployment → its fixed replicas (1 in dev), no autoscaler: the ledger's HTTP API
answers from the partitions it owns."""


def _sections() -> list[type[Section]]:
    configs: list[Any] = [
        IngestConfig,
        TranscodeConfig,
        RouterConfig,
        ForwarderConfig,
        LedgerConfig,
        WorklistConfig,
    ]
    if HAS_REPORT_RETURN:
        from report_return.settings import ReportReturnConfig

        configs.append(ReportReturnConfig)
    return [s for config in configs for s in config.SECTIONS]


def _known_variables() -> set[str]:
    return {name for section in _sections() for name, _, _ in section.describe()}


def _containers(deployment: Obj) -> list[Obj]:
    return deployment["spec"]["template"]["spec"]["containers"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(overlay: str) -> list[Obj]:
    return render(overlay)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_builtin_object_is_valid_for_kubernetes(objects: list[Obj], version: str) -> None:
    builtin = [o for o in objects if is_builtin(o)]
    assert len(builtin) > 20
    for obj in builtin:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")


def test_every_custom_resource_matches_its_published_crd_schema(objects: list[Obj]) -> None:
    schemas = crd_schemas()
    custom = [o for o in objects if not is_builtin(o)]
    assert {"KafkaTopic", "ServiceMonitor", "PrometheusRule"} <= {o["kind"] for o in custom}
    for obj in custom:
        key = (obj["apiVersion"], obj["kind"])
        assert key in schemas, f"no vendored schema for {key}: add it to tests/deploy/crd_schemas"
        errors = sorted(
            jsonschema.Draft7Validator(schemas[key]).iter_errors(obj), key=lambda e: list(e.path)
        )
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: " + "; ".join(
            f"{'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors
        )


def test_the_crd_check_catches_a_misspelt_field() -> None:
    schema = crd_schemas()[("kafka.strimzi.io/v1", "KafkaTopic")]
    topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "x"},
        "spec": {"partitions": 3, "replica": 3},
    }
    assert list(jsonschema.Draft7Validator(schema).iter_errors(topic))


def test_every_topic_has_a_kafka_topic_and_pending_is_compacted_like_its_input(
    objects: list[Obj],
) -> None:
    topics = {t["metadata"]["name"]: t["spec"] for t in of_kind(objects, "KafkaTopic")}
    assert set(topics) == {t.value for t in Topic}
    for name, spec in topics.items():
        assert spec["config"]["min.insync.replicas"] <= spec["replicas"], name
        policy = spec["config"]["cleanup.policy"]
        changelogs = (
            Topic.ROUTER_PENDING,
            Topic.ROUTER_PENDING_STAT,
            Topic.LEDGER,
            Topic.WORKLIST_ITEMS,
        )
        assert policy == ("compact" if name in changelogs else "delete"), name
    for lane in Lane:
        pending = topics[lane.topic(Topic.ROUTER_PENDING)]
        normalized = topics[lane.topic(Topic.INSTANCE_NORMALIZED)]
        assert pending["partitions"] == normalized["partitions"], lane
        assert "retention.ms" not in pending["config"], "held studies must not expire by age"
    # The ledger keeps a study's state in the partition its forward events are in.
    ledger_inputs = [
        Topic.LEDGER,
        Topic.FORWARD_REQUESTED,
        Topic.FORWARD_REQUESTED_STAT,
        Topic.FORWARD_COMPLETED,
        Topic.FORWARD_VERIFIED,
        Topic.FORWARD_FAILED,
    ]
    assert len({topics[t.value]["partitions"] for t in ledger_inputs}) == 1
    assert "retention.ms" not in topics[Topic.LEDGER.value]["config"]
    labels = {t["metadata"]["labels"]["strimzi.io/cluster"] for t in of_kind(objects, "KafkaTopic")}
    assert labels == {named(objects, "Kafka", "radflow")["metadata"]["name"]}


def test_each_service_runs_non_root_read_only_with_probes_limits_and_a_scratch_volume(
    objects: list[Obj],
) -> None:
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    assert set(SERVICES) <= set(deployments)
    for name, port in SERVICES.items():
        spec = deployments[name]["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        (container,) = spec["containers"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"]["drop"] == ["ALL"], name
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["ops"] == port
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["livenessProbe"]["httpGet"]["port"] == "ops", name
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (name, kind)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert env["TMPDIR"] == "/tmp" and "emptyDir" in volumes[mounts["/tmp"]], name


def test_ingest_runs_no_more_workers_than_its_cpu_limit_has_cores() -> None:
    """A worker is one Python process, about one core busy at most: more workers than
    cores of the limit only share the same quota, fewer leave cores paid for unused."""
    for overlay in OVERLAYS:
        (container,) = named(render(overlay), "Deployment", "radflow-ingest")["spec"]["template"][
            "spec"
        ]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        workers = int(env.get("RADFLOW_INGEST_WORKERS") or 1)
        limit = _cores(container["resources"]["limits"]["cpu"])
        assert workers >= 2, (overlay, "one worker cannot use a pod's cores")
        assert workers <= limit < workers + 1, (overlay, workers, limit)
        assert _cores(container["resources"]["requests"]["cpu"]) <= limit


def _cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_termination_grace_outlasts_each_service_s_shutdown() -> None:
    """ingest: preStop + association grace + STOW-RS grace + drain + producer flush;
    consumers: the 60 s their stop() waits for the work in hand, plus closing."""
    ingest = IngestConfig.SECTIONS[0].model_fields["shutdown_grace_s"].default
    needed = {
        "radflow-ingest": 5 + 2 * ingest + 5 + 10,
        "radflow-transcode": 60 + 10,
        "radflow-router": 60 + 10,
        "radflow-stow-forwarder": 60 + 10,
        "radflow-report-return": 60 + 10,
        "radflow-ledger": 60 + 10,
    }
    for overlay in OVERLAYS:
        for name, seconds in needed.items():
            spec = named(render(overlay), "Deployment", name)["spec"]["template"]["spec"]
            assert spec["terminationGracePeriodSeconds"] >= seconds, (overlay, name)


def test_each_service_has_its_service_budget_policy_monitor_and_autoscaler(
    objects: list[Obj], overlay: str
) -> None:
    for name, port in SERVICES.items():
        labels = named(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        service = named(objects, "Service", name)
        assert _selects(service["spec"]["selector"], labels)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["ops"] == port
        budget = named(objects, "PodDisruptionBudget", name)
        assert _selects(budget["spec"]["selector"]["matchLabels"], labels)
        policy = named(objects, "NetworkPolicy", name)
        assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
        monitor = named(objects, "ServiceMonitor", name)
        assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["ops"]
        scaled = [o for o in of_kind(objects, "ScaledObject") if o["metadata"]["name"] == name]
        if name in NOT_SCALED or overlay == "dev":
            fixed = 1 if overlay == "dev" else NOT_SCALED.get(name, 1)
            assert not scaled and named(objects, "Deployment", name)["spec"]["replicas"] == fixed
        else:
            (one,) = scaled
            assert one["spec"]["scaleTargetRef"]["name"] == name
            assert "replicas" not in named(objects, "Deployment", name)["spec"]


def test_kafka_lag_triggers_name_the_services_groups_and_topics() -> None:
    objects = render("prod")
    topics = {t["metadata"]["name"]: t["spec"] for t in of_kind(objects, "KafkaTopic")}
    expected = {
        "radflow-transcode": (
            TranscodeSettings.model_fields["group_id"].default,
            Topic.INSTANCE_RECEIVED,
        ),
        "radflow-router": (
            RouterSettings.model_fields["group_id"].default,
            Topic.INSTANCE_NORMALIZED,
        ),
    }
    for name, (group, topic) in expected.items():
        scaled = named(objects, "ScaledObject", name)
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "kafka"
        assert trigger["metadata"]["consumerGroup"] == group
        assert trigger["metadata"]["topic"] == topic.value
        assert scaled["spec"]["maxReplicaCount"] <= topics[topic.value]["partitions"]
        assert scaled["spec"]["minReplicaCount"] >= 2, "prod keeps two of each"
    prefix = ForwarderSettings.model_fields["group_prefix"].default
    (trigger,) = named(objects, "ScaledObject", "radflow-stow-forwarder")["spec"]["triggers"]
    assert f'"{prefix}\\\\..+"' in trigger["metadata"]["query"]
    for on_cpu in ("radflow-ingest", "radflow-worklist"):
        assert [t["type"] for t in named(objects, "ScaledObject", on_cpu)["spec"]["triggers"]] == [
            "cpu"
        ], on_cpu
    assert named(objects, "ScaledObject", "radflow-worklist")["spec"]["minReplicaCount"] >= 2


def test_every_radflow_variable_set_is_a_setting_of_a_service(objects: list[Obj]) -> None:
    known = _known_variables()
    used: dict[str, str] = {}
    for config_map in of_kind(objects, "ConfigMap"):
        for key in config_map.get("data", {}):
            if key.startswith("RADFLOW_"):
                used[key] = f"ConfigMap {config_map['metadata']['name']}"
    for deployment in of_kind(objects, "Deployment"):
        for container in _containers(deployment):
            for env in container.get("env", []):
                if env["name"].startswith("RADFLOW_"):
                    used[env["name"]] = f"Deployment {deployment['metadata']['name']}"
    unchecked = set()
    for name, where in sorted(used.items()):
        if name.startswith("RADFLOW_REPORT_RETURN_") and not HAS_REPORT_RETURN:
            unchecked.add(name)
            continue
        assert name in known, f"{where} sets {name}, which no service reads"
    if unchecked:
        print(f"report_return is not installed; not checked: {sorted(unchecked)}")


def test_no_secret_value_is_shipped_outside_the_dev_overlay(
    objects: list[Obj], overlay: str
) -> None:
    secrets = [s["metadata"]["name"] for s in of_kind(objects, "Secret")]
    if overlay == "dev":
        assert sorted(s.rsplit("-", 1)[0] for s in secrets) == ["radflow-order-key", "radflow-s3"]
    else:
        assert secrets == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_rule_files_shipped_are_valid(overlay: str) -> None:
    objects = render(overlay)
    rules = named(objects, "ConfigMap", "radflow-rules")["data"]["rules.yaml"]
    load_text(rules, f"{overlay}/radflow-rules")
    if not HAS_REPORT_RETURN:
        pytest.skip("report_return is not installed: its sites file is not checked")
    from report_return.sites import load_sites_text

    load_sites_text(named(objects, "ConfigMap", "radflow-sites")["data"]["sites.yaml"])


def test_the_dashboard_config_map_is_what_grafana_s_sidecar_loads(objects: list[Obj]) -> None:
    config_map = named(objects, "ConfigMap", "radflow-grafana-dashboards")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = sorted(p.name for p in (K8S / "base/monitoring/dashboards").glob("*.json"))
    assert sorted(config_map["data"]) == shipped
    assert all(len(v.encode()) < 256 * 1024 for v in config_map["data"].values()), (
        "too large for kubectl apply's last-applied annotation"
    )


def test_documented_path_is_the_dev_overlay() -> None:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    assert "kubectl apply -k deploy/k8s/overlays/dev" in guide
