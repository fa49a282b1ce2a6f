"""Delivery markers, one object per batch: what a destination was about to be sent
(intent) and what it acknowledged (delivered), for every request of the batch.

A batch's marker lives under its study's prefix for the destination,
``delivered/<destination scope>/<hashed study UID>/<batch id>``, so one LIST tells
what any earlier batch of the study recorded, instead of one HEAD per instance; and
one PUT records a whole batch, instead of one per instance. Its content is one line
per request: ``<idempotency key> sending`` or ``<idempotency key> delivered``.

The order of effects is the one the per-instance markers had: the batch's marker,
every request ``sending``, is written before the batch goes out; after each answer
it is written again with what the destination accepted now ``delivered``; only then
are the completed events published. A request that is ``delivered`` in any marker of
its study is done; one that is only ``sending`` somewhere may have been sent by a
process that crashed, and the destination is asked first.

Listing returns ETags: markers this process wrote (or read) are remembered with
theirs, so a study's later batches read no marker again unless another process
changed it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum

from radflow_core.blobstore import BlobStore
from radflow_core.uids import uid_digest
from radflow_rules.rules import Destination

DELIVERED_MARKER = "delivered"
"""The prefix of every delivery marker."""


class State(StrEnum):
    SENDING = "sending"
    """Staged to be sent: perhaps sent, perhaps not."""
    DELIVERED = "delivered"
    """The destination acknowledged it."""


def destination_scope(destination: Destination) -> str:
    """Markers are scoped by the destination's
    :attr:`~radflow_rules.rules.Destination.identity` (its address), not its name, so
    a destination that now points at another server receives everything again instead
    of having it skipped as delivered."""
    return hashlib.sha256(destination.identity.encode("utf-8")).hexdigest()[:16]


def study_prefix(destination: Destination, study_instance_uid: str) -> str:
    """Where every batch marker of one study for one destination is kept."""
    return f"{DELIVERED_MARKER}/{destination_scope(destination)}/{uid_digest(study_instance_uid)}/"


def encode(states: dict[str, State]) -> bytes:
    return "".join(f"{key} {state.value}\n" for key, state in sorted(states.items())).encode()


def decode(data: bytes) -> dict[str, State]:
    """A marker's content; lines that do not parse are ignored (never written by us)."""
    states: dict[str, State] = {}
    for line in data.decode("ascii", "replace").splitlines():
        key, _, state = line.partition(" ")
        if state in (State.SENDING.value, State.DELIVERED.value):
            states[key] = State(state)
    return states


def merge(into: dict[str, State], states: dict[str, State]) -> None:
    """Delivered anywhere wins over sending elsewhere."""
    for key, state in states.items():
        if into.get(key) is not State.DELIVERED:
            into[key] = state


class BatchMarker:
    """One batch's marker: its key and the state of each of its requests."""

    def __init__(self, book: MarkerBook, key: str, idempotency_keys: Iterable[str]) -> None:
        self._book = book
        self.key = key
        self.states = dict.fromkeys(idempotency_keys, State.SENDING)

    async def write(self) -> None:
        await self._book.put(self.key, dict(self.states))

    async def delivered(self, idempotency_keys: Iterable[str]) -> None:
        """Record these requests as acknowledged (one PUT for all of them)."""
        for key in idempotency_keys:
            self.states[key] = State.DELIVERED
        await self.write()


class MarkerBook:
    """The delivery markers of one destination."""

    def __init__(self, blobs: BlobStore, destination: Destination, remembered: int = 1024) -> None:
        self._blobs = blobs
        self._destination = destination
        self._remembered = remembered
        self._known: OrderedDict[str, tuple[str, dict[str, State]]] = OrderedDict()
        """Marker key → (ETag, content) of markers written or read lately."""
        self._writing = asyncio.Lock()
        """Writes are one at a time, each merged with the last known content of its
        object, so a request recorded as delivered is never written back as sending
        (an intent and a settlement of the same batch can overlap)."""

    async def states(self, study_instance_uid: str) -> dict[str, State]:
        """What every marker of the study records: one LIST, and a GET for each marker
        not written or read by this process in its present version."""
        found: dict[str, State] = {}
        for listed in await self._blobs.list(study_prefix(self._destination, study_instance_uid)):
            known = self._known.get(listed.key)
            if known is not None and known[0] == listed.etag:
                self._known.move_to_end(listed.key)
                states = known[1]
            else:
                data = await self._blobs.read_marker(listed.key)
                if data is None:  # removed since the listing (a lifecycle rule)
                    continue
                states = decode(data)
                self._remember(listed.key, listed.etag, states)
            merge(found, states)
        return found

    async def reopen(self, study_instance_uid: str, idempotency_keys: Iterable[str]) -> None:
        """Record these requests as ``sending`` again in every marker of the study that
        says they were delivered: a destination that acknowledged them and then did not
        hold them must get them again when they are replayed (asked first, as after a
        crash), not have them skipped as delivered."""
        keys = set(idempotency_keys)
        for listed in await self._blobs.list(study_prefix(self._destination, study_instance_uid)):
            data = await self._blobs.read_marker(listed.key)
            if data is None:
                continue
            states = decode(data)
            hit = [k for k in keys if states.get(k) is State.DELIVERED]
            if not hit:
                continue
            for key in hit:
                states[key] = State.SENDING
            async with self._writing:
                etag = await self._blobs.put_marker(listed.key, encode(states))
                self._remember(listed.key, etag, states)

    def batch(self, study_instance_uid: str, idempotency_keys: list[str]) -> BatchMarker:
        """A marker for one batch of a study, named by its requests: the same batch
        staged again writes the same object."""
        digest = hashlib.sha256("\n".join(sorted(idempotency_keys)).encode()).hexdigest()[:32]
        return BatchMarker(
            self, study_prefix(self._destination, study_instance_uid) + digest, idempotency_keys
        )

    async def put(self, key: str, states: dict[str, State]) -> None:
        async with self._writing:
            known = self._known.get(key)
            if known is not None:
                states = dict(states)
                merge(states, known[1])
            etag = await self._blobs.put_marker(key, encode(states))
            self._remember(key, etag, states)

    def _remember(self, key: str, etag: str, states: dict[str, State]) -> None:
        self._known[key] = (etag, states)
        self._known.move_to_end(key)
        while len(self._known) > self._remembered:
            self._known.popitem(last=False)
