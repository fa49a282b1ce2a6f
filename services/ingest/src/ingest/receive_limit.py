"""The instance size limit, enforced while a C-STORE data set is being received.

pynetdicom (chunked receive mode) writes each P-DATA fragment of a C-STORE data set
to a temporary file as it arrives and hands the C-STORE handler the finished file.
Checking the size in the handler would let a sender fill TMPDIR first. So once the
file exists, it is replaced by a :class:`CappedSpool` that passes writes through up to
the limit and, past it, truncates the file to nothing and drops the rest: the
association goes on, the rest of the data set is read from the network and
discarded, and the handler answers 0xC005 (the sender learns why and does not retry).

The hook is one wrapper around the association's ``DIMSEServiceProvider.
receive_primitive`` (the one place P-DATA enters DIMSE), installed per association;
pynetdicom itself is not patched.

pynetdicom also reads every PDU whole into memory, whatever length its header claims
(up to 4 GiB) and whatever maximum we negotiated. :func:`bound_pdu_length` refuses to
read a PDU longer than the maximum we announce (PS3.8 §D.1: a peer must not send
more): the association is aborted (A-ABORT) before the PDU's body is read.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom.association import Association

log = logging.getLogger(__name__)


class CappedSpool:
    """Stands in for pynetdicom's temporary file of one C-STORE data set (the
    ``write``/``file.flush``/``close``/``name`` it uses); never lets it grow past
    ``limit`` bytes."""

    def __init__(self, spool: Any, limit: int) -> None:
        self._spool = spool
        self._limit = limit
        self._size = spool.tell()
        self.name: str = spool.name
        self.file = self
        self.over = False
        """True once the data set passed the limit (the file is then empty)."""
        if self._size > limit:
            self._overflow()

    def _overflow(self) -> None:
        self.over = True
        self._spool.seek(0)
        self._spool.truncate(0)
        self._spool.flush()

    def write(self, data: bytes) -> int:
        if not self.over:
            if self._size + len(data) > self._limit:
                self._overflow()
            else:
                self._spool.write(data)
                self._size += len(data)
        return len(data)

    def flush(self) -> None:
        if not self.over:
            self._spool.flush()

    def close(self) -> None:
        self._spool.close()


def cap_received_datasets(assoc: Association, limit: int) -> None:
    """Cap every C-STORE data set received on ``assoc`` at ``limit`` bytes on disk
    (file meta included, as the claim check counts them)."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def _cap() -> None:
        message = dimse.message
        spool = getattr(message, "_data_set_file", None) if message is not None else None
        if spool is not None and not isinstance(spool, CappedSpool):
            message._data_set_file = CappedSpool(spool, limit)  # type: ignore[union-attr]

    def receive_capped(primitive: Any) -> None:
        # Before: the data set file of a message under way gets its cap before more
        # is written. After: a file created by this very primitive (the command's
        # last fragment) gets it before the next one.
        _cap()
        receive(primitive)
        _cap()

    dimse.receive_primitive = receive_capped  # type: ignore[method-assign]


class PduTooLong(Exception):
    """A peer announced a PDU longer than the maximum we negotiated."""

    def __init__(self, size: int, bound: int) -> None:
        super().__init__(f"PDU of {size} bytes exceeds the {bound}-byte maximum")


MIN_PDU_BOUND = 1024 * 1024
"""PDUs up to this length are always read (an A-ASSOCIATE-RQ with many presentation
contexts is larger than a small negotiated maximum)."""


def bound_pdu_length(assoc: Association, max_pdu_bytes: int) -> None:
    """Make a PDU longer than ``max_pdu_bytes`` (at least :data:`MIN_PDU_BOUND`) end
    ``assoc`` instead of being read into memory; 0: unbounded, as negotiated."""
    sock = assoc.dul.socket
    if not max_pdu_bytes or sock is None:
        return
    bound = max(max_pdu_bytes, MIN_PDU_BOUND)
    recv = sock.recv

    def recv_bounded(nr_bytes: int) -> bytearray:
        if nr_bytes > bound:
            log.warning(
                "association aborted: PDU longer than the maximum",
                extra={"peer_address": assoc.requestor.address, "size": nr_bytes},
            )
            if not assoc.is_established:
                # The acceptor waits (ACSE timeout) for the A-ASSOCIATE-RQ; nothing
                # is what it gets when that wait times out, and it then closes.
                assoc.dul.to_user_queue.put(None)
            # Not an OSError, so it leaves pynetdicom's PDU reader and reaches its
            # reactor's catch-all, which sends A-ABORT and ends the association.
            raise PduTooLong(nr_bytes, bound)
        return recv(nr_bytes)

    sock.recv = recv_bounded  # type: ignore[method-assign]


def received_too_large(request: Any) -> bool:
    """True if the C-STORE request's data set passed the cap while it was received."""
    spool = getattr(request, "_dataset_file", None)
    return isinstance(spool, CappedSpool) and spool.over
