"""The monitoring as shipped, against a real Prometheus scraping the real pipeline.

One run of every service on the real broker, S3 server, Orthanc and a stand-in RIS,
scraped by the Debian package's Prometheus with the rules of
deploy/k8s/base/monitoring/alerts.yaml (every ``for:`` capped at a few seconds, the
expressions as shipped):

1. every service is a scrape target, and up;
2. a healthy run (C-STORE and STOW-RS, transcoding, routing to Orthanc in both lanes,
   a Structured Report returned to the RIS) raises no alert, not even pending;
3. faults then give every panel something to draw: a broken instance (dead letter),
   an unknown calling AE, a STOW-RS request without credentials, an instance no rule
   routes, a RIS that answers AE and AR, a replayed delivery, Orthanc stopped (retries,
   circuit open, deliveries failing) and the S3 server stopped (ingest refusing);
   each raises the alerts written for it, firing, with its labels;
4. at the end every PromQL expression of the Grafana dashboard (panels and template
   variables) and every KEDA trigger query has data over the run, and the panels
   meant to show those faults draw them as more than 0.

About 90 s on two cores: scrapes and rule evaluations every second, alerts' ``for:``
capped at 3 s, a 15 s retry budget for the forwarder; every wait polls the API.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from deploy.manifests import K8S, dashboard_queries, dashboards, render, scaler_queries
from radflow_core.events import ForwardRequested
from radflow_core.settings import KafkaSettings, S3Settings
from radflow_core.topics import Topic
from radflow_devstack.__main__ import local_env
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer, Reply
from radflow_devstack.parts import http_status, prepare, start_broker, start_s3
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_devstack.prometheus import PrometheusApi, plain_rules, start_prometheus
from support.dicom import bundled_file, make_instance, pynetdicom_store
from support.forward import publish
from support.orthanc import OrthancView
from support.reports import make_sr, write_sites
from support.stack import IngestProcess, Stack
from support.stow import stow

pytestmark = pytest.mark.pipeline

ALERTS_FILE = K8S / "base" / "monitoring" / "alerts.yaml"
SCRAPE_S = 1.0
"""Scrape and rule evaluation interval: a state change is seen within a second."""
FOR_CAP_S = 3.0
"""Every alert's ``for:`` capped to this: long enough that a one-evaluation blip
would show as pending (and be caught), short enough to see firing in seconds."""
RATE_INTERVAL = "1m"
"""Grafana's $__rate_interval: at least four scrapes (here 1 s; 2 min at 30 s)."""
SERVICES = ("ingest", "transcode", "router", "stow-forwarder", "report-return", "ledger")
SITE = "local-ris"
HEALTHY_DELIVERIES = 7
"""Instances of the healthy traffic that go to Orthanc (the report too)."""
IMAGE_PEERS = "STORESCU,PYSCU,RAWSCU"
"""Calling AE titles ingest accepts; any other is refused (associations_rejected)."""

RULES = """\
version: 1
timezone: UTC
destinations:
  orthanc:
    url: {orthanc}/dicom-web
    verify: qido
    slo:
      routine: {{within_s: 600, percent: 99}}
      stat: {{within_s: 120, percent: 99}}
  ris:
    kind: report-return
    site: {site}
stat:
  from_priority: true
rules:
  - name: reports-to-the-ris
    when: {{modality: SR}}
    route: [ris]
    continue: true
  - name: images-to-orthanc
    when: {{modality: {{in: [CT, MR, SR]}}}}
    route: [orthanc]
default:
  hold: "no rule matched"
"""

NO_DATA_IN_ONE_NODE_RUN: dict[str, str] = {}
"""Dashboard or KEDA queries that cannot have data in this run, with the reason."""

SHOWS_THE_FAULTS = (
    "Dead letters (1h) / A",
    "Dead letters by reason / A",
    "Dead letters by reason / B",
    "Dead letters by reason / C",
    "Open circuits / A",
    "Circuit breaker by destination / A",
    "Delivery retries by destination and cause / A",
    "Ingest failures by status / A",
    "Ingest failures by status / C",
    "Reports sent and retried by site / B",
    "$destination: deliveries and failures / s / B",
)
"""Panels that must draw this run's faults as more than 0. A counter with labels
appears with its first increment, which increase() and rate() cannot see: a lone dead
letter drew 0 until the dead-letter panels counted series that did not exist a window
ago (as the alerts do), and the services now export the label sets they know in
advance (refusal reasons, a site's ACK codes and retries, a destination's failure
reasons) at 0. Not listed: "Ingest failures by status / B" (STOW-RS requests by HTTP
status, which cannot be known in advance), which draws a lone 401 as 0."""


# --- the parts --------------------------------------------------------------------


def deployment_stack(broker_port: int, s3_port: int, log_dir: Path) -> Stack:
    """Topic and group names exactly as deployed (no test prefix: the dashboard and
    KEDA select groups by name), on this test's own broker and S3 server."""
    env = local_env(broker_port, s3_port)
    env["RADFLOW_KAFKA_ACK_TIMEOUT_S"] = "5"
    return Stack(
        env=env, kafka=KafkaSettings.from_env(env), s3=S3Settings.from_env(env), log_dir=log_dir
    )


@pytest.fixture
def own_parts(tmp_path: Path) -> Iterator[tuple[ManagedProcess, ManagedProcess]]:
    """A broker and an S3 server for this test alone: it stops the S3 server."""
    broker = start_broker(free_port(), tmp_path)
    s3 = start_s3(free_port(), tmp_path, name="own-s3")
    yield broker, s3
    s3.stop()
    broker.stop()


@pytest.fixture
def ris() -> Iterator[MllpPeer]:
    peer = MllpPeer().start()
    yield peer
    peer.stop()


@dataclass
class Run:
    """The running pipeline, its parts, and the Prometheus that watches it."""

    stack: Stack
    api: PrometheusApi
    services: dict[str, IngestProcess]
    orthanc: ManagedProcess
    s3: ManagedProcess
    ris: MllpPeer
    started_at: float = field(default_factory=time.time)

    @property
    def ingest(self) -> IngestProcess:
        return self.services["ingest"]

    def delivered(self) -> list[ForwardRequested]:
        """The forward requests for Orthanc so far (to read one again)."""
        return [
            ForwardRequested.model_validate(e["data"])
            for e in self.stack.events(Topic.FORWARD_REQUESTED)
            if e["data"]["destination"] == "orthanc"
        ]

    def value(self, expr: str) -> float:
        """The sum of an instant query's values (0 without a result)."""
        return sum(float(r["value"][1]) for r in self.api.query(expr))

    def scraped(self, expr: str, expected: float, timeout_s: float = 60) -> None:
        """Wait until Prometheus has scraped ``expr`` reaching ``expected``."""
        wait_for(
            f"Prometheus to see {expr} >= {expected}",
            lambda: self.value(expr) >= expected,
            timeout_s=timeout_s,
            every_s=0.5,
        )

    def evaluated_after(self, moment: float) -> None:
        """Wait until every rule group has been evaluated after ``moment``."""
        wait_for("the rules evaluated", lambda: self.api.evaluated_after(moment), 30, every_s=0.5)

    def firing_now(self, alertname: str, **labels: str) -> dict[str, Any] | None:
        """``alertname`` with ``labels`` if it is firing now."""
        alert: dict[str, Any]
        for alert in self.api.alerts():
            if (
                alert["labels"].get("alertname") == alertname
                and alert["state"] == "firing"
                and labels.items() <= alert["labels"].items()
            ):
                return alert
        return None

    def firing(self, alertname: str, timeout_s: float = 90, **labels: str) -> dict[str, Any]:
        """Wait for ``alertname`` firing with ``labels``; return it."""
        alert: dict[str, Any] | None = wait_for(
            f"{alertname} {labels} firing",
            lambda: self.firing_now(alertname, **labels),
            timeout_s=timeout_s,
            every_s=0.5,
        )
        assert alert is not None
        return alert

    def waiting(self) -> list[dict[str, str]]:
        """What RadflowDependencyWaiting's expression sees waiting, at any age: its
        900 s threshold is in the expression (not a ``for:``), which is kept as
        shipped but for that number."""
        (rule,) = [
            r
            for g in plain_rules(ALERTS_FILE)["groups"]
            for r in g["rules"]
            if r.get("alert") == "RadflowDependencyWaiting"
        ]
        expr, replaced = re.subn(r">\s*900\s*$", "> 0", rule["expr"].strip())
        assert replaced == 1, f"RadflowDependencyWaiting changed: {rule['expr']}"
        return [
            {"group": r["metric"]["group"], "reason": r["metric"]["reason"]}
            for r in self.api.query(expr)
        ]

    def sees_waiting(self, group: str, reason: str) -> None:
        wait_for(
            f"RadflowDependencyWaiting's expression to see {group} wait ({reason})",
            lambda: {"group": group, "reason": reason} in self.waiting(),
            timeout_s=30,
            every_s=0.5,
        )


@pytest.fixture
def run(
    own_parts: tuple[ManagedProcess, ManagedProcess],
    ris: MllpPeer,
    start_ingest: Callable[..., IngestProcess],
    start_transcode: Callable[..., IngestProcess],
    start_router: Callable[..., IngestProcess],
    start_forwarder: Callable[..., IngestProcess],
    start_report_return: Callable[..., IngestProcess],
    start_ledger: Callable[..., IngestProcess],
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> Iterator[Run]:
    broker, s3 = own_parts
    assert broker.port and s3.port
    stack = deployment_stack(broker.port, s3.port, tmp_path)
    prepare(stack.kafka, stack.s3, [t.value for t in Topic])
    orthanc = start_orthanc_server()
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.format(orthanc=f"http://127.0.0.1:{orthanc.port}", site=SITE))
    sites = write_sites(
        tmp_path / "sites.yaml", {SITE: {"host": "127.0.0.1", "port": ris.port, "ack_timeout_s": 5}}
    )
    later: dict[str, Any] = {"stack_": stack, "wait_ready": False, "wait_port": False}
    services = {
        "ingest": start_ingest(allowed_peers=IMAGE_PEERS, rules_file=str(rules), **later),
        "transcode": start_transcode(**later),
        "router": start_router(rules_file=str(rules), **later),
        "stow-forwarder": start_forwarder(
            rules_file=str(rules),
            # Orthanc down: the circuit opens after two failures and each request
            # gives up (dicom.forward.failed, retries_exhausted) after 15 s.
            breaker_failures="2",
            breaker_cooldown_s="2",
            retry_budget_s="15",
            **later,
        ),
        "report-return": start_report_return(
            sites_file=str(sites), rules_file=str(rules), retry_initial_s="0.2", **later
        ),
        "ledger": start_ledger(**later),
    }
    for service in services.values():
        service.wait_ready()
    prometheus = start_prometheus(
        free_port(),
        {name: int(s.url.rsplit(":", 1)[1]) for name, s in services.items()},
        tmp_path,
        rules=plain_rules(ALERTS_FILE, max_for_s=FOR_CAP_S),
        scrape_interval_s=SCRAPE_S,
    )
    try:
        api = PrometheusApi(f"http://127.0.0.1:{prometheus.port}")
        yield Run(stack, api, services, orthanc, s3, ris)
    finally:
        prometheus.stop()


# --- what is sent -----------------------------------------------------------------


def fresh_copy(name: str, path: Path) -> Path:
    """A bundled file as a new instance of a new study (its pixel data untouched)."""
    ds = pydicom.dcmread(bundled_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.save_as(path)
    return path


def refused_association(port: int) -> bool:
    """An association from a calling AE ingest does not allow; True if refused."""
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW")
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return bool(assoc.is_rejected) and not established


def send_first_instance(live: Run) -> None:
    sent = storescu(live.ingest.dimse_port, bundled_file("CT_small.dcm"), ts="1.2.840.10008.1.2.1")
    assert sent.returncode == 0, sent.stderr


def send_healthy_traffic(live: Run, tmp_path: Path) -> int:
    """After the first instance: C-STORE (DCMTK and pynetdicom, routine and STAT),
    STOW-RS, a compressed image to transcode and a verified Structured Report; returns
    how many instances (the first one included) go to Orthanc."""
    port = live.ingest.dimse_port
    sent = storescu(port, bundled_file("MR_small.dcm"))
    assert sent.returncode == 0, sent.stderr
    compressed = fresh_copy("MR_small_RLE.dcm", tmp_path / "rle.dcm")
    assert pynetdicom_store(port, compressed).status == 0
    stat = make_instance(tmp_path / "stat.dcm")
    assert pynetdicom_store(port, stat, priority="high").status == 0
    parts = [make_instance(tmp_path / f"stow-{i}.dcm").read_bytes() for i in range(2)]
    answer = stow(live.ingest.stow_url, parts)
    assert answer.status_code == 200, answer.text
    report = make_sr(tmp_path / "report.dcm", findings=["Lungs clear."], impression=["Normal."])
    assert pynetdicom_store(port, report).status == 0
    return HEALTHY_DELIVERIES


# --- the checks -------------------------------------------------------------------


def substituted(expr: str, destination: str) -> str:
    """A dashboard expression as Grafana sends it: $namespace is the one namespace its
    variable finds (radflow), a repeated row's $destination the row's destination, a
    multi-value $destination (=~) its "All" value, $__rate_interval a minute."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", "radflow")
    expr = re.sub(r'destination=~"\$destination"', 'destination=~".*"', expr)
    return expr.replace("$destination", destination)


def drawn(api: PrometheusApi, expr: str, start: float) -> list[float]:
    """The numbers (not NaN) ``expr`` has between ``start`` and now, as a panel over
    that time range would draw them."""
    series = api.query_range(expr, start, time.time(), step_s=SCRAPE_S)
    values = (float(v) for s in series for _, v in s["values"])
    return [v for v in values if not math.isnan(v)]


def without_fallback(expr: str) -> str:
    """A KEDA query without its trailing ``or vector(0)`` (which always has data)."""
    return re.sub(r"\)\s*or\s+vector\(0\)\s*$", ")", expr.strip())


def test_the_shipped_monitoring_sees_a_healthy_run_quiet_and_every_fault(
    run: Run, tmp_path: Path
) -> None:
    every_service_is_a_target_and_up(run)
    a_healthy_run_raises_no_alert(run, tmp_path)
    faults_fire_their_alerts(run, tmp_path)
    a_destination_down_fires_its_alerts(run, tmp_path)
    s3_down_fires_its_alerts(run, tmp_path)
    every_dashboard_and_keda_query_has_data(run)


def every_service_is_a_target_and_up(live: Run) -> None:
    def all_up() -> list[dict[str, Any]]:
        targets = live.api.targets()
        return targets if sum(t["health"] == "up" for t in targets) == len(SERVICES) else []

    targets = wait_for("every target up", all_up, timeout_s=30, every_s=0.5)
    assert sorted(t["labels"]["job"] for t in targets) == sorted(f"radflow-{s}" for s in SERVICES)
    assert {t["labels"]["namespace"] for t in targets} == {"radflow"}


def a_healthy_run_raises_no_alert(live: Run, tmp_path: Path) -> None:
    """Nothing pending or firing from the first instance received, through the
    traffic, until every rule was evaluated long enough after it for a pending alert
    to fire.

    Before the first instance one alert is rightly pending on working days:
    RadflowNoInstancesReceived (nothing stored in the last hour). It needs that
    history, so the check starts once Prometheus has seen the first instance stored
    and evaluated the rules on it.
    """
    send_first_instance(live)
    live.scraped('sum(radflow_ingest_instances_total{outcome="stored"})', 1)
    quiet_from = time.time() + 2 * SCRAPE_S
    live.evaluated_after(quiet_from)
    expected = send_healthy_traffic(live, tmp_path)
    orthanc = OrthancView(live.orthanc)
    wait_for("every image in Orthanc", lambda: orthanc.count() == expected, timeout_s=90)
    wait_for("the report at the RIS", lambda: len(live.ris.received) == 1, timeout_s=60)
    live.scraped("sum(radflow_forwarder_delivered_total)", expected)
    live.scraped("sum(radflow_forwarder_verified_total)", expected)
    live.scraped("sum(radflow_report_return_acks_total)", 1)
    live.evaluated_after(time.time() + FOR_CAP_S + 3 * SCRAPE_S)
    raised = live.api.query_range("ALERTS", quiet_from, time.time(), step_s=SCRAPE_S)
    alerts = sorted({f"{s['metric']['alertname']} {s['metric']}" for s in raised})
    assert alerts == [], "alerts on a healthy run"


def faults_fire_their_alerts(live: Run, tmp_path: Path) -> None:
    """A broken instance, an unknown calling AE, STOW-RS without credentials, an
    invalid instance, one no rule routes, a RIS answering AE then AR, a delivery read
    again."""
    port = live.ingest.dimse_port
    broken = fresh_copy("JPEG-lossy.dcm", tmp_path / "broken.dcm")  # undecodable pixels
    assert pynetdicom_store(port, broken).status == 0
    assert refused_association(port)
    unauthenticated = stow(
        live.ingest.stow_url, [make_instance(tmp_path / "u.dcm").read_bytes()], authorization=None
    )
    assert unauthenticated.status_code == 401
    invalid = make_instance(tmp_path / "invalid.dcm", omit=("StudyInstanceUID",))
    assert pynetdicom_store(port, invalid).status != 0
    held = make_instance(tmp_path / "held.dcm", modality="OT")  # no rule routes OT
    assert pynetdicom_store(port, held).status == 0
    live.ris.answers.extend([Reply("AE"), Reply("AA")])  # retried once, then accepted
    retried = make_sr(tmp_path / "retried.dcm", findings=["x"], impression=["y"])
    assert pynetdicom_store(port, retried).status == 0
    wait_for("the report retried", lambda: len(live.ris.received) == 3, timeout_s=60)
    live.ris.answers.append(Reply("AR"))  # refused
    refused = make_sr(tmp_path / "refused.dcm", findings=["x"], impression=["y"])
    assert pynetdicom_store(port, refused).status == 0
    publish(live.stack, live.delivered()[:1])  # read again, as after a rebalance

    live.firing("RadflowDeadLettersGrowing", reason="undecodable_pixel_data", namespace="radflow")
    live.firing("RadflowIngestAssociationsRejected", reason="calling_ae_not_allowed")
    live.firing("RadflowInstancesHeld", namespace="radflow")
    live.firing("RadflowReportAckFailures", site=SITE, code="AE", severity="warning")
    live.firing("RadflowReportAckFailures", site=SITE, code="AR")
    live.firing("RadflowReportsFailing", site=SITE, reason="rejected")
    live.scraped("sum(radflow_forwarder_already_delivered_total)", 1)


def a_destination_down_fires_its_alerts(live: Run, tmp_path: Path) -> None:
    """Orthanc stopped while instances are routed to it: waiting, circuit open, then
    failed when the (shortened) retry budget is spent. Stopped once what it holds is
    verified: a verification without answer holds its fetch for its whole window."""
    live.scraped("sum(radflow_forwarder_delivered_total)", HEALTHY_DELIVERIES + 2)
    wait_for(
        "every delivery verified",
        lambda: (  # a delivery read again is verified again
            live.value("sum(radflow_forwarder_verified_total)")
            >= live.value(
                "sum(radflow_forwarder_delivered_total)"
                " + sum(radflow_forwarder_already_delivered_total)"
            )
        ),
        timeout_s=60,
        every_s=0.5,
    )
    live.orthanc.stop()
    for i in range(3):
        down = make_instance(tmp_path / f"down-{i}.dcm")
        assert pynetdicom_store(live.ingest.dimse_port, down).status == 0
    live.sees_waiting("radflow-forwarder.orthanc.routine", "destination_unavailable")
    live.firing("RadflowCircuitOpen", destination="orthanc", namespace="radflow")
    live.firing("RadflowDeliveriesFailing", destination="orthanc", reason="retries_exhausted")
    live.orthanc.start()
    url = f"http://127.0.0.1:{live.orthanc.port}/"
    live.orthanc.wait_until(lambda: http_status(url) == 200, 60)


def s3_down_fires_its_alerts(live: Run, tmp_path: Path) -> None:
    """The S3 server stopped while instances arrive (ingest refuses them) and while the
    forwarder reads a request again (it asks S3 whether it was delivered)."""
    live.s3.stop()
    again = live.delivered()[1]
    publish(live.stack, [again])
    sent = iter(range(1000))

    def refused_and_alerted() -> dict[str, Any] | None:
        path = make_instance(tmp_path / f"no-s3-{next(sent)}.dcm")
        assert pynetdicom_store(live.ingest.dimse_port, path).status != 0, "stored without S3"
        return live.firing_now("RadflowIngestRejecting", namespace="radflow", severity="critical")

    wait_for("RadflowIngestRejecting firing", refused_and_alerted, timeout_s=90, every_s=0.5)
    live.sees_waiting(f"radflow-forwarder.orthanc.{again.lane.value}", "blob_store_unavailable")
    live.s3.start()
    live.s3.wait_until(live.s3.answers, 30)
    wait_for("every consumer back at work", lambda: live.waiting() == [], timeout_s=60, every_s=0.5)


def every_dashboard_and_keda_query_has_data(live: Run) -> None:
    """Over the run, as a panel over that time range would draw it; the repeated row
    once per destination its variable finds."""
    variables = {
        where: expr
        for board in dashboards().values()
        for where, expr in dashboard_queries(board).items()
        if where.startswith("variable ")
    }
    namespaces = {r["metric"]["namespace"] for r in live.api.query(variables["variable namespace"])}
    assert namespaces == {"radflow"}
    destinations = sorted(
        {
            r["metric"]["destination"]
            for r in live.api.query(
                variables["variable destination"].replace("$namespace", "radflow")
            )
        }
    )
    assert destinations == ["orthanc"]
    empty, zero = [], []
    for board in dashboards().values():
        for where, expr in dashboard_queries(board).items():
            if where in NO_DATA_IN_ONE_NODE_RUN:
                continue
            for destination in destinations if "$destination" in expr else [""]:
                query = substituted(expr, destination)
                values = drawn(live.api, query, live.started_at)
                if not values:
                    empty.append(f"dashboard {where}: {query}")
                elif where in SHOWS_THE_FAULTS and max(values) <= 0:
                    zero.append(f"dashboard {where}: {query}")
    for where, expr in scaler_queries(render("prod")).items():
        for query in (expr, without_fallback(expr)):
            if where not in NO_DATA_IN_ONE_NODE_RUN and not drawn(live.api, query, live.started_at):
                empty.append(f"KEDA {where}: {query}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    assert zero == [], "panels that drew the faults of this run as 0:\n" + "\n".join(zero)
