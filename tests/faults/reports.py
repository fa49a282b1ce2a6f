"""report-return under a fault: a stream of reports published to reports.finalized
while report-return returns them to a stand-in RIS (an in-process MLLP peer), and the
count of what the RIS received, as a scenario ``Result``."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

from faults.harness import Result, size
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer
from support.fleet import Fleet
from support.reports import document, publisher, write_sites
from support.stack import IngestProcess, Stack


class ReportStream:
    """``count`` reports published one after the other in a thread (a reporting
    platform), returned by report-return to ``peer``."""

    def __init__(self, stack: Stack, peer: MllpPeer, count: int) -> None:
        self.stack = stack
        self.peer = peer
        self.count = count
        self.published: list[str] = []
        self.began = time.monotonic()
        self._thread = threading.Thread(target=self._publish, daemon=True)

    def start_service(self, fleet: Fleet, env: dict[str, str], tmp_path: Path) -> IngestProcess:
        sites = write_sites(
            tmp_path / "sites.yaml",
            {
                "north": {
                    "host": "127.0.0.1",
                    "port": self.peer.port,
                    "receiving_application": "RIS",
                    "receiving_facility": "NORTH",
                    "patient_identifier": {"assigning_authority": "NORTH"},
                    "ack_timeout_s": 5,
                    "connect_timeout_s": 2,
                }
            },
        )
        return fleet.start(
            "report_return",
            env=env,
            sites_file=str(sites),
            retry_initial_s="0.1",
            retry_max_s="0.5",
        )

    def _publish(self) -> None:
        publish = publisher(self.stack)
        for _ in range(self.count):
            self.published.append(publish(document()).report_id)

    def start(self) -> ReportStream:
        self.began = time.monotonic()
        self._thread.start()
        return self

    def wait_a_third(self) -> int:
        wait_for(
            "a third of the reports at the RIS",
            lambda: len(self.peer.received) >= self.count // 3,
            timeout_s=size().drain_s,
            every_s=0.1,
        )
        return len(self.peer.received)

    def returned(self) -> dict[str, str]:
        """report_id → the MSH-10 the RIS acknowledged it under."""
        return {
            e["data"]["report_id"]: e["data"]["message_control_id"]
            for e in self.stack.events(Topic.REPORT_RETURNED)
        }

    def finish(
        self, scenario: str, title: str, *, in_flight_resends: int = 0, **details: object
    ) -> Result:
        """Wait until every report is returned, then count what the RIS received.

        ``in_flight_resends``: how many reports the fault may legitimately send twice
        under the same MSH-10. A SIGKILL after the RIS's AA but before report-return
        has written its marker resends the one report on the wire with the same
        control ID (MLLP has no way to ask the RIS what it holds), which is what an
        HL7 receiver's duplicate check on MSH-10 is for. A second copy of anything
        else, or a copy under another control ID, is a duplicate."""
        self._thread.join(timeout=size().drain_s)
        assert not self._thread.is_alive(), "publishing never finished"
        drained = time.monotonic()
        wait_for(
            f"{self.count} reports returned",
            lambda: set(self.returned()) >= set(self.published),
            timeout_s=size().drain_s,
            every_s=0.5,
        )
        drain = time.monotonic() - drained
        time.sleep(3)  # a report sent twice would arrive now
        received = Counter(m.control_id for m in self.peer.received)
        returned = self.returned()
        expected = {returned[r] for r in self.published if r in returned}
        resent = sum(n - 1 for n in received.values() if n > 1)
        return Result(
            scenario=scenario,
            title=title,
            acknowledged=len(self.published),
            delivered={"ris": len(self.peer.received)},
            lost={"ris": len(set(self.published) - set(returned))},
            duplicated={"ris": max(0, resent - in_flight_resends)},
            dead_letters={Topic.REPORT_FAILED.value: len(self.stack.events(Topic.REPORT_FAILED))},
            drain_s=round(drain, 1),
            details={
                "reports": self.count,
                "unexpected_messages": len(set(received) - expected),
                "resent_same_control_id": resent,
                "total_s": round(time.monotonic() - self.began, 1),
                **details,
            },
        )
