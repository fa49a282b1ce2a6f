"""HL7 order messages (ORM^O01, OMI^O23) → what the worklist must do, or why not.

A message is read into an :class:`Intake`: its header (for the acknowledgement), the
site that sent it, and one :class:`Change` per scheduled procedure step: an upsert with
its :class:`~radflow_core.order_document.OrderDocument`, or a removal. Anything that
stops it raises :class:`Refused` with the HL7 acknowledgement code, the HL7 error code
(table 0357), the field and a reason written here: never text copied from the message,
so refusals can be logged (the message is PHI). Profile: docs/hl7-interface.md.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from enum import StrEnum

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydantic import SecretStr, ValidationError

from radflow_core.errors import PipelineError
from radflow_core.events import OrderPriority
from radflow_core.order_document import OrderDocument, ScheduledStep
from radflow_core.orders import order_ref
from radflow_core.report_document import CodedConcept, Patient, PatientIdentifier, PersonName
from worklist.er7 import Delimiters, Segment, segments
from worklist.sites import Site, Sites

VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8")
MESSAGE_TYPES = {"ORM": "O01", "OMI": "O23"}
"""Accepted MSH-9 message code → trigger event."""
CHARSETS = {"": None, "ASCII": "ascii", "8859/1": "latin-1", "UNICODE UTF-8": "utf-8"}
"""MSH-18 → Python codec (None: the site's hl7_encoding)."""
_PRIORITY = {"S": OrderPriority.STAT, "A": OrderPriority.ASAP}
_REMOVING_STATUS = {"CM", "CA", "DC"}
"""ORC-5 order statuses that end a step: completed, cancelled, discontinued."""


class AckCode(StrEnum):
    AA = "AA"
    AE = "AE"
    AR = "AR"


class Refused(PipelineError):
    """A message the worklist does not accept (as it is), with its HL7 answer."""

    reason = "order_refused"

    def __init__(
        self, ack: AckCode, hl7_error: int, message: str, location: str | None = None
    ) -> None:
        super().__init__(message)
        self.ack = ack
        self.hl7_error = hl7_error
        """HL7 table 0357: 100 segment sequence, 101 required field missing, 102 data
        type, 103 table value not found, 200 message type, 201 event code, 203 version,
        204 unknown key identifier, 207 application internal error."""
        self.location = location
        """Segment^sequence^field, e.g. PID^1^3."""
        self.text = message


class Action(StrEnum):
    UPSERT = "upsert"
    REMOVE = "remove"


@dataclass(frozen=True)
class Header:
    delimiters: Delimiters
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    control_id: str = ""
    message_code: str = ""
    trigger: str = ""
    version: str = "2.5.1"
    charset: str = ""
    """MSH-18 as sent (the acknowledgement repeats it)."""
    codec: str = "utf-8"


@dataclass(frozen=True)
class Change:
    """One step to write (``document`` set) or to remove (``step_id`` None: every open
    step of the order)."""

    action: Action
    order_control: str
    order_ref: str
    step_id: str | None
    document: OrderDocument | None = None


@dataclass(frozen=True)
class Intake:
    header: Header
    site: Site
    changes: list[Change] = field(default_factory=list)


def read_header(data: bytes) -> Header:
    """The MSH of a framed message, decoded with its MSH-18.

    Raises:
        Refused: AR when there is no usable MSH or its character set is unknown.
    """
    raw = data.decode("latin-1")  # byte-transparent: MSH is ASCII in every charset
    start = raw.find("MSH")
    if start < 0:
        raise Refused(AckCode.AR, 100, "no MSH segment")
    try:
        delimiters = Delimiters.of(raw[start:])
    except ValueError as exc:
        raise Refused(AckCode.AR, 100, f"MSH unreadable: {exc}", "MSH^1^2") from None
    msh = Segment(segments(raw[start:])[0], delimiters)
    charset = msh.value(18).upper()
    header = Header(
        delimiters=delimiters,
        sending_application=msh.value(3),
        sending_facility=msh.value(4),
        receiving_application=msh.value(5),
        receiving_facility=msh.value(6),
        control_id=msh.value(10),
        message_code=msh.value(9, 1),
        trigger=msh.value(9, 2),
        version=msh.value(12) or "2.5.1",
        charset=msh.value(18),
    )
    if charset not in CHARSETS:
        raise Refused(AckCode.AR, 103, "MSH-18 character set not supported", "MSH^1^18")
    return header


def read_message(data: bytes, sites: Sites, key: SecretStr, now: datetime) -> Intake:
    """Everything the worklist needs from one message.

    Raises:
        Refused: AR for what no resend fixes at this end (not HL7, a message type,
            version or sender the worklist does not take); AE for an order whose
            content is missing or malformed (the field is named).
    """
    header = read_header(data)
    if header.message_code not in MESSAGE_TYPES:
        raise Refused(AckCode.AR, 200, "message type not supported (ORM^O01, OMI^O23)", "MSH^1^9")
    if MESSAGE_TYPES[header.message_code] != header.trigger:
        raise Refused(AckCode.AR, 201, "trigger event not supported (ORM^O01, OMI^O23)", "MSH^1^9")
    if header.version not in VERSIONS:
        raise Refused(AckCode.AR, 203, "HL7 version not supported (2.3 to 2.8)", "MSH^1^12")
    if not header.control_id:
        raise Refused(AckCode.AR, 101, "MSH-10 message control ID is empty", "MSH^1^10")
    site = sites.sender(header.sending_facility, header.sending_application)
    if site is None:
        raise Refused(
            AckCode.AR, 204, "sending facility/application not in the sites file", "MSH^1^4"
        )
    codec = CHARSETS[header.charset.upper()] or site.hl7_codec
    try:
        text = data.decode(codec)
    except UnicodeDecodeError:
        raise Refused(AckCode.AE, 102, f"message is not valid {codec}", "MSH^1^18") from None
    header = Header(**{**header.__dict__, "codec": codec})
    _check_structure(text)
    found = [Segment(s, header.delimiters) for s in segments(text[text.find("MSH") :])]
    return Intake(header, site, _changes(found, header, site, key, now))


def _check_structure(text: str) -> None:
    """hl7apy's reading, without message-structure validation (Z-segments, versions)."""
    try:
        parse_message(
            "\r".join(segments(text[text.find("MSH") :])),
            validation_level=VALIDATION_LEVEL.TOLERANT,
            find_groups=False,
        )
    except (HL7apyException, ValueError, KeyError, IndexError, AttributeError, TypeError):
        raise Refused(AckCode.AR, 100, "not a readable HL7 v2 message") from None


def _changes(
    found: list[Segment], header: Header, site: Site, key: SecretStr, now: datetime
) -> list[Change]:
    pid = next((s for s in found if s.name == "PID"), None)
    pv1 = next((s for s in found if s.name == "PV1"), None)
    groups: list[list[Segment]] = []
    for segment in found:
        if segment.name == "ORC":
            groups.append([segment])
        elif groups:
            groups[-1].append(segment)
    if not groups:
        raise Refused(AckCode.AE, 100, "no ORC segment", "ORC")
    changes: list[Change] = []
    for number, group in enumerate(groups, start=1):
        changes.extend(_order(number, group, pid, pv1, site, key, now))
    return changes


def _order(
    number: int,
    group: list[Segment],
    pid: Segment | None,
    pv1: Segment | None,
    site: Site,
    key: SecretStr,
    now: datetime,
) -> list[Change]:
    orc = group[0]
    obr = next((s for s in group if s.name == "OBR"), None)
    tq1 = next((s for s in group if s.name == "TQ1"), None)
    zds = next((s for s in group if s.name == "ZDS"), None)
    ipcs = [s for s in group if s.name == "IPC"]
    control = orc.value(1).upper()
    status = orc.value(5).upper()
    if control in ("CA", "DC", "OC", "OD") or (
        control in ("SC", "XO") and status in _REMOVING_STATUS
    ):
        action = Action.REMOVE
    elif control in ("NW", "XO", "SC"):
        action = Action.UPSERT
    else:
        raise Refused(
            AckCode.AE,
            103,
            "ORC-1 order control not supported (NW, XO, SC, CA, DC)",
            f"ORC^{number}^1",
        )
    accession, issuer = _accession(obr, ipcs, site, number)
    ref = order_ref(accession, issuer, key)
    explicit = [ipc.value(4) for ipc in ipcs if ipc.value(4)] or (
        [obr.value(20)] if obr is not None and obr.value(20) else []
    )
    if action is Action.REMOVE:
        if explicit:
            return [Change(action, control, ref, step) for step in explicit]
        return [Change(action, control, ref, None)]
    if obr is None:
        raise Refused(AckCode.AE, 101, "OBR segment missing from the order", f"OBR^{number}")
    if pid is None:
        raise Refused(AckCode.AE, 101, "PID segment missing", "PID")
    started = status == "IP"
    common = _common(obr, orc, tq1, zds, ipcs, pid, site, accession, issuer, ref, number, now)
    steps: list[Segment | None] = [*ipcs] or [None]
    changes = []
    for index, ipc in enumerate(steps, start=1):
        step = _step(obr, orc, tq1, ipc, pv1, index, number, started)
        try:
            document = OrderDocument(**common, step=step)
        except ValidationError as exc:
            fields = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors()})
            raise Refused(
                AckCode.AE, 102, f"order values out of range: {', '.join(fields)}"
            ) from None
        changes.append(Change(Action.UPSERT, control, ref, step.step_id, document))
    return changes


def _accession(
    obr: Segment | None, ipcs: list[Segment], site: Site, number: int
) -> tuple[str, str | None]:
    """(accession number, issuer): IPC-1 (EI: number^namespace), else OBR-18."""
    if ipcs and ipcs[0].value(1):
        accession, namespace = ipcs[0].value(1), ipcs[0].value(1, 2)
        where = f"IPC^{number}^1"
    else:
        accession = obr.value(18) if obr is not None else ""
        namespace = ""
        where = f"OBR^{number}^18"
    if not accession:
        raise Refused(AckCode.AE, 101, "accession number missing (OBR-18 or IPC-1)", where)
    if len(accession) > 16:
        raise Refused(AckCode.AE, 102, "accession number longer than 16 characters", where)
    return accession, site.accession_issuer or namespace or None


def _common(
    obr: Segment,
    orc: Segment,
    tq1: Segment | None,
    zds: Segment | None,
    ipcs: list[Segment],
    pid: Segment,
    site: Site,
    accession: str,
    issuer: str | None,
    ref: str,
    number: int,
    now: datetime,
) -> dict[str, object]:
    identifiers = []
    for rep in pid.repetitions(3):
        parts = pid.components(3, rep) + [""] * 5
        if parts[0]:
            identifiers.append(
                PatientIdentifier(
                    id=parts[0][:64],
                    assigning_authority=parts[3] or None,
                    type_code=parts[4] or None,
                )
            )
    if not identifiers:
        raise Refused(AckCode.AE, 101, "patient identifier missing (PID-3)", "PID^1^3")
    requested_id = (ipcs[0].value(2) if ipcs else "") or obr.value(19) or accession
    if len(requested_id) > 16:
        raise Refused(
            AckCode.AE, 102, "requested procedure ID longer than 16 characters", f"OBR^{number}^19"
        )
    study_uid = (ipcs[0].value(3) if ipcs else "") or (zds.value(1) if zds else "")
    return {
        "site": site.name,
        "accession_number": accession,
        "accession_issuer": issuer,
        "placer_order_number": (orc.value(2) or obr.value(2))[:64] or None,
        "filler_order_number": (orc.value(3) or obr.value(3))[:64] or None,
        "requested_procedure_id": requested_id,
        "requested_procedure": _coded(obr, 44) or _coded(obr, 4),
        "study_instance_uid": study_uid or _derived_uid(site.name, ref),
        "priority": _priority(tq1, orc, obr),
        "patient": Patient(
            identifiers=tuple(identifiers),
            name=_xpn(pid.components(5)),
            birth_date=_date(pid.value(7), "PID^1^7"),
            sex=pid.value(8).upper() if pid.value(8).upper() in set("FMOUAN") else None,
        ),
        "referring_physician": _xpn(orc.components(12)[1:]) or _xpn(obr.components(16)[1:]),
        "reason": obr.value(31, 2)[:64] or obr.value(31)[:64] or None,
        "character_set": site.character_set,
        "received_at": now.astimezone(UTC),
    }


def _step(
    obr: Segment,
    orc: Segment,
    tq1: Segment | None,
    ipc: Segment | None,
    pv1: Segment | None,
    index: int,
    number: int,
    started: bool,
) -> ScheduledStep:
    start = (tq1.value(7) if tq1 else "") or obr.value(27, 4) or orc.value(7, 4) or obr.value(36)
    if not start:
        raise Refused(
            AckCode.AE,
            101,
            "scheduled start missing (TQ1-7, OBR-27.4, ORC-7.4 or OBR-36)",
            f"OBR^{number}^36",
        )
    start_date, start_time = _datetime(start, f"OBR^{number}^36")
    step_id = (ipc.value(4) if ipc else "") or obr.value(20) or str(index)
    if len(step_id) > 16:
        raise Refused(AckCode.AE, 102, "step ID longer than 16 characters", f"OBR^{number}^20")
    modality = ((ipc.value(5) if ipc else "") or obr.value(24)).upper()
    station_ae = (ipc.value(9) if ipc else "") or obr.value(21)
    for what, value in (("modality", modality), ("scheduled station AE title", station_ae)):
        if len(value) > 16:
            raise Refused(AckCode.AE, 102, f"{what} longer than 16 characters", f"OBR^{number}")
    protocol = None
    if ipc is not None and ipc.value(6):
        protocol = CodedConcept(
            code=ipc.value(6)[:64],
            meaning=(ipc.value(6, 2) or ipc.value(6))[:64],
            scheme=ipc.value(6, 3)[:16],
        )
    return ScheduledStep(
        step_id=step_id,
        start_date=start_date,
        start_time=start_time,
        modality=modality or None,
        station_ae=station_ae or None,
        station_name=(ipc.value(7) if ipc else "")[:16] or None,
        location=((ipc.value(8) if ipc else "") or (pv1.value(3) if pv1 else ""))[:16] or None,
        description=(obr.value(4, 2) or obr.value(4))[:64] or None,
        protocol=protocol,
        performing_physician=_xpn(obr.components(34)[1:]),
        status="STARTED" if started else "SCHEDULED",
    )


def _coded(segment: Segment, number: int) -> CodedConcept | None:
    parts = [*segment.components(number), "", "", ""]
    if not parts[0]:
        return None
    return CodedConcept(
        code=parts[0][:64], meaning=(parts[1] or parts[0])[:64], scheme=parts[2][:16]
    )


def _priority(tq1: Segment | None, orc: Segment, obr: Segment) -> OrderPriority:
    code = (tq1.value(9) if tq1 else "") or orc.value(7, 6) or obr.value(27, 6)
    return _PRIORITY.get(code.upper()[:1], OrderPriority.ROUTINE)


def _xpn(parts: list[str]) -> PersonName | None:
    """XPN (family^given^middle^suffix^prefix); None when empty."""
    parts = parts + [""] * 5
    if not any(parts[:5]):
        return None
    return PersonName(
        family=parts[0], given=parts[1], middle=parts[2], suffix=parts[3], prefix=parts[4]
    )


def _datetime(value: str, where: str) -> tuple[date, time | None]:
    """An HL7 DTM as the site's local date and time (an offset is dropped: DICOM
    worklist dates and times are local)."""
    digits = value.split("+")[0].split("-")[0]
    whole = digits.split(".")[0]
    try:
        day = datetime.strptime(whole[:8], "%Y%m%d").date()
        if len(whole) < 10:
            return day, None
        moment = datetime.strptime(whole[8:14].ljust(6, "0"), "%H%M%S").time()
    except ValueError:
        raise Refused(AckCode.AE, 102, "date/time not in HL7 DTM format", where) from None
    return day, moment


def _date(value: str, where: str) -> date | None:
    return _datetime(value, where)[0] if value else None


def _derived_uid(site: str, ref: str) -> str:
    """A Study Instance UID for an order that brings none: 2.25.<128-bit number> from
    the site and order reference (the same on every replica and every replay)."""
    digest = hashlib.sha256(f"{site}/{ref}".encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"
