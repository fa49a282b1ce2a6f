"""One received instance in, one canonical variant and normalized event out.

The original is streamed from S3 to a spool file (sha256 verified on the way), the
codec work runs frame by frame from file to file in the codec worker processes so the
consumer's event loop keeps heartbeating, and the canonical file is uploaded in parts:
no process holds a whole large instance in memory.

Idempotent: after the normalized event is acknowledged a marker is written; a
replayed received event that finds it does no work. Without the marker the work is
redone, and since the encoders are deterministic the canonical bytes, and so their
content-addressed key, are the same; the event announced again is recognised
downstream (the router's idempotency keys, the forwarder's delivery markers). So the
marker saves work and is only asked for where a replay is possible
(:class:`transcode.inflight.InFlight` says where). The same bytes announced again by
ingest (another worker or replica, a restart) reach the same partition (the key is
the study), so the process that normalized them recently remembers them
(:data:`REMEMBERED`) and does nothing, without asking S3.

S3 requests per instance: the GET of the original, the PUT of the canonical (none
when the original is canonical), the marker PUT after the event is acknowledged; and
the marker HEAD (at the same time as the GET, for originals up to
:data:`SMALL_BYTES`) for a record that may have been done before.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import OrderedDict
from datetime import UTC, datetime
from pathlib import Path

from radflow_codecs.codecs import Normalized, Outcome, Target
from radflow_codecs.streaming import normalize_file
from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.errors import PipelineError
from radflow_core.events import (
    BlobRef,
    DecodeStatus,
    InstanceNormalized,
    InstanceReceived,
    Lane,
    PixelInfo,
    RoutingAttributes,
)
from radflow_core.kafka import EventProducer
from transcode import metrics
from transcode.pool import CodecPool
from transcode.previews import Failed, Previews

log = logging.getLogger(__name__)

CANONICAL = "canonical"
NORMALIZED_MARKER = "normalized"
SMALL_BYTES = 16 * 1024 * 1024
"""Up to this size a transfer that may be wasted costs less than waiting for a round
trip that would avoid it: the original is fetched while the marker is asked for (a
replay throws it away), and the canonical is written without asking first whether
the same bytes are already stored under its content-addressed key."""
REMEMBERED = 16384
"""Markers this process wrote lately (about 1.5 MB): a repeat of one of them is known
done without a request."""
_STATUS = {
    Outcome.ENCODED: DecodeStatus.VERIFIED,
    Outcome.ALREADY_CANONICAL: DecodeStatus.ALREADY_CANONICAL,
    Outcome.NATIVE_FALLBACK: DecodeStatus.NATIVE_FALLBACK,
    Outcome.NON_IMAGE: DecodeStatus.NON_IMAGE,
}


class Normalizer:
    def __init__(
        self,
        blobs: BlobStore,
        producer: EventProducer,
        target: Target,
        codecs: CodecPool,
        lane: Lane = Lane.ROUTINE,
        previews: Previews | None = None,
    ) -> None:
        """``lane``: the lane of the received events this normalizer is given; their
        normalized events go to the same lane, and STAT ones go first in the codecs.
        ``previews``: makes the lossy previews the rule file asks for (none without)."""
        self._previews = previews
        self._blobs = blobs
        self._producer = producer
        self._target = target
        self._codecs = codecs
        self._lane = lane
        self._done: OrderedDict[str, None] = OrderedDict()
        """Markers written lately, oldest first."""

    async def normalize(
        self,
        received: InstanceReceived,
        may_be_done: bool = True,
        failed: Failed | None = None,
    ) -> None:
        """Store the canonical variant, publish its event, then mark the instance done.
        ``may_be_done``: ask for the marker first (a replay is possible). Previews, if
        any, are announced before the normalized event, so they travel ahead of it;
        ``failed`` dead-letters a preview that cannot be made (the instance goes on).

        Raises:
            PipelineError: retriable (S3 or broker unreachable) or not (the reason
            the instance cannot be normalized, already counted and logged here).
        """
        marker = content_key(
            NORMALIZED_MARKER,
            received.study_instance_uid,
            f"{received.blob.sha256}.{self._target.value}",
        )
        if marker in self._done:
            self._done.move_to_end(marker)
            metrics.INSTANCES.labels("replay_skipped", self._target.name).inc()
            return
        with tempfile.TemporaryDirectory(prefix="transcode-") as tmp:
            src, dst = Path(tmp) / "original.dcm", Path(tmp) / "canonical.dcm"
            try:
                if await self._fetch(received.blob, marker if may_be_done else None, src):
                    metrics.INSTANCES.labels("replay_skipped", self._target.name).inc()
                    self._remember(marker)
                    return
                result = await self._codecs.run(
                    normalize_file, src, dst, self._target, urgent=self._lane is Lane.STAT
                )
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
            if self._previews is not None and failed is not None:
                await self._previews.make(
                    received, result, src, Path(tmp) / "previews", self._lane, failed
                )
        event = self._event(received, result, canonical)
        await self._producer.publish(event, key=event.key, lane=self._lane)
        await self._blobs.put_bytes(marker, b"", NORMALIZED_MARKER, check_existing=False)
        self._remember(marker)
        self._count(received, result, canonical)

    def _remember(self, marker: str) -> None:
        self._done[marker] = None
        if len(self._done) > REMEMBERED:
            self._done.popitem(last=False)

    async def _fetch(self, original: BlobRef, marker: str | None, src: Path) -> bool:
        """True if the instance was done before (its marker exists); otherwise its
        original is now in ``src``. A small original is fetched while the marker is
        asked for; a large one only once the marker is known to be absent; with no
        marker to ask for, the original is fetched at once."""
        if marker is None:
            await self._download(original, src)
            return False
        if original.size > SMALL_BYTES:
            if await self._blobs.exists(marker):
                return True
            await self._download(original, src)
            return False
        done = asyncio.create_task(self._blobs.exists(marker))
        try:
            await self._download(original, src)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception:
            await asyncio.wait([done])
            if not done.exception() and done.result():
                return True  # done before: the original's state no longer matters
            raise
        return await done

    async def _download(self, original: BlobRef, src: Path) -> None:
        with src.open("wb") as file:
            await self._blobs.download(original, file)

    async def _store(self, received: InstanceReceived, result: Normalized, dst: Path) -> BlobRef:
        if result.outcome in (Outcome.ALREADY_CANONICAL, Outcome.NON_IMAGE):
            return received.blob
        with dst.open("rb") as file:
            hashed = await asyncio.to_thread(HashedFile.from_file, file)
            key = content_key(CANONICAL, received.study_instance_uid, hashed.sha256)
            stored = await self._blobs.put_file(
                key, hashed, CANONICAL, check_existing=hashed.size > SMALL_BYTES
            )
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
            routing=_routing(result),
            order_ref=received.order_ref,
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
                "lane": self._lane.value,
                "transfer_syntax_uid": result.transfer_syntax_uid,
                "size": canonical.size,
            },
        )


def _routing(result: Normalized) -> RoutingAttributes | None:
    """What the codec worker read of the routing attributes; None (the router then
    reads the header itself) if it read none."""
    if result.routing is None:
        return None
    return RoutingAttributes(
        **{
            field: result.routing.get(keyword)
            for keyword, field in RoutingAttributes.KEYWORDS.items()
        }
    )
