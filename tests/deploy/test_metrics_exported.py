"""No panel or alert that can never show data: every radflow_* series the dashboard,
the alerts and the autoscalers read is exported by the running services, with the
labels the queries match on.

The services run as real processes on the real broker and S3 (the pipeline fixtures)
and are scraped like Prometheus does. A labelled metric nobody has incremented yet has
no samples but is announced by its # HELP/# TYPE lines, which is what is checked for
the name; its label names come from the collector in the service's code.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from deploy.manifests import (
    K8S,
    alert_queries,
    dashboard_queries,
    dashboards,
    recorded_series,
    render,
    scaler_queries,
    selectors,
)
from radflow_devstack.processes import free_port
from support.stack import IngestProcess

pytestmark = pytest.mark.pipeline

TARGET_LABELS = {"namespace", "pod", "job", "instance", "service", "container", "endpoint"}
"""Labels Prometheus adds to every scraped series (prometheus-operator's defaults)."""
PROMETHEUS_OWN = {"up"}
"""Series Prometheus itself records about each target."""
SERVICE_METRICS = (
    "radflow_core.audit",
    "radflow_core.kafka",
    "radflow_core.blobstore",
    "ingest.metrics",
    "transcode.metrics",
    "router.metrics",
    "stow_forwarder.metrics",
    "ledger.metrics",
    "worklist.metrics",
)
NOT_YET_EXPORTED: dict[str, str] = {}
"""Series a panel reads before the code that exports them is merged: named here so the
gap is visible, and removed when it lands."""
REPORT_RETURN_PREFIX = "radflow_report_return_"
HAS_REPORT_RETURN = importlib.util.find_spec("report_return") is not None

RULES = """version: 1
timezone: UTC
destinations:
  pacs:
    url: http://127.0.0.1:9/dicom-web
    slo: {stat: {within_s: 60, percent: 99}}
rules:
  - name: everything
    route: [pacs]
default:
  hold: unrouted
"""


def queried() -> dict[str, dict[str, set[str]]]:
    """Series name → {where it is used → label names matched there}."""
    objects = render("prod")
    queries = {
        **{
            f"dashboard {k}": v
            for d in dashboards().values()
            for k, v in dashboard_queries(d).items()
        },
        **{f"alert {k}": v for k, v in alert_queries(objects).items()},
        **{f"KEDA {k}": v for k, v in scaler_queries(objects).items()},
    }
    found: dict[str, dict[str, set[str]]] = {}
    for where, expr in queries.items():
        for name, labels in selectors(expr).items():
            found.setdefault(name, {})[where] = labels
    return found


def exposed(text: str) -> dict[str, tuple[str, set[str]]]:
    """Series names a /metrics page makes available → (family type, label names seen)."""
    out: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            names = [f"{family.name}_total"]
        elif family.type == "histogram":
            names = [f"{family.name}{s}" for s in ("_bucket", "_sum", "_count")]
        else:
            names = [family.name]
        for name in names:
            labels = {k for s in family.samples if s.name == name for k in s.labels}
            out[name] = (family.type, labels)
    return out


def declared_labels() -> dict[str, set[str]]:
    """Series name → label names, from the collectors the services' code registers."""
    for module in SERVICE_METRICS:
        importlib.import_module(module)
    if HAS_REPORT_RETURN:
        import_report_return()
    labels: dict[str, set[str]] = {}
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:
            labels[name] = set(getattr(collector, "_labelnames", ()))
            if name.endswith("_bucket"):
                labels[name].add("le")
    return labels


def import_report_return() -> None:
    """Import every module of report-return, registering its collectors here."""
    package = importlib.import_module("report_return")
    for module in pkgutil.walk_packages(package.__path__, "report_return."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)


def report_return_in_process() -> dict[str, tuple[str, set[str]]]:
    """report-return's series, from the collectors its code registers."""
    import_report_return()
    found = {}
    for collector, names in REGISTRY._collector_to_names.items():
        for name in names:
            if name.startswith(REPORT_RETURN_PREFIX):
                found[name] = (type(collector).__name__.lower(), set())
    return found


@pytest.fixture
def running(
    start_ingest,
    start_transcode,
    start_router,
    start_forwarder,
    start_ledger,
    start_worklist,
    tmp_path: Path,
) -> list[IngestProcess]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    sites = K8S / "base" / "config" / "worklist-sites.yaml"  # the one the deployment ships
    return [
        start_worklist(
            sites_file=str(sites), mllp_port=str(free_port()), dimse_port=str(free_port())
        ),
        start_ingest(),
        start_transcode(),
        start_router(rules_file=str(rules)),
        start_forwarder(rules_file=str(rules)),
        start_ledger(),
    ]


def test_every_series_the_dashboard_alerts_and_autoscalers_read_is_exported(
    running: list[IngestProcess], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    available: dict[str, tuple[str, set[str]]] = {}
    for service in running:
        page = httpx.get(f"{service.url}/metrics", timeout=10)
        assert page.status_code == 200, service.proc.name
        for name, (kind, labels) in exposed(page.text).items():
            available.setdefault(name, (kind, set()))[1].update(labels)
    how = "not checked (services/report-return is not installed)"
    if HAS_REPORT_RETURN:
        try:
            starter: Any = request.getfixturevalue("start_report_return")
        except pytest.FixtureLookupError:
            available.update(report_return_in_process())
            how = "checked in its code (no start_report_return fixture to run it)"
        else:
            sites = tmp_path / "sites.yaml"  # the sites file the deployment ships
            sites.write_text((K8S / "base" / "config" / "sites.yaml").read_text())
            service = starter(sites_file=str(sites), rules_file=str(tmp_path / "rules.yaml"))
            page = httpx.get(f"{service.url}/metrics", timeout=10)
            available.update(exposed(page.text))
            how = "checked on the running service"
    labels = declared_labels()
    recorded = recorded_series(render("prod"))

    unchecked = []
    for name, uses in sorted(queried().items()):
        if name in PROMETHEUS_OWN or name in NOT_YET_EXPORTED:
            continue
        if name in recorded:  # its own expression is checked as an alert query
            for where, used in uses.items():
                missing = used - recorded[name]
                assert not missing, f"{where} matches {name} on {missing}, which it lacks"
            continue
        if name.startswith(REPORT_RETURN_PREFIX) and not HAS_REPORT_RETURN:
            unchecked.append(name)
            continue
        assert name in available, f"{name} is read by {sorted(uses)} but no service exports it"
        known = labels.get(name, set()) | available[name][1] | TARGET_LABELS
        for where, used in uses.items():
            assert used <= known, f"{where} matches {name} on {used - known}, which it lacks"
    print(f"report-return metrics {how}: {unchecked or 'all'}")
    assert NOT_YET_EXPORTED.keys().isdisjoint(available), "exported now: drop it from the list"


def test_the_check_sees_a_metric_that_no_service_exports() -> None:
    page = "# HELP radflow_real_total x\n# TYPE radflow_real_total counter\n"
    available = exposed(page)
    assert "radflow_real_total" in available
    assert "radflow_real" not in available
    assert "radflow_imaginary_total" not in available
