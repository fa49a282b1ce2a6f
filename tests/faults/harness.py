"""What every fault scenario shares: the whole pipeline on real parts with two
DICOMweb destinations behind counting proxies, a sender that records which instances
were acknowledged, the check that each was delivered exactly once to each
destination, and the scenario's result as JSON for docs/reliability.md.

Sizes: ``RADFLOW_FAULTS=ci`` (the default, what ``make test`` runs) keeps every
scenario to tens of seconds; ``RADFLOW_FAULTS=full`` (``make faults``) runs them at
length — outages of tens of minutes, several hundred instances, a long soak.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

from radflow_core.scu import keep_responses
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.stow_counter import StowCounter
from support.dicom import make_instance
from support.stack import IngestProcess, Stack

RESULTS = Path(__file__).parent / "results"
"""Where a full run (``make faults``) keeps each scenario's JSON; docs/reliability.md is
generated from these files (tests/faults/publish.py)."""


@dataclass(frozen=True)
class Size:
    instances: int
    """Instances in a stream (kill, terminate, scale, broker restart)."""
    outage_instances: int
    """Instances in a stream sent through an outage of S3 or the broker (fewer in CI:
    on a loaded 2-core machine ingest stores two or three a second)."""
    outage_s: float
    """How long a destination stays down."""
    s3_outage_s: float
    """How long S3 stays down."""
    max_poll_interval_ms: int
    """The consumers' poll interval: the destination outage lasts several times it."""
    soak_s: float
    """How long the soak sends."""
    soak_rate_per_s: float
    """Instances a second the soak sends: well under what the pipeline keeps up with on
    the machine it runs on (a 2-core CI runner manages about three)."""
    drain_s: float
    """How long a scenario may take to deliver everything after its fault ended."""


SIZES = {
    "ci": Size(
        instances=80,
        outage_instances=60,
        outage_s=12,
        s3_outage_s=10,
        max_poll_interval_ms=3_000,
        soak_s=24,
        soak_rate_per_s=1.5,
        drain_s=180,
    ),
    "full": Size(
        instances=600,
        outage_instances=600,
        outage_s=20 * 60,
        s3_outage_s=5 * 60,
        max_poll_interval_ms=300_000,
        soak_s=15 * 60,
        soak_rate_per_s=3.0,
        drain_s=30 * 60,
    ),
}


def mode() -> str:
    value = os.environ.get("RADFLOW_FAULTS", "ci")
    if value not in SIZES:
        raise ValueError(f"RADFLOW_FAULTS must be one of {sorted(SIZES)}, not {value!r}")
    return value


def size() -> Size:
    return SIZES[mode()]


def make_series(folder: Path, count: int, studies: int = 1, rows: int = 64) -> list[Path]:
    """``count`` small CT instances spread over ``studies`` studies."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uids = [generate_uid() for _ in range(studies)]
    series = {s: generate_uid() for s in study_uids}
    return [
        make_instance(
            folder / f"{i:05d}.dcm",
            study_instance_uid=study_uids[i % studies],
            series_instance_uid=series[study_uids[i % studies]],
            rows=rows,
            columns=rows,
        )
        for i in range(count)
    ]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@dataclass
class Sent:
    """What a sender was told, per SOP Instance UID (last answer wins)."""

    acked: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)
    """Every instance the sender tried at least once (all of them, unless stopped)."""
    refused: Counter[int] = field(default_factory=Counter)
    """Failure statuses (and -1: no answer) seen, by status."""
    ack_seconds: list[float] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    """When (monotonic time) each C-STORE in ``ack_seconds`` was sent, in the same order."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def send(
    port: int,
    files: Sequence[Path],
    sent: Sent,
    *,
    calling_ae: str = "FAULTSCU",
    retry_until: float | None = None,
    pace_s: float = 0.0,
    every_s: float = 0.0,
    stop: threading.Event | None = None,
) -> None:
    """Send ``files`` over as few associations as possible (a new one after a failure),
    as a modality does; an instance not acknowledged is sent again until
    ``retry_until`` (monotonic time) if given, else given up on. ``pace_s`` pauses
    after each instance; ``every_s`` starts one every so often instead (a steady rate,
    whatever each takes, unless one takes longer). ``stop`` ends the stream early: the
    instances not started yet are not sent (nor counted), those refused are still
    retried, so a stream can last exactly as long as what it accompanies."""
    pending = list(files)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    contexts: set[tuple[str, str]] = set()
    datasets = {}
    for path in pending:
        ds = pydicom.dcmread(path)
        datasets[path] = ds
        contexts.add((str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, [ts])
    next_at = time.monotonic()
    while pending:
        failed: list[Path] = []
        assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="RADFLOW"))
        if not assoc.is_established:
            failed = pending
        else:
            try:
                for index, path in enumerate(pending):
                    uid = str(datasets[path].SOPInstanceUID)
                    if stop is not None and stop.is_set() and uid not in sent.started:
                        continue
                    if every_s:
                        time.sleep(max(0.0, next_at - time.monotonic()))
                        next_at = max(next_at + every_s, time.monotonic() - every_s)
                    started = time.monotonic()
                    with sent.lock:
                        sent.started.add(uid)
                    try:
                        rsp = assoc.send_c_store(datasets[path])
                    except Exception:
                        rsp = None
                    status = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
                    with sent.lock:
                        if status in (0x0000, 0xB000, 0xB007, 0xB006):
                            sent.acked.add(uid)
                            sent.ack_seconds.append(time.monotonic() - started)
                            sent.acked_at.append(started)
                        else:
                            sent.refused[status] += 1
                    if status not in (0x0000, 0xB000, 0xB007, 0xB006):
                        failed.append(path)
                    if not assoc.is_established:
                        failed.extend(pending[index + 1 :])
                        break
                    if pace_s:
                        time.sleep(pace_s)
            finally:
                if assoc.is_established:
                    assoc.release()
        if not failed or retry_until is None or time.monotonic() > retry_until:
            return
        pending = failed
        time.sleep(1.0)


def send_in_background(
    port: int, files: Sequence[Path], sent: Sent, **kwargs: Any
) -> threading.Thread:
    thread = threading.Thread(target=send, args=(port, files, sent), kwargs=kwargs, daemon=True)
    thread.start()
    return thread


@dataclass
class Destinations:
    """The destinations the rules route everything to, each behind a counting proxy."""

    counters: dict[str, StowCounter]

    def delivered_everywhere(self, uids: Iterable[str]) -> bool:
        wanted = set(uids)
        return all(wanted <= set(c.deliveries()) for c in self.counters.values())

    def missing(self, uids: Iterable[str]) -> dict[str, int]:
        wanted = set(uids)
        return {n: len(wanted - set(c.deliveries())) for n, c in self.counters.items()}

    def duplicates(self) -> dict[str, int]:
        """Instances a destination stored more than once, per destination."""
        return {n: len(c.duplicates()) for n, c in self.counters.items()}

    def deliveries(self) -> dict[str, int]:
        return {n: sum(c.deliveries().values()) for n, c in self.counters.items()}


def write_rules(path: Path, destinations: dict[str, str]) -> Path:
    """Route everything to every destination (``name: url``), several per request."""
    lines = ["version: 1", "destinations:"]
    for name, url in destinations.items():
        lines += [f"  {name}:", f"    url: {url}", "    max_batch: 20"]
    lines += [
        "rules:",
        "  - name: everything",
        f"    route: [{', '.join(destinations)}]",
        "default: {hold: unrouted}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Pipeline:
    """ingest → transcode → router → stow-forwarder → destinations, on one stack."""

    stack: Stack
    destinations: Destinations
    rules: Path
    settings: dict[str, str]
    """Environment every service of the scenario gets (poll interval, breaker)."""
    started: dict[str, IngestProcess] = field(default_factory=dict)

    @property
    def ingest(self) -> IngestProcess:
        return self.started["ingest"]

    def wait_delivered(self, uids: Iterable[str], timeout_s: float) -> float:
        """Wait until every instance reached every destination; returns the seconds."""
        wanted = set(uids)
        began = time.monotonic()
        wait_for(
            f"{len(wanted)} instances delivered to every destination "
            f"(missing: {self.destinations.missing(wanted)})",
            lambda: self.destinations.delivered_everywhere(wanted),
            timeout_s=timeout_s,
            every_s=0.5,
        )
        return time.monotonic() - began

    def dead_letters(self) -> dict[str, int]:
        """Events on every failure topic, by topic."""
        return {
            t.value: len(self.stack.events(t))
            for t in (Topic.INSTANCE_FAILED, Topic.FORWARD_FAILED)
        }


@dataclass
class Result:
    """One scenario's outcome, as published in docs/reliability.md."""

    scenario: str
    title: str
    acknowledged: int
    delivered: dict[str, int]
    lost: dict[str, int]
    duplicated: dict[str, int]
    dead_letters: dict[str, int]
    drain_s: float
    details: dict[str, Any] = field(default_factory=dict)
    mode: str = field(default_factory=mode)
    when: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def record(self, tmp_path: Path) -> Path:
        """Write the result to ``RADFLOW_FAULTS_RESULTS`` if set, else to ``RESULTS`` on a
        full run, else beside the test (a CI run leaves the published results alone)."""
        text = json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"
        chosen = os.environ.get("RADFLOW_FAULTS_RESULTS")
        folder = Path(chosen) if chosen else RESULTS if self.mode == "full" else tmp_path
        target = folder / f"{self.scenario}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return target


def outcome(
    pipeline: Pipeline,
    sent: Sent,
    scenario: str,
    title: str,
    drain_s: float,
    **details: Any,
) -> Result:
    """Count what happened to the acknowledged instances at every destination."""
    delivered = pipeline.destinations.deliveries()
    lost = pipeline.destinations.missing(sent.acked)
    return Result(
        scenario=scenario,
        title=title,
        acknowledged=len(sent.acked),
        delivered=delivered,
        lost=lost,
        duplicated=pipeline.destinations.duplicates(),
        dead_letters=pipeline.dead_letters(),
        drain_s=round(drain_s, 1),
        details=details,
    )


def assert_exactly_once(result: Result) -> None:
    assert result.acknowledged > 0, "nothing was acknowledged"
    assert all(v == 0 for v in result.lost.values()), f"lost: {result.lost}"
    assert all(v == 0 for v in result.duplicated.values()), f"duplicated: {result.duplicated}"
    assert all(v == 0 for v in result.dead_letters.values()), f"dead letters: {result.dead_letters}"


Starter = Callable[..., IngestProcess]
