"""Lossy previews beside the lossless path: which instances get one, making them in the
codec workers, storing and announcing them.

An instance gets previews when the rule file (``RADFLOW_TRANSCODE_RULES_FILE``, the
router's) routes it by a rule with ``preview:`` and that rule's selection picks some of
its frames (decided from the instance alone: see
:class:`radflow_rules.rules.PreviewSelection`). The rules are evaluated on the same view
of the instance the router builds, at the time transcode sees it.

A preview is extra: a failure to make one (undecodable frame, a value that cannot be
shown, a codec crash) is dead-lettered to ``dicom.instance.failed`` with reason
``preview_failed`` and the lossless path goes on. Only what would stop the lossless
path too (S3 or the broker unreachable) is raised, and the whole instance is retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from pydicom import dcmread

from radflow_codecs.codecs import Normalized
from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.errors import PipelineError
from radflow_core.events import (
    InstancePreview,
    InstanceReceived,
    Lane,
    PreviewOf,
    RoutingAttributes,
)
from radflow_core.kafka import EventProducer
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError
from radflow_rules.rules import evaluate
from radflow_rules.view import event_instance, header_attributes
from transcode import metrics
from transcode.pool import CodecPool
from transcode.preview_instance import (
    JPEG_METHOD,
    SECONDARY_CAPTURE,
    PreviewMade,
    make_previews,
)

log = logging.getLogger(__name__)

PREVIEW = "preview"
"""Blob kind and key prefix: ``preview/<h>/<sha256>.dcm`` beside ``canonical/``."""
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)

Failed = Callable[[str, str], Awaitable[None]]
"""Dead-letter the instance's record with (reason, message)."""


class PreviewRules:
    """The rule file's preview options; a missing or invalid file means no previews."""

    def __init__(self, path: Path | None) -> None:
        self._live = LiveRules(path, RULES_METRICS) if path is not None else None

    def load(self) -> None:
        """Read the file at start; a problem is logged, never raised."""
        if self._live is None:
            metrics.RULES_VALID.set(1)
            return
        try:
            self._live.load()
        except RuleFileError as exc:
            metrics.RULES_VALID.set(0)
            log.error(  # noqa: TRY400 - its problems are the message, not a traceback
                "the rule file cannot be used; no previews until a valid one is seen",
                extra={"problems": exc.lines},
            )

    async def watch(self, interval_s: float) -> None:
        if self._live is not None:
            await self._live.watch(interval_s)

    @property
    def wanted(self) -> bool:
        """Some rule in force asks for previews (else no instance needs looking at)."""
        if self._live is None or not self._live.loaded:
            return False
        return any(rule.preview is not None for rule in self._live.current.rules)

    def frames(
        self,
        received: InstanceReceived,
        header: dict[str, str | None],
        number: int | None,
        count: int,
    ) -> tuple[int, ...]:
        """Frames of this instance that some destination wants a preview of."""
        if self._live is None or not self.wanted:
            return ()
        rules = self._live.current
        instance = event_instance(rules, received, header)
        wanted: set[int] = set()
        for route in evaluate(rules, instance, datetime.now(UTC)).routes:
            wanted.update(route.preview_frames(number, count))
        return tuple(sorted(wanted))


def read_header(src: Path) -> tuple[dict[str, str | None], int | None, int]:
    """(rule attributes, Instance Number, Number of Frames) of the file ``src``."""
    ds = dcmread(src, stop_before_pixels=True)
    try:
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = None
    try:
        count = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        count = 1
    return header_attributes(ds), number, count


class Previews:
    def __init__(
        self,
        rules: PreviewRules,
        blobs: BlobStore,
        producer: EventProducer,
        codecs: CodecPool,
        quality: int,
    ) -> None:
        self._rules = rules
        self._blobs = blobs
        self._producer = producer
        self._codecs = codecs
        self._quality = quality

    async def make(
        self,
        received: InstanceReceived,
        result: Normalized,
        src: Path,
        workdir: Path,
        lane: Lane,
        failed: Failed,
    ) -> None:
        """Make, store and announce the previews this instance gets (none for most).

        Raises:
            PipelineError: retriable only (S3 or the broker unreachable); every other
            failure is handed to ``failed`` and counted.
        """
        if result.pixels is None or not self._rules.wanted:
            return  # most instances: no header parsed on the hot path
        try:
            header, number, count = await asyncio.to_thread(read_header, src)
        except Exception as exc:  # noqa: BLE001 - it was normalized, so this is odd, not fatal
            await self._failed(received, failed, "unreadable_dataset", type(exc).__name__)
            return
        frames = self._rules.frames(received, header, number, count)
        if not frames:
            return
        await asyncio.to_thread(workdir.mkdir)
        try:
            made = await self._codecs.run(
                make_previews,
                src,
                workdir,
                frames,
                received.blob.sha256,
                self._quality,
                urgent=lane is Lane.STAT,
            )
        except PipelineError as exc:
            if exc.retriable:
                raise
            await self._failed(received, failed, exc.reason, str(exc))
            return
        except Exception as exc:
            log.exception("unexpected error making a preview")
            await self._failed(received, failed, "unexpected_error", type(exc).__name__)
            return
        for preview in made:
            await self._announce(received, result, preview, number, count)

    async def _announce(
        self,
        received: InstanceReceived,
        result: Normalized,
        preview: PreviewMade,
        number: int | None,
        count: int,
    ) -> None:
        with preview.path.open("rb") as file:
            hashed = await asyncio.to_thread(HashedFile.from_file, file)
            key = content_key(PREVIEW, received.study_instance_uid, hashed.sha256)
            stored = await self._blobs.put_file(key, hashed, PREVIEW, check_existing=False)
        routing = None
        if result.routing is not None:
            routing = RoutingAttributes(
                **{
                    field: result.routing.get(keyword)
                    for keyword, field in RoutingAttributes.KEYWORDS.items()
                }
            )
        event = InstancePreview(
            **{
                **received.identity(),
                "sop_instance_uid": preview.sop_instance_uid,
                "sop_class_uid": SECONDARY_CAPTURE,
                "series_instance_uid": preview.series_instance_uid,
            },
            preview_of=PreviewOf(
                sop_instance_uid=received.sop_instance_uid,
                sop_class_uid=received.sop_class_uid,
                series_instance_uid=received.series_instance_uid,
            ),
            blob=stored.ref,
            transfer_syntax_uid=JPEG_BASELINE,
            lossy_ratio=preview.ratio,
            lossy_method=JPEG_METHOD,
            frames=(preview.frame,),
            derived_at=datetime.now(UTC),
            original=received.blob,
            instance_number=number,
            original_frames=count,
            routing=routing,
        )
        await self._producer.publish(event, key=event.key)
        metrics.PREVIEWS.labels("made").inc()
        metrics.PREVIEW_BYTES.inc(stored.ref.size)
        metrics.PREVIEW_RATIO.observe(preview.ratio)
        log.info(
            "preview made",
            extra={
                "sop_instance_uid": preview.sop_instance_uid,
                "series_instance_uid": preview.series_instance_uid,
                "study_instance_uid": received.study_instance_uid,
                "size": stored.ref.size,
            },
        )

    @staticmethod
    async def _failed(received: InstanceReceived, failed: Failed, reason: str, detail: str) -> None:
        metrics.PREVIEWS.labels(reason).inc()
        log.warning(
            "preview not made",
            extra={
                "reason": reason,
                "sop_instance_uid": received.sop_instance_uid,
                "study_instance_uid": received.study_instance_uid,
            },
        )
        await failed("preview_failed", f"{reason}: {detail}")
