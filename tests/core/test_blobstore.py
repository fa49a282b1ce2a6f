"""The blob store against a real S3 server (SeaweedFS), and its error mapping."""

from __future__ import annotations

import hashlib
import inspect
import io

import minio.error
import pytest
import urllib3
from prometheus_client import REGISTRY

from radflow_core.blobstore import BlobStore, HashedFile, content_key, map_error
from radflow_core.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStoreMisconfigured,
    BlobStoreUnavailable,
    PipelineError,
)
from radflow_core.events import BlobRef
from radflow_core.settings import S3Settings
from radflow_devstack.processes import free_port
from support.stack import Stack
from support.strict_s3 import StrictS3

pytestmark = pytest.mark.pipeline

STUDY = "1.2.826.0.1.3680043.8.498.1"


async def test_same_bytes_are_stored_once_under_a_content_key(stack: Stack) -> None:
    stack.make_bucket()
    blobs = BlobStore(stack.s3)
    data = b"DICM-ish bytes" * 1000
    key = content_key("original", STUDY, hashlib.sha256(data).hexdigest())
    first = await blobs.put_bytes(key, data, "original")
    second = await blobs.put_bytes(key, data, "original")
    assert first.created and not second.created
    assert first.ref == second.ref
    assert STUDY not in key and first.ref.sha256 in key
    assert await blobs.read(first.ref) == data
    assert stack.minio().stat_object(stack.s3.bucket, key).metadata["x-amz-meta-sha256"] == (
        first.ref.sha256
    )
    blobs.close()
    blobs.close()  # safe twice


async def test_large_upload_streams_in_parts_and_reads_back_intact(stack: Stack) -> None:
    stack.make_bucket()
    settings = S3Settings.from_env({**stack.env, "RADFLOW_S3_PART_SIZE": str(5 * 1024 * 1024)})
    blobs = BlobStore(settings)
    data = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32)  # 12 MiB: 3 parts
    hashed = HashedFile.from_file(io.BytesIO(data))
    stored = await blobs.put_file("original/x/big.dcm", hashed, "original")
    assert stored.ref.size == len(data)
    assert await blobs.read(stored.ref) == data


class _CountingSha256:
    """Counts the bytes every sha256 in this process is fed (minio's included)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashed = 0
        real = hashlib.sha256
        counter = self

        class Counted:
            def __init__(self, data: bytes = b"", **kwargs: object) -> None:
                self._h = real(**kwargs)  # type: ignore[arg-type]
                self.update(data)

            def update(self, data: bytes) -> None:
                counter.hashed += len(data)
                self._h.update(data)

            def __getattr__(self, name: str) -> object:
                return getattr(self._h, name)

        monkeypatch.setattr(hashlib, "sha256", Counted)


async def test_a_one_part_upload_reuses_the_sha256_instead_of_hashing_the_body_again(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.make_bucket()
    blobs = BlobStore(stack.s3)
    data = hashlib.sha256(b"ct").digest() * (512 * 1024 // 32)  # a 0.5 MiB CT slice
    hashed = HashedFile.from_file(io.BytesIO(data))
    counting = _CountingSha256(monkeypatch)
    stored = await blobs.put_file("original/x/ct.dcm", hashed, "original", check_existing=False)
    # What is left is SigV4 signing: the canonical request and the string to sign.
    assert counting.hashed < 16 * 1024, f"{counting.hashed} bytes hashed for {len(data)}"
    # The same PUT through a plain minio client hashes the body: the count would see it.
    stack.minio().put_object(stack.s3.bucket, "original/x/plain.dcm", io.BytesIO(data), len(data))
    assert counting.hashed >= len(data)
    monkeypatch.undo()
    assert await blobs.read(stored.ref) == data


async def test_tampered_or_missing_blob_is_detected(stack: Stack) -> None:
    stack.make_bucket()
    blobs = BlobStore(stack.s3)
    stored = await blobs.put_bytes("original/x/a.dcm", b"original bytes", "original")
    stack.minio().put_object(stack.s3.bucket, "original/x/a.dcm", io.BytesIO(b"altered bytes!"), 14)
    with pytest.raises(BlobIntegrityError):
        await blobs.read(stored.ref)
    missing = stored.ref.model_copy(update={"key": "original/x/none.dcm"})
    with pytest.raises(BlobNotFound):
        await blobs.read(missing)


async def test_unreachable_server_is_blob_store_unavailable() -> None:
    settings = S3Settings.from_env(
        {
            "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "RADFLOW_S3_RETRIES": "0",
        }
    )
    blobs = BlobStore(settings)
    with pytest.raises(BlobStoreUnavailable) as info:
        await blobs.ping()
    assert info.value.retriable


def _minio_exceptions() -> list[type[BaseException]]:
    return [
        cls
        for _, cls in inspect.getmembers(minio.error, inspect.isclass)
        if issubclass(cls, BaseException) and cls.__module__ == "minio.error"
    ]


@pytest.mark.parametrize("cls", _minio_exceptions(), ids=lambda c: c.__name__)
def test_every_minio_exception_is_mapped(cls: type[BaseException]) -> None:
    if issubclass(cls, minio.error.S3Error):
        exc: BaseException = cls(None, "InternalError", "boom", "/", "req", "host")
    else:
        exc = cls.__new__(cls)
    mapped = map_error(exc, "put")
    assert isinstance(mapped, PipelineError)
    assert mapped.retriable


def _s3_error(code: str) -> minio.error.S3Error:
    return minio.error.S3Error(None, code, "the server's words", "/b/k", "req", "host")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "code",
    [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "NoSuchBucket",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "InvalidBucketName",
    ],
)
def test_s3_errors_that_only_configuration_fixes_are_not_retriable(code: str) -> None:
    mapped = map_error(_s3_error(code), "put")
    assert isinstance(mapped, BlobStoreMisconfigured) and not mapped.retriable
    assert mapped.reason == "blob_store_misconfigured"
    assert code in str(mapped)


@pytest.mark.parametrize(
    "code",
    ["InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"],
)
def test_s3_errors_of_a_busy_or_failing_server_are_retriable(code: str) -> None:
    mapped = map_error(_s3_error(code), "get")
    assert isinstance(mapped, BlobStoreUnavailable) and mapped.retriable
    assert code in str(mapped)


def test_server_errors_without_an_s3_code_are_retriable() -> None:
    server_error = minio.error.ServerError("server failed with HTTP status code 503", 503)
    garbled = minio.error.InvalidResponseError(502, "text/html", "<html>bad gateway</html>")
    for exc in (server_error, garbled):
        mapped = map_error(exc, "get")
        assert isinstance(mapped, BlobStoreUnavailable) and mapped.retriable


def _strict_store(strict_s3: StrictS3, bucket: str, secret_key: str | None = None) -> BlobStore:
    return BlobStore(S3Settings.from_env(strict_s3.env(bucket, secret_key)))


def _assert_misconfigured(info: pytest.ExceptionInfo[BlobStoreMisconfigured], code: str) -> None:
    assert not info.value.retriable
    assert code in str(info.value)


async def test_a_wrong_secret_is_misconfiguration_named_by_its_code_not_an_outage(
    strict_s3: StrictS3,
) -> None:
    bucket = "wrong-secret"
    strict_s3.make_bucket(bucket)
    right = _strict_store(strict_s3, bucket)
    await right.ping()
    stored = await right.put_bytes("original/x/a.dcm", b"bytes", "original")
    wrong = _strict_store(strict_s3, bucket, secret_key="not-the-secret")
    with pytest.raises(BlobStoreMisconfigured) as info:
        await wrong.ping()
    _assert_misconfigured(info, "AccessDenied")
    with pytest.raises(BlobStoreMisconfigured) as info:
        await wrong.put_bytes("original/x/b.dcm", b"other bytes", "original")
    _assert_misconfigured(info, "AccessDenied")  # the existence check (HEAD) says no first
    with pytest.raises(BlobStoreMisconfigured) as info:
        await wrong.put_bytes("original/x/b.dcm", b"other bytes", "original", check_existing=False)
    _assert_misconfigured(info, "SignatureDoesNotMatch")
    with pytest.raises(BlobStoreMisconfigured) as info:
        await wrong.read(stored.ref)
    _assert_misconfigured(info, "SignatureDoesNotMatch")
    assert "not-the-secret" not in str(info.value)
    assert strict_s3.access_key not in str(info.value)


async def test_an_unknown_access_key_is_misconfiguration(strict_s3: StrictS3) -> None:
    bucket = "unknown-key"
    strict_s3.make_bucket(bucket)
    env = {**strict_s3.env(bucket), "RADFLOW_S3_ACCESS_KEY": "AKIAUNKNOWNUNKNOWN00"}
    blobs = BlobStore(S3Settings.from_env(env))
    with pytest.raises(BlobStoreMisconfigured) as info:
        await blobs.put_bytes("original/x/a.dcm", b"bytes", "original", check_existing=False)
    _assert_misconfigured(info, "InvalidAccessKeyId")


async def test_a_missing_bucket_is_misconfiguration_and_ping_names_it(
    strict_s3: StrictS3,
) -> None:
    blobs = _strict_store(strict_s3, "no-such-bucket")
    with pytest.raises(BlobStoreMisconfigured) as info:
        await blobs.ping()
    _assert_misconfigured(info, "NoSuchBucket")
    assert "no-such-bucket" in str(info.value)
    with pytest.raises(BlobStoreMisconfigured) as info:
        await blobs.put_bytes("original/x/a.dcm", b"bytes", "original")
    _assert_misconfigured(info, "NoSuchBucket")
    ref = BlobRef(bucket="no-such-bucket", key="original/x/a.dcm", size=5, sha256="0" * 64)
    with pytest.raises(BlobStoreMisconfigured) as info:
        await blobs.read(ref)
    _assert_misconfigured(info, "NoSuchBucket")


@pytest.mark.parametrize(
    "exc",
    [
        urllib3.exceptions.MaxRetryError(None, "/"),  # type: ignore[arg-type]
        urllib3.exceptions.ProtocolError("reset"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_transport_errors_are_retriable_unavailability(exc: BaseException) -> None:
    assert isinstance(map_error(exc, "get"), BlobStoreUnavailable)


def test_not_found_is_not_retriable() -> None:
    exc = minio.error.S3Error(None, "NoSuchKey", "gone", "/", "req", "host")  # type: ignore[arg-type]
    mapped = map_error(exc, "get")
    assert isinstance(mapped, BlobNotFound) and not mapped.retriable


def test_an_s3_outage_inside_a_partial_read_is_an_outage_not_an_unreadable_header() -> None:
    """The router parses headers through ranged reads; pydicom wraps whatever a read
    raises, so an unmapped connection error became a final 'unreadable_header' dead
    letter during an S3 outage (found by the fault suite)."""
    from urllib3.exceptions import ProtocolError

    from radflow_core.blobstore import _RangedBlob
    from radflow_core.errors import BlobStoreUnavailable
    from radflow_core.events import BlobRef

    class DownClient:
        def get_object(self, *_: object, **__: object) -> object:
            raise ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))

    ref = BlobRef(bucket="b", key="original/x", size=1000, sha256="0" * 64)
    view = _RangedBlob(DownClient(), ref, limit=1000)  # type: ignore[arg-type]
    with pytest.raises(BlobStoreUnavailable):
        view.read(10)


def _requests(operation: str, method: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "radflow_blob_requests_total", {"operation": operation, "method": method}
        )
        or 0.0
    )


async def test_every_http_request_is_counted_not_just_every_operation(stack: Stack) -> None:
    """A multipart upload is several requests, a header read several ranged GETs, a
    listing one GET per page: it is requests that an S3 server pays for."""
    stack.make_bucket()
    settings = S3Settings.from_env({**stack.env, "RADFLOW_S3_PART_SIZE": str(5 * 1024 * 1024)})
    blobs = BlobStore(settings)
    data = hashlib.sha256(b"parts").digest() * (12 * 1024 * 1024 // 32)  # 3 parts
    before = {
        key: _requests(*key)
        for key in (("put", "POST"), ("put", "PUT"), ("get_range", "GET"), ("list", "GET"))
    }
    stored = await blobs.put_file(
        "original/x/counted.dcm", HashedFile.from_bytes(data), "original", check_existing=False
    )
    # Initiate and complete (POST), one PUT per part.
    assert _requests("put", "POST") - before["put", "POST"] == 2
    assert _requests("put", "PUT") - before["put", "PUT"] == 3

    def read_three_blocks(file: io.RawIOBase) -> int:
        return len(file.read(600 * 1024) or b"")

    assert await blobs.read_partially(stored.ref, read_three_blocks, 1024 * 1024) == 600 * 1024
    assert _requests("get_range", "GET") - before["get_range", "GET"] == 3  # 256 KiB blocks
    await blobs.put_marker("marker/a", b"a")
    await blobs.put_marker("marker/b", b"b")
    assert [m.key for m in await blobs.list("marker/")] == ["marker/a", "marker/b"]
    assert _requests("list", "GET") - before["list", "GET"] == 1
    blobs.close()
