"""The DIMSE receiver: a pynetdicom Storage SCP (C-STORE, C-ECHO) bridged to asyncio.

pynetdicom runs each association in its own thread. Handlers here never raise and
never block on I/O of their own: each received instance crosses to the event loop at
one bridge (:meth:`DimseReceiver._bridge`) where the claim check runs, and the
association thread waits for the resulting status.

Datasets are received in pynetdicom's chunked mode: the P-DATA stream is written
straight to a temporary Part 10 file (``TMPDIR``), so a multi-gigabyte instance costs
disk, not memory, and is hashed and uploaded from that file. The file meta pynetdicom
writes there is not kept: the claim check stores ingest's own in its place.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from ingest import metrics
from ingest.claimcheck import ClaimCheck, Expected, NotStored, Origin
from ingest.settings import IngestSettings
from radflow_core.dicom_status import StoreStatus
from radflow_core.events import Priority, Protocol, Sender
from radflow_core.transfer_syntaxes import ACCEPTED

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic): rejected-permanent, service-user,
# calling AE title not recognised (PS3.8 §9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_DIMSE_PRIORITY = {0: Priority.MEDIUM, 1: Priority.HIGH, 2: Priority.LOW}
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


def status_dataset(status: StoreStatus, comment: str | None = None) -> Dataset:
    """A C-STORE response status with Error Comment (0000,0902), at most 64 chars."""
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class DimseReceiver:
    """Owns the pynetdicom AE and its listening server."""

    def __init__(
        self, settings: IngestSettings, claim_check: ClaimCheck, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._settings = settings
        self._claim_check = claim_check
        self._loop = loop
        self._rules = settings.peer_rules
        self._server: ThreadedAssociationServer | None = None
        # pynetdicom reads this process-wide switch when a C-STORE arrives; ingest is
        # the only SCP in its process, so setting it here is the one place it is set.
        _config.STORE_RECV_CHUNKED_DATASET = True

        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_bytes
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in (*_STORAGE_CLASSES.values(), *settings.extra_sop_classes):
            ae.add_supported_context(uid, list(ACCEPTED))
        self._ae = ae

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("DIMSE receiver not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self._server = self._ae.start_server(
            (self._settings.dimse_host, self._settings.dimse_port),
            block=False,
            evt_handlers=handlers,
        )
        log.info(
            "DIMSE listening",
            extra={
                "host": self._settings.dimse_host,
                "port": self.port,
                "called_ae": self._settings.ae_title,
            },
        )

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let open associations finish for ``grace_s``, abort the rest.

        An aborted association's in-flight instance was never acknowledged, so its
        sender retries it: nothing is lost.
        """
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        deadline = time.monotonic() + grace_s
        # pynetdicom exposes open associations only as a thread list: poll it.
        while server.active_associations and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for assoc in server.active_associations:
            assoc.abort()

    # Handlers: called in association threads. They return a status or nothing and
    # never raise (pynetdicom would answer 0xC211 and log the dataset otherwise).

    def _on_conn_open(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        metrics.ASSOCIATIONS.inc()

    def _on_conn_close(self, _: evt.Event) -> None:
        metrics.ASSOCIATIONS.dec()

    def _on_requested(self, event: evt.Event) -> None:
        if not self._rules:
            return
        # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive is populated.
        primitive = event.assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        address = event.assoc.requestor.address
        if any(rule.allows(calling, address) for rule in self._rules):
            return
        metrics.ASSOCIATIONS_REJECTED.labels("calling_ae_not_allowed").inc()
        log.warning(
            "association rejected: caller not in allow-list",
            extra={"calling_ae": calling, "peer_address": address},
        )
        event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
        # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ
        # before the socket is closed.
        event.assoc.kill()

    def _on_echo(self, _: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset:
        request = cast(C_STORE, event.request)
        assoc = event.assoc
        origin = Origin(
            sender=Sender(
                protocol=Protocol.DIMSE,
                calling_ae=assoc.requestor.ae_title.strip(),
                called_ae=assoc.acceptor.ae_title.strip(),
                peer_address=assoc.requestor.address,
            ),
            priority=_DIMSE_PRIORITY.get(int(request.Priority or 0), Priority.MEDIUM),
            expected=Expected(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
            ),
        )
        return self._bridge(str(event.dataset_path), origin)

    def _bridge(self, path: str, origin: Origin) -> Dataset:
        """The one crossing from a pynetdicom thread to the event loop."""
        future = asyncio.run_coroutine_threadsafe(self._store(path, origin), self._loop)
        try:
            return future.result(timeout=self._settings.store_timeout_s)
        except FutureTimeout:
            future.cancel()
            log.error(  # noqa: TRY400 - an expected outcome, no traceback wanted
                "claim check timed out", extra={"calling_ae": origin.sender.calling_ae}
            )
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "storage timed out; retry")
        except Exception:
            log.exception("claim check failed")
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "receiver unavailable; retry")

    async def _store(self, path: str, origin: Origin) -> Dataset:
        try:
            with open(path, "rb") as file:  # noqa: ASYNC230 - local spool file, read in a thread
                await self._claim_check.store(file, origin)
        except NotStored as exc:
            return status_dataset(exc.status, exc.detail)
        return status_dataset(StoreStatus.SUCCESS)
