"""De-identification of one instance just before delivery: DICOM PS3.15 Annex E, the
Basic Application Level Confidentiality Profile and the options a route asks for.

Every attribute of Table E.1-1 (:mod:`stow_forwarder.confidentiality_table`, generated
from the standard) gets its action, at every depth of nesting:

- ``X`` removed; ``Z`` emptied; ``D`` a dummy of its VR; ``K`` kept; ``U`` remapped
  (below). The patient's name and ID (``Z``) get the patient's pseudonym.
- A choice of actions (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``) takes the one that keeps
  every IOD valid whatever the attribute's type there: ``D`` where it is offered, else
  ``Z``. ``X/Z/U*`` (sequences of references) keeps the sequence and de-identifies its
  items, UIDs remapped.
- ``C`` (an option's "clean"): dates are shifted under Retain Longitudinal Temporal
  Information with Modified Dates (times of day kept: the shift is whole days); any
  other ``C`` is implemented as the Basic Profile's own action. Free text is not
  parsed, so "cleaning" a descriptor removes it: the conservative reading.
- Private attributes (odd groups) are removed; curve data and overlay data and comments
  (repeating groups 50xx, 60xx) are removed; attributes the table does not list are
  kept, except that UI values naming an instance (not a registered class, syntax or
  coding scheme UID) are remapped like the listed ones, so no reference escapes.

Pseudonyms are keyed hashes (HMAC-SHA256 under ``RADFLOW_DEID_KEY``), so they are
consistent across studies, destinations and processes and cannot be reversed without
the key: a UID becomes ``2.25.<128 bits of HMAC(uid)>`` (the same UID always maps to the
same one, references included), a patient ``RF-<16 base32 characters>`` from the
issuer and Patient ID, and the date offset (1 to 3650 days back) is drawn from the same
patient key. The result declares what was done: Patient Identity Removed (0012,0062)
``YES``, De-identification Method (0012,0063) and its Code Sequence (0012,0064) with
one CID 7050 code per option, Longitudinal Temporal Information Modified (0028,0303).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import UID

from radflow_core.errors import PipelineError
from radflow_core.events import Deidentification, DeidOption
from stow_forwarder.burned_in import burned_in
from stow_forwarder.confidentiality_table import ROWS
from stow_forwarder.pseudonyms import Pseudonyms, patient_key

OPTION_COLUMNS = (
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
    DeidOption.RETAIN_DEVICE_IDENTITY,
    DeidOption.RETAIN_UIDS,
    DeidOption.CLEAN_DESCRIPTORS,
)
"""The option columns of :data:`ROWS`, in their order."""

BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: dict[DeidOption, tuple[str, str]] = {
    DeidOption.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    DeidOption.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    DeidOption.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    DeidOption.RETAIN_UIDS: ("113110", "Retain UIDs Option"),
}
"""DICOM CID 7050 (De-identification Method), coding scheme DCM."""

_UID_KEEP = re.compile(r"Class|TransferSyntax|CodingScheme|Implementation|Context")
"""Keywords of UI attributes outside the table that name a kind of thing, not an
instance; their values are kept."""
PSEUDONYMOUS = frozenset({"PatientName", "PatientID"})
"""Emptied (Z) by the profile, and given the patient's pseudonym instead (Z allows a
dummy value): a reader can still tell one patient's studies from another's."""


class DeidentificationError(PipelineError):
    """The instance cannot be de-identified as the route asks; it is dead-lettered."""

    retriable = False
    reason = "cannot_deidentify"


class BurnedInAnnotation(DeidentificationError):
    """Burned In Annotation (0028,0301) is YES, or absent on an instance of a kind that
    often carries text in its pixels, and the route does not accept it: removing
    attributes does not remove a name written into the image."""

    reason = "burned_in_annotation"


class NoDeidentificationKey(DeidentificationError):
    """No pseudonym key is configured (``RADFLOW_DEID_KEY`` or ``_KEY_FILE``): nothing
    is sent identified instead. Retriable: set the key and replay."""

    retriable = True
    reason = "deidentification_key_missing"


@dataclass(frozen=True)
class Action:
    """One row of the table resolved for a set of options."""

    code: str
    """X, Z, D, K, U, U* (a sequence whose items are de-identified) or C."""


@cache
def table(options: frozenset[DeidOption]) -> tuple[dict[int, Action], dict[int, str]]:
    """Tag → action for these options, and tag → the option column whose ``C`` applies
    (to tell a date shift from another clean)."""
    actions: dict[int, Action] = {}
    cleaned_by: dict[int, str] = {}
    for tag, _name, basic, *columns in ROWS:
        if "x" in tag:
            continue
        applied = [
            (o, a) for o, a in zip(OPTION_COLUMNS, columns, strict=True) if a and o in options
        ]
        keep = any(a == "K" for _, a in applied)
        clean = next((o for o, a in applied if a == "C"), None)
        number = int(tag, 16)
        if keep:
            actions[number] = Action("K")
        elif clean is not None:
            actions[number] = Action("C")
            cleaned_by[number] = clean
        else:
            actions[number] = Action(_resolve(basic))
    return actions, cleaned_by


def _resolve(basic: str) -> str:
    """A choice of actions → the one that keeps the IOD valid (D, else Z)."""
    if "/" not in basic:
        return basic
    choices = basic.split("/")
    if "U*" in choices:
        return "U*"
    return "D" if "D" in choices else "Z"


def _repeating(tag: int) -> bool:
    """Curve data (50xx,xxxx), overlay data (60xx,3000) and comments (60xx,4000)."""
    group, element = tag >> 16, tag & 0xFFFF
    return (group & 0xFF00) == 0x5000 or (
        (group & 0xFF00) == 0x6000 and element in (0x3000, 0x4000)
    )


class Deidentifier:
    """Applies one route's de-identification to datasets and files."""

    DUMMY: ClassVar[dict[str, Any]] = {
        "DA": "19000101",
        "DT": "19000101000000",
        "TM": "000000",
        "AS": "000D",
        "IS": "0",
        "DS": "0",
        "US": 0,
        "SS": 0,
        "UL": 0,
        "SL": 0,
        "UV": 0,
        "SV": 0,
        "FL": 0.0,
        "FD": 0.0,
        "CS": "ANONYMIZED",
    }
    """A dummy per VR; text VRs not listed get ``ANONYMIZED``."""

    def __init__(self, request: Deidentification, pseudonyms: Pseudonyms) -> None:
        self.request = request
        self.options = frozenset(request.options)
        self.pseudonyms = pseudonyms
        self.actions, self.cleaned_by = table(self.options)
        self.retain_uids = DeidOption.RETAIN_UIDS in self.options
        self.shift_dates = DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES in self.options

    def uid(self, uid: str) -> str:
        """What a UID of an instance, series, study... becomes at the destination."""
        return uid if self.retain_uids else self.pseudonyms.uid(uid)

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` in place (and return it)."""
        key = patient_key(ds)
        pseudonym = self.pseudonyms.patient(key)
        days = self.pseudonyms.days_back(key)
        self._walk(ds, pseudonym, days)
        self._declare(ds)
        if getattr(ds, "file_meta", None) is not None:
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = ds.SOPClassUID
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
            meta.ImplementationClassUID = ds.file_meta.get(
                "ImplementationClassUID", pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            )
            if "ImplementationVersionName" in ds.file_meta:
                meta.ImplementationVersionName = ds.file_meta.ImplementationVersionName
            ds.file_meta = meta
        return ds

    def file(self, source: Path, target: Path) -> None:
        """De-identify the Part 10 file ``source`` into ``target``; pixel data is
        copied as it is (same transfer syntax, same bytes).

        Raises:
            BurnedInAnnotation: the route does not accept it.
            DeidentificationError: the file cannot be read, or a value in it cannot be
                parsed or written.
        """
        try:
            ds = pydicom.dcmread(source)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise DeidentificationError(
                f"the instance cannot be read to de-identify it ({type(exc).__name__})"
            ) from exc
        why = burned_in(ds)
        if why is not None and not self.request.accept_burned_in:
            raise BurnedInAnnotation(
                f"{why}; profile {self.request.profile!r} removes attributes, not text "
                "in pixels (the rule may say accept_burned_in: true once this is checked)"
            )
        try:
            self.dataset(ds)
            ds.save_as(target, enforce_file_format=True)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError, OSError) as exc:
            # pydicom meets a malformed value only when it parses or writes it
            raise DeidentificationError(
                f"the instance cannot be de-identified ({type(exc).__name__})"
            ) from exc

    def _walk(self, ds: Dataset, pseudonym: str, days: int) -> None:
        for element in list(ds):
            tag = int(element.tag)
            if element.tag.is_private or _repeating(tag):
                del ds[element.tag]
                continue
            action = self.actions.get(tag)
            if action is None:
                self._unlisted(element, pseudonym, days)
                continue
            self._apply(ds, element, action.code, tag, pseudonym, days)

    def _apply(
        self,
        ds: Dataset,
        element: DataElement,
        code: str,
        tag: int,
        pseudonym: str,
        days: int,
    ) -> None:
        if code == "C":
            column = self.cleaned_by.get(tag)
            if column is DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES and element.VR in (
                "DA",
                "DT",
            ):
                element.value = _shifted(element, days)
                return
            if column is DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES and element.VR == "TM":
                return  # whole days move; the time of day stays
            code = _resolve(_basic(tag))
            if code == "C":  # never: no basic action is C
                code = "X"
        if code in ("Z", "D") and element.keyword in PSEUDONYMOUS:
            element.value = pseudonym
        elif code == "X":
            del ds[element.tag]
        elif code == "Z":
            element.value = Sequence() if element.VR == "SQ" else None
        elif code == "D":
            self._dummy(element, tag, pseudonym, days)
        elif code in ("U", "U*"):
            if element.VR == "SQ":
                self._items(element, pseudonym, days)
            elif element.VR == "UI":
                element.value = self._remapped(element.value)
            else:
                element.value = None
        elif code == "K" and element.VR == "SQ":
            self._items(element, pseudonym, days)

    def _unlisted(self, element: DataElement, pseudonym: str, days: int) -> None:
        if element.VR == "SQ":
            self._items(element, pseudonym, days)
        elif (
            element.VR == "UI"
            and not self.retain_uids
            and not _UID_KEEP.search(element.keyword or "")
        ):
            element.value = self._remapped(element.value, registered_kept=True)

    def _items(self, element: DataElement, pseudonym: str, days: int) -> None:
        for item in element.value or ():
            self._walk(item, pseudonym, days)

    def _remapped(self, value: Any, registered_kept: bool = False) -> Any:
        def one(uid: str) -> str:
            uid = str(uid).strip("\0 ")
            if not uid or (registered_kept and UID(uid).type):
                return uid
            return self.uid(uid)

        return _each(value, one)

    def _dummy(self, element: DataElement, tag: int, pseudonym: str, days: int) -> None:
        vr = element.VR
        if vr == "SQ":
            self._items(element, pseudonym, days)
        elif vr == "UI":
            element.value = self._remapped(element.value)
        elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            element.value = b""
        elif vr in self.DUMMY:
            element.value = self.DUMMY[vr]
        else:
            element.value = "ANONYMIZED"

    def _declare(self, ds: Dataset) -> None:
        """Patient Identity Removed, the method and its codes (PS3.15 E.1.1)."""
        ds.PatientIdentityRemoved = "YES"
        codes = [BASIC_PROFILE, *(OPTION_CODES[o] for o in sorted(self.options))]
        ds.DeidentificationMethod = [meaning for _, meaning in codes]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.shift_dates else "REMOVED"


@cache
def _basics() -> dict[int, str]:
    return {int(tag, 16): basic for tag, _n, basic, *_ in ROWS if "x" not in tag}


def _basic(tag: int) -> str:
    return _basics()[tag]


def _each(value: Any, change: Callable[[str], str]) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [change(v) for v in value]
    return change(value)


def _shifted(element: DataElement, days: int) -> Any:
    """A DA or DT value (or each of several, or both ends of a range) ``days`` earlier;
    a value that does not parse as a date becomes empty rather than stay as it was."""

    def one(text: str) -> str:
        text = str(text).strip()
        if "-" in text[1:] and element.VR == "DA":
            return "-".join(one(part) if part else "" for part in text.split("-"))
        match = re.match(r"^(\d{4})(\d{2})?(\d{2})?(.*)$", text)
        if not match:
            return ""
        year, month, day, rest = match.groups()
        try:
            date = dt.date(int(year), int(month or 1), int(day or 1))
        except ValueError:
            return ""
        moved = date - dt.timedelta(days=days)
        if day is None and month is None:
            return f"{moved:%Y}{rest}"
        if day is None:
            return f"{moved:%Y%m}{rest}"
        return f"{moved:%Y%m%d}{rest}"

    return _each(element.value, one)
