"""Orders steer routing: an instance whose Accession Number (with its issuer) matches an
open order of ``worklist.items`` takes the STAT lane from ingest on when the order is
STAT, and the router's rules see the order's site, priority and procedure. The orders
are produced on the topic directly, as the worklist service writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radflow_core.events import OrderPriority, OrderProcedure
from radflow_core.topics import STAT_LANE, Topic
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.parts import prepare
from radflow_devstack.processes import ManagedProcess
from support.dicom import make_instance, pynetdicom_store
from support.metrics import metric
from support.orders import cancel_now, item, publish_now
from support.orthanc import OrthancView
from support.stack import IngestProcess, Stack, make_stack

pytestmark = pytest.mark.pipeline

LATER = {"wait_ready": False, "wait_port": False}


def ordered(
    tmp_path: Path, study: str, accession: str | None, issuer: str | None = "RIS_A"
) -> tuple[str, Path]:
    """An instance of ``study`` with this Accession Number and issuer."""
    extra: dict[str, object] = {}
    if accession is not None:
        extra["AccessionNumber"] = accession
    if issuer is not None:
        namespace = Dataset()
        namespace.LocalNamespaceEntityID = issuer
        extra["IssuerOfAccessionNumberSequence"] = [namespace]
    uid = generate_uid()
    path = make_instance(
        tmp_path / f"{uid}.dcm", sop_instance_uid=uid, study_instance_uid=study, extra=extra
    )
    return uid, path


def uids(stack: Stack, topic: Topic) -> set[str]:
    return {e["data"]["sop_instance_uid"] for e in stack.events(topic)}


def orders_loaded(*services: IngestProcess) -> bool:
    names = {"ingest": "radflow_ingest_order_table_loaded"}
    return all(
        metric(s.url, names.get(s.proc.name.split("-")[0], "radflow_router_order_table_loaded"))
        == 1
        for s in services
    )


def test_a_stat_order_takes_its_study_through_the_stat_lane_to_the_destination(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"""version: 1
destinations:
  orthanc: {{url: "{orthanc.dicomweb}"}}
rules:
  - name: everything
    route: [orthanc]
default: {{hold: unrouted}}
"""
    )
    cancelled = item("ACC-CANCELLED", priority=OrderPriority.STAT)
    publish_now(
        stack,
        item("ACC-STAT", priority=OrderPriority.STAT),
        item("ACC-ROUTINE"),
        cancelled,
    )
    cancel_now(stack, cancelled)
    ingest = start_ingest(rules_file=str(rules), **LATER)
    router = start_router(rules_file=str(rules), **LATER)
    services = [
        ingest,
        start_transcode(**LATER),
        router,
        start_forwarder(rules_file=str(rules), **LATER),
    ]
    for service in services:
        service.wait_ready()
    wait_for("the orders read", lambda: orders_loaded(ingest, router))

    stat_study, routine_study = generate_uid(), generate_uid()
    stat = [ordered(tmp_path, stat_study, "ACC-STAT") for _ in range(2)]
    routine = [
        ordered(tmp_path, routine_study, "ACC-ROUTINE"),
        ordered(tmp_path, generate_uid(), "ACC-STAT", issuer="RIS_B"),  # another issuer's
        ordered(tmp_path, generate_uid(), "ACC-CANCELLED"),
        ordered(tmp_path, generate_uid(), None, issuer=None),
    ]
    done = storescu(ingest.dimse_port, *(p for _, p in stat + routine), calling_ae="CT1")
    assert done.returncode == 0, done.stderr
    wait_for("every instance delivered", lambda: orthanc.count() == 6, timeout_s=120)

    stat_uids, routine_uids = {u for u, _ in stat}, {u for u, _ in routine}
    for topic in (Topic.INSTANCE_RECEIVED, Topic.INSTANCE_NORMALIZED, Topic.FORWARD_REQUESTED):
        assert uids(stack, topic) == routine_uids, topic
        assert uids(stack, STAT_LANE[topic]) == stat_uids, topic
    assert set(orthanc.sop_instance_uids()) == stat_uids | routine_uids
    assert metric(ingest.url, "radflow_ingest_order_matches_total", lane="stat") == 2
    assert metric(ingest.url, "radflow_ingest_order_matches_total", lane="routine") == 1
    assert metric(router.url, "radflow_router_order_matches_total", lane="stat") == 2
    assert metric(router.url, "radflow_router_order_matches_total", lane="routine") == 1
    # Events name the order by its keyed reference, never by the accession number.
    received = stack.events(Topic.INSTANCE_RECEIVED) + stack.events(Topic.INSTANCE_RECEIVED_STAT)
    refs = {e["data"]["sop_instance_uid"]: e["data"]["order_ref"] for e in received}
    assert len({refs[u] for u in stat_uids}) == 1
    assert [u for u, ref in refs.items() if ref is None] == [routine[-1][0]]
    for topic in Topic:
        assert "ACC-" not in json.dumps(stack.events(topic)), topic


ORDER_RULES = """version: 1
destinations:
  neuro: {url: "http://127.0.0.1:9/neuro"}
  site_b_pacs: {url: "http://127.0.0.1:9/site-b"}
  archive: {url: "http://127.0.0.1:9/archive"}
rules:
  - name: head-ct-to-neuro
    when: {order_procedure_code: CTHEAD, order_procedure_scheme: L}
    route: [neuro]
  - name: site-b-orders
    when: {order_site: site-b}
    route: [site_b_pacs]
  - name: no-order
    when: {order_site: {exists: false}}
    route: [archive]
default: {hold: unrouted}
"""


def destinations(stack: Stack) -> dict[str, set[str]]:
    """SOP Instance UID → the destinations the router requested for it."""
    found: dict[str, set[str]] = {}
    for topic in (Topic.FORWARD_REQUESTED, Topic.FORWARD_REQUESTED_STAT):
        for e in stack.events(topic):
            found.setdefault(e["data"]["sop_instance_uid"], set()).add(e["data"]["destination"])
    return found


def test_rules_route_on_the_order_s_procedure_and_site_and_a_restarted_router_still_knows_them(
    stack: Stack, start_ingest, start_transcode, start_router, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(ORDER_RULES)
    head = OrderProcedure(code="CTHEAD", scheme="L", meaning="CT head")
    cancelled = item("ACC-GONE", site="site-b")
    publish_now(
        stack,
        item("ACC-HEAD", procedure=head),
        item("ACC-B", site="site-b", procedure=OrderProcedure(code="CTCHEST", scheme="L")),
        cancelled,
    )
    cancel_now(stack, cancelled)
    ingest = start_ingest(**LATER)
    router = start_router(rules_file=str(rules), **LATER)
    for service in (ingest, start_transcode(**LATER), router):
        service.wait_ready()
    wait_for("the orders read", lambda: orders_loaded(ingest, router))

    sent = {
        "head": ordered(tmp_path, generate_uid(), "ACC-HEAD"),
        "site-b": ordered(tmp_path, generate_uid(), "ACC-B"),
        "cancelled": ordered(tmp_path, generate_uid(), "ACC-GONE"),
        "other issuer": ordered(tmp_path, generate_uid(), "ACC-HEAD", issuer="RIS_B"),
    }
    for _, path in sent.values():
        assert pynetdicom_store(ingest.dimse_port, path).status == 0
    wait_for("4 instances routed", lambda: len(destinations(stack)) == 4, timeout_s=60)
    routed = destinations(stack)
    assert {name: routed[uid] for name, (uid, _) in sent.items()} == {
        "head": {"neuro"},
        "site-b": {"site_b_pacs"},
        "cancelled": {"archive"},
        "other issuer": {"archive"},
    }

    assert router.proc.stop() == 0
    restarted = start_router(rules_file=str(rules))
    wait_for("the orders read again", lambda: orders_loaded(restarted))
    again, path = ordered(tmp_path, generate_uid(), "ACC-HEAD")
    assert pynetdicom_store(ingest.dimse_port, path).status == 0
    wait_for("routed after the restart", lambda: again in destinations(stack), timeout_s=60)
    assert destinations(stack)[again] == {"neuro"}


def test_with_order_lookup_off_ingest_ignores_orders_and_names_none(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    publish_now(stack, item("ACC-STAT", priority=OrderPriority.STAT))
    ingest = start_ingest(env={"RADFLOW_ORDER_LOOKUP_ENABLED": "false"})
    uid, path = ordered(tmp_path, generate_uid(), "ACC-STAT")
    assert pynetdicom_store(ingest.dimse_port, path).status == 0
    (event,) = stack.events(Topic.INSTANCE_RECEIVED)
    assert event["data"]["sop_instance_uid"] == uid
    assert event["data"]["order_ref"] is None
    assert stack.events(Topic.INSTANCE_RECEIVED_STAT) == []
    assert metric(ingest.url, "radflow_ingest_order_table_loaded") == 0


def test_ingest_receives_while_the_worklist_topic_is_missing_and_takes_it_up_once_it_exists(
    broker: ManagedProcess, s3_server: ManagedProcess, start_ingest, tmp_path: Path
) -> None:
    assert broker.port and s3_server.port
    stack = make_stack(broker.port, s3_server.port, tmp_path)
    prepare(stack.kafka, stack.s3, [stack.topic(t) for t in Topic if t != Topic.WORKLIST_ITEMS])
    ingest = start_ingest(stack_=stack, env={"RADFLOW_ORDER_LOOKUP_RETRY_INTERVAL_S": "0.5"})
    study = generate_uid()
    before, path = ordered(tmp_path, study, "ACC-STAT")
    assert pynetdicom_store(ingest.dimse_port, path).status == 0, "no worklist, still stored"
    assert uids(stack, Topic.INSTANCE_RECEIVED) == {before}
    assert metric(ingest.url, "radflow_ingest_order_table_loaded") == 0

    prepare(stack.kafka, stack.s3, [stack.topic(Topic.WORKLIST_ITEMS)])
    publish_now(stack, item("ACC-STAT", priority=OrderPriority.STAT))
    wait_for(
        "the worklist read",
        lambda: metric(ingest.url, "radflow_ingest_order_items") == 1,
        timeout_s=30,
    )
    after, path = ordered(tmp_path, study, "ACC-STAT")
    assert pynetdicom_store(ingest.dimse_port, path).status == 0
    assert uids(stack, Topic.INSTANCE_RECEIVED_STAT) == {after}
