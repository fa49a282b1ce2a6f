"""Building STOW-RS requests (multipart/related; type="application/dicom")."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import httpx


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
    **headers: str,
) -> httpx.Response:
    body, ctype = multipart(parts, part_type)
    return httpx.post(
        url,
        content=body,
        headers={"Content-Type": content_type or ctype, **headers},
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
