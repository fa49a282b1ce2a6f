"""DIMSE ingest rate: our ingest next to a bare pynetdicom SCP, Orthanc and DCMTK
storescp, receiving the same files from DCMTK storescu, in one run. Prints a table and
writes bench/results/ingest_rate.json.

    python bench/ingest_rate.py [--ct 300] [--small 500] [--repeat 3] [--quick]
        [--workers 1 [2 ...]] [--associations 1 4] [--references pynetdicom orthanc storescp]

Method. Two sets of instances, generated once (Explicit VR Little Endian): a CT series
of 512x512 16-bit slices (0.5 MB each) and a mix of small instances (64² and 128² CT,
256² MR, header-only SRs). Each set is sent by ``storescu -R`` (TCP_NODELAY=1) over 1
association, and split over 4 concurrent storescu processes (4 associations). The
time is the wall time from starting the first storescu to the exit of the last: when
storescu exits, every instance has been answered with success. Receivers:

- ours: ``python -m ingest`` — success only after the blob is in S3 (SeaweedFS) and
  the dicom.instance.received event is acknowledged by the broker (Tansu, acks=all).
  Afterwards the received events are counted.
- pynetdicom floor: ``bench/bare_scp.py``, writes each dataset to disk and nothing else.
- Orthanc (DCMTK inside; SQLite index and files on disk), counted by its REST API.
- DCMTK ``storescp --fork`` writing files (the near-limit).

``--workers 1 2`` runs ours once per RADFLOW_INGEST_WORKERS value, in the same run as
the references: the first value is ``ours``, each other one ``ours-w<N>`` (its CPU
counted over the parent and every worker). ``--references`` leaves out references not
needed for a question (the ratio to the bare SCP needs only pynetdicom).

CPU per instance is read from /proc (user + system seconds) for ingest, the S3
server, the broker, the bare SCP and storescp, over the same window; the ratio of
ingest's to the bare SCP's is the "ingest CPU per instance" target (at most 1.3
times), from the medians of the repeated runs.

Every receiver is fresh for every run (new bucket and topics, new Orthanc, new
folders), so none of them sees a duplicate. Runs are interleaved receiver by
receiver and repeated; the table shows the median, and the ratios are ours over
each reference from those medians. All of it shares the machine's 2 cores with the
sender (and, for ours, with the broker and the S3 server).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import (
    BENCH_AE,
    RESULTS,
    Parts,
    TopicFollower,
    ct_series,
    fmt,
    loadavg,
    machine,
    median,
    orthanc_count,
    python,
    run_dir,
    small_mix,
    total_bytes,
    write_result,
)

from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import NODELAY, storescu_parallel
from radflow_devstack.kit.procfs import cpu_seconds
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess, free_port

BENCH = Path(__file__).resolve().parent
RECEIVERS = ("ours", "pynetdicom", "orthanc", "storescp")
Timed = tuple[float, dict[str, float]]
"""Wall seconds, and CPU milliseconds per instance by process (ours only)."""


def _send_to_ours(parts: Parts, files: list[Path], associations: int, workers: int = 1) -> Timed:
    st = parts.slice()
    ingest = parts.service("ingest", st, workers=str(workers))
    assert ingest.dimse_port is not None
    with TopicFollower(st.kafka, st.topic(Topic.INSTANCE_RECEIVED)) as received:
        before = {**parts.cpu(), "ingest": cpu_seconds(ingest.pid)}
        elapsed = storescu_parallel(ingest.dimse_port, files, associations, "RADFLOW", BENCH_AE)
        after = {**parts.cpu(), "ingest": cpu_seconds(ingest.pid)}
        received.wait(len(files), 60)
        assert received.count == len(files), f"{received.count} events for {len(files)} sent"
    parts.stop(ingest)
    return elapsed, {k: 1000 * (after[k] - before[k]) / len(files) for k in after}


def _send_to_process(
    parts: Parts,
    argv: Callable[[int, Path], list[str]],
    name: str,
    files: list[Path],
    aet: str,
    associations: int,
) -> Timed:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as out:
        proc = ManagedProcess(name, argv(port, Path(out)), parts.run_dir / f"{name}.log", NODELAY)
        proc.start()
        try:
            proc.wait_for_port(port)
            assert proc.proc is not None
            before = cpu_seconds(proc.proc.pid)
            elapsed = storescu_parallel(port, files, associations, aet, BENCH_AE)
            used = 1000 * (cpu_seconds(proc.proc.pid) - before) / len(files)
            wait_for(
                f"{len(files)} files from {name}",
                lambda: len(os.listdir(out)) >= len(files),
                30,
                every_s=0.05,
            )
        finally:
            proc.stop()
    return elapsed, {name: used}


def _send_to_pynetdicom(parts: Parts, files: list[Path], associations: int) -> Timed:
    return _send_to_process(
        parts,
        lambda port, out: [python(), str(BENCH / "bare_scp.py"), str(port), str(out)],
        "bare-scp",
        files,
        "BARESCP",
        associations,
    )


def _send_to_storescp(parts: Parts, files: list[Path], associations: int) -> Timed:
    return _send_to_process(
        parts,
        lambda port, out: ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        "storescp",
        files,
        "STORESCP",
        associations,
    )


def _send_to_orthanc(parts: Parts, files: list[Path], associations: int) -> Timed:
    orthanc = parts.orthanc()
    assert orthanc.dicom_port is not None
    elapsed = storescu_parallel(orthanc.dicom_port, files, associations, "ORTHANC", BENCH_AE)
    count = orthanc_count(orthanc)
    assert count == len(files), f"Orthanc holds {count} of {len(files)}"
    parts.stop(orthanc)
    return elapsed, {}


SENDERS: dict[str, Callable[[Parts, list[Path], int], Timed]] = {
    "ours": _send_to_ours,
    "pynetdicom": _send_to_pynetdicom,
    "orthanc": _send_to_orthanc,
    "storescp": _send_to_storescp,
}


def _receivers(workers: list[int], references: list[str]) -> dict[str, Callable[..., Timed]]:
    """Ours once per workers value (the first named ``ours``), then the references."""
    ours: dict[str, Callable[..., Timed]] = {}
    for n in workers:
        name = "ours" if not ours else f"ours-w{n}"
        ours[name] = lambda p, f, a, n=n: _send_to_ours(p, f, a, n)
    return {**ours, **{r: SENDERS[r] for r in references}}


def run(
    ct: int,
    small: int,
    repeat: int,
    workers: list[int] | None = None,
    associations_list: tuple[int, ...] = (1, 4),
    references: tuple[str, ...] = RECEIVERS[1:],
) -> dict[str, Any]:
    info = machine()
    workers = workers or [1]
    senders = _receivers(workers, list(references))
    receivers = list(senders)
    variants = [r for r in receivers if r.startswith("ours")]
    rows: list[dict[str, Any]] = []
    with run_dir() as tmp, Parts(tmp) as parts:
        sets = {"ct-512": ct_series(tmp / "ct", ct)}
        if small:
            sets["small-mix"] = small_mix(tmp / "small", small)
        for set_name, files in sets.items():
            size = total_bytes(files)
            for associations in associations_list:
                times: dict[str, list[float]] = {r: [] for r in receivers}
                cpu: list[dict[str, float]] = []
                for _ in range(repeat):
                    for receiver in receivers:
                        elapsed, used = senders[receiver](parts, files, associations)
                        times[receiver].append(elapsed)
                        if receiver.startswith("ours-"):
                            used = {f"{k}@{receiver}": v for k, v in used.items()}
                        cpu.append(used)
                row: dict[str, Any] = {
                    "set": set_name,
                    "instances": len(files),
                    "mb": round(size / 1e6, 1),
                    "associations": associations,
                }
                row["cpu_ms_per_instance"] = {
                    k: round(median([c[k] for c in cpu if k in c]), 2)
                    for k in {k for c in cpu for k in c}
                }
                for receiver in receivers:
                    elapsed = median(times[receiver])
                    row[receiver] = {
                        "seconds": [round(t, 3) for t in times[receiver]],
                        "instances_per_s": round(len(files) / elapsed, 1),
                        "mb_per_s": round(size / 1e6 / elapsed, 1),
                    }
                for ours in variants:
                    for ref in references:
                        row[f"{ours}_vs_{ref}"] = round(
                            row[ours]["instances_per_s"] / row[ref]["instances_per_s"], 2
                        )
                if "orthanc" in references:
                    row["target_orthanc_met"] = row["ours_vs_orthanc"] >= 1.0
                if "pynetdicom" in references:
                    row["target_pynetdicom_met"] = row["ours_vs_pynetdicom"] >= 0.9
                cpu = row["cpu_ms_per_instance"]
                if "ingest" in cpu and "bare-scp" in cpu:
                    row["ingest_cpu_vs_bare_scp"] = round(cpu["ingest"] / cpu["bare-scp"], 2)
                    row["target_cpu_met"] = row["ingest_cpu_vs_bare_scp"] <= 1.3
                rows.append(row)
    return {
        **info,
        "load_at_end": loadavg(),
        "repeat": repeat,
        "workers": workers,
        "rows": rows,
    }


def workers_table(result: dict[str, Any]) -> str:
    """Ours by RADFLOW_INGEST_WORKERS, each over the bare SCP of the same run."""
    workers = result.get("workers", [1])
    names = ["ours", *(f"ours-w{n}" for n in workers[1:])]
    lines = [
        "| set | assoc | workers | inst/s | / pynetdicom floor | CPU ms/instance (ingest) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        for n, name in zip(workers, names, strict=True):
            cpu = r["cpu_ms_per_instance"].get("ingest" if name == "ours" else f"ingest@{name}")
            ratio = r.get(f"{name}_vs_pynetdicom")
            lines.append(
                f"| {r['set']} | {r['associations']} | {n} "
                f"| {fmt(r[name]['instances_per_s'])} "
                f"| {'-' if ratio is None else f'{ratio:.2f}'} | {fmt(cpu)} |"
            )
    return "\n".join(lines)


def table(result: dict[str, Any]) -> str:
    head = (
        "| set | assoc | ours inst/s (MB/s) | pynetdicom floor | Orthanc | storescp "
        "| ours/pynetdicom (≥0.9) | ours/Orthanc (≥1.0) | ours/storescp "
        "| CPU ms/instance: ingest, S3, broker; floor, storescp "
        "| ingest CPU/floor CPU (≤1.3) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result["rows"]:

        def cell(name: str, row: dict[str, Any] = r) -> str:
            return f"{fmt(row[name]['instances_per_s'])} ({fmt(row[name]['mb_per_s'])})"

        cpu = r["cpu_ms_per_instance"]
        ok_p = "met" if r["target_pynetdicom_met"] else "**missed**"
        ok_o = "met" if r["target_orthanc_met"] else "**missed**"
        ok_c = "met" if r["target_cpu_met"] else "**missed**"
        lines.append(
            f"| {r['set']} ({r['instances']}, {r['mb']} MB) | {r['associations']} "
            f"| {cell('ours')} | {cell('pynetdicom')} | {cell('orthanc')} | {cell('storescp')} "
            f"| {r['ours_vs_pynetdicom']:.2f} {ok_p} | {r['ours_vs_orthanc']:.2f} {ok_o} "
            f"| {r['ours_vs_storescp']:.2f} "
            f"| {cpu['ingest']:.1f}, {cpu['s3']:.1f}, {cpu['tansu']:.1f}; "
            f"{cpu['bare-scp']:.1f}, {cpu['storescp']:.1f} "
            f"| {r['ingest_cpu_vs_bare_scp']:.2f} {ok_c} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=300, help="CT slices (512x512)")
    parser.add_argument("--small", type=int, default=500, help="small instances (0: none)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a few instances, once")
    parser.add_argument("--out", type=Path, default=RESULTS / "ingest_rate.json")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="RADFLOW_INGEST_WORKERS values to run ours with (default: 1)",
    )
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--references",
        nargs="+",
        choices=RECEIVERS[1:],
        default=list(RECEIVERS[1:]),
        help="reference receivers to run (default: all)",
    )
    args = parser.parse_args()
    if args.quick:
        args.ct, args.small, args.repeat = 12, 0, 1
    result = run(
        args.ct,
        args.small,
        args.repeat,
        args.workers,
        tuple(args.associations),
        tuple(args.references),
    )
    write_result(args.out, result)
    every_reference = set(args.references) == set(RECEIVERS[1:])
    if every_reference:
        print(table(result))
    if len(args.workers) > 1 or not every_reference:
        print(workers_table(result))


if __name__ == "__main__":
    main()
