"""De-identification as a routing action, with real parts: the router routes two
studies of one patient to two Orthancs, one through a de-identifying rule; the
forwarder de-identifies just before delivering there (and verifies by QIDO-RS, asking
about the remapped UIDs), delivers the originals unchanged to the other, and refuses
an instance with burned-in annotation for the de-identified route only."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from lxml import etree
from pydicom.uid import generate_uid

from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.events import (
    DecodeStatus,
    Deidentification,
    DeidOption,
    InstanceNormalized,
    Protocol,
    Sender,
    encode,
    wrap,
)
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import dimse_destination, write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_rules.loader import load_file
from router.routing import idempotency_key
from stow_forwarder.deidentify import Deidentifier
from stow_forwarder.markers import MarkerBook
from stow_forwarder.pseudonyms import Pseudonyms
from support.audit import audit_records, participant_ids
from support.deid import every_element, leftovers, rich, write
from support.forward import publish, stored
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import Stack

pytestmark = pytest.mark.pipeline

KEY = "pipeline-test-pseudonym-key"
AUDIT_SCHEMA = etree.RelaxNG(
    etree.parse(str(Path(__file__).parents[1] / "audit" / "dicom-audit-message.rng"))
)
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def normalized(stack: Stack, files: Sequence[Path]) -> None:
    """Store each file and announce it on dicom.instance.normalized, as transcode does
    for an instance already in its canonical syntax."""

    async def run() -> None:
        blobs = BlobStore(stack.s3)
        producer = EventProducer(stack.kafka, "test-transcode")
        await producer.start()
        try:
            for path in files:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                hashed = HashedFile.from_bytes(path.read_bytes())
                key = content_key("original", ds.StudyInstanceUID, hashed.sha256)
                stored = await blobs.put_file(key, hashed, "original", check_existing=False)
                now = datetime.now(UTC)
                event = InstanceNormalized(
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    study_instance_uid=ds.StudyInstanceUID,
                    series_instance_uid=ds.SeriesInstanceUID,
                    modality=ds.Modality,
                    sender=Sender(protocol=Protocol.DIMSE, calling_ae="CT1"),
                    received_at=now,
                    original=stored.ref,
                    original_transfer_syntax_uid=EXPLICIT_LE,
                    canonical=stored.ref,
                    canonical_transfer_syntax_uid=EXPLICIT_LE,
                    decode_status=DecodeStatus.ALREADY_CANONICAL,
                    normalized_at=now,
                )
                await producer.send(
                    stack.topic(Topic.INSTANCE_NORMALIZED), event.key, encode(wrap(event, "test"))
                )
        finally:
            await producer.stop()
            blobs.close()

    asyncio.run(run())


def data(stack: Stack, topic: Topic) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(topic)]


def test_one_route_gets_consistent_pseudonyms_and_the_other_the_originals_unchanged(
    stack: Stack,
    start_router,
    start_forwarder,
    start_orthanc_server,
    tmp_path: Path,
) -> None:
    plain: ManagedProcess = start_orthanc_server()
    research_server: ManagedProcess = start_orthanc_server()
    pacs, research = OrthancView(plain), OrthancView(research_server)
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "pacs": f"url: {pacs.dicomweb}",
            "research": f"url: {research.dicomweb}\nverify: qido",
        },
        rules=(
            "deidentification:\n"
            "  longitudinal:\n"
            "    options: [retain_longitudinal_modified_dates]\n"
            "rules:\n"
            "  - name: everything\n"
            "    route: [pacs]\n"
            "    continue: true\n"
            "  - name: to-research\n"
            "    route: [research]\n"
            "    deidentify: longitudinal\n"
            "default: {hold: unrouted}\n"
        ),
    )
    router = start_router(rules_file=str(rules), wait_ready=False, wait_port=False)
    forwarder = start_forwarder(
        rules_file=str(rules),
        verify_delay_s="0.2",
        env={"RADFLOW_DEID_KEY": KEY, "RADFLOW_AUDIT_TRANSFER_WINDOW_S": "0.5"},
    )
    router.wait_ready()
    # Two studies of one patient; the second instance of each refers to the first.
    originals: list[Path] = []
    for study_index in range(2):
        study, series = generate_uid(), generate_uid()
        first = rich("PID-SAME", study=study, series=series)
        second = rich("PID-SAME", study=study, series=series, source=first.SOPInstanceUID)
        originals.append(write(first, tmp_path / f"s{study_index}-1.dcm"))
        originals.append(write(second, tmp_path / f"s{study_index}-2.dcm"))
    burned = rich("PID-SAME", study=generate_uid())
    burned.BurnedInAnnotation = "YES"
    burned_path = write(burned, tmp_path / "burned.dcm")
    started = datetime.now(UTC)
    normalized(stack, [*originals, burned_path])

    wait_for("both Orthancs to fill", lambda: pacs.count() == 5 and research.count() == 4, 30)
    wait_for("QIDO-RS verification", lambda: len(data(stack, Topic.FORWARD_VERIFIED)) == 4, 30)
    elapsed = (datetime.now(UTC) - started).total_seconds()

    # The plain destination received the originals byte for byte.
    for path in [*originals, burned_path]:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert pacs.file(uid) == path.read_bytes()

    # The de-identifying one: nothing of the profile's list, pseudonyms, consistent UIDs.
    pseudonyms = Pseudonyms(KEY.encode())
    source = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: pydicom.dcmread(p)
        for p in originals
    }
    original_uids = {
        e.value for ds in source.values() for e in every_element(ds) if e.VR == "UI"
    } - {"1.2.840.10008.5.1.4.1.1.2"}
    received = {
        uid: pydicom.dcmread(io.BytesIO(research.file(uid))) for uid in research.sop_instance_uids()
    }
    assert set(received) == {pseudonyms.uid(uid) for uid in source}
    patients = set()
    for original_uid, original in source.items():
        ds = received[pseudonyms.uid(original_uid)]
        assert leftovers(ds, frozenset({DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES})) == []
        assert ds.PatientIdentityRemoved == "YES"
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert ds.StudyInstanceUID == pseudonyms.uid(original.StudyInstanceUID)
        assert ds.SeriesInstanceUID == pseudonyms.uid(original.SeriesInstanceUID)
        reference = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert reference == pseudonyms.uid(original.SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert not original_uids & {e.value for e in every_element(ds) if e.VR == "UI"}
        assert ds.StudyDate != original.StudyDate and len(ds.StudyDate) == 8
        assert ds.PixelData == original.PixelData
        patients.add((str(ds.PatientName), ds.PatientID, ds.StudyDate))
    # not one identifying value of the originals is anywhere in the bytes received
    identifying = [
        b"Doe^Jane",
        b"PID-SAME",
        b"HOSP",
        b"ACC123",
        b"19700101",
        b"General Hospital",
        b"1 Main Street",
        b"Who^Doctor",
        b"Tech^One",
        b"CT01",
        b"SN-998877",
        b"Jane Doe",
        b"anxious",
        b"Smith^John",
        b"PRIVATE NAME",
        b"HOSPITALPACS",
        b"OTHER-1",
        *(uid.encode() for uid in original_uids),
    ]
    for uid in received:
        raw = research.file(uid)
        assert [v for v in identifying if v in raw] == []
    # one patient in two studies: one pseudonym, one date offset
    assert len(patients) == 1 and "PID-SAME" not in next(iter(patients))[1]
    # references inside a study resolve to instances the destination holds
    for ds in received.values():
        reference = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        if reference in {pseudonyms.uid(u) for u in source}:
            assert reference in received

    (refused,) = data(stack, Topic.FORWARD_FAILED)
    assert refused["destination"] == "research"
    assert refused["sop_instance_uid"] == burned.SOPInstanceUID
    assert refused["reason"] == "burned_in_annotation"
    assert "(0028,0301) is YES" in refused["message"]
    requests = data(stack, Topic.FORWARD_REQUESTED)
    to_research = [r for r in requests if r["destination"] == "research"]
    assert {r["deidentify"]["profile"] for r in to_research} == {"longitudinal"}
    assert all(r["deidentify"] is None for r in requests if r["destination"] == "pacs")

    ops = f"http://127.0.0.1:{forwarder.http_port}"
    assert (
        metric(
            ops,
            "radflow_forwarder_deidentified_total",
            destination="research",
            profile="longitudinal",
        )
        == 4
    )
    refused_count = metric(
        ops,
        "radflow_forwarder_deidentify_refused_total",
        destination="research",
        profile="longitudinal",
        reason="burned_in_annotation",
    )
    assert refused_count == 1

    # The audit trail says which transfers were de-identified, and how (valid PS3.15 A.5).
    def transfers() -> dict[str, list[Any]] | None:
        found: dict[str, list[Any]] = {"pacs": [], "research": []}
        for record in audit_records(stack, "110104"):
            for name in found.keys() & participant_ids(record):
                found[name].append(etree.fromstring(record["message"].encode()))
        return found if all(found.values()) else None

    audited = wait_for("the transfers audited", transfers, every_s=0.5)
    for message in audited["pacs"] + audited["research"]:
        AUDIT_SCHEMA.assertValid(message)
    for message in audited["research"]:
        (study,) = [
            o
            for o in message.iter("ParticipantObjectIdentification")
            if o.find(".//SOPClass") is not None
        ]
        assert study.findtext("ParticipantObjectDescription/Anonymized") == "true"
        detail = study.find("ParticipantObjectDetail")
        assert detail.get("type") == "Deidentified"
        assert base64.b64decode(detail.get("value")) == b"longitudinal"
    for message in audited["pacs"]:
        assert not list(message.iter("Anonymized"))
    print(f"two studies to two destinations, one de-identified and verified: {elapsed:.1f}s")


def test_after_an_interrupted_send_the_destination_is_asked_about_the_remapped_uids(
    stack: Stack,
    start_forwarder,
    start_orthanc_server,
    tmp_path: Path,
) -> None:
    """A crashed process left the batch's marker at ``sending`` after the destination
    had stored two of its three de-identified instances: the next process asks the
    destination about the remapped UIDs, records those two as delivered without
    sending them again, and sends the third."""
    research = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"research": f"url: {research.dicomweb}"},
        rules=(
            "deidentification:\n"
            "  basic:\n"
            "rules:\n"
            "  - name: everything\n"
            "    route: [research]\n"
            "    deidentify: basic\n"
            "default: {hold: unrouted}\n"
        ),
    )
    study, series = generate_uid(), generate_uid()
    files = [
        write(rich("PID-X", study=study, series=series), tmp_path / f"{i}.dcm") for i in range(3)
    ]
    deid = Deidentification(profile="basic")
    requests = [
        r.model_copy(
            update={
                "deidentify": deid,
                "idempotency_key": idempotency_key(
                    r.sop_instance_uid, r.original_sha256, "research", deid
                ),
            }
        )
        for r in stored(stack, files, "research")
    ]
    pseudonyms = Pseudonyms(KEY.encode())
    for path in files[:2]:  # what the crashed process got through
        out = tmp_path / f"{path.stem}.sent.dcm"
        Deidentifier(deid, pseudonyms).file(path, out)
        research.upload(out.read_bytes())
    destination = load_file(rules).destinations["research"]

    async def interrupted() -> None:
        blobs = BlobStore(stack.s3)
        try:
            marker = MarkerBook(blobs, destination).batch(
                study, [r.idempotency_key for r in requests]
            )
            await marker.write()
        finally:
            blobs.close()

    asyncio.run(interrupted())
    publish(stack, requests)
    start_forwarder(rules_file=str(rules), env={"RADFLOW_DEID_KEY": KEY})
    wait_for("3 completions", lambda: len(data(stack, Topic.FORWARD_COMPLETED)) == 3, 30)
    done = {
        d["sop_instance_uid"]: d["already_delivered"] for d in data(stack, Topic.FORWARD_COMPLETED)
    }
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files]
    assert done == {uids[0]: True, uids[1]: True, uids[2]: False}
    assert sorted(research.sop_instance_uids()) == sorted(pseudonyms.uid(u) for u in uids)


def test_the_forwarder_does_not_start_with_profiles_and_no_pseudonym_key(
    stack: Stack, start_forwarder, tmp_path: Path
) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"research": "url: https://research.example\ndeidentify: basic"},
        rules="deidentification:\n  basic:\nrules:\n  - name: all\n    route: [research]\n"
        "default: {hold: unrouted}\n",
    )
    forwarder = start_forwarder(rules_file=str(rules), wait_ready=False, wait_port=False)
    forwarder.expected_exit = 3
    assert forwarder.proc.proc is not None
    assert forwarder.proc.proc.wait(timeout=60) == 3
    assert "RADFLOW_DEID_KEY or RADFLOW_DEID_KEY_FILE" in forwarder.log()


def test_a_dimse_destination_gets_deidentified_instances_and_commits_to_the_remapped_uids(
    stack: Stack,
    start_forwarder,
    start_orthanc_server,
    tmp_path: Path,
) -> None:
    """C-STORE sends the de-identified file, and storage commitment is asked about (and
    answers for) the remapped UIDs. The destination requires the profile: a request
    that does not carry it (an older router's) is de-identified all the same."""
    listener_port = free_port()
    server: ManagedProcess = start_orthanc_server(
        config={"DicomModalities": {"radflow": ["RADFLOW", "127.0.0.1", listener_port]}}
    )
    pacs = OrthancView(server)
    body = dimse_destination(server.dicom_port, "ORTHANC", verify="storage-commitment")
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"research": f"{body}\ndeidentify: basic"},
        rules="deidentification:\n  basic:\nrules:\n  - name: all\n    route: [research]\n"
        "default: {hold: unrouted}\n",
    )
    study, series = generate_uid(), generate_uid()
    files = [
        write(rich("PID-D", study=study, series=series), tmp_path / f"{i}.dcm") for i in range(3)
    ]
    deid = Deidentification(profile="basic")
    first, *others = stored(stack, files, "research")
    # the first as an older router routed it, before the destination required a profile
    publish(stack, [first, *(r.model_copy(update={"deidentify": deid}) for r in others)])
    start_forwarder(
        rules_file=str(rules),
        commitment_port=str(listener_port),
        commitment_same_association_s="0.5",
        env={"RADFLOW_DEID_KEY": KEY},
    )
    wait_for("3 verified", lambda: len(data(stack, Topic.FORWARD_VERIFIED)) == 3, 60)
    pseudonyms = Pseudonyms(KEY.encode())
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files]
    assert sorted(pacs.sop_instance_uids()) == sorted(pseudonyms.uid(u) for u in uids)
    for uid in uids:
        ds = pydicom.dcmread(io.BytesIO(pacs.file(pseudonyms.uid(uid))))
        assert leftovers(ds) == [] and ds.PatientIdentityRemoved == "YES"
    assert {v["method"] for v in data(stack, Topic.FORWARD_VERIFIED)} == {"storage-commitment"}
    assert data(stack, Topic.FORWARD_FAILED) == []
