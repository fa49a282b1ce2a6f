"""The STOW-RS wire format (DICOM PS3.18 §10.5): a multipart/related request body
streamed from spool files, and the Store Instances Response Module parsed per
instance.

The body is produced piece by piece from files, with its length known in advance, so
a batch of large instances never sits in memory and servers that want a
Content-Length get one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

_CHUNK = 1024 * 1024
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class MultipartBody:
    """A STOW-RS request body streamed from spool files.

    It is an async iterable rather than a generator so that httpx can send it again:
    an OAuth2 destination that answers 401 gets the same request once more with a
    fresh token, and a generator body could not be replayed.
    """

    files: Sequence[Path]
    boundary: str

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.stream()

    @classmethod
    def of(cls, files: Sequence[Path]) -> MultipartBody:
        return cls(files, f"radflow-{uuid.uuid4().hex}")

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def _head(self) -> bytes:
        return f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")

    def _tail(self) -> bytes:
        return f"--{self.boundary}--\r\n".encode("ascii")

    def length(self) -> int:
        per_part = len(self._head()) + 2
        return sum(per_part + f.stat().st_size for f in self.files) + len(self._tail())

    async def stream(self) -> AsyncIterator[bytes]:
        for path in self.files:
            yield self._head()
            async with await anyio.open_file(path, "rb") as file:
                while chunk := await file.read(_CHUNK):
                    yield chunk
            yield b"\r\n"
        yield self._tail()


@dataclass(frozen=True)
class InstanceAnswer:
    stored: bool
    failure_reason: int | None = None
    """FailureReason (0008,1197) for a failed instance."""


class UnreadableResponse(ValueError):
    """A 2xx/409 answer whose body is not a Store Instances Response."""


def parse_response(body: bytes, content_type: str | None) -> dict[str, InstanceAnswer]:
    """SOP Instance UID → what the destination said about it (JSON response only;
    we ask for application/dicom+json)."""
    if not body.strip():
        return {}
    if content_type and "xml" in content_type:
        raise UnreadableResponse("XML response (we asked for application/dicom+json)")
    try:
        data = json.loads(body)
    except ValueError:
        raise UnreadableResponse("response body is not JSON") from None
    if isinstance(data, list):  # some servers wrap the dataset in a list
        data = data[0] if data else {}
    if not isinstance(data, dict):
        raise UnreadableResponse("response is not a DICOM JSON dataset")
    answers: dict[str, InstanceAnswer] = {}
    for item in _items(data, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            answers[uid] = InstanceAnswer(stored=True)
    for item in _items(data, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        reason = _first(item, FAILURE_REASON)
        if isinstance(uid, str):
            answers[uid] = InstanceAnswer(
                stored=False, failure_reason=int(reason) if isinstance(reason, int) else None
            )
    return answers


def _items(data: dict[str, object], tag: str) -> list[dict[str, object]]:
    element = data.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _first(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    if isinstance(element, dict):
        value = element.get("Value")
        if isinstance(value, list) and value:
            return value[0]
    return None
