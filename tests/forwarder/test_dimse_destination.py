"""The DIMSE destination (C-STORE SCU) against real storage SCPs on loopback: how each
answer of a PACS is sorted, what is proposed and sent, and what happens when the
PACS is down, refuses our AE title or accepts only uncompressed syntaxes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless
from pynetdicom import AE

from radflow_codecs.codecs import decode
from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import ConfigurationError
from radflow_core.events import Lane
from radflow_devstack.pki import Authority
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_rules.destinations import DestinationKind, DimsePeer, Tls
from radflow_rules.rules import Destination
from stow_forwarder.answer import Outgoing
from stow_forwarder.client import StowClient
from stow_forwarder.dimse import DimseClient, Verdict, proposed_contexts, verdict
from stow_forwarder.settings import ForwarderSettings
from support.dicom import bundled_file, make_instance
from support.dimse_peer import DimsePeer as ScriptedPeer
from support.orthanc import OrthancView
from support.scu_race import hold_reactor_once

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0x0000, Verdict.STORED),
        (0xB000, Verdict.STORED),
        (0xB006, Verdict.STORED),
        (0xB007, Verdict.STORED),
        (StoreStatus.DUPLICATE_SOP_INSTANCE, Verdict.ALREADY_STORED),
        (0xA700, Verdict.RETRY),
        (0xA7FF, Verdict.RETRY),
        (0xA900, Verdict.REFUSED),
        (0xA9FF, Verdict.REFUSED),
        (0xC000, Verdict.REFUSED),
        (0xCFFF, Verdict.REFUSED),
        (0x0122, Verdict.REFUSED),
        (0x0124, Verdict.REFUSED),
        (0x0110, Verdict.REFUSED),
    ],
)
def test_each_c_store_status_is_stored_retried_or_refused(status: int, expected: Verdict) -> None:
    assert verdict(status) is expected


def _outgoing(path: Path) -> Outgoing:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Outgoing(
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
        path,
    )


def test_compressed_instances_also_propose_explicit_little_endian_once_per_class() -> None:
    items = [
        Outgoing("1.1", CT, str(JPEGLSLossless), Path("a")),
        Outgoing("1.2", CT, str(RLELossless), Path("b")),
        Outgoing("1.3", CT, str(ExplicitVRLittleEndian), Path("c")),
    ]
    assert proposed_contexts(items) == [
        (CT, str(JPEGLSLossless)),
        (CT, str(RLELossless)),
        (CT, str(ExplicitVRLittleEndian)),
    ]


def _client(
    port: int, ae_title: str = "PACS", tls: Tls | None = None, **settings: float
) -> DimseClient:
    destination = Destination(
        "pacs",
        f"dicom://{ae_title}@127.0.0.1:{port}",
        None,
        (),
        50,
        tls=tls,
        kind=DestinationKind.DIMSE,
        dimse=DimsePeer("127.0.0.1", port, ae_title),
    )
    values = {"connect_timeout_s": 2.0, "request_timeout_s": 10.0, **settings}
    return DimseClient(destination, ForwarderSettings(**values))


@pytest.fixture
def peer() -> ScriptedPeer:
    scp = ScriptedPeer(free_port()).start()
    yield scp
    scp.stop()


def _instances(tmp_path: Path, count: int) -> list[Path]:
    return [make_instance(tmp_path / f"{i}.dcm", rows=32, columns=32) for i in range(count)]


def test_each_instance_is_sorted_by_the_status_the_pacs_answers(
    peer: ScriptedPeer, tmp_path: Path
) -> None:
    items = [_outgoing(p) for p in _instances(tmp_path, 6)]
    statuses = [0x0000, 0xB000, 0xA700, 0xA900, 0xC000, 0x0122]
    for item, status in zip(items, statuses, strict=True):
        peer.script[item.sop_instance_uid] = [status]
    answer = asyncio.run(_client(peer.port).store(items, Lane.ROUTINE))
    uids = [i.sop_instance_uid for i in items]
    assert answer.delivered == set(uids[:2])
    assert list(answer.retry) == [uids[2]]
    assert answer.refused == {
        uids[3]: (0xA900, "C-STORE status 0xA900"),
        uids[4]: (0xC000, "C-STORE status 0xC000"),
        uids[5]: (0x0122, "C-STORE status 0x0122"),
    }
    assert answer.peer_unavailable, "0xA7xx (out of resources) counts against the circuit"
    assert [r.sop_instance_uid for r in peer.received] == uids, "one association, in order"


def test_an_instance_the_pacs_already_holds_counts_as_delivered(
    peer: ScriptedPeer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    peer.script[items[0].sop_instance_uid] = [StoreStatus.DUPLICATE_SOP_INSTANCE]
    with caplog.at_level("INFO", logger="stow_forwarder.dimse"):
        answer = asyncio.run(_client(peer.port).store(items, Lane.ROUTINE))
    assert answer.delivered == {i.sop_instance_uid for i in items}
    assert not answer.refused and not answer.retry and not answer.peer_unavailable
    assert [r.status for r in peer.received] == [StoreStatus.DUPLICATE_SOP_INSTANCE, 0]
    (duplicate,) = [r for r in caplog.records if "already holds" in r.getMessage()]
    assert duplicate.__dict__["sop_instance_uid"] == items[0].sop_instance_uid


def test_a_quick_answer_the_reactor_sees_first_is_delivered_once_without_waiting(
    peer: ScriptedPeer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom's reactor race (radflow_core.scu) forced on the first C-STORE of the
    association: the PACS's answer is the forwarder's, not a DIMSE timeout followed by
    a retry that would send the instance twice."""
    associate = AE.associate

    def reactor_late(self: AE, *args: Any, **kwargs: Any) -> Any:
        assoc = associate(self, *args, **kwargs)
        if assoc.is_established:
            hold_reactor_once(assoc)
        return assoc

    monkeypatch.setattr(AE, "associate", reactor_late)
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    started = time.monotonic()
    answer = asyncio.run(_client(peer.port, request_timeout_s=5.0).store(items, Lane.ROUTINE))
    assert answer.delivered == {i.sop_instance_uid for i in items}
    assert not answer.retry and not answer.refused and not answer.peer_unavailable
    assert time.monotonic() - started < 5.0, "waited out the DIMSE timeout"
    assert [r.sop_instance_uid for r in peer.received] == [i.sop_instance_uid for i in items]


def test_stat_instances_are_sent_with_high_priority(peer: ScriptedPeer, tmp_path: Path) -> None:
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    client = _client(peer.port)
    asyncio.run(client.store(items[:1], Lane.STAT))
    asyncio.run(client.store(items[1:], Lane.ROUTINE))
    assert [r.priority for r in peer.received] == [1, 0]  # HIGH, MEDIUM


def test_the_bytes_arrive_as_sent_in_the_instances_own_syntax(
    peer: ScriptedPeer, tmp_path: Path
) -> None:
    path = bundled_file("MR_small_jpeg_ls_lossless.dcm")
    answer = asyncio.run(_client(peer.port).store([_outgoing(path)], Lane.ROUTINE))
    assert answer.delivered
    (received,) = peer.received
    assert received.transfer_syntax_uid == str(JPEGLSLossless)
    assert received.dataset.PixelData == pydicom.dcmread(path).PixelData


def test_a_pacs_without_compressed_syntaxes_gets_the_pixels_decompressed_losslessly(
    tmp_path: Path,
) -> None:
    scp = ScriptedPeer.uncompressed_only(free_port()).start()
    try:
        path = bundled_file("MR_small_jpeg_ls_lossless.dcm")
        answer = asyncio.run(_client(scp.port).store([_outgoing(path)], Lane.ROUTINE))
    finally:
        scp.stop()
    assert answer.delivered and not answer.refused
    (received,) = scp.received
    assert received.transfer_syntax_uid == str(ExplicitVRLittleEndian)
    assert np.array_equal(decode(received.dataset), decode(pydicom.dcmread(path)))


def test_a_pacs_that_does_not_know_our_called_ae_title_refuses_every_instance(
    peer: ScriptedPeer, tmp_path: Path
) -> None:
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    answer = asyncio.run(_client(peer.port, ae_title="NOT_PACS").store(items, Lane.ROUTINE))
    assert set(answer.refused) == {i.sop_instance_uid for i in items}
    (message,) = {m for _, m in answer.refused.values()}
    assert "association rejected" in message and "Called AE title not recognised" in message
    assert peer.received == []


# pynetdicom drops (without closing) the socket of a refused connection; CPython closes
# it at once, with a ResourceWarning that is pynetdicom's, not a leak of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_pacs_that_is_down_is_worth_another_try_and_trips_the_circuit(tmp_path: Path) -> None:
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    answer = asyncio.run(_client(free_port(), connect_timeout_s=1).store(items, Lane.ROUTINE))
    assert set(answer.retry) == {i.sop_instance_uid for i in items}
    assert answer.peer_unavailable and not answer.delivered and not answer.refused


def test_an_orthanc_with_dicom_tls_receives_over_tls_and_refuses_what_it_cannot_trust(
    start_orthanc_server: Callable[..., ManagedProcess], tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "ca")
    pacs = ca.issue("orthanc", server=True, hosts=("127.0.0.1", "pacs.test"))
    ours = ca.issue("RADFLOW", server=False, file_stem="forwarder")
    server = start_orthanc_server(
        config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pacs.cert),
            "DicomTlsPrivateKey": str(pacs.key),
            "DicomTlsTrustedCertificates": str(ca.ca_file),
            "DicomTlsRemoteCertificateRequired": True,
        }
    )
    port = server.dicom_port
    items = [_outgoing(p) for p in _instances(tmp_path, 2)]
    uids = {i.sop_instance_uid for i in items}

    mutual = Tls(ca.ca_file, ours.cert, ours.key, server_name="pacs.test")
    answer = asyncio.run(_client(port, "ORTHANC", mutual).store(items, Lane.ROUTINE))
    assert answer.delivered == uids, answer
    assert OrthancView(server).count() == 2

    stranger = Authority(tmp_path / "other", "other CA")
    untrusted = asyncio.run(
        _client(port, "ORTHANC", Tls(stranger.ca_file, ours.cert, ours.key)).store(
            items, Lane.ROUTINE
        )
    )
    assert set(untrusted.retry) == uids and untrusted.peer_unavailable
    assert "TLS: certificate verify failed" in next(iter(untrusted.retry.values()))
    wrong_name = Tls(ca.ca_file, ours.cert, ours.key, server_name="elsewhere.test")
    misnamed = asyncio.run(_client(port, "ORTHANC", wrong_name).store(items, Lane.ROUTINE))
    assert "TLS: certificate verify failed" in next(iter(misnamed.retry.values()))
    anonymous = asyncio.run(_client(port, "ORTHANC", Tls(ca.ca_file)).store(items, Lane.ROUTINE))
    assert set(anonymous.retry) == uids and not anonymous.delivered


def test_a_dimse_destination_whose_tls_files_are_missing_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match="destination 'pacs': its tls files"):
        _client(104, tls=Tls(tmp_path / "missing-ca.pem"))


def test_a_stow_rs_destination_whose_tls_files_are_missing_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    destination = Destination(
        "archive", "https://127.0.0.1:1/dicomweb", None, (), 50, tls=Tls(tmp_path / "no-ca.pem")
    )
    with pytest.raises(ConfigurationError, match="destination 'archive': its tls files"):
        StowClient(destination, ForwarderSettings())
