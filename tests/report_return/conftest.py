"""Report-return's fixtures: the stand-in RIS (hl7apy's MLLP server, in this process, on
a free loopback port, scripted per test), the stand-in EHR (radflow_devstack's FHIR
server, likewise) and a reporting platform that stores report
documents in the test's bucket and announces them on reports.finalized."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radflow_devstack.fhir_server import FhirServer
from radflow_devstack.mllp_peer import MllpPeer
from support.reports import FHIR_CLIENT, FHIR_SECRET, Publish, publisher
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


@pytest.fixture
def fhir_server() -> Iterator[FhirServer]:
    """The stand-in EHR: a FHIR server (conditional create and update, scripted
    faults) with an OAuth2 token endpoint, on a free loopback port."""
    server = FhirServer(clients={FHIR_CLIENT: FHIR_SECRET}).start()
    yield server
    server.stop()
