"""Event models: a CloudEvents-style envelope around one typed, versioned payload.

Every model is frozen and rejects unknown fields, so a producer cannot add a field
that consumers silently ignore: a schema change is a new version. Payloads carry
routing metadata only; patient name, ID and birth date stay in the blob (the PHI
store). JSON Schema files for downstream consumers are generated from these models
(``python -m radflow_core.schema``) into docs/events/.
"""

from __future__ import annotations

import functools
import socket
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from radflow_core.errors import EventDecodeError
from radflow_core.topics import STAT_LANE, Topic
from radflow_core.uids import Uid

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class EventModel(BaseModel):
    """Base of every payload: frozen, closed, documented field by field."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    type_name: ClassVar[str]
    """The CloudEvents ``type``."""
    version: ClassVar[int]
    """Schema version; bumped on any incompatible change."""
    topic: ClassVar[Topic | None] = None
    """The topic this payload is published on; None where the caller chooses it."""
    reads: ClassVar[tuple[int, ...]] = ()
    """Earlier versions this model also decodes: their fields are a subset of this
    version's, and what they lack has a default that says so (e.g. None)."""


class BlobRef(EventModel):
    """Where an object's bytes are, and how to verify them (the claim check)."""

    bucket: str
    """S3 bucket name."""
    key: str
    """Object key; derived from content and hashed UIDs, never a raw UID."""
    size: int = Field(ge=0)
    """Object size in bytes."""
    sha256: Sha256Hex
    """Lower-case hex sha256 of the object's bytes; consumers verify before use."""


class Protocol(StrEnum):
    DIMSE = "dimse"
    STOW_RS = "stow-rs"


class Sender(EventModel):
    """Who sent the instance and how (no patient data)."""

    protocol: Protocol
    """How the instance arrived."""
    calling_ae: str | None = None
    """DIMSE: the sender's AE title."""
    called_ae: str | None = None
    """DIMSE: the AE title the sender addressed."""
    peer_address: str | None = None
    """The sender's IP address as seen by ingest."""
    client: str | None = None
    """STOW-RS: the User-Agent of the client, if any."""
    identity: str | None = None
    """Who the sender proved to be, when it authenticated: ``jwt:<issuer>#<subject>``
    (a bearer token), ``apikey:<name>`` (a static API key) or ``cert:<subject CN>``
    (a TLS client certificate, STOW-RS or DICOM TLS). None on an unauthenticated
    door (plain DIMSE). Routing rules and allow-lists may match on it."""


class Priority(StrEnum):
    """The sender's request priority (DIMSE C-STORE Priority; STOW-RS has none)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class InstanceIdentity(EventModel):
    """What identifies an instance and routes it; shared by every per-instance event.

    No demographics: name, patient ID and birth date stay in the blob.
    """

    sop_instance_uid: Uid
    """(0008,0018) SOP Instance UID (unchanged by lossless transcoding)."""
    sop_class_uid: Uid
    """(0008,0016) SOP Class UID."""
    study_instance_uid: Uid
    """(0020,000D) Study Instance UID; also the record key (one study, one partition)."""
    series_instance_uid: Uid
    """(0020,000E) Series Instance UID."""
    modality: str | None = None
    """(0008,0060) Modality, if present."""
    body_part_examined: str | None = None
    """(0018,0015) Body Part Examined, if present."""
    priority: Priority = Priority.MEDIUM
    """Request priority as sent to ingest (DIMSE C-STORE Priority; medium for STOW-RS)."""
    sender: Sender
    """Who sent it to ingest, and how."""
    received_at: AwareDatetime
    """When ingest finished receiving the bytes (UTC)."""

    @property
    def key(self) -> bytes:
        """The record key: the Study Instance UID."""
        return self.study_instance_uid.encode("ascii")

    def identity(self) -> dict[str, Any]:
        """The identity fields alone, to build the next stage's event from."""
        return {name: getattr(self, name) for name in InstanceIdentity.model_fields}


class InstanceReceived(InstanceIdentity):
    """``dicom.instance.received`` v2 (and ``.stat``): one instance is durably stored
    as received.

    Published on ``dicom.instance.received`` for the routine lane and on
    ``dicom.instance.received.stat`` for the STAT lane; the payload is the same.

    v2 (from v1): ``order_ref``, so that later stages can match the instance with its
    order without the accession number. v1 records are still read (``order_ref`` None).
    """

    type_name: ClassVar[str] = "dicom.instance.received"
    version: ClassVar[int] = 2
    reads: ClassVar[tuple[int, ...]] = (1,)
    topic: ClassVar[Topic | None] = Topic.INSTANCE_RECEIVED

    transfer_syntax_uid: Uid
    """(0002,0010) Transfer Syntax UID of the stored original."""
    blob: BlobRef
    """The original Part 10 file, byte for byte as received."""
    order_ref: Sha256Hex | None = None
    """The order reference of the instance's Accession Number (0008,0050) and its
    issuer (Local Namespace Entity ID in (0008,0051)): HMAC-SHA256 under the
    deployment's order reference key (radflow_core.orders), as worklist items name
    their order; never the accession number itself. None without an accession number,
    or with order lookup off in ingest."""


class PixelInfo(EventModel):
    """The image's geometry as decoded (absent for non-image instances)."""

    frames: int = Field(ge=1)
    """Number of frames."""
    rows: int = Field(ge=1)
    """(0028,0010) Rows."""
    columns: int = Field(ge=1)
    """(0028,0011) Columns."""
    samples_per_pixel: int = Field(ge=1)
    """(0028,0002) Samples per Pixel."""
    bits_allocated: int = Field(ge=1)
    """(0028,0100) Bits Allocated."""
    bits_stored: int = Field(ge=1)
    """(0028,0101) Bits Stored."""
    photometric_interpretation: str
    """(0028,0004) of the original."""
    lossy_original: bool
    """True if the original was lossy compressed (its syntax, or (0028,2110) = 01)."""


class DecodeStatus(StrEnum):
    VERIFIED = "verified"
    """Re-encoded losslessly; the result decodes to exactly the original's values."""
    ALREADY_CANONICAL = "already_canonical"
    """The original is already in the target syntax and decodes completely."""
    NATIVE_FALLBACK = "native_fallback"
    """The target codec cannot encode this image; canonical is Explicit VR Little Endian,
    verified."""
    NON_IMAGE = "non_image"
    """No pixel data; passed through unchanged."""


class RoutingAttributes(EventModel):
    """Header attributes that routing rules read most and the event's identity does
    not carry, so that the router need not read the header from the blob store.
    Coded and device-model values only: no patient data, descriptions, institution or
    station (PS3.15's de-identification profile removes Station Name)."""

    requested_procedure_priority: str | None = None
    """(0040,1003) Requested Procedure Priority, at the top level or in the first
    Request Attributes Sequence item that has it (STAT, HIGH, ROUTINE, MEDIUM, LOW)."""
    manufacturer: str | None = None
    """(0008,0070) Manufacturer of the modality."""
    manufacturer_model_name: str | None = None
    """(0008,1090) Manufacturer's Model Name."""

    KEYWORDS: ClassVar[dict[str, str]] = {
        "RequestedProcedurePriority": "requested_procedure_priority",
        "Manufacturer": "manufacturer",
        "ManufacturerModelName": "manufacturer_model_name",
    }
    """DICOM keyword (as rules name it) → field."""

    def by_keyword(self) -> dict[str, str | None]:
        return {keyword: getattr(self, name) for keyword, name in self.KEYWORDS.items()}


class InstanceNormalized(InstanceIdentity):
    """``dicom.instance.normalized`` v3 (and ``.stat``): the canonical lossless variant
    is stored. Published on the lane's topic the received event came from.

    v2 (from v1): ``routing``, the header attributes rules read most, so the router
    reads no header from the blob store for them. v3 (from v2): ``order_ref``, passed
    on from the received event, which the router matches with the open orders. v1 and
    v2 records are still read (as v3 with ``routing`` / ``order_ref`` None)."""

    type_name: ClassVar[str] = "dicom.instance.normalized"
    version: ClassVar[int] = 3
    reads: ClassVar[tuple[int, ...]] = (1, 2)
    topic: ClassVar[Topic | None] = Topic.INSTANCE_NORMALIZED

    original: BlobRef
    """The original, as received (never modified)."""
    original_transfer_syntax_uid: Uid
    """Transfer syntax of the original."""
    canonical: BlobRef
    """The canonical variant (the original itself when already canonical or non-image)."""
    canonical_transfer_syntax_uid: Uid
    """Transfer syntax of the canonical variant."""
    decode_status: DecodeStatus
    """What was proven about the pixel data."""
    pixels: PixelInfo | None = None
    """Geometry, for image instances."""
    normalized_at: AwareDatetime
    """When transcode finished (UTC)."""
    routing: RoutingAttributes | None = None
    """The header attributes rules read most (v2; always written by transcode). None
    only in a v1 event: then the router reads them from the header."""
    order_ref: Sha256Hex | None = None
    """The received event's ``order_ref`` (v3), which the router matches with the open
    orders of ``worklist.items``."""


class PreviewOf(EventModel):
    """The original a preview instance was derived from."""

    sop_instance_uid: Uid
    """(0008,0018) of the original instance (its Source Image Sequence item)."""
    sop_class_uid: Uid
    """(0008,0016) of the original instance."""
    series_instance_uid: Uid
    """(0020,000E) of the original's series."""


class InstancePreview(InstanceIdentity):
    """``dicom.instance.preview`` v1: transcode derived a lossy, non-diagnostic preview
    instance from an original, so that a reading site sees each series before its full
    lossless instances arrive.

    The identity fields are the preview's own: a new SOP Instance UID (and series),
    in the original's study, so the record key keeps it on the study's partition. The
    original and its canonical variant are untouched.
    """

    type_name: ClassVar[str] = "dicom.instance.preview"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.INSTANCE_PREVIEW

    preview_of: PreviewOf
    """The original instance this preview was derived from."""
    blob: BlobRef
    """The preview instance (Part 10 file) in the blob store."""
    transfer_syntax_uid: Uid
    """Transfer syntax of the preview (lossy: JPEG baseline or HTJ2K)."""
    lossy_ratio: float = Field(gt=0)
    """(0028,2112) Lossy Image Compression Ratio written into the preview."""
    lossy_method: str
    """(0028,2114) Lossy Image Compression Method (ISO_10918_1 or ISO_15444_15)."""
    frames: tuple[int, ...]
    """1-based frame numbers of the original the preview holds."""
    derived_at: AwareDatetime
    """When transcode stored the preview (UTC)."""
    original: BlobRef
    """The original as received: the router reads its header when a rule needs an
    attribute the event does not carry, so a preview is routed as its original."""
    instance_number: int | None = None
    """(0020,0013) Instance Number of the original (None when absent): with
    ``original_frames`` what a rule's ``preview:`` selection is decided on."""
    original_frames: int = Field(default=1, ge=1)
    """(0028,0008) Number of Frames of the original (1 for a single-frame image)."""
    routing: RoutingAttributes | None = None
    """The original's header attributes rules read most (as in its normalized event)."""


class Lane(StrEnum):
    """STAT instances travel on topics of their own at every stage (received,
    normalized, forward requested) and are read first."""

    ROUTINE = "routine"
    STAT = "stat"

    def topic(self, routine: Topic) -> Topic:
        """This lane's topic for the stage whose routine-lane topic is ``routine``."""
        return STAT_LANE[routine] if self is Lane.STAT else routine

    def group(self, routine: str) -> str:
        """This lane's consumer group for a stage whose routine lane's group is
        ``routine`` (``<routine>.stat``): each lane has its own offsets and lag."""
        return f"{routine}.stat" if self is Lane.STAT else routine


LANES = (Lane.STAT, Lane.ROUTINE)
"""Every lane, STAT first: the order in which a stage sets up its consumer per lane."""


class DeidOption(StrEnum):
    """An option of the DICOM PS3.15 Annex E Basic Application Level Confidentiality
    Profile that a de-identification profile of the rule file applies (Table E.1-1's
    option columns this pipeline implements)."""

    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    """Retain Longitudinal Temporal Information with Modified Dates: dates shifted by a
    per-patient keyed offset (whole days), times kept (CID 7050 113107)."""
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    """Retain Patient Characteristics: sex, age, size, weight and the like (113108)."""
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    """Retain Device Identity: device serial numbers, station name and the like
    (113109)."""
    RETAIN_UIDS = "retain_uids"
    """Retain UIDs: UIDs kept as they are instead of remapped (113110)."""
    CLEAN_DESCRIPTORS = "clean_descriptors"
    """Clean Descriptors: the descriptions and comments the option lets through cleaned
    are removed instead, as the Basic Profile does (free text is not parsed); declared
    with its code (113105)."""


class Deidentification(EventModel):
    """The de-identification a route asks for: exactly what the forwarder applies to
    the instance just before it is delivered (the original and every other destination
    are untouched)."""

    profile: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,255}$")
    """The profile's name in the rule file (``a+b`` when two profiles met on one
    destination and the stricter combination of both was taken)."""
    options: tuple[DeidOption, ...] = ()
    """The Annex E options applied on top of the Basic Profile, sorted."""
    accept_burned_in: bool = False
    """True when every rule that de-identifies this route accepts instances whose
    Burned In Annotation (0028,0301) is YES (or that are suspect of it); otherwise such
    an instance is refused (``dicom.forward.failed``, ``burned_in_annotation``)."""


class ForwardRequested(InstanceIdentity):
    """``dicom.forward.requested`` v2 (and ``.stat``): deliver one instance to one
    destination.

    Published on ``dicom.forward.requested`` for the routine lane and on
    ``dicom.forward.requested.stat`` for the STAT lane; the payload is the same.

    v2 (from v1): ``deidentify``, the de-identification to apply before delivery, and
    ``preview_of``, set on the request of a lossy preview so that the ledger and
    analytics tell previews from diagnostic instances. v1 records are still read (as
    v2 without either: v1 routers neither de-identified nor sent previews).
    """

    type_name: ClassVar[str] = "dicom.forward.requested"
    version: ClassVar[int] = 2
    reads: ClassVar[tuple[int, ...]] = (1,)

    destination: str
    """Name of the destination as defined in the rule file."""
    lane: Lane
    """routine or stat; also tells which topic the event is on."""
    blob: BlobRef
    """The variant to send (the canonical variant, or the original when the destination
    accepts the original's syntax and not the canonical one)."""
    transfer_syntax_uid: Uid
    """Transfer syntax of ``blob``."""
    requested_transfer_syntax_uid: Uid
    """What the destination should receive; differs from ``transfer_syntax_uid`` when
    the forwarder must convert."""
    original_sha256: Sha256Hex
    """sha256 of the original as received; part of the idempotency key."""
    rules: tuple[str, ...]
    """Names of the rules that routed the instance here (``default`` for the default)."""
    rules_digest: str
    """First 12 hex digits of the rule file's sha256, for tracing a decision to a file."""
    idempotency_key: Sha256Hex
    """sha256 of (SOP Instance UID, original sha256, destination, and the
    de-identification when there is one): the same instance to the same destination
    always has the same key, so a replay is recognised (and a route that starts
    de-identifying sends again what the destination so far received identified)."""
    waited_for: Literal["study", "series"] | None = None
    """Set when the request was held until the study (or series) was complete."""
    routed_at: AwareDatetime
    """When the router decided (UTC); for a delayed study, when it was released."""
    deidentify: Deidentification | None = None
    """De-identify the instance just before delivering it (v2); None: deliver it as
    stored. The identity fields above stay the original's (the pipeline's own
    bookkeeping); only the destination sees the remapped UIDs."""
    preview_of: PreviewOf | None = None
    """Set when the instance is a lossy preview (v2): the original it was derived from.
    A preview is not a diagnostic instance: the ledger does not count it in a study's
    delivery. None for every diagnostic instance (and in a v1 event)."""


class Delivery(InstanceIdentity):
    """What every delivery outcome says about the request it answers."""

    destination: str
    """Name of the destination as defined in the rule file."""
    lane: Lane
    """The lane the request travelled in."""
    idempotency_key: Sha256Hex
    """The request's key (SOP Instance UID, original sha256, destination)."""
    original_sha256: Sha256Hex
    """sha256 of the original as received."""
    attempts: int = Field(ge=1)
    """Sending attempts made (1 when it went through the first time)."""


class VerificationMethod(StrEnum):
    """How a destination was asked whether it holds what it acknowledged."""

    QIDO = "qido"
    """A QIDO-RS search (STOW-RS destinations)."""
    STORAGE_COMMITMENT = "storage-commitment"
    """DICOM Storage Commitment, Push Model (DIMSE destinations)."""


class ForwardCompleted(Delivery):
    """``dicom.forward.completed`` v2: the destination acknowledged the instance.

    v2 (from v1): ``verification``, so a reader knows from the event itself whether an
    acknowledgement is the end of the story or a ``dicom.forward.verified`` (or a
    ``not_held_after_delivery`` failure) is to follow. v1 records are still read (as v2
    without verification: v1 forwarders had none)."""

    type_name: ClassVar[str] = "dicom.forward.completed"
    version: ClassVar[int] = 2
    reads: ClassVar[tuple[int, ...]] = (1,)
    topic: ClassVar[Topic | None] = Topic.FORWARD_COMPLETED

    transfer_syntax_uid: Uid
    """The transfer syntax the destination received."""
    size: int = Field(ge=0)
    """Bytes sent for this instance."""
    delivered_at: AwareDatetime
    """When the destination's positive answer arrived (UTC)."""
    latency_s: float = Field(ge=0)
    """From ``received_at`` (ingest) to ``delivered_at``: the end-to-end trace."""
    already_delivered: bool = False
    """True when a replayed request was recognised and not sent again."""
    verification: VerificationMethod | None = None
    """How the destination will now be asked whether it holds the instance (its
    ``verify:`` in the rule file); None when the acknowledgement is trusted."""


class ForwardVerified(Delivery):
    """``dicom.forward.verified`` v1: after acknowledging the instance, the destination
    was asked again and holds it, with the SOP Class it was sent as.

    Only for destinations with ``verify:`` in the rule file; a destination that
    acknowledged and does not hold the instance gets ``dicom.forward.failed`` with
    reason ``not_held_after_delivery`` instead."""

    type_name: ClassVar[str] = "dicom.forward.verified"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.FORWARD_VERIFIED

    method: VerificationMethod
    """How the destination was asked."""
    checks: int = Field(ge=1)
    """Questions asked before it answered that it holds the instance (QIDO-RS searches;
    1 for storage commitment): a destination that indexes slowly needs more than one."""
    delivered_at: AwareDatetime
    """When the destination acknowledged the instance (UTC)."""
    verified_at: AwareDatetime
    """When the destination's answer proved it holds the instance (UTC)."""
    transaction_uid: Uid | None = None
    """Storage commitment: the Transaction UID of the N-ACTION request."""


class ForwardFailed(Delivery):
    """``dicom.forward.failed`` v2: delivery given up, with the destination's answer and
    the request itself, so that it can be replayed as it was (``radflow dlq replay``).

    v2 (from v1): ``source_topic``, ``source_partition``, ``source_offset``,
    ``original_key`` and ``original_value``, the request record as it was on its topic.
    v1 records are still read (as v2 with those None: find the request on
    ``dicom.forward.requested(.stat)`` by its ``idempotency_key``)."""

    type_name: ClassVar[str] = "dicom.forward.failed"
    version: ClassVar[int] = 2
    reads: ClassVar[tuple[int, ...]] = (1,)
    topic: ClassVar[Topic | None] = Topic.FORWARD_FAILED

    reason: str
    """Machine-readable: ``rejected`` (the destination said no), ``retries_exhausted``,
    ``blob_integrity_error``, ``blob_not_found``, ``cannot_convert``,
    ``not_held_after_delivery``, ``verification_unanswered``. (A request for a
    destination the rule file does not define is not a failure: it is reported on
    ``dicom.instance.held``.)"""
    http_status: int | None = None
    """The destination's last HTTP status, if it answered."""
    dicom_status: int | None = None
    """The FailureReason (0008,1197) it gave for this instance, if any."""
    message: str
    """Human-readable detail written by the pipeline (never copied from patient data)."""
    retriable: bool
    """Whether the last failure was of a retriable kind (its budget ran out)."""
    failed_at: AwareDatetime
    """When the forwarder gave up (UTC)."""
    source_topic: str | None = None
    """Topic of the request record, as the broker names it (with the deployment's
    prefix); None only in a v1 event."""
    source_partition: int | None = Field(default=None, ge=0)
    """Partition of the request record; None only in a v1 event."""
    source_offset: int | None = Field(default=None, ge=0)
    """Offset of the request record; None only in a v1 event."""
    original_key: str | None = None
    """The request record's key (the Study Instance UID); None only in a v1 event."""
    original_value: str | None = None
    """The request record's value as UTF-8 text: the ``dicom.forward.requested`` event
    (envelope and all) exactly as the forwarder read it, to publish again unchanged to
    ``source_topic`` with ``original_key``. None only in a v1 event."""


class DestinationTally(EventModel):
    """How one destination of a delivered study stands."""

    destination: str
    """Name of the destination as defined in the rule file."""
    instances: int = Field(ge=1)
    """Instances of the study routed to it, every one of them delivered (or verified)."""
    verified: bool
    """True when the destination has verification on: each instance counted was verified,
    not only acknowledged."""


class StudyDelivered(EventModel):
    """``dicom.study.delivered`` v1: every instance of a study routed so far has reached
    every destination it was routed to, and no new request came for a quiet period.

    More instances of the study may arrive later: then, once they too have reached their
    destinations, the event is published again with a higher ``revision`` and the new
    counts. A consumer keeps the highest revision per study; a repeat of the same revision
    (a restart between publishing and recording it) says the same thing again.
    """

    type_name: ClassVar[str] = "dicom.study.delivered"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.STUDY_DELIVERED

    study_instance_uid: Uid
    """(0020,000D) Study Instance UID; also the record key."""
    revision: int = Field(ge=1)
    """1 the first time the study is delivered; one more each time it is delivered again
    with more instances."""
    instances: int = Field(ge=1)
    """Distinct instances (idempotency keys' SOP Instance UIDs) of the study routed."""
    destinations: tuple[DestinationTally, ...]
    """Each destination the study was routed to, by name."""
    first_routed_at: AwareDatetime | None
    """The earliest ``routed_at`` of the study's requests (None if no request was seen,
    only outcomes)."""
    last_reached_at: AwareDatetime
    """When the last instance reached its destination (delivered, or verified)."""

    @property
    def key(self) -> bytes:
        """The record key: the Study Instance UID."""
        return self.study_instance_uid.encode("ascii")


class InstanceHeld(InstanceIdentity):
    """``dicom.instance.held`` v1: no rule routed the instance and the default holds it
    (router), or it was routed to a destination the rule file does not define
    (forwarder).

    Nothing is dropped: held instances stay in the blob store and on this topic until an
    operator fixes the rules and replays them; a destination added under the missing
    name receives its requests without a replay.
    """

    type_name: ClassVar[str] = "dicom.instance.held"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.INSTANCE_HELD

    reason: str
    """The hold reason from the rule file's default (router), or
    ``unknown_destination: <destination name>`` (forwarder)."""
    canonical: BlobRef
    """The canonical variant (as in the normalized event); for ``unknown_destination``,
    the variant the forward request named."""
    canonical_transfer_syntax_uid: Uid
    """Its transfer syntax."""
    rules_digest: str
    """First 12 hex digits of the rule file's sha256 that held it."""
    held_at: AwareDatetime
    """When the router (or the forwarder) decided (UTC)."""


SiteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
"""A RIS site's name, as in report-return's sites file."""
ReportId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
"""The reporting platform's identifier of a report (opaque; never a patient identifier)."""


class OrderPriority(StrEnum):
    """The order's priority (ORC-7.6 / OBR-27.6 / TQ1-9): what STAT lane routing reads."""

    STAT = "stat"
    ASAP = "asap"
    ROUTINE = "routine"


class OrderProcedure(EventModel):
    """The ordered procedure as a code (OBR-4 / the Requested Procedure Code)."""

    code: str = Field(min_length=1, max_length=64)
    scheme: str | None = Field(default=None, max_length=64)
    meaning: str | None = Field(default=None, max_length=128)


class WorklistItem(EventModel):
    """``worklist.item`` v1: one open scheduled procedure step of a site's order, as
    the worklist service keeps it on the compacted ``worklist.items`` topic.

    The record key is ``<site>/<order_ref>/<step id>``; a cancelled, discontinued or
    completed step is a tombstone on that key. The order is named by a keyed hash of its
    accession number (``radflow_core.orders``): patient name, ID, birth date and the
    accession number itself are in the order document in the blob store (``document``).
    """

    type_name: ClassVar[str] = "worklist.item"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.WORKLIST_ITEMS

    site: SiteName
    """The ordering site (mapped from MSH-4/MSH-3 in the worklist's sites file)."""
    order_ref: Sha256Hex
    """HMAC-SHA256 of the order's issuer and accession number under the deployment's
    order reference key (radflow_core.orders.order_ref): what an arriving instance's
    Accession Number (0008,0050) and its issuer (0008,0051) are matched with."""
    step_id: str = Field(min_length=1, max_length=64)
    """(0040,0009) Scheduled Procedure Step ID."""
    priority: OrderPriority = OrderPriority.ROUTINE
    """The order's priority; stat puts the study's instances in the STAT lane."""
    modality: str | None = Field(default=None, max_length=16)
    """(0008,0060) scheduled modality."""
    scheduled_station_ae: str | None = Field(default=None, max_length=16)
    """(0040,0001) Scheduled Station AE Title."""
    procedure: OrderProcedure | None = None
    """The ordered procedure."""
    document: BlobRef
    """The order document (demographics, accession number, dates, the full order) in
    the blob store."""
    updated_at: AwareDatetime
    """When the worklist last changed this item (UTC)."""

    @property
    def key(self) -> bytes:
        """The record key: ``<site>/<order_ref>/<step id>``."""
        return f"{self.site}/{self.order_ref}/{self.step_id}".encode()


class ReportStatus(StrEnum):
    """What the radiologist's signature means for this version (OBR-25 / OBX-11)."""

    PRELIMINARY = "preliminary"
    """Not yet final (HL7 P)."""
    FINAL = "final"
    """Signed final (HL7 F)."""
    CORRECTED = "corrected"
    """Replaces a final report (HL7 C)."""


class ReportSource(StrEnum):
    """Where report-return got the report from."""

    REPORTS_FINALIZED = "reports.finalized"
    """A reports.finalized event and its report document."""
    STRUCTURED_REPORT = "structured_report"
    """A DICOM Structured Report routed to report-return by a rule."""


class ReportFinalized(EventModel):
    """``reports.finalized`` v1: a radiologist signed a version of a report; return it to
    the ordering site's RIS.

    The report itself (patient and order identifiers, text, radiologist) is a JSON
    document in the blob store following ``radflow:radflow.report:v1``, named by
    ``document``: patient data stays in the blob store, as for images.
    """

    type_name: ClassVar[str] = "reports.finalized"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.REPORTS_FINALIZED

    report_id: ReportId
    """The reporting platform's identifier of the report, the same for all its versions."""
    report_version: int = Field(ge=1)
    """Version of the report, counting from 1; a correction is a higher version."""
    status: ReportStatus
    """preliminary, final, or corrected (a final sent again after changes)."""
    site: SiteName
    """The RIS to return it to: a site name in report-return's sites file."""
    study_instance_uid: Uid
    """(0020,000D) of the reported study; also the record key."""
    document: BlobRef
    """The report document (JSON, ``radflow:radflow.report:v1``) and its sha256."""
    signed_at: AwareDatetime
    """When the radiologist signed this version (UTC)."""

    @property
    def key(self) -> bytes:
        """The record key: the Study Instance UID."""
        return self.study_instance_uid.encode("ascii")


class ReportChannel(StrEnum):
    """How report-return handed a report to the site (a site may use both)."""

    ORU = "oru"
    """HL7 v2 ORU^R01 over MLLP to the RIS."""
    FHIR = "fhir"
    """A FHIR R4 DiagnosticReport created or updated on the site's FHIR server."""


class ReportDelivery(EventModel):
    """What every report-return outcome says about the report it answers."""

    channel: ReportChannel = ReportChannel.ORU
    """Which channel this outcome is for: a site with both has one outcome per channel
    and report version (absent in earlier versions: oru)."""

    site: str = Field(max_length=128)
    """The RIS site the report was for (as the report or the rule file named it)."""
    source: ReportSource
    """Which input the report came from."""
    report_id: str
    """The platform's report id; for a Structured Report, its SOP Instance UID."""
    report_version: int | None = None
    """The report's version (reports.finalized only)."""
    study_instance_uid: Uid
    """(0020,000D) of the reported study; also the record key."""
    sop_instance_uid: Uid | None = None
    """The Structured Report's SOP Instance UID (structured_report only)."""
    destination: str | None = None
    """The rule file's destination that routed the Structured Report here."""
    attempts: int = Field(ge=0)
    """Messages sent to the RIS for this report (0 when it was never sent)."""

    @property
    def key(self) -> bytes:
        """The record key: the Study Instance UID."""
        return self.study_instance_uid.encode("ascii")


class FhirInteraction(StrEnum):
    """How the DiagnosticReport reached the FHIR server."""

    CREATE = "create"
    """A conditional create (POST with If-None-Exist on the report identifier)."""
    UPDATE = "update"
    """A conditional update (PUT DiagnosticReport?identifier=...)."""


class FhirResult(EventModel):
    """What the FHIR server answered when it accepted a DiagnosticReport."""

    interaction: FhirInteraction
    """Conditional create or conditional update."""
    http_status: int = Field(ge=200, le=299)
    """201 (created), or 200 (an existing report matched, or was updated)."""
    created: bool
    """Whether this request created the resource (False: it existed already)."""
    resource_id: str | None = Field(default=None, max_length=64)
    """The server's logical id of the DiagnosticReport (from Location or the body)."""
    version_id: str | None = Field(default=None, max_length=64)
    """The server's version id of it, when it said."""


class ReportReturned(ReportDelivery):
    """``report.returned`` v2: the site took the report: its RIS acknowledged the
    ORU^R01 with AA (channel oru), or its FHIR server stored the DiagnosticReport
    (channel fhir).

    v2 (from v1): ``channel``; ``fhir`` with the server's answer; ``ack_code`` is None
    on the fhir channel. v1 records are still read (channel oru)."""

    type_name: ClassVar[str] = "report.returned"
    version: ClassVar[int] = 2
    reads: ClassVar[tuple[int, ...]] = (1,)
    topic: ClassVar[Topic | None] = Topic.REPORT_RETURNED

    status: ReportStatus
    """The result status sent (OBR-25): a final after an acknowledged final is sent as
    corrected."""
    message_control_id: str
    """MSH-10 of the message (oru), or the X-Request-Id of the FHIR request (fhir): the
    same on every retry and replay of this version."""
    ack_code: Literal["AA"] | None = "AA"
    """MSA-1 of the RIS's acknowledgement (oru); None on the fhir channel."""
    acked_at: AwareDatetime
    """When the acknowledgement (or the FHIR server's answer) arrived (UTC)."""
    ack_latency_s: float = Field(ge=0)
    """From writing the message (or request) to reading its answer (last attempt)."""
    already_returned: bool = False
    """True when a replayed report was recognised as acknowledged and not sent again."""
    fhir: FhirResult | None = None
    """The FHIR server's answer (fhir channel, when sent now; None on a replay)."""


HL7ErrorCode = Annotated[str, Field(pattern=r"^[0-9]{1,5}$")]
"""A code of HL7 table 0357 (message error condition codes): digits only."""
HL7Location = Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9]{2}(\^[0-9]{0,5}){0,5}$")]
"""An HL7 error location (ERL): segment ID, then sequence, field, repetition, component
and subcomponent numbers, ``^``-separated as in ER7 (``PID^1^3``)."""


class AckError(EventModel):
    """One ERR segment of a RIS's acknowledgement, reduced to its coded fields.

    A RIS's free text (MSA-3, ERR-7 diagnostics, ERR-8 user message, code texts) often
    quotes the message it refuses (patient name, identifiers, report text), so it never
    leaves report-return; only values that fit these codes' syntax are kept, anything
    else is dropped."""

    hl7_error_code: HL7ErrorCode | None = None
    """ERR-3 (v2.5+) or ERR-1's code (v2.4) identifier, HL7 table 0357 (e.g. ``207``
    application internal error, ``204`` unknown key identifier)."""
    severity: Literal["E", "F", "I", "W"] | None = None
    """ERR-4, HL7 table 0516: error, fatal, information, warning."""
    location: HL7Location | None = None
    """ERR-2 (or ERR-1's location, v2.4): where in our message the RIS found the error."""


class FhirIssue(EventModel):
    """One issue of the OperationOutcome a FHIR server refused a DiagnosticReport with.

    Its text is the server's, redacted: every value of the report document's patient
    (name parts, identifiers, birth date) and order (accession, order and visit
    numbers) is replaced by ``[redacted]`` before it leaves report-return, and it is
    cut at 500 characters."""

    severity: Literal["fatal", "error", "warning", "information"] | None = None
    """OperationOutcome.issue.severity."""
    code: str | None = Field(default=None, pattern=r"^[a-z-]{1,40}$")
    """OperationOutcome.issue.code (FHIR issue-type, e.g. ``invalid``, ``processing``)."""
    details_code: str | None = Field(default=None, max_length=64)
    """The first coding of issue.details (e.g. a server's message id)."""
    text: str | None = Field(default=None, max_length=500)
    """issue.details.text or issue.diagnostics, redacted as above."""
    expression: tuple[str, ...] = ()
    """issue.expression (FHIRPath of the element), as the server gave it."""


class ReportFailed(ReportDelivery):
    """``report.failed`` v4: report-return gave up on a report, with the reason, when
    the RIS answered the coded part of its acknowledgement, and the input record itself,
    so that it can be replayed as it was (``radflow dlq replay``).

    v4 (from v3): ``channel``; ``http_status`` and ``fhir_issues`` (the FHIR server's
    OperationOutcome, redacted) on the fhir channel. v3 and v2 records are still read
    (channel oru).

    v3 (from v2): ``original_key`` and ``original_value``, the input record as it was on
    ``source_topic``. v2 records are still read (with those None: the input is at the
    source coordinates, while the topic retains it).
    v2 (from v1): the RIS's own words are gone (``ack_text`` and ``ack``: its free text
    can quote patient data); ``ack_errors`` keeps each ERR segment's codes instead."""

    type_name: ClassVar[str] = "report.failed"
    version: ClassVar[int] = 4
    reads: ClassVar[tuple[int, ...]] = (2, 3)
    topic: ClassVar[Topic | None] = Topic.REPORT_FAILED

    reason: str
    """Machine-readable: ``rejected`` (AR), ``application_error`` (AE, after its
    retries), ``invalid_ack``, ``retries_exhausted``, ``unknown_site``, on the fhir
    channel ``fhir_rejected`` (a 4xx), ``fhir_ambiguous`` (412: several reports carry
    the identifier), ``fhir_invalid_resource`` (the built DiagnosticReport does not
    validate), ``token_unavailable``,
    ``missing_accession_number``, ``missing_patient_identifier``, ``invalid_report``,
    ``empty_report``, ``not_verified``, ``not_complete``, ``unreadable_report``,
    ``unencodable_text``, ``report_too_large``, ``blob_not_found``,
    ``blob_integrity_error``."""
    message: str
    """Human-readable detail written by the pipeline (never copied from patient data nor
    from the RIS's answer)."""
    retriable: bool
    """Whether the last failure was of a retriable kind (its retries ran out)."""
    status: ReportStatus | None = None
    """The result status that was (or would have been) sent."""
    message_control_id: str | None = None
    """MSH-10 of the message, if one was built."""
    ack_code: Literal["AE", "AR"] | None = None
    """MSA-1 of the RIS's last acknowledgement, if it sent a readable one."""
    ack_errors: tuple[AckError, ...] = ()
    """The coded fields of each ERR segment of that acknowledgement, in order."""
    http_status: int | None = Field(default=None, ge=100, le=599)
    """The FHIR server's last HTTP status (fhir channel), if it answered."""
    fhir_issues: tuple[FhirIssue, ...] = ()
    """The issues of the OperationOutcome it answered with, redacted, in order."""
    source_topic: str
    """Topic of the input record."""
    source_partition: int
    """Its partition."""
    source_offset: int
    """Its offset: reset the consumer group there to replay after fixing the cause."""
    failed_at: AwareDatetime
    """When report-return gave up (UTC)."""
    original_key: str | None = None
    """The input record's key (the Study Instance UID); None only in a v2 event."""
    original_value: str | None = None
    """The input record's value as UTF-8 text: the ``reports.finalized`` event, or the
    ``dicom.forward.requested`` event of a Structured Report, exactly as read (events
    carry no patient data; the report document stays in the blob store). None only in
    a v2 event."""


class DeadLetter(EventModel):
    """A record a consumer could not process and will not retry, with the reason."""

    type_name: ClassVar[str] = "radflow.dead_letter"
    version: ClassVar[int] = 1

    reason: str
    """Machine-readable reason (e.g. blob_integrity_error, undecodable_event)."""
    message: str
    """Human-readable detail; written by the pipeline, never copied from patient data."""
    retriable: bool
    """Whether the error was of a retriable kind whose attempts ran out."""
    attempts: int = Field(ge=1)
    """How many times processing was tried."""
    service: str
    """The consumer that gave up."""
    source_topic: str
    """Topic of the failed record."""
    source_partition: int
    """Partition of the failed record."""
    source_offset: int
    """Offset of the failed record."""
    original_key: str | None
    """The failed record's key (a Study Instance UID), if any."""
    original_value: str
    """The failed record's value as UTF-8 text (events hold no demographics)."""
    failed_at: AwareDatetime
    """When the consumer gave up (UTC)."""


class AuditRecorded(EventModel):
    """``radflow.audit`` v1: one DICOM audit message (PS3.15 A.5), as written to the
    audit record repository. The summary fields let a consumer filter without parsing
    the XML; the XML is the record (catalogue: docs/security.md, Audit trail)."""

    type_name: ClassVar[str] = "radflow.audit"
    version: ClassVar[int] = 1
    topic: ClassVar[Topic | None] = Topic.AUDIT

    event_id: str = Field(pattern=r"^[0-9]+$")
    """EventID code (DCM), e.g. 110104 DICOM Instances Transferred."""
    event_type: str | None = Field(default=None, pattern=r"^[0-9]+$")
    """The first EventTypeCode (DCM), e.g. 110120 Application Start; None when absent."""
    outcome: Literal[0, 4, 8, 12]
    """EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure."""
    study_instance_uid: Uid | None = None
    """The study the message is about, when there is one (also the record key)."""
    message: str
    """The ``AuditMessage`` XML document. Instances Transferred and Export messages
    carry the Patient ID (PS3.15 A.5.3 requires it), never the name or birth date: this
    topic is PHI (docs/security.md, Audit trail)."""


PayloadT = TypeVar("PayloadT", bound=EventModel)


class Envelope(BaseModel, Generic[PayloadT]):
    """CloudEvents 1.0 attributes around one payload (structured JSON mode)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    specversion: Literal["1.0"] = "1.0"
    """CloudEvents spec version."""
    id: str
    """Unique per emitted event (uuid4); a re-emission of the same fact gets a new id."""
    type: str
    """Payload type, e.g. dicom.instance.received."""
    source: str
    """Emitting service and host, e.g. /radflow/ingest/pod-1."""
    time: AwareDatetime
    """When the event was emitted (UTC)."""
    datacontenttype: Literal["application/json"] = "application/json"
    """Always JSON."""
    dataschema: str
    """Versioned schema name of ``data``, e.g. radflow:dicom.instance.received:v1."""
    data: PayloadT
    """The payload."""


def schema_name(model: type[EventModel], version: int | None = None) -> str:
    return f"radflow:{model.type_name}:v{model.version if version is None else version}"


@functools.cache
def envelope_type(model: type[PayloadT]) -> type[Envelope[PayloadT]]:
    """``Envelope[model]``, built once per process.

    pydantic keeps parametrized generics only weakly, so after a garbage collection
    ``Envelope[model]`` is built again, which re-reads this module's source for the
    field docstrings (~2.5 ms; 8 % of ingest's CPU in the benchmark). Holding the class
    here makes that a one-time cost.
    """
    return Envelope[model]  # type: ignore[valid-type]


def wrap(payload: PayloadT, service: str) -> Envelope[PayloadT]:
    """Put ``payload`` in a fresh envelope emitted by ``service`` on this host."""
    model = type(payload)
    return envelope_type(model)(
        id=str(uuid.uuid4()),
        type=model.type_name,
        source=f"/radflow/{service}/{socket.gethostname()}",
        time=datetime.now(UTC),
        dataschema=schema_name(model),
        data=payload,
    )


def encode(envelope: Envelope[PayloadT]) -> bytes:
    return envelope.model_dump_json().encode("utf-8")


def decode(raw: bytes, model: type[PayloadT]) -> Envelope[PayloadT]:
    """Parse a record value as an envelope of ``model``.

    Raises:
        EventDecodeError: not JSON, wrong type or version, or a field out of contract.
    """
    try:
        envelope = envelope_type(model).model_validate_json(raw)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
        raise EventDecodeError(f"not a valid {model.__name__} event: {fields}") from None
    if envelope.dataschema != schema_name(model) and envelope.dataschema not in {
        schema_name(model, version) for version in model.reads
    }:
        raise EventDecodeError(f"unexpected dataschema {envelope.dataschema!r}")
    return envelope
