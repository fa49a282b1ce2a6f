"""Building STOW-RS requests (multipart/related; type="application/dicom")."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable

import httpx

TEST_API_KEY = "radflow-tests-api-key"
"""The API key the ingest fixtures accept (STOW-RS authentication stays on in tests)."""
TEST_API_KEY_SETTING = f"tests:{hashlib.sha256(TEST_API_KEY.encode()).hexdigest()}"
"""RADFLOW_INGEST_AUTH_API_KEYS for it: identity 'apikey:tests'."""
TEST_AUTHORIZATION = f"ApiKey {TEST_API_KEY}"
AUTH_HEADERS = {"Authorization": TEST_AUTHORIZATION}


def multipart(parts: Iterable[bytes], part_type: str = "application/dicom") -> tuple[bytes, str]:
    """(body, Content-Type header) for a multipart/related request of ``parts``."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        body += part + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return bytes(body), f'multipart/related; type="{part_type}"; boundary={boundary}'


def stow(
    url: str,
    parts: Iterable[bytes],
    part_type: str = "application/dicom",
    content_type: str | None = None,
    authorization: str | None = TEST_AUTHORIZATION,
    **headers: str,
) -> httpx.Response:
    """POST ``parts``, authenticated with the fixtures' API key unless
    ``authorization`` says otherwise (None: no Authorization header)."""
    body, ctype = multipart(parts, part_type)
    auth = {"Authorization": authorization} if authorization is not None else {}
    return httpx.post(
        url,
        content=body,
        headers={"Content-Type": content_type or ctype, **auth, **headers},
        timeout=60,
    )


def failed_reasons(body: dict) -> list[tuple[str | None, int]]:
    """(SOP Instance UID, Failure Reason) of each FailedSOPSequence item."""
    items = body.get("00081198", {}).get("Value", [])
    return [
        ((item["00081155"].get("Value") or [None])[0], item["00081197"]["Value"][0])
        for item in items
    ]


def referenced(body: dict) -> list[str]:
    """SOP Instance UIDs of the ReferencedSOPSequence."""
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]
