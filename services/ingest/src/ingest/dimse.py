"""The DIMSE receiver: a pynetdicom Storage SCP (C-STORE, C-ECHO) bridged to asyncio.

pynetdicom runs each association in its own thread. Handlers here never raise and
never block on I/O of their own: each received instance crosses to the event loop at
one bridge (:meth:`DimseReceiver._bridge`) where the claim check runs, and the
association thread waits for the resulting status.

Two listeners share one AE (and so its association limit): plain DIMSE and DICOM TLS
(PS3.15 Annex B). On the TLS one the handshake runs in the association's own thread
(:class:`~radflow_core.tls.DeferredHandshake`), never in the accept loop, so a peer
that stalls its handshake holds up only itself; a verified client certificate's common
name becomes the sender's identity (``cert:<CN>``) and may be bound to the calling AE
titles it is allowed to use.

A data set is received into a :class:`~ingest.receive_limit.ReceivedDataSet`: in
memory up to ``spool_memory_bytes`` (so a CT slice never makes a round trip through
a file), in an anonymous temporary file (``TMPDIR``) beyond, so a multi-gigabyte
instance costs disk, not memory; never past ``max_instance_bytes``: a larger data set
is read to its end and dropped, and answered 0xC005. The claim check reads it behind
ingest's own file meta (:mod:`radflow_core.file_meta`); pynetdicom's chunked mode,
which writes a file meta of its own to a named file and flushes every fragment, is
not used. Deflated Explicit VR Little Endian is not negotiated
(:data:`~radflow_core.transfer_syntaxes.RECEIVED`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, BinaryIO, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from ingest import metrics
from ingest.claimcheck import ClaimCheck, Expected, NotStored, Origin
from ingest.receive_limit import ReceivedDataSet, bound_pdu_length, receive_datasets
from ingest.settings import IngestSettings
from radflow_core.audit import Auditor, Door
from radflow_core.dicom_status import StoreStatus
from radflow_core.events import Priority, Protocol, Sender
from radflow_core.file_meta import CanonicalFile, encode_file_meta
from radflow_core.tls import DeferredHandshake, peer_common_name, server_context
from radflow_core.transfer_syntaxes import RECEIVED

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic): rejected-permanent, service-user,
# calling AE title not recognised (PS3.8 §9.3.4).
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
# Rejected-transient, service-provider (presentation), local limit exceeded: what
# pynetdicom answers at its own association limit; the sender retries later.
_REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
_DIMSE_PRIORITY = {0: Priority.MEDIUM, 1: Priority.HIGH, 2: Priority.LOW}
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


def status_dataset(status: StoreStatus, comment: str | None = None) -> Dataset:
    """A C-STORE response status with Error Comment (0000,0902), at most 64 chars."""
    ds = Dataset()
    ds.Status = int(status)
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def certificate_cn(sock: object) -> str | None:
    """The common name of the verified client certificate on ``sock``, if any."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        return peer_common_name(sock.getpeercert())
    except (ValueError, OSError):
        return None


def certificate_identity(common_name: str | None) -> str | None:
    """The sender identity a verified client certificate gives: ``cert:<CN>``."""
    return f"cert:{common_name}" if common_name else None


def _socket_of(assoc: Any) -> socket.socket | None:
    wrapper = assoc.dul.socket
    return None if wrapper is None else cast(socket.socket | None, wrapper.socket)


class _SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server; in a worker (``worker`` set) bound with
    SO_REUSEPORT so that every worker listens on the same port and the kernel spreads
    the connections, and counting the connections each worker accepts."""

    def __init__(self, *args: Any, worker: int | None, **kwargs: Any) -> None:
        self.reuse_port = worker is not None
        self._connections = metrics.WORKER_CONNECTIONS.labels(worker=str(worker or 0))
        super().__init__(*args, **kwargs)  # binds: reuse_port must be set before

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request: Any, client_address: Any) -> None:
        self._connections.inc()
        super().process_request(request, client_address)


class DimseReceiver:
    """Owns the pynetdicom AE and its listening servers (plain and DICOM TLS)."""

    def __init__(
        self,
        settings: IngestSettings,
        claim_check: ClaimCheck,
        loop: asyncio.AbstractEventLoop,
        audit: Auditor | None = None,
        *,
        worker: int | None = None,
    ) -> None:
        self._settings = settings
        self._worker = worker
        """This process's index among ingest's workers (RADFLOW_INGEST_WORKERS > 1):
        its listeners share their ports with the other workers' (SO_REUSEPORT).
        None: the only process."""
        self._audit = audit
        self._claim_check = claim_check
        self._loop = loop
        self._rules = settings.peer_rules
        self._certificate_peers = settings.certificate_peers
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        # Open associations per sender, and which sender each association counts for;
        # written from association threads.
        self._senders_lock = threading.Lock()
        self._per_sender: Counter[str] = Counter()
        self._counted: dict[int, str] = {}
        # pynetdicom reads this process-wide switch when a C-STORE arrives; ingest is
        # the only SCP in its process, so setting it here is the one place it is set.
        # Off: data sets go to the ReceivedDataSet that receive_datasets installs.
        _config.STORE_RECV_CHUNKED_DATASET = False

        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.maximum_pdu_size = settings.max_pdu_bytes
        ae.acse_timeout = settings.acse_timeout_s
        ae.dimse_timeout = settings.dimse_timeout_s
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in (*_STORAGE_CLASSES.values(), *settings.extra_sop_classes):
            ae.add_supported_context(uid, list(RECEIVED))
        self._ae = ae

    @property
    def port(self) -> int:
        """The plain listener's bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("plain DIMSE listener not started")
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The DICOM TLS listener's bound port."""
        if self._tls_server is None:
            raise RuntimeError("DICOM TLS listener not started")
        return int(self._tls_server.server_address[1])

    def start(self) -> None:
        """Open the plain listener (unless turned off) and, with a certificate, the
        DICOM TLS one.

        Raises:
            TlsFilesUnusable: the certificate, key or client CA cannot be used.
        """
        settings = self._settings
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_CONN_OPEN, self._cap_datasets),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        tls = None
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            context = server_context(
                settings.tls_cert_file,
                settings.tls_key_file,
                client_ca_file=settings.tls_client_ca_file,
                require_client_cert=settings.dimse_tls_require_client_cert,
            )
            tls = DeferredHandshake(context, timeout_s=settings.acse_timeout_s)
        if settings.dimse_plain:
            self._server = self._serve((settings.dimse_host, settings.dimse_port), handlers)
            log.info(
                "DIMSE listening",
                extra={
                    "host": settings.dimse_host,
                    "port": self.port,
                    "called_ae": settings.ae_title,
                },
            )
        if tls is not None:
            self._tls_server = self._serve(
                (settings.dimse_host, settings.dimse_tls_port),
                handlers,
                cast(ssl.SSLContext, tls),
            )
            log.info(
                "DICOM TLS listening",
                extra={
                    "host": settings.dimse_host,
                    "port": self.tls_port,
                    "called_ae": settings.ae_title,
                    "client": (
                        "no certificate asked"
                        if settings.tls_client_ca_file is None
                        else "certificate required"
                        if settings.dimse_tls_require_client_cert
                        else "certificate optional"
                    ),
                },
            )

    def _serve(
        self,
        address: tuple[str, int],
        handlers: list[Any],
        ssl_context: ssl.SSLContext | None = None,
    ) -> ThreadedAssociationServer:
        """``AE.start_server(block=False)``, with our server class (SO_REUSEPORT for
        workers, connections counted per worker)."""
        server = self._ae.make_server(
            address,
            evt_handlers=handlers,
            ssl_context=ssl_context,
            server_class=_SharedPortServer,
            worker=self._worker,
        )
        thread = threading.Thread(
            target=make_target(server.serve_forever),
            name=f"AcceptorServer@{address[1]}",
            daemon=True,
        )
        thread.start()
        # As start_server does: the AE knows its servers (its shutdown and
        # active_associations use the list, and the server's shutdown removes itself).
        self._ae._servers.append(server)
        return server

    async def stop(self, grace_s: float) -> None:
        """Stop listening, let open associations finish for ``grace_s``, abort the rest.

        An aborted association's in-flight instance was never acknowledged, so its
        sender retries it: nothing is lost.
        """
        servers = [s for s in (self._server, self._tls_server) if s is not None]
        self._server = self._tls_server = None
        for server in servers:
            await asyncio.to_thread(server.shutdown)
        deadline = time.monotonic() + grace_s

        def active() -> list[Any]:
            return [assoc for server in servers for assoc in server.active_associations]

        # pynetdicom exposes open associations only as a thread list: poll it.
        while active() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        for assoc in active():
            assoc.abort()

    # Handlers: called in association threads. They return a status or nothing and
    # never raise (pynetdicom would answer 0xC211 and log the dataset otherwise).

    def _on_conn_open(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.inc()
        sock = _socket_of(event.assoc)
        if sock is None:
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(
            sock, event.assoc.requestor.address
        ):
            # No A-ASSOCIATE-RQ can come on a closed socket: the association thread
            # ends now instead of waiting acse_timeout_s for one.
            event.assoc.acse_timeout = 0

    def _handshake(self, sock: ssl.SSLSocket, address: str) -> bool:
        """Complete the TLS handshake; on failure, close the connection."""
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            metrics.TLS_HANDSHAKE_FAILURES.inc()
            why = getattr(exc, "reason", None) or type(exc).__name__
            log.warning(
                "DICOM TLS handshake failed", extra={"peer_address": address, "reason": why}
            )
            if self._audit is not None:
                self._audit.authentication_failure(
                    Door.DICOM_TLS,
                    reason=f"TLS handshake failed: {why}",
                    peer_address=address,
                    node=True,
                )
            # Closed, not shut down: an SSLSocket shut down drops its TLS layer, and
            # the DUL would read the peer's TLS records as PDUs.
            sock.close()
            return False
        # The handshake's timeout served; pynetdicom reads a blocking socket.
        sock.settimeout(None)
        return True

    def _cap_datasets(self, event: evt.Event) -> None:
        receive_datasets(
            event.assoc, self._settings.max_instance_bytes, self._settings.spool_memory_bytes
        )
        bound_pdu_length(event.assoc, self._settings.max_pdu_bytes)

    def _on_conn_close(self, event: evt.Event) -> None:
        metrics.ASSOCIATIONS.dec()
        with self._senders_lock:
            sender = self._counted.pop(id(event.assoc), None)
            if sender is not None:
                self._per_sender[sender] -= 1
                if self._per_sender[sender] <= 0:
                    del self._per_sender[sender]

    def _on_requested(self, event: evt.Event) -> None:
        """Admit or reject an association request: calling-AE allow-list, then the
        certificate's allowed AE titles (DICOM TLS), then the per-sender limit."""
        assoc = event.assoc
        # At EVT_REQUESTED only the A-ASSOCIATE-RQ primitive is populated.
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip() if primitive else ""
        address = assoc.requestor.address
        sock = _socket_of(assoc)
        common_name = certificate_cn(sock)
        identity = certificate_identity(common_name)
        if self._rules and not any(rule.allows(calling, address) for rule in self._rules):
            self._reject(assoc, "calling_ae_not_allowed", calling, address, identity)
            return
        if isinstance(sock, ssl.SSLSocket) and self._certificate_peers:
            peer = self._certificate_peers.get(common_name) if common_name else None
            if peer is None or not peer.allows(calling):
                self._reject(assoc, "certificate_not_allowed", calling, address, identity)
                return
        sender = identity or f"{calling}@{address}"
        with self._senders_lock:
            over = self._per_sender[sender] >= self._settings.max_associations_per_sender
            if not over:
                self._per_sender[sender] += 1
                self._counted[id(assoc)] = sender
        if over:
            self._reject(assoc, "sender_limit", calling, address, identity)

    def _reject(
        self, assoc: Any, reason: str, calling: str, address: str, identity: str | None
    ) -> None:
        metrics.ASSOCIATIONS_REJECTED.labels(reason).inc()
        log.warning(
            "association rejected",
            extra={
                "reason": reason,
                "calling_ae": calling,
                "peer_address": address,
                "identity": identity,
            },
        )
        if reason != "sender_limit" and self._audit is not None:
            self._audit.authentication_failure(
                Door.DIMSE, reason=reason, peer_address=address, user=identity or calling, node=True
            )
        if reason == "sender_limit":
            assoc.acse.send_reject(*_REJECT_LOCAL_LIMIT)
        else:
            assoc.acse.send_reject(*_REJECT_CALLING_AE)
        # As pynetdicom does after its own rejections: let the DUL send the A-ASSOCIATE-RJ
        # before the socket is closed.
        assoc.kill()

    def _on_echo(self, _: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _on_store(self, event: evt.Event) -> Dataset:
        request = cast(C_STORE, event.request)
        assoc = event.assoc
        data = request.DataSet
        if isinstance(data, ReceivedDataSet) and data.over:
            data.discard()  # nothing of it was kept
            metrics.INSTANCES.labels(
                Protocol.DIMSE.value, StoreStatus.INSTANCE_TOO_LARGE.label
            ).inc()
            log.warning(
                "instance not stored",
                extra={
                    "status": f"0x{StoreStatus.INSTANCE_TOO_LARGE:04X}",
                    "reason": "instance exceeds the size limit",
                    "protocol": Protocol.DIMSE.value,
                    "calling_ae": assoc.requestor.ae_title.strip(),
                    "peer_address": assoc.requestor.address,
                },
            )
            return status_dataset(StoreStatus.INSTANCE_TOO_LARGE, "instance exceeds the size limit")
        origin = Origin(
            sender=Sender(
                protocol=Protocol.DIMSE,
                calling_ae=assoc.requestor.ae_title.strip(),
                called_ae=assoc.acceptor.ae_title.strip(),
                peer_address=assoc.requestor.address,
                identity=certificate_identity(certificate_cn(_socket_of(assoc))),
            ),
            priority=_DIMSE_PRIORITY.get(int(request.Priority or 0), Priority.MEDIUM),
            expected=Expected(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
            ),
        )
        if not isinstance(data, ReceivedDataSet):
            # Not received through receive_datasets: nothing of ours to release.
            data = ReceivedDataSet.holding(data)
        # The data set behind ingest's file meta, in the negotiated transfer syntax:
        # the Part 10 file the claim check reads, built without copying the data set.
        part10 = CanonicalFile(
            encode_file_meta(
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax),
            ),
            data.received(),
            0,
        )
        return self._bridge(cast(BinaryIO, part10), data, origin)

    def _bridge(self, part10: BinaryIO, received: ReceivedDataSet, origin: Origin) -> Dataset:
        """The one crossing from a pynetdicom thread to the event loop."""
        timeout_s = self._settings.store_timeout_for(received.size)
        future = asyncio.run_coroutine_threadsafe(self._store(part10, received, origin), self._loop)
        try:
            return future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            log.error(  # noqa: TRY400 - an expected outcome, no traceback wanted
                "claim check timed out",
                extra={"calling_ae": origin.sender.calling_ae, "timeout_s": round(timeout_s, 1)},
            )
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "storage timed out; retry")
        except Exception:
            log.exception("claim check failed")
            return status_dataset(StoreStatus.OUT_OF_RESOURCES, "receiver unavailable; retry")

    async def _store(self, part10: BinaryIO, received: ReceivedDataSet, origin: Origin) -> Dataset:
        try:
            await self._claim_check.store(part10, origin)
        except NotStored as exc:
            return status_dataset(exc.status, exc.detail)
        finally:
            # Here, not in the association thread: after a timeout the claim check
            # must never go on with the bytes emptied under it (it ends here, and a
            # worker thread still reading them only produces a result nobody uses).
            received.discard()
        return status_dataset(StoreStatus.SUCCESS)
