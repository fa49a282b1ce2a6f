"""Where a C-STORE data set is received, and the instance size limit enforced on it.

pynetdicom collects a received data set in the message's ``data_set`` BytesIO (or, in
its chunked mode, writes it to a temporary file it creates and fills with its own
file meta first, flushing every fragment). Neither fits: memory must stay bounded for
a 1 GB instance, and a file round trip costs more CPU than receiving the bytes for a
0.5 MB CT slice. So every incoming message gets a :class:`ReceivedDataSet` in place
of that BytesIO: it holds the data set in memory up to ``memory_bytes``, moves it to
a temporary file (TMPDIR, removed when closed) past that, and past ``limit`` drops it
altogether: the association goes on, the rest of the data set is read from the
network and discarded, and the handler answers 0xC005 (the sender learns why and
does not retry). Checking the size in the handler instead would let a sender fill
memory or TMPDIR first.

The hook is one wrapper around the association's ``DIMSEServiceProvider.
receive_primitive`` (the one place P-DATA enters DIMSE), installed per association;
pynetdicom itself is not patched.

pynetdicom also reads every PDU whole into memory, whatever length its header claims
(up to 4 GiB) and whatever maximum we negotiated. :func:`bound_pdu_length` refuses to
read a PDU longer than the maximum we announce (PS3.8 §D.1: a peer must not send
more): the association is aborted (A-ABORT) before the PDU's body is read.
"""

from __future__ import annotations

import io
import logging
import tempfile
from typing import IO, Any, BinaryIO

from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage

log = logging.getLogger(__name__)


class ReceivedDataSet(io.BytesIO):
    """Stands in for the BytesIO pynetdicom writes one message's data set into (it
    accepts only a BytesIO); never holds more than ``memory_bytes`` in memory, nor
    more than ``limit`` bytes anywhere."""

    def __init__(self, limit: int, memory_bytes: int) -> None:
        super().__init__()
        self._limit = limit
        self._memory_bytes = memory_bytes
        self._size = 0
        self._spill: IO[bytes] | None = None
        self.over = False
        """True once the data set passed the limit (nothing of it is then kept)."""

    def write(self, data: Any) -> int:
        length = len(data)
        if self.over:
            return length
        size = self._size + length
        if size > self._limit:
            # Emptied, not closed: the handler discards it once the rest has been read.
            self.over = True
            if self._spill is not None:
                self._spill.seek(0)
                self._spill.truncate(0)
            super().seek(0)
            super().truncate(0)
            return length
        if self._spill is None and size > self._memory_bytes:
            self._spill = tempfile.NamedTemporaryFile(suffix=".dcm")  # noqa: SIM115 - discard()
            self._spill.write(self.getvalue())
            super().seek(0)
            super().truncate(0)
        if self._spill is not None:
            self._spill.write(data)
        else:
            super().write(data)
        self._size = size
        return length

    @classmethod
    def holding(cls, data: io.BytesIO | None) -> ReceivedDataSet:
        """One over a data set pynetdicom collected itself (a message that started
        before :func:`receive_datasets` was installed)."""
        held = cls(limit=2**63, memory_bytes=2**63)
        if data is not None:
            held.write(data.getbuffer())
        return held

    @property
    def size(self) -> int:
        """Bytes of the data set received so far."""
        return self._size

    def received(self) -> BinaryIO:
        """The data set as received, rewound: this buffer, or its temporary file."""
        file: BinaryIO = self if self._spill is None else self._spill  # type: ignore[assignment]
        file.seek(0)
        return file

    def discard(self) -> None:
        """Drop what was received (the temporary file goes with it)."""
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        super().seek(0)
        super().truncate(0)


def receive_datasets(assoc: Association, limit: int, memory_bytes: int) -> None:
    """Receive every data set on ``assoc`` into a :class:`ReceivedDataSet` capped at
    ``limit`` bytes, in memory up to ``memory_bytes``."""
    dimse = assoc.dimse
    receive = dimse.receive_primitive

    def receive_bounded(primitive: Any) -> None:
        # pynetdicom starts a new message when none is under way; starting it here
        # gives it our data set buffer before its first fragment is written.
        if dimse.message is None:
            message = DIMSEMessage()
            message.data_set = ReceivedDataSet(limit, memory_bytes)
            dimse.message = message
        receive(primitive)

    dimse.receive_primitive = receive_bounded  # type: ignore[method-assign]


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


def received_data_set(request: Any) -> ReceivedDataSet | None:
    """The C-STORE request's data set as :func:`receive_datasets` received it."""
    data = getattr(request, "DataSet", None)
    return data if isinstance(data, ReceivedDataSet) else None
