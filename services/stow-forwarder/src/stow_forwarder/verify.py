"""Delivery verification: after a destination acknowledged instances, ask it again
whether it holds them (the destination's ``verify:`` in the rule file).

A PACS that answered "stored" and then lost the study is a classic; only asking it
again tells. Each acknowledged instance ends with ``dicom.forward.verified`` (held,
with the SOP Class it was sent as) or ``dicom.forward.failed``:

- ``not_held_after_delivery``: the destination answered, and the instance is not
  there (QIDO-RS does not list it once the window has passed, or lists it with
  another SOP Class; a storage commitment report puts it in the Failed SOP Sequence).
  Its delivery markers are set back to ``sending``, so a replay of the request asks
  the destination first and sends it again instead of skipping it as delivered.
- ``verification_unanswered``: the destination could not be asked (its QIDO-RS did
  not answer for the whole window; no storage commitment report came in time). What
  it holds is unknown; the markers keep ``delivered``.

QIDO-RS: a PACS indexes asynchronously, so the first question waits
``RADFLOW_FORWARDER_VERIFY_DELAY_S`` and an instance not listed yet is asked about
again, each wait twice the last, until ``RADFLOW_FORWARDER_VERIFY_WINDOW_S`` has
passed since the acknowledgement. One search per series per round covers a batch.

The verification of a fetch's instances runs beside the next request on the wire;
the fetch's offsets are committed only when every instance of it is verified or
failed, so a crash meanwhile reads the fetch again, and the replay (recognised as
delivered, not sent) is verified then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

from aiokafka import ConsumerRecord

from radflow_core.errors import PipelineError
from radflow_core.events import ForwardRequested, ForwardVerified, VerificationMethod
from radflow_core.kafka import EventProducer
from radflow_core.retry import HandedBack, current_turn
from radflow_rules.destinations import Verification
from radflow_rules.rules import Destination
from stow_forwarder.answer import SentAs
from stow_forwarder.markers import MarkerBook
from stow_forwarder.metrics import FAILED, VERIFICATION_FAILURES, VERIFIED, VERIFY_CHECKS
from stow_forwarder.settings import ForwarderSettings

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NOT_HELD = "not_held_after_delivery"
UNANSWERED = "verification_unanswered"


class VerificationUnanswered(PipelineError):
    """The destination could not be asked what it holds (no answer, an error status, an
    unreadable answer, or no storage commitment report in time)."""

    retriable = True
    reason = UNANSWERED


@dataclass(frozen=True)
class Delivered:
    """One instance the destination acknowledged, to verify."""

    request: ForwardRequested
    delivered_at: datetime
    attempts: int
    source: ConsumerRecord[bytes, bytes]
    """The request's record: what a dead letter carries to be replayed as it was."""
    sent: SentAs
    """Its UIDs at the destination (remapped when it was de-identified)."""


@dataclass
class Commitment:
    """A storage commitment report: what the destination commits to holding."""

    transaction_uid: str
    held: dict[str, str] = field(default_factory=dict)
    """SOP Instance UID → SOP Class UID, from the Referenced SOP Sequence."""
    failed: dict[str, int | None] = field(default_factory=dict)
    """SOP Instance UID → FailureReason (0008,1197), from the Failed SOP Sequence."""


@runtime_checkable
class Searchable(Protocol):
    async def instances_held(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> dict[str, str]:
        """SOP Instance UID → SOP Class UID of what the destination lists in the series.

        Raises:
            VerificationUnanswered: it could not be asked.
        """
        ...


@runtime_checkable
class Committing(Protocol):
    async def commit(self, items: Sequence[tuple[str, str]]) -> Commitment:
        """Ask the destination to commit to holding (SOP Instance UID, SOP Class UID)
        pairs, and wait for its report.

        Raises:
            VerificationUnanswered: no N-ACTION answer, a failure status, or no report
                in time.
        """
        ...


Fail = Callable[..., Awaitable[None]]
"""The deliverer's dead-letter writer: (request, source record, reason, message,
attempts, *, retriable, dicom_status=...)."""


async def _unless_handed_back(work: Coroutine[Any, Any, _T]) -> _T:
    """``work``'s result, or HandedBack as soon as the fetch must be handed back (a
    storage commitment report can take minutes; a stop does not wait for it)."""
    turn = current_turn()
    task = asyncio.ensure_future(work)
    handed_back = asyncio.ensure_future(turn.hand_back.wait())
    try:
        await asyncio.wait({task, handed_back}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        handed_back.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise HandedBack("handed back while waiting for a storage commitment report")
    return task.result()


class Verifier:
    """Verifies what one destination acknowledged, as its ``verify:`` says."""

    def __init__(
        self,
        destination: Destination,
        client: object,
        producer: EventProducer,
        markers: MarkerBook,
        settings: ForwarderSettings,
        fail: Fail,
    ) -> None:
        self.destination = destination
        self._client = client
        self._producer = producer
        self._markers = markers
        self._settings = settings
        self._fail = fail
        if self.enabled:
            # At 0 from the start, like every known label set: the dashboard's rate()
            # draws "none failed" instead of nothing, and sees the first failure.
            VERIFICATION_FAILURES.labels(destination.name)
            FAILED.labels(destination.name, NOT_HELD)

    @property
    def enabled(self) -> bool:
        return self.destination.verify is not Verification.OFF

    @property
    def method(self) -> VerificationMethod | None:
        """What the completed events announce: how the instances will be verified."""
        if self.destination.verify is Verification.QIDO:
            return VerificationMethod.QIDO
        if self.destination.verify is Verification.STORAGE_COMMITMENT:
            return VerificationMethod.STORAGE_COMMITMENT
        return None

    async def verify(self, delivered: Sequence[Delivered]) -> None:
        """Verify, then publish one outcome per instance.

        Raises:
            HandedBack: the fetch is handed back meanwhile (it is read again).
        """
        if not delivered or not self.enabled:
            return
        if self.destination.verify is Verification.QIDO:
            assert isinstance(self._client, Searchable)
            await self._by_qido(list(delivered), self._client)
        else:
            assert isinstance(self._client, Committing)
            await self._by_commitment(list(delivered), self._client)

    async def _by_qido(self, delivered: list[Delivered], client: Searchable) -> None:
        turn = current_turn()
        pending = {d.sent.sop_instance_uid: d for d in delivered}
        checks: dict[str, int] = dict.fromkeys(pending, 0)
        unanswered: dict[str, str] = {}
        start = time.monotonic()
        wait = self._settings.verify_delay_s
        while True:
            if await turn.wait_for_hand_back(wait):
                raise HandedBack("handed back while waiting to verify deliveries")
            series: dict[tuple[str, str], list[Delivered]] = {}
            for d in pending.values():
                key = (d.sent.study_instance_uid, d.sent.series_instance_uid)
                series.setdefault(key, []).append(d)
            for (study, series_uid), items in series.items():
                VERIFY_CHECKS.labels(self.destination.name).inc()
                try:
                    held = await client.instances_held(study, series_uid)
                except VerificationUnanswered as exc:
                    for d in items:
                        unanswered[d.sent.sop_instance_uid] = str(exc)
                    continue
                for d in items:
                    uid = d.sent.sop_instance_uid
                    checks[uid] += 1
                    unanswered.pop(uid, None)
                    sop_class = held.get(uid)
                    if sop_class is None:
                        continue
                    del pending[uid]
                    if sop_class == d.request.sop_class_uid:
                        await self._verified(d, VerificationMethod.QIDO, checks[uid])
                    else:
                        await self._not_held(
                            [d],
                            f"QIDO-RS lists the instance with SOP Class {sop_class}, "
                            f"it was sent as {d.request.sop_class_uid}",
                        )
            if not pending:
                return
            left = self._settings.verify_window_s - (time.monotonic() - start)
            if left <= 0:
                break
            wait = min(wait * 2, left)
        window = f"{self._settings.verify_window_s:g}s"
        missing = [d for uid, d in pending.items() if uid not in unanswered]
        if missing:
            await self._not_held(
                missing,
                f"acknowledged, and QIDO-RS did not list it in the {window} after delivery",
            )
        for uid, why in unanswered.items():
            await self._unanswered(
                pending[uid], f"QIDO-RS did not answer for {window} after delivery: {why}"
            )

    async def _by_commitment(self, delivered: list[Delivered], client: Committing) -> None:
        items = [(d.sent.sop_instance_uid, d.request.sop_class_uid) for d in delivered]
        VERIFY_CHECKS.labels(self.destination.name).inc()
        try:
            report = await _unless_handed_back(client.commit(items))
        except VerificationUnanswered as exc:
            for d in delivered:
                await self._unanswered(d, str(exc))
            return
        for d in delivered:
            uid = d.sent.sop_instance_uid
            if report.held.get(uid) == d.request.sop_class_uid:
                await self._verified(
                    d, VerificationMethod.STORAGE_COMMITMENT, 1, report.transaction_uid
                )
            elif uid in report.failed:
                reason = report.failed[uid]
                shown = f"0x{reason:04X}" if reason is not None else "no reason given"
                await self._not_held(
                    [d],
                    f"storage commitment {report.transaction_uid}: in the Failed SOP "
                    f"Sequence, FailureReason {shown}",
                    dicom_status=reason,
                )
            elif uid in report.held:
                await self._not_held(
                    [d],
                    f"storage commitment {report.transaction_uid}: committed with SOP Class "
                    f"{report.held[uid]}, it was sent as {d.request.sop_class_uid}",
                )
            else:
                await self._not_held(
                    [d],
                    f"storage commitment {report.transaction_uid}: the report does not "
                    "mention the instance",
                )

    async def _verified(
        self,
        d: Delivered,
        method: VerificationMethod,
        checks: int,
        transaction_uid: str | None = None,
    ) -> None:
        request = d.request
        event = ForwardVerified(
            **request.identity(),
            destination=self.destination.name,
            lane=request.lane,
            idempotency_key=request.idempotency_key,
            original_sha256=request.original_sha256,
            attempts=d.attempts,
            method=method,
            checks=max(1, checks),
            delivered_at=d.delivered_at,
            verified_at=datetime.now(UTC),
            transaction_uid=transaction_uid,
        )
        await self._producer.publish(event, request.key)
        VERIFIED.labels(self.destination.name, method.value).inc()
        log.info(
            "verified at the destination",
            extra={
                "sop_instance_uid": request.sop_instance_uid,
                "destination": self.destination.name,
                "method": method.value,
                "checks": checks,
            },
        )

    async def _not_held(
        self, items: list[Delivered], message: str, dicom_status: int | None = None
    ) -> None:
        """The destination acknowledged and does not hold them: their markers go back to
        ``sending`` first (a replay then asks and sends again), then the failures."""
        studies: dict[str, list[str]] = {}
        for d in items:
            studies.setdefault(d.request.study_instance_uid, []).append(d.request.idempotency_key)
        for study, keys in studies.items():
            await self._markers.reopen(study, keys)
        for d in items:
            VERIFICATION_FAILURES.labels(self.destination.name).inc()
            await self._fail(
                d.request,
                d.source,
                NOT_HELD,
                message,
                d.attempts,
                retriable=False,
                dicom_status=dicom_status,
            )

    async def _unanswered(self, d: Delivered, message: str) -> None:
        await self._fail(d.request, d.source, UNANSWERED, message, d.attempts, retriable=True)
