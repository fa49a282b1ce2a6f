"""Lossy previews through the real pipeline (ingest → transcode → router → forwarder →
Orthanc): each series' preview reaches the reading side first, as a derived lossy
instance DCMTK reads; the full lossless series follows, pixel-identical; a preview that
cannot be made is dead-lettered without holding its instance back; the ledger
announces the study without counting the previews."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.dicom import make_instance
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

RULES = """
rules:
  - name: reading
    when: {modality: CT}
    route: [orthanc]
    preview: first
    wait_for_study_complete: {quiet_seconds: 4, level: study}
default: {hold: unrouted}
"""


def series(tmp_path: Path, study: str, count: int) -> list[Path]:
    """A CT series of ``count`` instances numbered from 1, with a soft-tissue window."""
    uid = generate_uid()
    return [
        make_instance(
            tmp_path / f"{uid}.{number}.dcm",
            study_instance_uid=study,
            series_instance_uid=uid,
            rows=32,
            columns=32,
            extra={
                "InstanceNumber": number,
                "WindowCenter": 40,
                "WindowWidth": 400,
                "RescaleSlope": 1,
                "RescaleIntercept": -1024,
            },
        )
        for number in range(1, count + 1)
    ]


def store(ingest: IngestProcess, paths: list[Path]) -> None:
    done = storescu(ingest.dimse_port, *paths)
    assert done.returncode == 0, done.stderr


def test_previews_reach_the_reading_side_first_and_the_lossless_study_follows_unchanged(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_forwarder,
    start_ledger,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml", {"orthanc": f"url: {orthanc.dicomweb}"}, rules=RULES
    )
    later = {"wait_ready": False, "wait_port": False}
    ingest: IngestProcess = start_ingest(**later)
    transcode = start_transcode(rules_file=str(rules), **later)
    for service in (
        ingest,
        transcode,
        start_router(rules_file=str(rules), release_interval_s="0.2", **later),
        start_forwarder(rules_file=str(rules), **later),
        start_ledger(quiet_s="1", tick_interval_s="0.2", **later),
    ):
        service.wait_ready()
    study = generate_uid()
    # A palette colour image without its palette: losslessly normalized as it is, but
    # it cannot be shown, so it gets no preview.
    unshowable = make_instance(
        tmp_path / "palette.dcm",
        study_instance_uid=study,
        rows=32,
        columns=32,
        extra={
            "InstanceNumber": 1,
            "PhotometricInterpretation": "PALETTE COLOR",
            "BitsAllocated": 8,
            "BitsStored": 8,
            "HighBit": 7,
            "PixelData": bytes(range(256)) * 4,
        },
    )
    originals = series(tmp_path, study, 3) + series(tmp_path, study, 3) + [unshowable]
    store(ingest, originals)

    wait_for("two previews at Orthanc", lambda: orthanc.count() == 2, timeout_s=60)
    previews = {
        e["data"]["sop_instance_uid"]: e["data"] for e in stack.events(Topic.INSTANCE_PREVIEW)
    }
    assert sorted(orthanc.sop_instance_uids()) == sorted(previews), (
        "the previews arrive while the full study still waits for completion"
    )
    by_uid = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in originals}
    for uid, event in previews.items():
        received = tmp_path / f"preview-{uid}.dcm"
        received.write_bytes(orthanc.file(uid))
        ds = pydicom.dcmread(received)
        source = by_uid[event["preview_of"]["sop_instance_uid"]]
        assert source.InstanceNumber == 1, "the first image of each series"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.LossyImageCompression == "01"
        assert float(ds.LossyImageCompressionRatio) == event["lossy_ratio"]
        assert ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert "not for diagnosis" in ds.DerivationDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ds.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert ds.StudyInstanceUID == study
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert (ds.PhotometricInterpretation, ds.BitsStored) == ("MONOCHROME2", 8)
        for tool in (
            ["dcmdump", str(received)],
            ["dcmj2pnm", "+on", str(received), str(received.with_suffix(".png"))],
        ):
            run = subprocess.run(tool, capture_output=True, check=False)
            assert run.returncode == 0, (tool[0], run.stderr)
    requests = stack.events(Topic.FORWARD_REQUESTED_STAT)
    assert {r["data"]["sop_instance_uid"] for r in requests} == set(previews)
    assert all(r["data"]["preview_of"] is not None for r in requests)

    (letter,) = [e["data"] for e in stack.events(Topic.INSTANCE_FAILED)]
    assert letter["reason"] == "preview_failed"
    assert pydicom.dcmread(unshowable).SOPInstanceUID in letter["original_value"]
    wait_for("the full study at Orthanc", lambda: orthanc.count() == 9, timeout_s=60)
    for path in originals:
        sent = pydicom.dcmread(path)
        got = pydicom.dcmread(BytesIO(orthanc.file(sent.SOPInstanceUID)))
        assert got.SOPInstanceUID == sent.SOPInstanceUID
        assert "LossyImageCompression" not in got
        assert np.array_equal(got.pixel_array, sent.pixel_array), "lossless, pixel-identical"

    wait_for(
        "the study announced delivered",
        lambda: len(stack.events(Topic.STUDY_DELIVERED)) == 1,
        timeout_s=30,
    )
    (delivered,) = stack.events(Topic.STUDY_DELIVERED)
    assert delivered["data"]["instances"] == 7, "previews are not diagnostic instances"
    assert metric(transcode.url, "radflow_transcode_previews_total", outcome="made") == 2
    assert metric(transcode.url, "radflow_transcode_previews_total", outcome="preview_failed") == 1
