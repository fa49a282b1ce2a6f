"""Transcode on the real broker and S3: instances sent to ingest come out normalized,
pixel-identical, or on dicom.instance.failed with their reason; replays do no work."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from radflow_codecs.codecs import decode
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from support.dicom import bundled_file
from support.stack import IngestProcess, Stack
from support.stow import stow

pytestmark = pytest.mark.pipeline

MORE = [  # beyond one file per transfer syntax: colour, multi-frame, 32-bit, non-image
    "SC_rgb_rle_16bit_2frame.dcm",
    "rtdose_rle.dcm",
    "examples_ybr_color.dcm",
    "examples_palette.dcm",
    "liver_1frame.dcm",
    "test-SR.dcm",
]
BROKEN = {
    "JPEG-lossy.dcm": "undecodable_pixel_data",
    "J2K_pixelrep_mismatch.dcm": "pixel_representation_mismatch",
}


def _normalized(stack: Stack) -> list[dict]:
    return [e["data"] for e in stack.events(Topic.INSTANCE_NORMALIZED)]


def _failed(stack: Stack) -> list[dict]:
    return [e["data"] for e in stack.events(Topic.INSTANCE_FAILED)]


def test_received_instances_are_normalized_or_dead_lettered_with_reason(
    stack: Stack, start_ingest, start_transcode, ts_corpus: dict[str, Path]
) -> None:
    ingest: IngestProcess = start_ingest()
    start_transcode()
    good = [*ts_corpus.values(), *(bundled_file(n) for n in MORE)]
    files = [*good, *(bundled_file(n) for n in BROKEN)]
    response = stow(ingest.stow_url, [f.read_bytes() for f in files])
    assert response.status_code == 200, response.text

    wait_for(
        f"{len(good)} normalized and {len(BROKEN)} failed events",
        lambda: len(_normalized(stack)) == len(good) and len(_failed(stack)) == len(BROKEN),
        timeout_s=180,
    )
    received = {e["data"]["blob"]["sha256"]: e["data"] for e in stack.events()}
    for event in _normalized(stack):
        original = stack.object_bytes(event["original"]["key"])
        canonical = stack.object_bytes(event["canonical"]["key"])
        stack.assert_event_matches_blob({"data": {"blob": event["canonical"]}})
        assert event["original"] == received[event["original"]["sha256"]]["blob"]
        ds = pydicom.dcmread(io.BytesIO(canonical))
        assert ds.file_meta.TransferSyntaxUID == event["canonical_transfer_syntax_uid"]
        if event["decode_status"] == "non_image":
            assert canonical == original
            continue
        assert event["pixels"]["frames"] >= 1
        assert np.array_equal(decode(ds), decode(pydicom.dcmread(io.BytesIO(original)))), event[
            "sop_instance_uid"
        ]
    failed = {
        received_for(letter)["sop_instance_uid"]: letter["reason"] for letter in _failed(stack)
    }
    expected = {pydicom.dcmread(bundled_file(n)).SOPInstanceUID: r for n, r in BROKEN.items()}
    assert failed == expected


def received_for(letter: dict) -> dict:
    """The received event a dead letter carries."""
    return json.loads(letter["original_value"])["data"]


def test_a_replayed_received_event_does_no_new_work(
    stack: Stack, start_ingest, start_transcode
) -> None:
    ingest: IngestProcess = start_ingest()
    first = start_transcode()
    response = stow(ingest.stow_url, [bundled_file("CT_small.dcm").read_bytes()])
    assert response.status_code == 200
    wait_for("the normalized event", lambda: len(_normalized(stack)) == 1, timeout_s=60)
    keys = stack.keys("canonical/")
    first.proc.stop()
    # A new consumer group reads the received topic again from the start.
    replay: IngestProcess = start_transcode(group_id="radflow-transcode-replay")
    wait_for(
        "the replay to be consumed",
        lambda: (
            'radflow_transcode_instances_total{outcome="replay_skipped"'
            in httpx.get(f"{replay.url}/metrics").text
        ),
        timeout_s=60,
    )
    assert len(_normalized(stack)) == 1
    assert stack.keys("canonical/") == keys


def test_the_same_bytes_to_a_restarted_ingest_are_announced_again_and_normalized_once(
    stack: Stack, start_ingest, start_transcode
) -> None:
    # Ingest remembers what it announced only in its process (no marker round trip on
    # the acknowledgement path): a new process announces the same bytes again, and
    # transcode's marker makes that a no-op downstream.
    data = bundled_file("CT_small.dcm").read_bytes()
    transcode = start_transcode()
    first: IngestProcess = start_ingest()
    assert stow(first.stow_url, [data]).status_code == 200
    assert stow(first.stow_url, [data]).status_code == 200  # remembered: no second event
    wait_for("the normalized event", lambda: len(_normalized(stack)) == 1, timeout_s=60)
    assert len(stack.events()) == 1
    first.proc.stop()
    again: IngestProcess = start_ingest()
    assert stow(again.stow_url, [data]).status_code == 200
    received = stack.events()
    assert len(received) == 2
    assert received[0]["data"]["blob"] == received[1]["data"]["blob"]
    wait_for(
        "the repeat to be consumed",
        lambda: (
            'radflow_transcode_instances_total{outcome="replay_skipped"'
            in httpx.get(f"{transcode.url}/metrics").text
        ),
        timeout_s=60,
    )
    assert len(_normalized(stack)) == 1
