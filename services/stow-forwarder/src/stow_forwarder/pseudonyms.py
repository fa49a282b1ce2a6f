"""Pseudonyms: keyed hashes (HMAC-SHA256) of UIDs and patients, and a patient's date
offset, under one deployment key (``RADFLOW_DEID_KEY``).

Keyed, so they are the same in every study, at every destination and in every
process, and cannot be reversed (or a guessed Patient ID checked) without the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from pydicom.dataset import Dataset

MAX_DAYS_BACK = 3650
"""The longest date shift, in days (ten years)."""


@dataclass(frozen=True)
class Pseudonyms:
    """The keyed hashes; one key for the deployment (a Kubernetes Secret)."""

    key: bytes

    def _mac(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()

    def uid(self, uid: str) -> str:
        """``2.25.`` and the first 128 bits of the UID's HMAC as a decimal integer (at
        most 44 characters, PS3.5 B.2)."""
        return f"2.25.{int.from_bytes(self._mac('uid', uid.strip())[:16], 'big')}"

    def patient(self, patient_key: str) -> str:
        """``RF-`` and 16 base32 characters (80 bits): the patient's name and ID at a
        de-identifying destination."""
        text = base64.b32encode(self._mac("patient", patient_key)[:10]).decode()
        return f"RF-{text}"

    def days_back(self, patient_key: str) -> int:
        """Whole days every date of the patient moves back (1 to 3650)."""
        return int.from_bytes(self._mac("dates", patient_key)[:4], "big") % MAX_DAYS_BACK + 1


def patient_key(ds: Dataset) -> str:
    """Who the patient is, for the pseudonym and the date offset: issuer and Patient ID;
    without a Patient ID, name and birth date; without those, the study (its own
    pseudonym: nothing links it to another)."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    if patient_id:
        return f"id\x1f{str(ds.get('IssuerOfPatientID', '') or '').strip()}\x1f{patient_id}"
    name = str(ds.get("PatientName", "") or "").strip()
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    if name:
        return f"name\x1f{name}\x1f{birth}"
    return f"study\x1f{str(ds.get('StudyInstanceUID', '') or '').strip()}"
