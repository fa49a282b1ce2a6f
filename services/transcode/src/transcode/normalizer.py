"""One received instance in, one canonical variant and normalized event out.

The original is streamed from S3 to a spool file (sha256 verified on the way), the
codec work runs frame by frame from file to file in a process pool (bounded by
``workers``) so the consumer's event loop keeps heartbeating, and the canonical file is
uploaded in parts: no process holds a whole large instance in memory.

Idempotent: after the normalized event is acknowledged a marker is written; a
replayed received event that finds it does no work. Without the marker the work is
redone, and since the encoders are deterministic the canonical bytes, and so their
content-addressed key, are the same.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.codecs import Normalized, Outcome, Target
from radflow_core.errors import PipelineError
from radflow_core.events import (
    BlobRef,
    DecodeStatus,
    Envelope,
    InstanceNormalized,
    InstanceReceived,
    PixelInfo,
)
from radflow_core.kafka import EventProducer
from radflow_core.streaming_codecs import normalize_file
from transcode import metrics

log = logging.getLogger(__name__)

CANONICAL = "canonical"
NORMALIZED_MARKER = "normalized"
_STATUS = {
    Outcome.ENCODED: DecodeStatus.VERIFIED,
    Outcome.ALREADY_CANONICAL: DecodeStatus.ALREADY_CANONICAL,
    Outcome.NATIVE_FALLBACK: DecodeStatus.NATIVE_FALLBACK,
    Outcome.NON_IMAGE: DecodeStatus.NON_IMAGE,
}


class CodecCrashed(PipelineError):
    """A codec worker process died on this instance (crash or out of memory).

    Not retriable: the same bytes would kill the next worker too."""

    reason = "codec_crashed"


class Normalizer:
    def __init__(
        self, blobs: BlobStore, producer: EventProducer, target: Target, workers: int
    ) -> None:
        self._blobs = blobs
        self._producer = producer
        self._target = target
        self._workers = workers
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        return ProcessPoolExecutor(
            self._workers, mp_context=multiprocessing.get_context("forkserver")
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def handle(self, envelope: Envelope[InstanceReceived], _: Any) -> None:
        received = envelope.data
        marker = content_key(
            NORMALIZED_MARKER,
            received.study_instance_uid,
            f"{received.blob.sha256}.{self._target.value}",
        )
        if await self._blobs.exists(marker):
            metrics.INSTANCES.labels("replay_skipped", self._target.name).inc()
            return
        with tempfile.TemporaryDirectory(prefix="transcode-") as tmp:
            src, dst = Path(tmp) / "original.dcm", Path(tmp) / "canonical.dcm"
            try:
                with src.open("wb") as file:
                    await self._blobs.download(received.blob, file)
                result = await self._normalize(src, dst)
            except PipelineError as exc:
                if not exc.retriable:
                    metrics.INSTANCES.labels(exc.reason, self._target.name).inc()
                    log.warning(
                        "instance not normalized",
                        extra={
                            "reason": exc.reason,
                            "sop_instance_uid": received.sop_instance_uid,
                            "study_instance_uid": received.study_instance_uid,
                        },
                    )
                raise
            canonical = await self._store(received, result, dst)
        event = self._event(received, result, canonical)
        await self._producer.publish(event, key=event.key)
        await self._blobs.put_bytes(marker, b"", NORMALIZED_MARKER, check_existing=False)
        self._count(received, result, canonical)

    async def _normalize(self, src: Path, dst: Path) -> Normalized:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, normalize_file, src, dst, self._target)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            raise CodecCrashed("codec worker died on this instance") from None

    async def _store(self, received: InstanceReceived, result: Normalized, dst: Path) -> BlobRef:
        if result.outcome in (Outcome.ALREADY_CANONICAL, Outcome.NON_IMAGE):
            return received.blob
        with dst.open("rb") as file:
            hashed = await asyncio.to_thread(HashedFile.from_file, file)
            key = content_key(CANONICAL, received.study_instance_uid, hashed.sha256)
            stored = await self._blobs.put_file(key, hashed, CANONICAL)
        return stored.ref

    @staticmethod
    def _event(
        received: InstanceReceived, result: Normalized, canonical: BlobRef
    ) -> InstanceNormalized:
        pixels = None
        if result.pixels is not None:
            pixels = PixelInfo(**vars(result.pixels))
        return InstanceNormalized(
            **received.identity(),
            original=received.blob,
            original_transfer_syntax_uid=received.transfer_syntax_uid,
            canonical=canonical,
            canonical_transfer_syntax_uid=result.transfer_syntax_uid,
            decode_status=_STATUS[result.outcome],
            pixels=pixels,
            normalized_at=datetime.now(UTC),
        )

    def _count(self, received: InstanceReceived, result: Normalized, canonical: BlobRef) -> None:
        metrics.INSTANCES.labels(_STATUS[result.outcome].value, self._target.name).inc()
        metrics.BYTES.labels("in").inc(received.blob.size)
        rewritten = canonical != received.blob
        metrics.BYTES.labels("out").inc(canonical.size if rewritten else 0)
        if rewritten and canonical.size:
            metrics.RATIO.observe(received.blob.size / canonical.size)
        for stage, seconds in (
            ("decode", result.decode_s),
            ("encode", result.encode_s),
            ("verify", result.verify_s),
        ):
            if seconds:
                metrics.CODEC_SECONDS.labels(stage).observe(seconds)
        log.info(
            "instance normalized",
            extra={
                "sop_instance_uid": received.sop_instance_uid,
                "study_instance_uid": received.study_instance_uid,
                "state": _STATUS[result.outcome].value,
                "transfer_syntax_uid": result.transfer_syntax_uid,
                "size": canonical.size,
            },
        )
