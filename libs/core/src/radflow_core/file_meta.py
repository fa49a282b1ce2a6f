"""The file meta information ingest writes on every original (PS3.10 §7.1).

A sender's Part 10 file meta says who wrote the file, not what the instance is: a
C-STORE arrives without one (pynetdicom writes its own), a STOW-RS part brings the
sender's. Ingest therefore stores every original as **this module's file meta followed
by the data set bytes exactly as received**, so the same data set has the same bytes
and sha256 whichever protocol and sender brought it, and every key derived from that
sha256 (the original's blob, transcode's marker, the router's idempotency key) matches.

The data set is never re-encoded: only the preamble and group 0002 are replaced, and
the original is streamed from the received file (:class:`CanonicalFile`), never loaded.
"""

from __future__ import annotations

import io
import re
import struct
from typing import BinaryIO

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

IMPLEMENTATION_CLASS_UID = "2.25.300361951922985614945786023880462354212"
"""radflow's Implementation Class UID (0002,0012), a UUID-derived UID (PS3.5 §B.2).

Part of every stored original's bytes: changing it (or the version name) changes the
sha256 of every original stored afterwards, so an instance received again after the
change is not recognised as a duplicate of one stored before it."""
IMPLEMENTATION_VERSION_NAME = "RADFLOW_1"
"""radflow's Implementation Version Name (0002,0013), SH (at most 16 characters).
Deliberately not the release version, for the reason given above."""

PREAMBLE = b"\x00" * 128 + b"DICM"


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble (128 zero bytes), ``DICM`` and the group 0002 elements ingest writes.

    Elements: File Meta Information Group Length and Version, Media Storage SOP Class
    and Instance UID (the data set's SOP Class and Instance UID), Transfer Syntax UID
    (the one the data set is encoded in), Implementation Class UID and Version Name
    (radflow's). Nothing about the sender: no Source Application Entity Title, no
    Private Information.

    Encoded by hand (once per received instance, where pydicom's writer cost more CPU
    than the rest of the header work) for UIDs of digits and dots; anything else goes
    through pydicom, whose bytes the hand encoding matches exactly (tested).
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid)
    if all(_PLAIN_UID.fullmatch(uid) for uid in uids):
        body = b"".join(
            (
                _VERSION,
                _ui(0x0002, sop_class_uid),
                _ui(0x0003, sop_instance_uid),
                _ui(0x0010, transfer_syntax_uid),
                _IMPLEMENTATION,
            )
        )
        return b"".join((PREAMBLE, _GROUP_LENGTH, struct.pack("<I", len(body)), body))
    return _encode_with_pydicom(sop_class_uid, sop_instance_uid, transfer_syntax_uid)


_PLAIN_UID = re.compile(r"[0-9.]{1,64}")
_GROUP_LENGTH = b"\x02\x00\x00\x00UL\x04\x00"
_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HH2sH", 0x0002, element, b"UI", len(value)) + value


def _sh(element: int, text: str) -> bytes:
    value = text.encode("ascii")
    if len(value) % 2:
        value += b" "
    return struct.pack("<HH2sH", 0x0002, element, b"SH", len(value)) + value


_IMPLEMENTATION = _ui(0x0012, IMPLEMENTATION_CLASS_UID) + _sh(0x0013, IMPLEMENTATION_VERSION_NAME)


def _encode_with_pydicom(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = io.BytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def dataset_offset(file: BinaryIO) -> int:
    """Where the data set starts in a Part 10 file: after the preamble, ``DICM`` and
    the group 0002 elements, split exactly where pydicom's reader splits them (so the
    bytes kept are the ones :func:`~radflow_core.instance_header.read_header` parsed
    as the data set).

    Raises:
        pydicom.errors.InvalidDicomError: no preamble and ``DICM`` prefix.
    """
    file.seek(0)
    read_preamble(file, False)
    _read_file_meta_info(file)
    return file.tell()


class CanonicalFile(io.RawIOBase):
    """Read-only, seekable view of ``meta`` followed by ``file`` from ``offset`` on.

    The received file stays where it is (a spool or temporary file) and must stay open
    while this view is read; nothing but ``meta`` is held in memory.
    """

    def __init__(self, meta: bytes, file: BinaryIO, offset: int) -> None:
        super().__init__()
        self._meta = meta
        self._file = file
        self._offset = offset
        self._size = len(meta) + file.seek(0, io.SEEK_END) - offset
        self._pos = 0

    @property
    def size(self) -> int:
        """Bytes in the view."""
        return self._size

    @property
    def meta(self) -> bytes:
        """The preamble and file meta the view starts with."""
        return self._meta

    @property
    def offset(self) -> int:
        """Where in the underlying file the view's data set starts."""
        return self._offset

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        wanted = max(0, min(len(view), self._size - self._pos))
        done = 0
        if self._pos < len(self._meta) and wanted:
            piece = self._meta[self._pos : self._pos + wanted]
            view[: len(piece)] = piece
            done = len(piece)
        if done < wanted:
            self._file.seek(self._offset + self._pos + done - len(self._meta))
            while done < wanted:
                chunk = self._file.read(wanted - done)
                if not chunk:
                    break
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
        self._pos += done
        return done
