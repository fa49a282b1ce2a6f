"""Report-return's fixtures: the stand-in RIS (hl7apy's MLLP server, in this process, on
a free loopback port, scripted per test) and a reporting platform that stores report
documents in the test's bucket and announces them on reports.finalized."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radflow_devstack.mllp_peer import MllpPeer
from support.reports import Publish, publisher
from support.stack import Stack


@pytest.fixture
def mllp_peer() -> Iterator[MllpPeer]:
    peer = MllpPeer().start()
    yield peer
    peer.stop()


@pytest.fixture
def publish_report(stack: Stack) -> Publish:
    """Store a report document and announce it on reports.finalized; returns the event."""
    return publisher(stack)
