"""The blob store against a real S3 server (moto), and its error mapping."""

from __future__ import annotations

import hashlib
import inspect
import io

import minio.error
import pytest
import urllib3

from radflow_core.blobstore import BlobStore, HashedFile, content_key, map_error
from radflow_core.errors import (
    BlobIntegrityError,
    BlobNotFound,
    BlobStoreUnavailable,
    PipelineError,
)
from radflow_core.settings import S3Settings
from radflow_devstack.processes import free_port
from support.stack import Stack

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
