"""The blob store: S3 (MinIO in production) through the ``minio`` client.

Keys are content-addressed: ``<kind>/<hashed study UID>/<sha256>.dcm``. The same bytes
always land on the same key, so a duplicate upload is detected with one HEAD and
never stored twice, and no raw UID from the sender appears in a key. Uploads stream
from a file object in parts, so a 1 GB multi-frame instance never sits in memory.

The minio client is blocking; every call runs in a worker thread so the event loop
keeps serving. Its errors are mapped to :mod:`radflow_core.errors` here and nowhere
else.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import certifi
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.error import MinioException, S3Error
from prometheus_client import Counter, Histogram

from radflow_core.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStoreMisconfigured,
    BlobStoreUnavailable,
    PipelineError,
)
from radflow_core.events import BlobRef
from radflow_core.settings import S3Settings
from radflow_core.uids import uid_digest

_T = TypeVar("_T")
_CHUNK = 1024 * 1024

BLOB_OPS = Histogram(
    "radflow_blob_operation_seconds",
    "Duration of blob store operations.",
    ["operation", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BLOB_BYTES = Counter(
    "radflow_blob_uploaded_bytes_total", "Bytes uploaded to the blob store.", ["kind"]
)
BLOB_REQUESTS = Counter(
    "radflow_blob_requests_total",
    "HTTP requests sent to the blob store (each ranged GET, multipart part, list page and "
    "retry counts), by the operation that sent them and the HTTP method.",
    ["operation", "method"],
)
_OPERATION: contextvars.ContextVar[str] = contextvars.ContextVar(
    "radflow_blob_operation", default="other"
)
"""The operation a request belongs to; set in :meth:`BlobStore._call` and carried into
its worker thread by :func:`asyncio.to_thread`. minio uploads a multipart object's
parts from threads of its own, which do not carry it: a part (``partNumber`` in the
query) is counted under ``put``, the only operation that uploads in parts."""


def _count(method: str, url: str) -> None:
    operation = _OPERATION.get()
    if operation == "other" and "partNumber=" in url:
        operation = "put"
    BLOB_REQUESTS.labels(operation, method).inc()


class _CountsRequests:
    """Counts every request a connection pool puts on the wire: one operation of ours
    can be several (a multipart upload's parts, a header read's ranged GETs, urllib3's
    retries), and it is requests that the S3 server pays for."""

    def _make_request(self, conn: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        _count(method, url)
        return super()._make_request(conn, method, url, *args, **kwargs)  # type: ignore[misc]


class _CountedHTTPConnectionPool(_CountsRequests, urllib3.HTTPConnectionPool):
    pass


class _CountedHTTPSConnectionPool(_CountsRequests, urllib3.HTTPSConnectionPool):
    pass


CONTENT_SHA256 = "x-amz-content-sha256"


class _Minio(Minio):
    """A minio client that signs a request with the payload hash it is given.

    minio hashes every request body for SigV4 (or, over TLS, sends UNSIGNED-PAYLOAD
    and computes a Content-MD5 instead). A blob's sha256 is computed anyway, for its
    content key and its event, so a single-part PUT passes it as the
    ``x-amz-content-sha256`` header and the body is not hashed a second time. It is
    signed either way; a server that checks payload hashes (AWS S3, MinIO) refuses a
    body that does not match it (XAmzContentSHA256Mismatch). SeaweedFS 4.48 and moto
    do not check (tried with a wrong hash); the consumers' sha256 check on download is
    what catches a corrupted upload there, as it did before.
    """

    def _build_headers(
        self,
        host: str,
        headers: dict[str, str | list[str] | tuple[str]] | None = None,
        body: bytes | None = None,
        creds: Credentials | None = None,
    ) -> tuple[dict[str, str | list[str] | tuple[str]], datetime]:
        known = (headers or {}).get(CONTENT_SHA256)
        if known is None or creds is None or not body:
            return super()._build_headers(host, headers, body, creds)
        built, date = super()._build_headers(host, headers, None, creds)
        built["Content-Length"] = str(len(body))
        built[CONTENT_SHA256] = known
        return built, date


_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound"})
MISCONFIGURED_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "InvalidToken",
        "NoSuchBucket",
        "PermanentRedirect",
        "SignatureDoesNotMatch",
    }
)
"""S3 error codes that only a change of settings (endpoint, region, keys, bucket, the
bucket's policy) can fix. Every other S3 error code (InternalError, SlowDown,
ServiceUnavailable, RequestTimeout, RequestTimeTooSkewed, ...) is worth another try."""


def content_key(kind: str, study_instance_uid: str, sha256: str) -> str:
    """The object key of a blob: kind, hashed study UID, then the content hash."""
    return f"{kind}/{uid_digest(study_instance_uid)}/{sha256}.dcm"


def map_error(exc: BaseException, operation: str) -> PipelineError:
    """Translate a minio/urllib3/socket error into the pipeline's error tree."""
    if isinstance(exc, S3Error) and exc.code in _NOT_FOUND_CODES:
        return BlobNotFound(f"{operation}: object not found")
    if isinstance(exc, S3Error) and exc.code in MISCONFIGURED_CODES:
        return BlobStoreMisconfigured(
            f"{operation}: S3 error {exc.code}; check the endpoint, region, access key, "
            "secret key and bucket"
        )
    if isinstance(exc, S3Error):
        return BlobStoreUnavailable(f"{operation}: S3 error {exc.code}")
    if isinstance(exc, MinioException | urllib3.exceptions.HTTPError | OSError):
        return BlobStoreUnavailable(f"{operation}: {type(exc).__name__}")
    if isinstance(exc, ValueError):
        # minio raises ValueError for malformed server answers (e.g. a proxy's HTML page).
        return BlobStoreUnavailable(f"{operation}: unexpected answer ({type(exc).__name__})")
    return BlobStoreUnavailable(f"{operation}: {type(exc).__name__}")


@dataclass(frozen=True)
class Listed:
    """One object of a listing."""

    key: str
    size: int
    etag: str
    """Without quotes; changes whenever the object is written with other bytes."""


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


@dataclass(frozen=True)
class StoredBlob:
    ref: BlobRef
    created: bool
    """False when identical bytes were already stored under the key."""


@dataclass(frozen=True)
class HashedFile:
    """A seekable file whose size and sha256 are known."""

    file: BinaryIO
    size: int
    sha256: str

    @classmethod
    def from_file(cls, file: BinaryIO) -> HashedFile:
        """Hash ``file`` from its start in 1 MiB chunks; leaves it rewound."""
        file.seek(0)
        digest = hashlib.sha256()
        size = 0
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        file.seek(0)
        return cls(file, size, digest.hexdigest())

    @classmethod
    def from_bytes(cls, data: bytes) -> HashedFile:
        return cls(io.BytesIO(data), len(data), hashlib.sha256(data).hexdigest())


class ReadLimitExceeded(PipelineError):
    """A partial read went past its limit (e.g. a header larger than any sane one)."""

    reason = "read_limit_exceeded"


class _RangedBlob(io.RawIOBase):
    """Read-only, seekable, blocking file over one object; fetches 256 KiB blocks on
    demand with ranged GETs and keeps the last few."""

    _BLOCK = 256 * 1024

    def __init__(self, client: Minio, ref: BlobRef, limit: int) -> None:
        super().__init__()
        self._client = client
        self._ref = ref
        self._limit = limit
        self._pos = 0
        self._blocks: dict[int, bytes] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._ref.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            start = index * self._BLOCK
            if start >= self._limit:
                raise ReadLimitExceeded(f"read past the first {self._limit} bytes")
            length = min(self._BLOCK, self._ref.size - start)
            try:
                response = self._client.get_object(
                    self._ref.bucket, self._ref.key, offset=start, length=length
                )
                try:
                    block = response.read()
                finally:
                    response.close()
                    response.release_conn()
            except Exception as exc:
                # Mapped here, inside the parser's reads: a parser that wraps what it
                # reads must not turn an S3 outage into "unreadable data".
                raise map_error(exc, "get_range") from exc
            if len(self._blocks) >= 4:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[index] = block
        return block

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        wanted = min(len(buffer), self._ref.size - self._pos)
        done = 0
        while done < wanted:
            index, within = divmod(self._pos, self._BLOCK)
            block = self._block(index)
            piece = block[within : within + wanted - done]
            if not piece:
                break
            buffer[done : done + len(piece)] = piece
            done += len(piece)
            self._pos += len(piece)
        return done


class BlobStore:
    """Async facade over one bucket."""

    def __init__(self, settings: S3Settings) -> None:
        self._settings = settings
        url = urlsplit(settings.endpoint)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(
                connect=settings.connect_timeout_s, read=settings.read_timeout_s
            ),
            retries=urllib3.Retry(
                total=settings.retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
            ),
            maxsize=32,
            cert_reqs="CERT_REQUIRED" if url.scheme == "https" else "CERT_NONE",
            ca_certs=str(settings.ca_file) if settings.ca_file else certifi.where(),
        )
        http.pool_classes_by_scheme = {
            "http": _CountedHTTPConnectionPool,
            "https": _CountedHTTPSConnectionPool,
        }
        self._http = http
        self._client = _Minio(
            url.netloc,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=url.scheme == "https",
            region=settings.region,
            http_client=http,
        )
        self.bucket = settings.bucket

    async def _call(self, operation: str, fn: Callable[[], _T]) -> _T:
        started = time.perf_counter()
        outcome = "error"
        label = _OPERATION.set(operation)
        try:
            result = await asyncio.to_thread(fn)
            outcome = "ok"
            return result
        except PipelineError:
            raise
        except Exception as exc:
            mapped = map_error(exc, operation)
            outcome = mapped.reason
            raise mapped from exc
        finally:
            _OPERATION.reset(label)
            BLOB_OPS.labels(operation, outcome).observe(time.perf_counter() - started)

    async def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (development and tests)."""

        def create() -> None:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

        await self._call("ensure_bucket", create)

    async def ping(self) -> None:
        """Return when the bucket is reachable with our credentials.

        Raises:
            BlobStoreUnavailable: the server did not answer or answered with an error
                worth another try.
            BlobStoreMisconfigured: the credentials were refused or the bucket does not
                exist (named with the S3 error code).
        """
        exists = await self._call("ping", lambda: self._client.bucket_exists(self.bucket))
        if not exists:
            raise BlobStoreMisconfigured(f"ping: S3 error NoSuchBucket (bucket {self.bucket!r})")

    async def size_of(self, key: str) -> int | None:
        """The stored object's size, or None if there is no object under ``key``."""
        try:
            stat = await self._call("stat", lambda: self._client.stat_object(self.bucket, key))
        except BlobNotFound:
            return None
        return stat.size

    async def put_file(
        self,
        key: str,
        blob: HashedFile,
        kind: str,
        content_type: str = "application/dicom",
        check_existing: bool = True,
    ) -> StoredBlob:
        """Store ``blob`` under ``key`` unless identical bytes are already there.

        With ``check_existing=False`` the existence check (one HEAD) is skipped, for
        small objects where writing them again costs less than asking. The sha256 is
        recorded as object metadata too, so the bucket alone can be audited against the
        events. An object sent in one part is signed with that sha256 as its payload
        hash: the bytes are hashed once, by whoever built ``blob`` (see
        :class:`_Minio` on which servers check it).
        """
        ref = BlobRef(bucket=self.bucket, key=key, size=blob.size, sha256=blob.sha256)
        if check_existing and await self.size_of(key) == blob.size:
            return StoredBlob(ref, created=False)

        headers: dict[str, str | list[str] | tuple[str]] = {"sha256": blob.sha256}
        if blob.size <= self._settings.part_size:
            # Only the single request of a one-part upload carries exactly these bytes.
            headers[CONTENT_SHA256] = blob.sha256

        def upload() -> None:
            blob.file.seek(0)
            self._client.put_object(
                self.bucket,
                key,
                blob.file,
                blob.size,
                content_type=content_type,
                metadata=headers,
                part_size=self._settings.part_size,
            )

        await self._call("put", upload)
        BLOB_BYTES.labels(kind).inc(blob.size)
        return StoredBlob(ref, created=True)

    async def put_bytes(
        self, key: str, data: bytes, kind: str, check_existing: bool = True
    ) -> StoredBlob:
        return await self.put_file(
            key, HashedFile.from_bytes(data), kind, check_existing=check_existing
        )

    async def list(self, prefix: str) -> list[Listed]:
        """Every object under ``prefix`` (one request per 1,000), for bookkeeping
        objects kept together under a common prefix (e.g. a study's delivery markers).

        Raises:
            BlobStoreUnavailable, BlobStoreMisconfigured
        """

        def listing() -> list[Listed]:
            return [
                Listed(obj.object_name or "", obj.size or 0, _etag(obj.etag))
                for obj in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]

        return await self._call("list", listing)

    async def put_marker(self, key: str, data: bytes) -> str:
        """Write a small bookkeeping object (replacing any under ``key``) in one
        request; returns its ETag, so a later listing shows whether it changed.

        Raises:
            BlobStoreUnavailable, BlobStoreMisconfigured
        """

        def upload() -> str:
            result = self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type="text/plain"
            )
            return _etag(result.etag)

        return await self._call("put_marker", upload)

    async def exists(self, key: str) -> bool:
        return await self.size_of(key) is not None

    async def read(self, ref: BlobRef) -> bytes:
        """A whole (small) blob in memory, verified like :meth:`download`."""
        buffer = io.BytesIO()
        await self.download(ref, buffer)
        return buffer.getvalue()

    async def read_partially(self, ref: BlobRef, parse: Callable[[BinaryIO], _T], limit: int) -> _T:
        """Run ``parse`` (in a worker thread) on a seekable view of the blob that fetches
        only the byte ranges it reads, never more than ``limit`` bytes from the start.

        For reading a dataset's header without fetching its pixel data. Nothing read
        this way is verified against the sha256 (only whole downloads can be); use it
        for decisions, never to deliver bytes.

        Raises:
            BlobNotFound, BlobStoreUnavailable, BlobStoreMisconfigured, ReadLimitExceeded
        """
        return await self._call(
            "get_range",
            lambda: parse(_RangedBlob(self._client, ref, limit)),  # type: ignore[arg-type]
        )

    async def read_marker(self, key: str, limit: int = 64 * 1024) -> bytes | None:
        """A small bookkeeping object a service wrote for itself (e.g. a delivery
        marker with the status it recorded), or None if there is none.

        Markers carry no announced sha256, so nothing read here is verified; never use
        it for instance bytes.

        Raises:
            BlobStoreUnavailable, BlobStoreMisconfigured, ReadLimitExceeded
        """

        def fetch() -> bytes:
            response = self._client.get_object(self.bucket, key)
            try:
                data = response.read(limit + 1)
            finally:
                response.close()
                response.release_conn()
            if len(data) > limit:
                raise ReadLimitExceeded(f"marker larger than {limit} bytes")
            return bytes(data)

        try:
            return await self._call("get_marker", fetch)
        except BlobNotFound:
            return None

    async def download(self, ref: BlobRef, file: BinaryIO) -> None:
        """Stream a blob into ``file`` (1 MiB at a time), verifying size and sha256.

        Raises:
            BlobNotFound, BlobStoreUnavailable, BlobStoreMisconfigured, BlobIntegrityError
        """

        def fetch() -> tuple[int, str]:
            response = self._client.get_object(ref.bucket, ref.key)
            digest = hashlib.sha256()
            size = 0
            try:
                for chunk in response.stream(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    file.write(chunk)
            finally:
                response.close()
                response.release_conn()
            file.flush()
            return size, digest.hexdigest()

        size, sha = await self._call("get", fetch)
        if size != ref.size or sha != ref.sha256:
            raise BlobIntegrityError("stored bytes do not match the announced size/sha256")

    def close(self) -> None:
        """Release pooled connections; safe to call twice."""
        self._http.clear()
