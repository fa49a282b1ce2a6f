"""Forward rate (issue 6): a backlog of routed instances delivered to Orthanc by the
stow-forwarder, by STOW-RS and by DIMSE, next to DCMTK storescu sending the same files
straight to Orthanc, in one run. Prints a table, writes bench/results/forward_rate.json
and a plot of instances at Orthanc over time (bench/plots/forward_throughput.png).

    python bench/forward_rate.py [--ct 500] [--small 500] [--repeat 2] [--quick]

Method. The files (CT 512x512 slices of one study; a mix of small instances in many
studies) are put in the bucket with ``BlobStore`` and one ``ForwardRequested`` event
per file is published to dicom.forward.requested, as the router would (requested
syntax = the file's own, Explicit VR LE, so nothing is converted). Then, for each
destination kind, a fresh Orthanc is started and the forwarder is started with a
rule file whose one destination is that Orthanc: DICOMweb (``url``, batches of 50, the
default) or DIMSE (``kind: dimse``, AE title ORTHANC, one association per batch).
The reference is ``storescu -R`` (TCP_NODELAY=1, one association) sending the same
files to another fresh Orthanc.

Timed windows, stated because they differ:
- storescu: its wall time, process start to exit (starting storescu costs ~10 ms).
- forwarder, total: from starting ``python -m stow_forwarder`` (Python start-up,
  rule file, S3 and broker connections, consumer-group join) to the last
  ``dicom.forward.completed`` event's ``delivered_at``.
- forwarder, steady: from the ``delivered_at`` of the last instance of the first
  batch to that of the last instance: (N - first batch) instances over that time.
  Start-up and group join are outside it; each batch's download from S3, send,
  delivery markers and completed events are inside.
The target (ours >= 1.0x storescu) is judged on the steady rate; the total is shown
beside it. Every run checks that Orthanc holds every instance and that each request
has exactly one completed event.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    BENCH_AE,
    PLOTS,
    RESULTS,
    Parts,
    Slice,
    TopicFollower,
    blob_requests,
    ct_series,
    fmt,
    loadavg,
    machine,
    median,
    orthanc_count,
    requests_per_instance,
    run_dir,
    small_mix,
    timestamp,
    total_bytes,
    write_result,
)

from radflow_core.blobstore import BlobStore
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import storescu_parallel
from radflow_devstack.kit.rules_file import dimse_destination, write_rules
from radflow_devstack.processes import ManagedProcess
from radflow_devstack.seed import stored_request

KINDS = ("stow-rs", "dimse")


async def _publish_backlog(st: Slice, files: list[Path]) -> None:
    """Blobs in the bucket and one routine forward request per file, for ``dest``."""
    blobs = BlobStore(st.s3)
    producer = EventProducer(st.kafka, "bench")
    await blobs.ensure_bucket()
    await producer.start()
    try:
        for path in files:
            request = await stored_request(blobs, path, "dest", "bench")
            await producer.publish(request, request.key, st.topic(Topic.FORWARD_REQUESTED))
    finally:
        await producer.stop()
        blobs.close()


class CountPoller:
    """Polls Orthanc's instance count every 0.2 s: the destination's view over time."""

    def __init__(self, orthanc: ManagedProcess) -> None:
        self._orthanc = orthanc
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CountPoller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.points.append((time.time(), orthanc_count(self._orthanc)))
            except Exception:  # noqa: BLE001, S112 - a missed sample is harmless
                continue


def _storescu(parts: Parts, files: list[Path]) -> dict[str, Any]:
    orthanc = parts.orthanc()
    assert orthanc.dicom_port is not None
    with CountPoller(orthanc) as poller:
        started = time.time()
        elapsed = storescu_parallel(orthanc.dicom_port, files, 1, "ORTHANC", BENCH_AE)
    held = orthanc_count(orthanc)
    assert held == len(files), f"Orthanc holds {held} of {len(files)}"
    parts.stop(orthanc)
    return {
        "seconds": round(elapsed, 3),
        "instances_per_s": round(len(files) / elapsed, 1),
        "curve": [(round(t - started, 2), n) for t, n in poller.points],
    }


def _forwarder(
    parts: Parts, files: list[Path], kind: str, max_batch: int, tmp: Path
) -> dict[str, Any]:
    st = parts.slice()
    asyncio.run(_publish_backlog(st, files))
    orthanc = parts.orthanc()
    if kind == "dimse":
        assert orthanc.dicom_port is not None
        body = dimse_destination(orthanc.dicom_port, "ORTHANC", max_batch=str(max_batch))
    else:
        body = f"url: 'http://127.0.0.1:{orthanc.port}/dicom-web'\nmax_batch: {max_batch}"
    rules = write_rules(tmp / f"rules-{kind}.yaml", {"dest": body}, ["dest"])
    with (
        TopicFollower(st.kafka, st.topic(Topic.FORWARD_COMPLETED)) as completed,
        CountPoller(orthanc) as poller,
    ):
        started = time.time()
        forwarder = parts.service("stow_forwarder", st, rules_file=str(rules))
        ready = time.time()
        completed.wait(len(files), 600)
        requests = requests_per_instance(
            {}, {"stow_forwarder": blob_requests(forwarder)}, len(files)
        )
    done = completed.events()
    failed = TopicFollower(st.kafka, st.topic(Topic.FORWARD_FAILED))
    with failed:
        time.sleep(0.5)
        assert failed.count == 0, f"{failed.count} dead letters"
    assert len({d["idempotency_key"] for d in done}) == len(files) == len(done)
    held = orthanc_count(orthanc)
    assert held == len(files), f"Orthanc holds {held} of {len(files)}"
    parts.stop(forwarder)
    parts.stop(orthanc)
    delivered = sorted(timestamp(d["delivered_at"]) for d in done)
    first_batch = min(max_batch, len(files))
    total = delivered[-1] - started
    row: dict[str, Any] = {
        "total_seconds": round(total, 3),
        "total_instances_per_s": round(len(files) / total, 1),
        "start_to_ready_s": round(ready - started, 2),
        "start_to_first_delivery_s": round(delivered[0] - started, 2),
        "curve": [(round(t - started, 2), n) for t, n in poller.points],
        "s3_requests_per_instance": requests["total"],
        "s3_requests_by_operation": requests["stages"]["stow_forwarder"]["by_operation"],
    }
    if len(files) > first_batch:
        steady = delivered[-1] - delivered[first_batch - 1]
        row["steady_seconds"] = round(steady, 3)
        row["instances_per_s"] = round((len(files) - first_batch) / steady, 1)
    else:
        row["instances_per_s"] = row["total_instances_per_s"]
    return row


def run(ct: int, small: int, repeat: int, max_batch: int) -> dict[str, Any]:
    info = machine()
    rows: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    with run_dir() as tmp, Parts(tmp) as parts:
        sets = {"ct-512": ct_series(tmp / "ct", ct)}
        if small:
            sets["small-mix"] = small_mix(tmp / "small", small)
        for set_name, files in sets.items():
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ("storescu", *KINDS)}
            for _ in range(repeat):
                runs["storescu"].append(_storescu(parts, files))
                for kind in KINDS:
                    runs[kind].append(_forwarder(parts, files, kind, max_batch, tmp))
            row: dict[str, Any] = {
                "set": set_name,
                "instances": len(files),
                "mb": round(total_bytes(files) / 1e6, 1),
                "max_batch": max_batch,
            }
            for name, results in runs.items():
                curves[f"{set_name} {name}"] = results[0].pop("curve")
                for r in results[1:]:
                    r.pop("curve")
                summary = {
                    key: median([r[key] for r in results])
                    for key in results[0]
                    if isinstance(results[0][key], int | float)
                }
                summary["runs"] = results
                row[name] = summary
            for kind in KINDS:
                rate = row[kind]["instances_per_s"] / row["storescu"]["instances_per_s"]
                row[f"{kind}_vs_storescu"] = round(rate, 2)
                total = row[kind]["total_instances_per_s"] / row["storescu"]["instances_per_s"]
                row[f"{kind}_total_vs_storescu"] = round(total, 2)
                row[f"{kind}_target_met"] = rate >= 1.0
            rows.append(row)
    return {**info, "load_at_end": loadavg(), "repeat": repeat, "rows": rows, "curves": curves}


def plot(result: dict[str, Any], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({name.split(" ")[0] for name in result["curves"]})
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, set_name in zip(axes[0], sets, strict=True):
        for name, curve in result["curves"].items():
            if name.startswith(f"{set_name} ") and curve:
                t, n = zip(*curve, strict=True)
                ax.plot(t, n, label=name.split(" ", 1)[1])
        ax.set_title(f"{set_name}: instances held by Orthanc")
        ax.set_xlabel("seconds since the sender or forwarder was started")
        ax.set_ylabel("instances")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "forward_throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(result: dict[str, Any]) -> str:
    head = (
        "| set | storescu inst/s | forwarder STOW-RS steady (total) | ratio (≥1.0) "
        "| forwarder DIMSE steady (total) | ratio (≥1.0) | start to first delivery |"
    )
    lines = [head, "|" + "---|" * 7]
    for r in result["rows"]:

        def cell(kind: str, row: dict[str, Any] = r) -> str:
            return (
                f"{fmt(row[kind]['instances_per_s'])} ({fmt(row[kind]['total_instances_per_s'])})"
            )

        def ratio(kind: str, row: dict[str, Any] = r) -> str:
            verdict = "met" if row[f"{kind}_target_met"] else "**missed**"
            return (
                f"{row[f'{kind}_vs_storescu']:.2f} ({row[f'{kind}_total_vs_storescu']:.2f}) "
                f"{verdict}"
            )

        lines.append(
            f"| {r['set']} ({r['instances']}, {r['mb']} MB) "
            f"| {fmt(r['storescu']['instances_per_s'])} | {cell('stow-rs')} | {ratio('stow-rs')} "
            f"| {cell('dimse')} | {ratio('dimse')} "
            f"| {fmt(r['stow-rs']['start_to_first_delivery_s'])} s / "
            f"{fmt(r['dimse']['start_to_first_delivery_s'])} s |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=500, help="CT slices (512x512)")
    parser.add_argument("--small", type=int, default=500, help="small instances (0: none)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=50, help="the destinations' max_batch")
    parser.add_argument("--quick", action="store_true", help="a few instances, once")
    parser.add_argument("--out", type=Path, default=RESULTS / "forward_rate.json")
    parser.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args()
    if args.quick:
        args.ct, args.small, args.repeat, args.max_batch = 12, 0, 1, 5
    result = run(args.ct, args.small, args.repeat, args.max_batch)
    write_result(args.out, result)
    plot(result, args.plots)
    print(table(result))


if __name__ == "__main__":
    main()
