"""A pynetdicom sender gets the response its peer sent, however its threads are
scheduled (radflow_core.scu).

The race (see :mod:`radflow_core.scu`) needs the association's reactor thread to be
descheduled just after it went past its checkpoint, until the peer's answer is in the
queue. A loaded machine does that now and then (the bench's paced sender was cut
after its 30 s DIMSE timeout); here the reactor is held at that very point
(:mod:`support.scu_race`), so the interleaving happens every time, over a real
association to a real SCP on loopback.
"""

from __future__ import annotations

import io
import logging
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from radflow_core.scu import keep_responses
from radflow_devstack.processes import free_port
from support.dicom import make_instance
from support.dimse_peer import DimsePeer
from support.scu_race import hold_reactor_once

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DIMSE_TIMEOUT_S = 3.0
"""The sender's DIMSE timeout: how long a lost response costs in these tests."""


@pytest.fixture
def peer() -> Iterator[DimsePeer]:
    started = DimsePeer(free_port()).start()
    yield started
    started.stop()


def _associate(peer: DimsePeer) -> Any:
    ae = AE(ae_title="RACESCU")
    ae.dimse_timeout = DIMSE_TIMEOUT_S
    ae.add_requested_context(CT_IMAGE_STORAGE, [EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    assert assoc.is_established
    return assoc


def _send_with_reactor_late(assoc: Any, path: Path) -> tuple[Dataset, float]:
    """One C-STORE with the reactor held past its checkpoint until the answer is in
    (and the sender held until the reactor has looked at it)."""
    hold_reactor_once(assoc)
    started = time.monotonic()
    status = assoc.send_c_store(pydicom.dcmread(path))
    return status, time.monotonic() - started


def test_a_guarded_sender_gets_the_answer_its_reactor_saw_first(
    peer: DimsePeer, tmp_path: Path
) -> None:
    path = make_instance(tmp_path / "one.dcm", sop_class_uid=CT_IMAGE_STORAGE)
    assoc = keep_responses(_associate(peer))
    try:
        status, took = _send_with_reactor_late(assoc, path)
        assert "Status" in status, "the response was lost: the sender waited its DIMSE timeout"
        assert int(status.Status) == 0x0000
        assert took < DIMSE_TIMEOUT_S
        assert assoc.is_established
        # and the association goes on as usual
        again = assoc.send_c_store(pydicom.dcmread(make_instance(tmp_path / "two.dcm")))
        assert int(again.Status) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()
    assert len(peer.stored()) == 2


def test_unguarded_pynetdicom_loses_the_answer_its_reactor_takes(
    peer: DimsePeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The defect itself, in the installed pynetdicom: the peer stored the instance
    and answered, the sender saw no answer and aborted. If this fails, pynetdicom no
    longer has the race and radflow_core.scu can go."""
    path = make_instance(tmp_path / "one.dcm", sop_class_uid=CT_IMAGE_STORAGE)
    assoc = _associate(peer)
    try:
        with caplog.at_level(logging.WARNING, logger="pynetdicom"):
            status, took = _send_with_reactor_late(assoc, path)
    finally:
        if assoc.is_established:
            assoc.release()
    assert "Status" not in status
    assert took >= DIMSE_TIMEOUT_S
    assert assoc.is_aborted
    assert peer.stored() == [pydicom.dcmread(path).SOPInstanceUID]
    assert "Received unexpected C-STORE service message" in caplog.text


def _store_request(message_id: int) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 0
    request.DataSet = io.BytesIO(b"\x00" * 8)
    return request


def _store_response(message_id: int) -> C_STORE:
    response = C_STORE()
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = CT_IMAGE_STORAGE
    response.AffectedSOPInstanceUID = "1.2.3.4"
    response.Status = 0x0000
    return response


def test_the_reactor_still_takes_requests_and_only_requests() -> None:
    """A peer's request (a C-STORE sub-operation of a C-GET, say) is still served by
    the reactor; a response behind it stays for the sender, and so does one in front."""
    waiting: queue.Queue[Any] = queue.Queue()
    dimse = SimpleNamespace(msg_queue=waiting, get_msg=None)

    def blocking_or_not(block: bool = False) -> tuple[Any, Any]:
        try:
            return waiting.get(block=block, timeout=1)  # type: ignore[no-any-return]
        except queue.Empty:
            return None, None

    dimse.get_msg = blocking_or_not
    assoc = SimpleNamespace(dimse=dimse)
    keep_responses(keep_responses(assoc))  # twice: the same as once
    request, response = _store_request(7), _store_response(1)
    assert request.is_valid_request and not response.is_valid_request

    waiting.put((1, request))
    waiting.put((1, response))
    assert dimse.get_msg(block=False) == (1, request)
    assert dimse.get_msg(block=False) == (None, None)
    assert waiting.qsize() == 1
    assert dimse.get_msg(block=True) == (1, response)

    waiting.put((1, response))
    waiting.put((1, request))
    assert dimse.get_msg(block=False) == (None, None)
    assert dimse.get_msg(block=True) == (1, response)
    assert dimse.get_msg(block=False) == (1, request)

    # An abort or a closed connection: pynetdicom wakes a waiting sender with
    # (None, None); the reactor leaves it to the sender (it once crashed on it, and the
    # sender then waited out its whole DIMSE timeout).
    waiting.put((None, None))
    assert dimse.get_msg(block=False) == (None, None)
    assert waiting.qsize() == 1
    assert dimse.get_msg(block=True) == (None, None)
    assert waiting.qsize() == 0
