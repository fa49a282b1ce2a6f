"""Hostile inputs through the real receivers: refused with the status that names the
problem, before resources are spent, with no blob and no event."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from radflow_core.dicom_status import StoreStatus
from radflow_devstack.kit.dcmtk import storescu
from support.dicom import CT_IMAGE_STORAGE, dataset_bytes, make_instance, raw_store
from support.hostile import deflate_bomb
from support.stack import IngestProcess, Stack
from support.stow import AUTH_HEADERS, failed_reasons, multipart, stow

pytestmark = pytest.mark.pipeline


def _peak_rss_mib(ingest: IngestProcess) -> float:
    status = Path(f"/proc/{ingest.proc.proc.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _assert_nothing_kept(stack: Stack) -> None:
    assert stack.events() == []
    assert stack.keys() == []


def _short_pixels(tmp_path: Path) -> bytes:
    """A well-framed instance whose Pixel Data is 2 bytes short of its image."""
    ds = pydicom.dcmread(make_instance(tmp_path / "short.dcm"))
    ds.PixelData = ds.PixelData[:-2]
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_hostile_stow_parts_are_refused_with_their_reason_and_nothing_kept(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(max_request_bytes=str(8 << 20))
    good = make_instance(tmp_path / "good.dcm").read_bytes()
    cases = {
        "truncated in Pixel Data": (good[:-100], 400, StoreStatus.CANNOT_UNDERSTAND),
        "short native Pixel Data": (_short_pixels(tmp_path), 400, StoreStatus.CANNOT_UNDERSTAND),
        "deflate bomb": (deflate_bomb(1 << 30), 409, StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED),
    }
    # A Patient ID whose 2-byte length points far past the end of the data.
    at = good.index(b"\x10\x00\x20\x00LO")
    cases["length past the end"] = (
        good[: at + 6] + b"\xf0\xff" + good[at + 8 :],
        400,
        StoreStatus.CANNOT_UNDERSTAND,
    )
    for name, (part, http, reason) in cases.items():
        response = stow(ingest.stow_url, [part])
        assert response.status_code == http, f"{name}: {response.text}"
        assert [r for _, r in failed_reasons(response.json())] == [reason], name
    # The 1 GiB bomb was refused without being inflated.
    assert _peak_rss_mib(ingest) < 400
    _assert_nothing_kept(stack)
    log = ingest.log()
    assert "native Pixel Data holds 510 bytes; its image needs 512" in log
    assert "deflated transfer syntax is refused" in log
    assert stow(ingest.stow_url, [good]).status_code == 200


def test_stow_part_flood_and_uncounted_bytes_answer_413_before_anything_is_kept(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(max_parts="5", max_request_bytes=str(1 << 20))
    # Six parts, none of them DICOM (each a part all the same).
    flood, ctype = multipart([b"x"] * 6, part_type="text/plain")
    ctype = ctype.replace('type="text/plain"', 'type="application/dicom"')
    response = httpx.post(
        ingest.stow_url, content=flood, headers={"Content-Type": ctype, **AUTH_HEADERS}
    )
    assert response.status_code == 413
    assert "more parts" in response.json()["error"]
    # Non-DICOM parts count: 2 MiB of text with no Content-Length, streamed.
    body, ctype = multipart([bytes(2 << 20)], part_type="text/plain")
    ctype = ctype.replace('type="text/plain"', 'type="application/dicom"')

    def chunks():
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = httpx.post(
        ingest.stow_url, content=chunks(), headers={"Content-Type": ctype, **AUTH_HEADERS}
    )
    assert response.status_code == 413
    assert response.json()["error"] == "request body exceeds the configured limit"
    _assert_nothing_kept(stack)


def test_hostile_dimse_data_sets_are_refused_while_received_and_nothing_kept(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    limit = 1 << 20
    # Data sets move from memory to a spool file past 64 KiB, and are dropped past 1 MiB.
    ingest: IngestProcess = start_ingest(
        env={"TMPDIR": str(spool_dir)},
        max_instance_bytes=str(limit),
        spool_memory_bytes=str(64 << 10),
    )
    good = make_instance(tmp_path / "good.dcm")
    raw = good.read_bytes()
    ds = pydicom.dcmread(good)

    def send(data: bytes):
        return raw_store(
            ingest.dimse_port,
            sop_class_uid=CT_IMAGE_STORAGE,
            sop_instance_uid=ds.SOPInstanceUID,
            transfer_syntax="1.2.840.10008.1.2.1",
            data=data,
        )

    # 24 MiB over the limit: the spool file never grows past it.
    sizes: dict[str, int] = {}
    sending = True

    def watch() -> None:
        # Only the data set spools (``tmp*.dcm``): ingest's first temporary file also
        # makes Python's tempfile probe TMPDIR with a 4-byte file it deletes at once,
        # which a loaded machine leaves there long enough to be seen.
        while sending:
            for path in spool_dir.glob("*.dcm"):
                with contextlib.suppress(FileNotFoundError):
                    size = path.stat().st_size
                    sizes[path.name] = max(size, sizes.get(path.name, 0))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        big = dataset_bytes(raw) + b"\x09\x00\x10\x10OB\0\0" + (24 << 20).to_bytes(4, "little")
        result = send(big + bytes(24 << 20))
    finally:
        sending = False
        watcher.join()
    assert result.status == StoreStatus.INSTANCE_TOO_LARGE
    assert result.comment == "instance exceeds the size limit"
    assert len(sizes) == 1, sizes  # the spool was there while the data set arrived
    assert max(sizes.values()) <= limit

    # Cut inside Pixel Data, through the real receiver: 0xC000 with the reason.
    result = send(dataset_bytes(raw)[:-100])
    assert result.status == StoreStatus.CANNOT_UNDERSTAND
    assert result.comment == "Pixel Data length points past the end of the data"

    # DCMTK's storescu sending an image with short native Pixel Data.
    short = tmp_path / "short.dcm"
    short.write_bytes(_short_pixels(tmp_path))
    sent = storescu(ingest.dimse_port, short, extra=("-v",))
    assert sent.returncode != 0
    assert "Received Store Response (Error: CannotUnderstand)" in sent.stderr, sent

    # Deflate is not negotiated: the presentation context is refused.
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, ["1.2.840.10008.1.2.1.99"])
    assoc = ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
    try:
        assert assoc.accepted_contexts == []
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CT_IMAGE_STORAGE]
    finally:
        if assoc.is_established:
            assoc.release()

    # A PDU claiming 2 GiB is not read into memory: the connection is dropped.
    with socket.create_connection(("127.0.0.1", ingest.dimse_port), timeout=10) as sock:
        sock.sendall(b"\x01\x00" + (0x7FFFFFF0).to_bytes(4, "big"))
        try:
            for _ in range(256):  # up to 16 MiB, far past the 1 MiB bound
                sock.sendall(bytes(64 * 1024))
            dropped = sock.recv(1) == b""
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
    assert dropped

    _assert_nothing_kept(stack)
    assert send(dataset_bytes(raw)).status == StoreStatus.SUCCESS
