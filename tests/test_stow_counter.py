"""The counting proxy the fault suite puts in front of Orthanc: it sees every
delivery that Orthanc's one-copy-per-UID storage hides, and it plays a destination
that is gone or refusing work for as long as a test wants."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydicom.uid import generate_uid

from radflow_devstack.processes import ManagedProcess
from radflow_devstack.stow_counter import StowCounter, stow_parts
from support.dicom import make_instance
from support.orthanc import OrthancView
from support.stow import multipart, stow

pytestmark = pytest.mark.pipeline


def test_stow_parts_reads_each_dicom_part_of_a_multipart_body() -> None:
    body, content_type = multipart([b"one", b"two\r\n--not-a-boundary"])
    assert stow_parts(content_type, body) == [b"one", b"two\r\n--not-a-boundary"]
    assert stow_parts("application/json", body) == []


def test_the_same_instance_sent_twice_counts_two_deliveries_where_orthanc_keeps_one(
    start_orthanc_server: Callable[..., ManagedProcess],
    stow_counter: Callable[[ManagedProcess], StowCounter],
    tmp_path: Path,
) -> None:
    orthanc = start_orthanc_server()
    counter = stow_counter(orthanc)
    uid, other = generate_uid(), generate_uid()
    first = make_instance(tmp_path / "a.dcm", sop_instance_uid=uid).read_bytes()
    second = make_instance(tmp_path / "b.dcm", sop_instance_uid=other).read_bytes()
    url = f"{counter.url}/dicom-web/studies"

    assert stow(url, [first, second], Accept="application/dicom+json").status_code == 200
    assert stow(url, [first], Accept="application/dicom+json").status_code == 200

    assert counter.deliveries() == Counter({uid: 2, other: 1})
    assert counter.duplicates() == {uid: 2}
    assert counter.posts == 2 and counter.in_flight == 0
    assert OrthancView(orthanc).count() == 2  # one copy of each UID
    assert httpx.get(f"{counter.url}/statistics").json()["CountInstances"] == 2  # proxied GET


def test_a_destination_down_refuses_or_answers_503_until_it_is_up_again(
    start_orthanc_server: Callable[..., ManagedProcess],
    stow_counter: Callable[[ManagedProcess], StowCounter],
    tmp_path: Path,
) -> None:
    orthanc = start_orthanc_server()
    counter = stow_counter(orthanc)
    uid = generate_uid()
    instance = make_instance(tmp_path / "a.dcm", sop_instance_uid=uid).read_bytes()
    url = f"{counter.url}/dicom-web/studies"
    port = counter.port

    counter.down("refuse")
    with pytest.raises(httpx.ConnectError):
        stow(url, [instance])
    counter.down("503", retry_after_s=7)
    refused = stow(url, [instance])
    assert (refused.status_code, refused.headers["Retry-After"]) == (503, "7")
    assert counter.attempts() == Counter({uid: 1})  # the refused connection sent nothing
    assert counter.deliveries() == Counter()
    assert OrthancView(orthanc).count() == 0

    counter.up()
    assert stow(url, [instance]).status_code == 200
    assert counter.port == port
    assert counter.attempts() == Counter({uid: 2})
    assert counter.deliveries() == Counter({uid: 1})
    assert OrthancView(orthanc).count() == 1
