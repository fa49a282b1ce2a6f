"""DICOM UID validation and the hashing that keeps raw UIDs out of object keys."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated

from pydantic import StringConstraints

UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"
"""PS3.5 §9.1: dot-separated numeric components, no leading zeros, at most 64 chars."""
_UID_RE = re.compile(UID_PATTERN)

Uid = Annotated[str, StringConstraints(pattern=UID_PATTERN, max_length=64)]
"""A validated DICOM UID, usable as a pydantic field type."""


def is_valid_uid(value: object) -> bool:
    """True if ``value`` is a string that is a conformant DICOM UID."""
    return isinstance(value, str) and len(value) <= 64 and _UID_RE.fullmatch(value) is not None


def uid_digest(uid: str) -> str:
    """A short, stable, path-safe stand-in for a validated UID (24 hex chars of sha256).

    Keys use this instead of the UID so that no identifier from the sender's data ends
    up in a path, a bucket listing or an access log.
    """
    return hashlib.sha256(uid.encode("ascii")).hexdigest()[:24]
