"""The ledger's engine, without a broker: facts in any order, statuses, overdue, and
when a study counts as delivered."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from ledger.book import Book, Mark, Status, tally
from radflow_core.events import (
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
    ForwardVerified,
    Lane,
    PreviewOf,
    Sender,
    VerificationMethod,
)

T0 = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
STUDY = "1.2.3.4"
QUIET = timedelta(seconds=30)
AFTER = timedelta(minutes=15)


def _identity(sop: str, study: str = STUDY) -> dict[str, Any]:
    return {
        "sop_instance_uid": f"{study}.1.{sop}",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": study,
        "series_instance_uid": f"{study}.1",
        "sender": Sender(protocol="dimse"),
        "received_at": T0,
    }


def _key(sop: str, destination: str) -> str:
    return hashlib.sha256(f"{sop}|{destination}".encode()).hexdigest()


def request(sop: str, destination: str, at: datetime = T0, study: str = STUDY) -> ForwardRequested:
    return ForwardRequested(
        **_identity(sop, study),
        destination=destination,
        lane=Lane.ROUTINE,
        blob={"bucket": "b", "key": "k", "size": 1, "sha256": "0" * 64},
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        requested_transfer_syntax_uid="1.2.840.10008.1.2.1",
        original_sha256="0" * 64,
        rules=("r",),
        rules_digest="abc",
        idempotency_key=_key(sop, destination),
        routed_at=at,
    )


def _delivery(sop: str, destination: str) -> dict[str, Any]:
    return {
        **_identity(sop),
        "destination": destination,
        "lane": Lane.ROUTINE,
        "idempotency_key": _key(sop, destination),
        "original_sha256": "0" * 64,
        "attempts": 1,
    }


def completed(
    sop: str, destination: str, at: datetime, verification: VerificationMethod | None = None
) -> ForwardCompleted:
    return ForwardCompleted(
        **_delivery(sop, destination),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size=1,
        delivered_at=at,
        latency_s=1.0,
        verification=verification,
    )


def verified(sop: str, destination: str, at: datetime) -> ForwardVerified:
    return ForwardVerified(
        **_delivery(sop, destination),
        method=VerificationMethod.QIDO,
        checks=1,
        delivered_at=at,
        verified_at=at,
    )


def failed(sop: str, destination: str, at: datetime, reason: str = "rejected") -> ForwardFailed:
    return ForwardFailed(
        **_delivery(sop, destination),
        reason=reason,
        message="no",
        retriable=False,
        failed_at=at,
    )


def test_an_outcome_read_before_its_request_still_counts_and_a_repeat_changes_nothing() -> None:
    book = Book()
    assert book.apply(0, completed("1", "pacs", T0 + timedelta(seconds=5)), T0) is not None
    study = book.study(STUDY)
    assert study is not None
    assert study.delivered(frozenset(), T0 + timedelta(hours=1), QUIET) is None, (
        "its request not read yet: the study may have more"
    )
    entry = book.apply(0, request("1", "pacs"), T0)
    assert entry is not None and entry.routed_at == T0
    assert entry.status is Status.DELIVERED
    assert book.apply(0, request("1", "pacs"), T0 + timedelta(seconds=9)) is None
    assert book.apply(0, completed("1", "pacs", T0 + timedelta(seconds=5)), T0) is None
    assert study.delivered(frozenset(), T0 + timedelta(hours=1), QUIET) is not None


def test_the_later_of_failure_and_success_wins() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, failed("1", "pacs", T0 + timedelta(seconds=1)), T0)
    study = book.study(STUDY)
    assert study is not None
    assert study.entries[_key("1", "pacs")].status is Status.FAILED
    # replayed and delivered
    book.apply(0, completed("1", "pacs", T0 + timedelta(seconds=2)), T0)
    assert study.entries[_key("1", "pacs")].status is Status.DELIVERED
    # then a verification finds it missing: a failure after the delivery
    book.apply(0, failed("1", "pacs", T0 + timedelta(seconds=3), "not_held"), T0)
    entry = study.entries[_key("1", "pacs")]
    assert entry.status is Status.FAILED and entry.failure == "not_held"


def test_counts_per_destination_and_overdue() -> None:
    book = Book()
    for sop in ("1", "2", "3", "4"):
        book.apply(0, request(sop, "pacs"), T0)
    book.apply(0, completed("1", "pacs", T0), T0)
    book.apply(0, completed("2", "pacs", T0), T0)
    book.apply(0, verified("2", "pacs", T0), T0)
    book.apply(0, failed("3", "pacs", T0), T0)
    study = book.study(STUDY)
    assert study is not None
    entries = study.destinations()["pacs"]
    early = tally("pacs", entries, False, T0 + timedelta(minutes=1), AFTER)
    assert (early.routed, early.delivered, early.verified, early.failed, early.pending) == (
        4,
        2,
        1,
        1,
        1,
    )
    assert early.overdue == 0
    late = tally("pacs", entries, False, T0 + timedelta(minutes=16), AFTER)
    assert late.overdue == 1, "only the pending one; a failed one is in the dead letters"
    # With verification on, the delivered-but-unverified one is overdue too.
    verifying = tally("pacs", entries, True, T0 + timedelta(minutes=16), AFTER)
    assert verifying.overdue == 2 and verifying.reached == 1


def test_a_study_is_delivered_once_every_instance_reached_and_it_was_quiet() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, request("1", "ai"), T0)
    book.apply(0, request("2", "pacs"), T0)
    study = book.study(STUDY)
    assert study is not None
    verify = frozenset({"ai"})
    later = T0 + timedelta(minutes=5)
    book.apply(0, completed("1", "pacs", T0), T0)
    book.apply(0, completed("2", "pacs", T0), T0)
    book.apply(0, completed("1", "ai", T0), T0)
    assert study.delivered(verify, later, QUIET) is None, "ai needs verification"
    book.apply(0, verified("1", "ai", T0), T0 + timedelta(seconds=1))
    assert study.delivered(verify, T0 + timedelta(seconds=10), QUIET) is None, "not quiet yet"
    event = study.delivered(verify, later, QUIET)
    assert event is not None
    assert event.revision == 1 and event.instances == 2
    assert [(d.destination, d.instances, d.verified) for d in event.destinations] == [
        ("ai", 1, True),
        ("pacs", 2, False),
    ]
    assert event.first_routed_at == T0
    study.mark = Mark(study_instance_uid=STUDY, revision=1, entries=3, published_at=later)
    assert study.delivered(verify, later, QUIET) is None, "published already"
    # One more instance later: once it arrives, the study is delivered again, revision 2.
    book.apply(0, request("3", "pacs", later), later)
    assert study.delivered(verify, later + QUIET * 2, QUIET) is None
    book.apply(0, completed("3", "pacs", later), later)
    again = study.delivered(verify, later + QUIET * 2, QUIET)
    assert again is not None and again.revision == 2 and again.instances == 3


def test_a_completion_that_announces_verification_waits_for_it_without_any_setting() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, request("1", "archive"), T0)
    study = book.study(STUDY)
    assert study is not None
    later = T0 + timedelta(minutes=5)
    book.apply(0, completed("1", "pacs", T0, VerificationMethod.QIDO), T0)
    book.apply(0, completed("1", "archive", T0), T0)
    assert study.delivered(frozenset(), later, QUIET) is None, "pacs is being verified"
    (pacs,) = study.destinations()["pacs"]
    assert not pacs.reached(False) and pacs.overdue(False, later, timedelta(minutes=1))
    book.apply(0, verified("1", "pacs", T0), T0 + timedelta(seconds=1))
    event = study.delivered(frozenset(), later, QUIET)
    assert event is not None
    assert [(d.destination, d.verified) for d in event.destinations] == [
        ("archive", False),
        ("pacs", True),
    ]


def test_a_failed_instance_keeps_its_study_from_being_delivered() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, failed("1", "pacs", T0), T0)
    study = book.study(STUDY)
    assert study is not None
    assert study.delivered(frozenset(), T0 + timedelta(hours=1), QUIET) is None


def test_only_studies_with_something_on_its_way_or_to_publish_are_watched() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, request("2", "pacs"), T0)
    assert book.take_changed() == {(0, STUDY)}
    assert book.take_changed() == set(), "taken"
    study = book.study(STUDY)
    assert study is not None
    assert study.watched(frozenset()), "on their way: may become overdue"
    book.apply(0, completed("1", "pacs", T0), T0)
    book.apply(0, failed("2", "pacs", T0), T0)
    assert not study.watched(frozenset()), "one arrived, one failed: nothing to do"
    book.apply(0, completed("2", "pacs", T0 + timedelta(seconds=1)), T0)
    assert book.take_changed() == {(0, STUDY)}
    assert study.watched(frozenset()), "all arrived: to publish"
    study.mark = Mark(study_instance_uid=STUDY, revision=1, entries=2, published_at=T0)
    assert not study.watched(frozenset()), "published"
    assert study.watched(frozenset({"pacs"})), "where verification is on, not arrived yet"


def preview_request(sop: str, destination: str, at: datetime = T0) -> ForwardRequested:
    original = request(sop, destination, at)
    return original.model_copy(
        update={
            "lane": Lane.STAT,
            "preview_of": PreviewOf(
                sop_instance_uid=f"{STUDY}.1.999",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                series_instance_uid=f"{STUDY}.1",
            ),
        }
    )


def test_a_preview_never_holds_a_study_back_nor_counts_as_a_diagnostic_instance() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, preview_request("900", "pacs"), T0)
    book.apply(0, completed("1", "pacs", T0), T0)
    study = book.get(0, STUDY)
    assert study is not None
    later = T0 + timedelta(hours=1)
    event = study.delivered(frozenset(), later, QUIET)
    assert event is not None, "the preview, never delivered, does not hold the study back"
    assert event.instances == 1
    assert [(d.destination, d.instances) for d in event.destinations] == [("pacs", 1)]
    assert study.entries[_key("900", "pacs")].preview


def test_a_preview_outcome_read_before_its_request_waits_for_the_request_like_any() -> None:
    book = Book()
    book.apply(0, request("1", "pacs"), T0)
    book.apply(0, completed("1", "pacs", T0), T0)
    book.apply(0, completed("900", "pacs", T0), T0)
    study = book.get(0, STUDY)
    assert study is not None
    later = T0 + timedelta(hours=1)
    assert study.delivered(frozenset(), later, QUIET) is None
    book.apply(0, preview_request("900", "pacs"), T0)
    event = study.delivered(frozenset(), later, QUIET)
    assert event is not None and event.instances == 1
    book.apply(0, request("2", "pacs"), T0)
    assert study.watched(frozenset()), "a diagnostic instance on its way keeps it watched"


def test_a_study_of_previews_alone_is_never_announced_delivered() -> None:
    book = Book()
    book.apply(0, preview_request("900", "pacs"), T0)
    book.apply(0, completed("900", "pacs", T0), T0)
    study = book.get(0, STUDY)
    assert study is not None
    assert study.delivered(frozenset(), T0 + timedelta(hours=1), QUIET) is None
    assert not study.watched(frozenset())
