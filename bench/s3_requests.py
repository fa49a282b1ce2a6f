"""S3 requests per delivered instance, by stage and operation (issue 18): the whole
pipeline (ingest → transcode → router → stow-forwarder → Orthanc by STOW-RS) on a
few CT studies sent by storescu, with the rule file ``make run`` uses (STAT by
priority, Structured Reports to the RIS, everything to Orthanc). Writes
bench/results/s3_requests.json and prints a table.

    python bench/s3_requests.py [--studies 4] [--slices 40] [--rows 256]
                                [--warmup-studies 32] [--warmup-slices 24]

Method. Every service counts the HTTP requests it sends to S3 in
``radflow_blob_requests_total{operation,method}`` (each ranged GET, multipart part,
list page and retry is one). Each service's /metrics is read after a warm-up has been
delivered and again when the measured studies are delivered; the difference over the
instances delivered in between is the figure. Readiness pings and start-up are left
out (they do not grow with the load). The broker's and the S3 server's CPU time over
the same window, per delivered instance, is reported beside it.

The warm-up is long enough (768 instances over 32 studies, so over every partition)
to take each partition past transcode's replay window (the first 200 records after
it is assigned, where transcode asks whether an instance was done before): the
figure is the steady state. ``--warmup-studies 1`` measures the start instead.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    Parts,
    Service,
    TopicFollower,
    blob_requests,
    ct_series,
    loadavg,
    machine,
    requests_per_instance,
    run_dir,
    write_result,
)

from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import nodelay_env, storescu_argv

STAGES = ("ingest", "transcode", "router", "stow_forwarder")
RULES = """version: 1
timezone: UTC
destinations:
  orthanc:
    url: {url}
stat:
  from_priority: true
rules:
  - name: reports-to-orthanc
    when: {{modality: SR}}
    route: [orthanc]
  - name: everything-to-orthanc
    route: [orthanc]
default:
  hold: "no rule matched"
"""


def run(
    studies: int, slices: int, rows: int, warmup_studies: int, warmup_slices: int
) -> dict[str, Any]:
    info = machine()
    with run_dir() as tmp, Parts(tmp) as parts:
        warmup = [
            ct_series(tmp / f"warmup{n}", warmup_slices, rows, seed=1000 + n)
            for n in range(warmup_studies)
        ]
        files = [ct_series(tmp / f"study{n}", slices, rows, seed=n + 1) for n in range(studies)]
        st = parts.slice()
        orthanc = parts.orthanc()
        rules = tmp / "rules.yaml"
        rules.write_text(RULES.format(url=f"http://127.0.0.1:{orthanc.port}/dicom-web"))
        with TopicFollower(st.kafka, st.topic(Topic.FORWARD_COMPLETED)) as completed:
            services: dict[str, Service] = {
                "ingest": parts.service("ingest", st, rules_file=str(rules)),
                "transcode": parts.service("transcode", st),
                "router": parts.service("router", st, rules_file=str(rules)),
                "stow_forwarder": parts.service("stow_forwarder", st, rules_file=str(rules)),
            }
            port = services["ingest"].dimse_port
            assert port is not None

            def send(batch: list[Path]) -> None:
                subprocess.run(
                    storescu_argv(port, batch, called_ae="RADFLOW", calling_ae="BENCHSCU"),
                    check=True,
                    env=nodelay_env(),
                    capture_output=True,
                    timeout=600,
                )

            # Warm-up: connections, codec workers, group joins, replay windows.
            for batch in warmup:
                send(batch)
            warm = warmup_studies * warmup_slices
            completed.wait(warm, 900)
            before = {name: blob_requests(s) for name, s in services.items()}
            cpu_before = parts.cpu()
            for batch in files:
                send(batch)
            delivered = studies * slices
            completed.wait(warm + delivered, 600)
            after = {name: blob_requests(s) for name, s in services.items()}
            cpu_after = parts.cpu()
    return {
        **info,
        "load_at_end": loadavg(),
        "studies": studies,
        "slices": slices,
        "rows": rows,
        "warmup_instances": warmup_studies * warmup_slices,
        "requests_per_instance": requests_per_instance(before, after, delivered),
        "cpu_ms_per_instance": {
            name: round((cpu_after[name] - cpu_before[name]) * 1000 / delivered, 2)
            for name in cpu_after
        },
    }


def table(result: dict[str, Any]) -> str:
    counts = result["requests_per_instance"]
    lines = ["| stage | requests per delivered instance | by operation |", "|---|---|---|"]
    for stage in STAGES:
        one = counts["stages"].get(stage, {"total": 0, "by_operation": {}})
        ops = ", ".join(f"{op} {n:g}" for op, n in one["by_operation"].items()) or "none"
        lines.append(f"| {stage} | {one['total']:g} | {ops} |")
    lines.append(f"| **all** | **{counts['total']:g}** | |")
    cpu = ", ".join(f"{name} {ms:g} ms" for name, ms in result["cpu_ms_per_instance"].items())
    lines.append(f"\nCPU per delivered instance: {cpu}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=40, help="CT slices per study")
    parser.add_argument("--rows", type=int, default=256, help="CT slice size (rows x rows)")
    parser.add_argument("--warmup-studies", type=int, default=32)
    parser.add_argument("--warmup-slices", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS / "s3_requests.json")
    parser.add_argument("--quick", action="store_true", help="a few instances, no long warm-up")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.slices, args.rows = 2, 5, 64
        args.warmup_studies, args.warmup_slices = 1, 3
    result = run(args.studies, args.slices, args.rows, args.warmup_studies, args.warmup_slices)
    write_result(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
