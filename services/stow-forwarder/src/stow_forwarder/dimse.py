"""A DIMSE destination: C-STORE SCU for on-premise PACS that do not speak DICOMweb.

One association per batch (one study), proposing for each SOP class the syntax the
instance is in, plus Explicit VR Little Endian for compressed instances: a PACS that
refuses the compressed syntax gets the instance decompressed losslessly instead of
not at all. Files are sent in pynetdicom's chunked mode, straight from the spool file,
so memory does not grow with the instance.

How answers are sorted (PS3.4 Annex B.2.3 and PS3.7 Annex C), the same way for every
peer:

- Success 0x0000 and the warnings 0xB000, 0xB006, 0xB007: stored.
- 0x0111 (duplicate SOP instance): the PACS already holds the instance, so it is
  delivered as far as we are concerned; logged as a duplicate.
- 0xA7xx (out of resources): retried, within the destination's budget.
- 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), 0x0122
  (SOP class not supported), 0x0124 (not authorised) and any other failure: refused,
  dead-lettered with the status.
- No connection, an abort, a DIMSE timeout, or an association rejected *transiently*
  (e.g. the PACS is at its association limit): retried, and counted by the circuit
  breaker. An association rejected *permanently* (e.g. called AE title not
  recognised) is a configuration error at the destination: refused.

With ``tls:`` the association runs over DICOM TLS (PS3.15 Annex B, TLS 1.2+): the
peer's certificate is verified against ``ca_file`` (or the system's trust store) for
``server_name`` or the host, and ``cert_file``/``key_file`` are presented when the
peer asks. A failed handshake is retried like any lost connection, with its reason
("TLS: certificate verify failed (...)") in the dead letter if it never succeeds.

pynetdicom is synchronous, so each association runs in a worker thread of the
client's own (one per lane): it never waits behind the bucket requests that fill the
event loop's default executor while the next batch is staged. Each association is
guarded by :func:`radflow_core.scu.keep_responses`, so a response pynetdicom's reactor
thread sees first is not lost (which would cost a DIMSE timeout and a second copy).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Any, cast

from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from radflow_codecs.codecs import Target
from radflow_codecs.streaming import normalize_file
from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import ConfigurationError, PipelineError
from radflow_core.events import Lane
from radflow_core.scu import keep_responses
from radflow_core.tls import DeferredHandshake, TlsFilesUnusable, client_context
from radflow_rules.destinations import DimsePeer
from radflow_rules.rules import Destination
from stow_forwarder.answer import Answer, Outgoing
from stow_forwarder.client import no_answer
from stow_forwarder.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentBook,
    commitment_request,
)
from stow_forwarder.metrics import REQUEST_SECONDS
from stow_forwarder.settings import ForwarderSettings
from stow_forwarder.verify import Commitment, VerificationUnanswered

log = logging.getLogger(__name__)

# The forwarder is the only DIMSE user in its process: send files as they are, in
# PDU-sized chunks, never decoded into memory.
_config.STORE_SEND_CHUNKED_DATASET = True

HIGH, MEDIUM = 1, 0
"""C-STORE Priority (0000,0700): STAT goes as HIGH."""
_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})
_MAX_CONTEXTS = 128


class Verdict(Enum):
    STORED = "stored"
    ALREADY_STORED = "already_stored"
    """The peer had the instance already (0x0111): delivered, nothing new stored."""
    RETRY = "retry"
    REFUSED = "refused"


def verdict(status: int) -> Verdict:
    """What a C-STORE response status means for the instance."""
    if status == StoreStatus.SUCCESS or status in _WARNINGS:
        return Verdict.STORED
    if status == StoreStatus.DUPLICATE_SOP_INSTANCE:
        return Verdict.ALREADY_STORED
    if 0xA700 <= status <= 0xA7FF:
        return Verdict.RETRY
    return Verdict.REFUSED


def proposed_contexts(items: Sequence[Outgoing]) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs to propose, instances' own syntaxes first."""
    pairs: dict[tuple[str, str], None] = {}
    for item in items:
        pairs[(item.sop_class_uid, item.transfer_syntax_uid)] = None
    for item in items:
        if UID(item.transfer_syntax_uid).is_compressed:
            pairs[(item.sop_class_uid, str(ExplicitVRLittleEndian))] = None
    return list(pairs)[:_MAX_CONTEXTS]


def _on_connected(timeout_s: float, failures: list[str], event: evt.Event) -> None:
    """Nagle off; over DICOM TLS, the handshake, whose failure is kept in
    ``failures`` (pynetdicom would log it and report only "no association")."""
    wrapper = event.assoc.dul.socket
    sock = None if wrapper is None else wrapper.socket
    if sock is None:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not isinstance(sock, ssl.SSLSocket):
        return
    sock.settimeout(timeout_s)
    try:
        sock.do_handshake()
    except (OSError, ValueError) as exc:
        failures.append(no_answer(exc))
        sock.close()
        return
    sock.settimeout(None)


class DimseClient:
    """A DICOM peer reached by C-STORE (``kind: dimse`` in the rule file)."""

    def __init__(
        self,
        destination: Destination,
        settings: ForwarderSettings,
        commitments: CommitmentBook | None = None,
    ) -> None:
        """``commitments`` matches storage commitment reports to their requests, for
        ``verify: storage-commitment`` (shared with the process's listener).

        Raises:
        ConfigurationError: the destination's CA, certificate or key cannot be used
            (the forwarder then does not start, or leaves the destination stopped).
        """
        assert destination.dimse is not None
        self.destination = destination
        self.peer: DimsePeer = destination.dimse
        self._settings = settings
        self._commitments = commitments or CommitmentBook()
        self._threads = ThreadPoolExecutor(max_workers=len(Lane), thread_name_prefix="dimse")
        self._tls: tuple[Any, str] | None = None
        tls = destination.tls
        if tls is not None:
            try:
                context = client_context(
                    ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file
                )
            except (TlsFilesUnusable, OSError, ssl.SSLError) as exc:
                raise ConfigurationError(
                    f"destination {destination.name!r}: its tls files cannot be used "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self._tls = (DeferredHandshake(context), tls.server_name or self.peer.host)

    async def close(self) -> None:
        """Called when no batch is on the wire any more; safe to call twice."""
        self._threads.shutdown(wait=False)

    async def holds(self, study_instance_uid: str, sop_instance_uids: Sequence[str]) -> set[str]:
        """Not asked (a PACS need not answer C-FIND for what it stores): the instances
        are sent again, and a PACS that has one answers 0x0111, counted as delivered."""
        return set()

    async def commit(self, items: Sequence[tuple[str, str]]) -> Commitment:
        """Request storage commitment for (SOP Instance UID, SOP Class UID) pairs and
        wait up to ``commitment_timeout_s`` for the report, on the N-ACTION's
        association or on one the destination opens to our listener.

        Raises:
            VerificationUnanswered: no association, no N-ACTION answer or a failure
                status, or no report in time.
        """
        transaction_uid = str(generate_uid())
        waiting = self._commitments.expect(transaction_uid)
        timeout_s = self._settings.commitment_timeout_s
        try:
            await asyncio.to_thread(self._request_commitment, transaction_uid, items, waiting)
            return await asyncio.wait_for(asyncio.wrap_future(waiting), timeout=timeout_s)
        except TimeoutError:
            raise VerificationUnanswered(
                f"no storage commitment report for transaction {transaction_uid} "
                f"within {timeout_s:g}s"
            ) from None
        finally:
            self._commitments.forget(transaction_uid)

    def _request_commitment(
        self, transaction_uid: str, items: Sequence[tuple[str, str]], waiting: object
    ) -> None:
        """The N-ACTION, on an association of its own; kept open a moment for a
        destination that reports on it (``commitment_same_association_s``)."""
        ae = AE(ae_title=self.peer.calling_ae_title)
        ae.connection_timeout = self._settings.connect_timeout_s
        ae.acse_timeout = self._settings.connect_timeout_s
        ae.dimse_timeout = self._settings.request_timeout_s
        ae.network_timeout = self._settings.request_timeout_s
        ae.add_requested_context(StorageCommitmentPushModel)
        failures: list[str] = []
        opened = functools.partial(_on_connected, self._settings.connect_timeout_s, failures)
        assoc = ae.associate(
            self.peer.host,
            self.peer.port,
            ae_title=self.peer.ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, opened),
                (evt.EVT_N_EVENT_REPORT, self._commitments.on_event_report),
            ],
            tls_args=cast("tuple[ssl.SSLContext, str] | None", self._tls),
        )
        if not assoc.is_established:
            _close(assoc)
            why = failures[0] if failures else "no association for storage commitment"
            if assoc.is_rejected and assoc.acceptor.primitive is not None:
                rsp = assoc.acceptor.primitive
                why = f"association rejected ({rsp.result_str}: {rsp.reason_str})"
            raise VerificationUnanswered(why)
        keep_responses(assoc)  # the N-ACTION's answer must not be taken by the reactor
        try:
            status, _ = assoc.send_n_action(
                commitment_request(transaction_uid, items),
                REQUEST_COMMITMENT,
                StorageCommitmentPushModel,
                STORAGE_COMMITMENT_INSTANCE,
            )
            if "Status" not in status:
                raise VerificationUnanswered("no N-ACTION response (timeout or abort)")
            code = int(status.Status)
            if code != StoreStatus.SUCCESS:
                raise VerificationUnanswered(f"storage commitment refused: N-ACTION 0x{code:04X}")
            grace = self._settings.commitment_same_association_s
            deadline = time.monotonic() + grace
            future = cast("Future[Commitment]", waiting)
            while not future.done() and time.monotonic() < deadline and assoc.is_established:
                time.sleep(0.05)
        finally:
            if assoc.is_established:
                assoc.release()

    async def store(self, items: Sequence[Outgoing], lane: Lane) -> Answer:
        started = time.perf_counter()
        priority = HIGH if lane is Lane.STAT else MEDIUM
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(self._threads, self._store, items, priority)
        label = "error" if answer.peer_unavailable else "dimse"
        REQUEST_SECONDS.labels(self.destination.name, label).observe(time.perf_counter() - started)
        return answer

    def _ae(self, items: Sequence[Outgoing]) -> AE:
        ae = AE(ae_title=self.peer.calling_ae_title)
        ae.connection_timeout = self._settings.connect_timeout_s
        ae.acse_timeout = self._settings.connect_timeout_s
        ae.dimse_timeout = self._settings.request_timeout_s
        ae.network_timeout = self._settings.request_timeout_s
        for sop_class, syntax in proposed_contexts(items):
            ae.add_requested_context(sop_class, syntax)
        return ae

    def _store(self, items: Sequence[Outgoing], priority: int) -> Answer:
        uids = [item.sop_instance_uid for item in items]
        failures: list[str] = []
        opened = functools.partial(_on_connected, self._settings.connect_timeout_s, failures)
        assoc = self._ae(items).associate(
            self.peer.host,
            self.peer.port,
            ae_title=self.peer.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, opened)],
            tls_args=cast("tuple[ssl.SSLContext, str] | None", self._tls),
        )
        if not assoc.is_established:
            _close(assoc)
            return _not_associated(assoc, uids, failures[0] if failures else None)
        # Else a quick answer can be taken by pynetdicom's own reactor: the send waits
        # request_timeout_s, and the instance is sent again on a new association.
        keep_responses(assoc)
        answer = Answer(None)
        try:
            for item in items:
                if not assoc.is_established:
                    answer.retry[item.sop_instance_uid] = "association lost"
                    answer.peer_unavailable = True
                    continue
                self._send_one(assoc, item, priority, answer)
        finally:
            if assoc.is_established:
                assoc.release()
        return answer

    def _send_one(self, assoc: Association, item: Outgoing, priority: int, answer: Answer) -> None:
        uid = item.sop_instance_uid
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        path = item.path
        with tempfile.TemporaryDirectory(prefix="radflow-dimse-") as scratch:
            if (item.sop_class_uid, item.transfer_syntax_uid) not in accepted:
                if (item.sop_class_uid, str(ExplicitVRLittleEndian)) not in accepted:
                    answer.refused[uid] = (
                        None,
                        f"the destination accepted no presentation context for SOP class "
                        f"{item.sop_class_uid} in {item.transfer_syntax_uid} or explicit "
                        "VR little endian",
                    )
                    return
                path = Path(scratch) / "decompressed.dcm"
                try:
                    normalize_file(item.path, path, Target.EXPLICIT_VR_LITTLE_ENDIAN)
                except PipelineError as exc:
                    answer.refused[uid] = (None, f"cannot decompress for the peer: {exc.reason}")
                    return
            try:
                status = assoc.send_c_store(path, priority=priority)
            except (ValueError, AttributeError, OSError) as exc:
                answer.refused[uid] = (None, f"cannot send: {type(exc).__name__}")
                return
        if "Status" not in status:
            answer.retry[uid] = "no C-STORE response (timeout or abort)"
            answer.peer_unavailable = True
            return
        code = int(status.Status)
        outcome = verdict(code)
        if outcome is Verdict.STORED:
            answer.delivered.add(uid)
        elif outcome is Verdict.ALREADY_STORED:
            answer.delivered.add(uid)
            log.info(
                "the destination already holds the instance; counted as delivered",
                extra={
                    "sop_instance_uid": uid,
                    "destination": self.destination.name,
                    "status": f"0x{code:04X}",
                },
            )
        elif outcome is Verdict.RETRY:
            answer.retry[uid] = f"out of resources (0x{code:04X})"
            answer.peer_unavailable = True
        else:
            answer.refused[uid] = (code, f"C-STORE status 0x{code:04X}")


def _close(assoc: Association) -> None:
    """Close what pynetdicom leaves open after a failed association (its socket)."""
    wrapper = assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        wrapper.socket.close()


def _not_associated(assoc: Association, uids: list[str], tls_failure: str | None) -> Answer:
    if tls_failure is not None:
        return Answer(None, retry=dict.fromkeys(uids, tls_failure), peer_unavailable=True)
    rsp = assoc.acceptor.primitive
    if assoc.is_rejected and rsp is not None:
        why = f"association rejected ({rsp.result_str}: {rsp.reason_str})"
        if rsp.result == 0x01:
            return Answer(None, refused=dict.fromkeys(uids, (None, why)))
        return Answer(None, retry=dict.fromkeys(uids, why), peer_unavailable=True)
    return Answer(
        None,
        retry=dict.fromkeys(uids, "no association (connection refused, timeout or abort)"),
        peer_unavailable=True,
    )
