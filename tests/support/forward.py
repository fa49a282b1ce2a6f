"""Forward requests published straight to their topic, as the router would, for the
forwarder's tests that need no ingest, transcode or router."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from radflow_core.blobstore import BlobStore
from radflow_core.events import ForwardRequested, encode, wrap
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.seed import stored_request
from support.stack import Stack


def publish(stack: Stack, requests: Sequence[ForwardRequested]) -> None:
    """Publish ``requests`` in this order, each on its lane's topic, all to partition 0
    (one fetch can carry several studies)."""

    async def run() -> None:
        producer = EventProducer(stack.kafka, "test-router")
        await producer.start()
        try:
            for request in requests:
                await producer.send(
                    stack.topic(request.lane.topic(Topic.FORWARD_REQUESTED)),
                    request.key,
                    encode(wrap(request, "router")),
                    partition=0,
                )
        finally:
            await producer.stop()

    asyncio.run(run())


def stored(stack: Stack, files: Sequence[Path], destination: str) -> list[ForwardRequested]:
    """Store each file in the bucket; one routine forward request per file."""

    async def run() -> list[ForwardRequested]:
        blobs = BlobStore(stack.s3)
        try:
            return [await stored_request(blobs, path, destination, "test") for path in files]
        finally:
            blobs.close()

    return asyncio.run(run())


def routed(stack: Stack, files: Sequence[Path], destination: str) -> list[ForwardRequested]:
    """Store each file and publish one routine forward request per file to
    ``destination``, in this order, all to partition 0."""
    requests = stored(stack, files, destination)
    publish(stack, requests)
    return requests
