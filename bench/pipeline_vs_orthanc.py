"""The whole pipeline against the reference a user would pick instead: Orthanc
configured as a router. Same machine, same run, same workload, same kind of
destination; end-to-end throughput and latency side by side. Prints two tables and
writes bench/results/pipeline_vs_orthanc.json.

    python bench/pipeline_vs_orthanc.py [--instances 300] [--associations 4] [--repeat 2]
        [--rate 20] [--seconds 60] [--orthanc sync jobs] [--orthanc-jobs 32] [--quick]

The routers:

- **ours**: ingest → transcode → router → stow-forwarder, each started as
  ``bench/latency.py`` starts them (default settings, JPEG-LS lossless canonical), on
  a fresh topic prefix and bucket; one rule sends every instance to destination B by
  STOW-RS.
- **Orthanc as a router** ("A"): Debian's Orthanc with its DICOMweb plugin,
  ``IngestTranscoding`` to JPEG-LS lossless (1.2.840.10008.1.2.4.80), and a Lua
  ``OnStoredInstance`` callback that forwards each stored instance to B through the
  plugin: ``RestApiPost('/dicom-web/servers/B/stow', {"Resources": [id],
  "Synchronous": ...})``. Two ways:

  - ``orthanc-sync``: ``"Synchronous": true``, Orthanc's default ``ConcurrentJobs`` (2).
    The plugin runs every STOW-RS client call as a job whose step sleeps 500 ms before
    it reports success, and Orthanc's one Lua thread waits for it: at most ~2
    instances/s, whatever the machine.
  - ``orthanc-jobs``: ``"Synchronous": false`` with ``ConcurrentJobs`` =
    ``--orthanc-jobs`` (32): the request goes out as soon as its job starts and 32 jobs
    sleep out their 500 ms side by side: the tuned configuration, the strongest
    reference found (2 jobs: ~4/s, 8: ~15/s, 16: ~32/s, 32: ~56/s, 64: no better).

Every run gets a fresh destination B (an empty Orthanc with DICOMweb) behind a
counting proxy (``harness.CountingProxy``: radflow_devstack's StowCounter in a process
of its own), which stamps when B's answer storing each instance arrived — the same
arrival time for both routers. Each run also gets a fresh A, or fresh services. DCMTK
tools and Orthanc run with TCP_NODELAY=1. Before each measured run one other instance
goes end to end (warm-up: consumer groups joined, Lua loaded), not measured.

(a) Throughput: ``--instances`` 512x512 16-bit CT slices (0.5 MB, the generator of
the other benches) sent by storescu over ``--associations`` concurrent associations as
fast as the router takes them. Window: the first storescu started → the last of them
stored at B. ``--repeat`` runs each, alternating which goes first; medians. CPU per
instance: the router's own processes (ours: the four services, the broker and the S3
server; Orthanc: A), from /proc, over the window; B, the proxy and storescu are the
same for both and left out.

(b) Latency: ``--rate`` per second for ``--seconds`` (like bench/latency.py's routine
steady phase), sent by pynetdicom over one association, paced open loop (latency.py's
PacedSender). Latency of an instance = its arrival at B minus the time its C-STORE
request was sent; the C-STORE round trip and arrival minus the C-STORE response are
reported beside it.

Checks, recorded in the JSON: every instance arrived at B exactly once (the proxy
counts each stored copy), B holds the instances, and in which transfer syntax (both
should hold JPEG-LS lossless: proof that Orthanc A really transcoded). Other engineers'
work may share the 2 cores: each run records the load average at its start.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCH_AE,
    RESULTS,
    CountingProxy,
    Parts,
    Service,
    ct_series,
    fmt,
    loadavg,
    machine,
    median,
    orthanc_count,
    orthanc_syntaxes,
    percentile,
    run_dir,
    sop_uid,
    write_result,
)
from latency import PacedSender
from pynetdicom import _config

from radflow_devstack.kit.dcmtk import storescu, storescu_parallel
from radflow_devstack.kit.procfs import cpu_seconds
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
MODES = ("sync", "jobs")
LUA = """-- Orthanc as a router: forward every stored instance to B by STOW-RS.
function OnStoredInstance(instanceId, tags, metadata, origin)
  RestApiPost('/dicom-web/servers/B/stow',
              '{"Resources":["' .. instanceId .. '"],"Synchronous":%s}')
end
"""


@dataclass
class Router:
    """One started router: where to send C-STOREs, and how to read its CPU time."""

    name: str
    dimse_port: int
    called_ae: str
    cpu: Callable[[], dict[str, float]]
    """CPU seconds used so far by each of the router's processes, by name."""


@contextmanager
def ours(parts: Parts, tmp: Path, destination: str) -> Iterator[Router]:
    """The four services on a fresh slice, routing everything to ``destination``."""
    st = parts.slice()
    rules = write_rules(
        tmp / f"rules-{st.env['RADFLOW_S3_BUCKET']}.yaml",
        {"dest": f"url: '{destination}/dicom-web'"},
        ["dest"],
    )
    services: list[Service] = []
    try:
        services.append(parts.service("ingest", st, rules_file=str(rules)))
        services.append(parts.service("transcode", st))
        services.append(parts.service("router", st, rules_file=str(rules)))
        services.append(parts.service("stow_forwarder", st, rules_file=str(rules)))
        port = services[0].dimse_port
        assert port is not None

        def cpu() -> dict[str, float]:
            return {
                s.proc.name.rsplit("-", 1)[0]: cpu_seconds(s.pid) for s in services
            } | parts.cpu()

        yield Router("ours", port, "RADFLOW", cpu)
    finally:
        for service in reversed(services):
            parts.stop(service)


@contextmanager
def orthanc_router(
    parts: Parts, tmp: Path, destination: str, mode: str, jobs: int
) -> Iterator[Router]:
    """Orthanc A: ingest transcoding to JPEG-LS lossless, Lua forwarding to B; in
    ``jobs`` mode with ``jobs`` concurrent jobs."""
    script = tmp / f"forward-{mode}.lua"
    script.write_text(LUA % ("true" if mode == "sync" else "false"))
    a = parts.orthanc(
        {
            "IngestTranscoding": JPEG_LS_LOSSLESS,
            "ConcurrentJobs": jobs if mode == "jobs" else 2,
            "LuaScripts": [str(script)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": False,
                "Servers": {"B": [f"{destination}/dicom-web/"]},
            },
        }
    )
    try:
        assert a.proc is not None
        pid = a.proc.pid
        yield Router(
            f"orthanc-{mode}", a.dicom_port, "ORTHANC", lambda: {"orthanc-a": cpu_seconds(pid)}
        )
    finally:
        parts.stop(a)


@contextmanager
def started(
    which: str, parts: Parts, tmp: Path, jobs: int
) -> Iterator[tuple[Router, ManagedProcess, CountingProxy]]:
    """A fresh destination B behind its counting proxy, and router ``which`` sending to
    it; one warm-up instance is sent through and has arrived."""
    b = parts.orthanc()
    try:
        with CountingProxy(f"http://127.0.0.1:{b.port}") as proxy:
            if which == "ours":
                context = ours(parts, tmp, proxy.url)
            else:
                context = orthanc_router(
                    parts, tmp, proxy.url, which.removeprefix("orthanc-"), jobs
                )
            with context as router:
                warm = ct_series(tmp / f"warm-{b.name}", 1, seed=99)
                done = storescu(
                    router.dimse_port, *warm, called_ae=router.called_ae, calling_ae=BENCH_AE
                )
                assert done.returncode == 0, done.stderr[-2000:]
                wait_for("the warm-up instance at B", lambda: proxy.arrived() >= 1, 120)
                yield router, b, proxy
    finally:
        parts.stop(b)


def checks(b: ManagedProcess, report: dict[str, Any], uids: Sequence[str]) -> dict[str, Any]:
    """Every instance arrived once; what B holds and in which transfer syntax."""
    deliveries = report["deliveries"]
    syntaxes = orthanc_syntaxes(b)
    return {
        "arrived": sum(1 for u in uids if deliveries.get(u, 0) >= 1),
        "arrived_more_than_once": sum(1 for u in uids if deliveries.get(u, 0) > 1),
        "stow_requests": report["posts"],
        "destination_instances": orthanc_count(b),
        "destination_syntaxes": syntaxes,
        "all_jpeg_ls_lossless": set(syntaxes) == {JPEG_LS_LOSSLESS},
    }


def throughput_run(
    which: str,
    parts: Parts,
    tmp: Path,
    files: list[Path],
    uids: list[str],
    associations: int,
    jobs: int,
) -> dict[str, Any]:
    load = loadavg()
    with started(which, parts, tmp, jobs) as (router, b, proxy):
        cpu_before = router.cpu()
        t0 = time.time()
        send_s = storescu_parallel(
            router.dimse_port, files, associations, router.called_ae, BENCH_AE
        )
        wait_for(
            f"{len(files)} instances at B through {which}",
            lambda: proxy.arrived() >= 1 + len(files),
            max(300.0, 2.0 * len(files)),
            every_s=0.05,
        )
        cpu_after = router.cpu()
        cpu_by_process = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in cpu_after}
        cpu_s = sum(cpu_by_process.values())
        report = proxy.report()
        last = max(report["first_delivered_at"][u] for u in uids)
        window = last - t0
        return {
            "load_at_start": load,
            "instances_per_s": round(len(files) / window, 2),
            "window_s": round(window, 2),
            "send_s": round(send_s, 2),
            "accepted_per_s": round(len(files) / send_s, 2),
            "cpu_ms_per_instance": round(1000 * cpu_s / len(files), 1),
            "cpu_ms_per_instance_by_process": {
                k: round(1000 * v / len(files), 1) for k, v in sorted(cpu_by_process.items())
            },
            **checks(b, report, uids),
        }


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3) if values else float("nan"),
    }


def latency_run(
    which: str, parts: Parts, tmp: Path, files: list[Path], rate: float, jobs: int
) -> dict[str, Any]:
    load = loadavg()
    with started(which, parts, tmp, jobs) as (router, b, proxy):
        sender = PacedSender(router.dimse_port, "MODALITY1", files, rate, "steady", "routine")
        error = None
        try:
            sender.start().join()
        except RuntimeError as exc:  # the association went away: measure what got through
            error = f"{exc}: {exc.__cause__!r}"
        sent = [s for s in sender.sent if s.status == 0]
        if not sent:
            raise RuntimeError(f"{which}: no C-STORE succeeded ({error})")
        wait_for(
            f"{len(sent)} paced instances at B through {which}",
            lambda: proxy.arrived() >= 1 + len(sent),
            900,
            every_s=0.05,
        )
        report = proxy.report()
        arrived = report["first_delivered_at"]
        achieved = (len(sent) - 1) / max(sent[-1].sent_at - sent[0].sent_at, 1e-9)
        return {
            "load_at_start": load,
            "asked": len(files),
            "stored": len(sent),
            "sender_error": error,
            "achieved_rate": round(achieved, 2),
            "latency_s": _stats([arrived[s.sop_instance_uid] - s.sent_at for s in sent]),
            "after_c_store_response_s": _stats(
                [arrived[s.sop_instance_uid] - s.answered_at for s in sent]
            ),
            "c_store_rtt_s": _stats([s.answered_at - s.sent_at for s in sent]),
            **checks(b, report, [s.sop_instance_uid for s in sent]),
        }


def progress(text: str) -> None:
    """A line on stderr, so that a long run shows where it is and keeps what it measured."""
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    info = machine()
    _config.STORE_SEND_CHUNKED_DATASET = True
    routers = ["ours", *(f"orthanc-{m}" for m in args.orthanc)]
    with run_dir(keep=args.keep) as tmp, Parts(tmp) as parts:
        if args.keep:
            progress(f"keeping the run folder (every process's log): {tmp}")
        files = ct_series(tmp / "burst", args.instances, seed=1)
        uids = [sop_uid(f) for f in files]
        instance_kb = round(files[0].stat().st_size / 1024, 1)
        paced = ct_series(tmp / "paced", int(args.rate * args.seconds), seed=2)
        runs: dict[str, list[dict[str, Any]]] = {r: [] for r in routers}
        for i in range(args.repeat):
            for which in routers if i % 2 == 0 else routers[::-1]:
                progress(f"throughput run {i + 1}: {which}")
                runs[which].append(
                    throughput_run(
                        which, parts, tmp, files, uids, args.associations, args.orthanc_jobs
                    )
                )
            progress(f"throughput run {i + 1} done: {json.dumps(runs)}")
        latency = {}
        for which in routers:
            progress(f"latency: {which}")
            latency[which] = latency_run(which, parts, tmp, paced, args.rate, args.orthanc_jobs)
            progress(f"latency {which}: {json.dumps(latency[which])}")
    throughput: dict[str, Any] = {
        r: {
            "instances_per_s": median([x["instances_per_s"] for x in runs[r]]),
            "cpu_ms_per_instance": median([x["cpu_ms_per_instance"] for x in runs[r]]),
            "cpu_ms_per_instance_by_process": {
                k: median([x["cpu_ms_per_instance_by_process"][k] for x in runs[r]])
                for k in runs[r][0]["cpu_ms_per_instance_by_process"]
            },
        }
        for r in routers
    }
    references = routers[1:]
    best = max(references, key=lambda r: throughput[r]["instances_per_s"])
    ours_rate = throughput["ours"]["instances_per_s"]
    for r in references:
        throughput[f"ours_vs_{r}"] = round(ours_rate / throughput[r]["instances_per_s"], 2)
        p99 = latency[r]["latency_s"]["p99"]
        latency[f"p99_ours_vs_{r}"] = round(latency["ours"]["latency_s"]["p99"] / p99, 2)
    return {
        **info,
        "load_at_end": loadavg(),
        "rows": 512,
        "instance_kb": instance_kb,
        "routers": routers,
        "orthanc_concurrent_jobs": args.orthanc_jobs,
        "throughput": {
            "instances": args.instances,
            "associations": args.associations,
            "repeat": args.repeat,
            **throughput,
            "best_orthanc": best,
            "ours_vs_best_orthanc": throughput[f"ours_vs_{best}"],
            "target_met": ours_rate >= throughput[best]["instances_per_s"],
            "runs": runs,
        },
        "latency": {"rate": args.rate, "seconds": args.seconds, **latency},
    }


def table(result: dict[str, Any]) -> str:
    t, lat, routers = result["throughput"], result["latency"], result["routers"]
    lines = [
        f"Throughput: {t['instances']} CT slices ({result['instance_kb']} KB) by storescu over "
        f"{t['associations']} associations, first sent → last stored at B; median of "
        f"{t['repeat']}.",
        "",
        "| router | inst/s (runs) | ours/this | CPU ms/instance | arrived once / sent "
        "| B holds, syntax |",
        "|---|---|---|---|---|---|",
    ]
    for r in routers:
        runs = t["runs"][r]
        last = runs[-1]
        once = last["arrived"] - last["arrived_more_than_once"]
        syntax = (
            "JPEG-LS lossless" if last["all_jpeg_ls_lossless"] else last["destination_syntaxes"]
        )
        lines.append(
            f"| {r} | {fmt(t[r]['instances_per_s'])} "
            f"({', '.join(fmt(x['instances_per_s']) for x in runs)}) "
            f"| {fmt(t.get(f'ours_vs_{r}'), 2)} | {fmt(t[r]['cpu_ms_per_instance'])} "
            f"| {once} / {t['instances']} | {last['destination_instances']}, {syntax} |"
        )
    lines += [
        "",
        f"ours / best Orthanc-as-router ({t['best_orthanc']}): **{t['ours_vs_best_orthanc']}** "
        f"(target ≥ 1.0: {'met' if t['target_met'] else '**missed**'}).",
        "",
        f"Latency at {lat['rate']:g}/s for {lat['seconds']:g} s, C-STORE sent → stored at B:",
        "",
        "| router | achieved/s | p50 / p95 / p99 (s) | p99 ours/this "
        "| after the C-STORE response p50 / p99 | C-STORE RTT p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for r in routers:
        x = lat[r]
        s, a, c = x["latency_s"], x["after_c_store_response_s"], x["c_store_rtt_s"]
        got = (
            "" if x["sender_error"] is None else f" ({x['stored']} of {x['asked']}: sender cut off)"
        )
        lines.append(
            f"| {r} | {x['achieved_rate']}{got} | {fmt(s['p50'], 3)} / {fmt(s['p95'], 3)} / "
            f"{fmt(s['p99'], 3)} | {fmt(lat.get(f'p99_ours_vs_{r}'), 2)} "
            f"| {fmt(a['p50'], 3)} / {fmt(a['p99'], 3)} | {fmt(c['p50'], 3)} / {fmt(c['p99'], 3)} |"
        )
    lines += [
        "",
        f"load average at the start {result['load_at_start']}, end {result['load_at_end']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=300, help="CT slices in the burst")
    parser.add_argument("--associations", type=int, default=4, help="storescu processes")
    parser.add_argument("--repeat", type=int, default=2, help="throughput runs of each")
    parser.add_argument("--rate", type=float, default=20.0, help="paced instances per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the paced run")
    parser.add_argument(
        "--orthanc",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="how Orthanc's Lua forwards: in the callback (sync) or as a job (jobs)",
    )
    parser.add_argument(
        "--orthanc-jobs", type=int, default=32, help="Orthanc's ConcurrentJobs in jobs mode"
    )
    parser.add_argument("--quick", action="store_true", help="a few instances, a few seconds")
    parser.add_argument("--out", type=Path, help="default: bench/results/pipeline_vs_orthanc.json")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the run folder with every process's log (to find why a sender was cut off)",
    )
    args = parser.parse_args()
    if args.quick:
        args.instances, args.repeat, args.rate, args.seconds = 8, 1, 4.0, 2.0
    result = run(args)
    write_result(args.out or RESULTS / "pipeline_vs_orthanc.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
