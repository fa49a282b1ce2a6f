"""The fault suite's process helpers: replicas of a consumer in one group, each on its
own ops port; a crash, a graceful stop and a restart on the same ports."""

from __future__ import annotations

import signal

import pytest

from support.fleet import Fleet

pytestmark = pytest.mark.pipeline


def test_scale_kill_restart_and_terminate_replicas_of_a_consumer(fleet: Fleet) -> None:
    first, second = fleet.scale("transcode", 2)
    assert first.http_port != second.http_port
    assert first.ready() and second.ready()

    fleet.kill(first.proc.name)

    assert fleet.replicas("transcode") == [second]
    assert first.expected_exit == -signal.SIGKILL
    port = first.http_port
    assert fleet.restart(first.proc.name) is first
    assert (first.http_port, first.ready(), first.expected_exit) == (port, True, 0)
    assert fleet.terminate(second.proc.name) == 0
    assert fleet.scale("transcode", 1) == [first]
    with pytest.raises(LookupError):
        fleet.get("router")
