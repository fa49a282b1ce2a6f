"""DICOM Storage Commitment, Push Model (PS3.4 Annex J), as the SCU: how a DIMSE
destination with ``verify: storage-commitment`` is asked to commit to holding what it
acknowledged.

The forwarder sends an N-ACTION (Request Storage Commitment, with the Referenced SOP
Sequence and a Transaction UID of its own) and waits for the destination's
N-EVENT-REPORT naming that Transaction UID. The report may come on the N-ACTION's
association, while it is still open, or, as most PACS do (Orthanc among them), on a
new association the destination opens to us later: the :class:`CommitmentListener`
accepts those on ``RADFLOW_FORWARDER_COMMITMENT_PORT``. The destination must know us
under our calling AE title at that address (Orthanc: an entry in its
``DicomModalities``).

Reports are matched to requests by Transaction UID through one :class:`CommitmentBook`
per process, whichever association they arrive on. A report for a transaction this
process does not wait for (another replica's, or one from before a restart) is
answered with success and ignored: the instances it covers are then verified again
when their requests are read again, or reported as unanswered.

pynetdicom is synchronous: the listener and the associations run in its threads and
hand reports to the event loop through :class:`concurrent.futures.Future`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from radflow_core.dicom_status import StoreStatus
from stow_forwarder.verify import Commitment

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
"""The well-known SOP Instance of the Storage Commitment Push Model SOP Class."""
REQUEST_COMMITMENT = 1
"""N-ACTION Action Type ID: Request Storage Commitment."""


def commitment_request(transaction_uid: str, items: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: Transaction UID and the Referenced SOP
    Sequence of (SOP Instance UID, SOP Class UID) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    referenced = []
    for sop_instance_uid, sop_class_uid in items:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        referenced.append(item)
    ds.ReferencedSOPSequence = referenced
    return ds


def parse_report(ds: Dataset) -> Commitment:
    """An N-EVENT-REPORT's Event Information: what is committed, what failed and why."""
    report = Commitment(str(ds.get("TransactionUID", "")))
    for item in ds.get("ReferencedSOPSequence", []):
        report.held[str(item.ReferencedSOPInstanceUID)] = str(item.ReferencedSOPClassUID)
    for item in ds.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        report.failed[str(item.ReferencedSOPInstanceUID)] = (
            int(reason) if reason is not None else None
        )
    return report


class CommitmentBook:
    """Transactions waiting for their report, by Transaction UID (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, Future[Commitment]] = {}

    def expect(self, transaction_uid: str) -> Future[Commitment]:
        future: Future[Commitment] = Future()
        with self._lock:
            self._waiting[transaction_uid] = future
        return future

    def forget(self, transaction_uid: str) -> None:
        with self._lock:
            self._waiting.pop(transaction_uid, None)

    def deliver(self, report: Commitment) -> bool:
        """Hand a report to whoever waits for its transaction; False if nobody does."""
        with self._lock:
            future = self._waiting.pop(report.transaction_uid, None)
        if future is None or future.done():
            return False
        future.set_result(report)
        return True

    def on_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """pynetdicom's EVT_N_EVENT_REPORT handler, for the listener and for the
        N-ACTION's own association. Returns a status (the general DIMSE ones, PS3.7
        Annex C, which the store statuses share); never raises (pynetdicom would
        answer 0x0110 and log a traceback)."""
        try:
            info = event.event_information
            report = parse_report(info)
        except Exception:  # noqa: BLE001 - an unreadable report is answered, not raised
            log.warning("unreadable storage commitment report; answered with failure")
            return StoreStatus.PROCESSING_FAILURE, None
        if self.deliver(report):
            log.info(
                "storage commitment report received",
                extra={
                    "transaction_uid": report.transaction_uid,
                    "count": len(report.held),
                    "failed": len(report.failed),
                },
            )
        else:
            log.info(
                "storage commitment report for a transaction not waited for here; ignored",
                extra={"transaction_uid": report.transaction_uid},
            )
        return StoreStatus.SUCCESS, None


def commitment_ae(ae_title: str) -> AE:
    """An AE that takes Storage Commitment reports: the destination opening the
    association asks to be the SCP of the Push Model (SCP/SCU role selection, PS3.7
    D.3.3.4), which is accepted, as well as the default roles."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    ae.require_called_aet = False
    return ae


class CommitmentListener:
    """Accepts the associations destinations open to send storage commitment reports."""

    def __init__(self, book: CommitmentBook, host: str, port: int, ae_title: str) -> None:
        self._book = book
        self._host = host
        self.port = port
        self._ae_title = ae_title
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None

    def start(self) -> None:
        self._ae = commitment_ae(self._ae_title)
        handlers: list[Any] = [(evt.EVT_N_EVENT_REPORT, self._book.on_event_report)]
        server = self._ae.start_server((self._host, self.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self._server = server
        self.port = int(server.server_address[1])
        log.info("storage commitment reports accepted", extra={"port": self.port})

    def stop(self) -> None:
        """Safe to call twice."""
        if self._ae is not None:
            self._ae.shutdown()
            self._ae = None
            self._server = None
