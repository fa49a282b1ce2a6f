"""Memory of each service: resident set over many instances (it must stay flat), and
the peak while one large multi-frame instance passes through the whole pipeline.
Prints a table, writes bench/results/memory.json and a plot of RSS over time
(bench/plots/memory_rss.png).

    python bench/memory.py [--instances 10000] [--frames 2000] [--quick]

Method. Ingest, transcode (one codec worker), router and stow-forwarder run with
their default settings into a fresh Orthanc (STOW-RS). A thread reads VmRSS and
VmHWM from /proc/<pid>/status of every service process and of its children (the
transcode codec worker and its forkserver) every 0.25 s.

1. Many instances: ``--instances`` small instances (64² and 128² CT, 256² MR, SRs)
   sent by storescu over 2 associations; sampled until every one is delivered to
   Orthanc. "after warm-up" is the RSS when the first 10 % had been delivered, "at
   the end" when the last had; growth between them is what would leak. Flat means
   it grew less than 10 % (or 10 MB).
2. One large instance: new service processes (so VmHWM is this instance's), one
   Enhanced CT of ``--frames`` 512x512 16-bit frames (2000 frames = 1.05 GB) sent by
   storescu, sampled until it is delivered. Peak = VmHWM; the ratio is peak over the
   instance's size (target ≤ 1.5 in any one service process).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from harness import (
    BENCH_AE,
    PLOTS,
    RESULTS,
    Parts,
    RssSampler,
    Service,
    TopicFollower,
    fmt,
    loadavg,
    machine,
    multiframe,
    run_dir,
    small_mix,
    timestamp,
    write_result,
)

from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import storescu_parallel
from radflow_devstack.kit.rules_file import write_rules

SERVICES = ("ingest", "transcode", "router", "stow_forwarder")


def _pipeline(parts: Parts, tmp: Path, tag: str) -> tuple[Any, dict[str, Service], Any]:
    st = parts.slice()
    orthanc = parts.orthanc()
    rules = write_rules(
        tmp / f"rules-{tag}.yaml",
        {"dest": f"url: 'http://127.0.0.1:{orthanc.port}/dicom-web'"},
        ["dest"],
    )
    started = {
        "ingest": parts.service("ingest", st),
        "transcode": parts.service("transcode", st),
        "router": parts.service("router", st, rules_file=str(rules)),
        "stow_forwarder": parts.service("stow_forwarder", st, rules_file=str(rules)),
    }
    return st, started, orthanc


def _stop(parts: Parts, services: dict[str, Service], orthanc: Any) -> None:
    for service in services.values():
        parts.stop(service)
    parts.stop(orthanc)


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def many(parts: Parts, tmp: Path, count: int) -> dict[str, Any]:
    files = small_mix(tmp / "many", count)
    st, services, orthanc = _pipeline(parts, tmp, "many")
    roots = {name: s.pid for name, s in services.items()}
    assert services["ingest"].dimse_port is not None
    with (
        TopicFollower(st.kafka, st.topic(Topic.FORWARD_COMPLETED)) as completed,
        RssSampler(roots) as sampler,
    ):
        time.sleep(1)
        idle = dict(sampler.samples[-1][1])
        started = time.time()
        storescu_parallel(services["ingest"].dimse_port, files, 2, "RADFLOW", BENCH_AE)
        completed.wait(count, 3600)
        finished = time.time()
    delivered = sorted(timestamp(d["delivered_at"]) for d in completed.events())
    warm_at = delivered[max(0, count // 10 - 1)]
    end_at = delivered[-1]

    def rss_at(moment: float) -> dict[str, int]:
        before = [row for t, row in sampler.samples if t <= moment]
        return before[-1] if before else sampler.samples[0][1]

    warm, end = rss_at(warm_at), rss_at(end_at)
    rows = {}
    for name in sorted(sampler.hwm):
        growth = end.get(name, 0) - warm.get(name, 0)
        rows[name] = {
            "idle_mb": _mb(idle.get(name)),
            "after_warmup_mb": _mb(warm.get(name)),
            "end_mb": _mb(end.get(name)),
            "growth_mb": _mb(growth),
            "peak_mb": _mb(sampler.hwm[name]),
            "flat": growth < max(10 * 1024, 0.1 * warm.get(name, 0)),
        }
    _stop(parts, services, orthanc)
    return {
        "instances": count,
        "seconds": round(finished - started, 1),
        "instances_per_s": round(count / (finished - started), 1),
        "processes": rows,
        "curve": [
            (round(t - started, 2), {k: _mb(v) for k, v in row.items()})
            for t, row in sampler.samples[::4]
        ],
    }


def large(parts: Parts, tmp: Path, frames: int) -> dict[str, Any]:
    path = multiframe(tmp / "large.dcm", frames)
    size = path.stat().st_size
    st, services, orthanc = _pipeline(parts, tmp, "large")
    roots = {name: s.pid for name, s in services.items()}
    assert services["ingest"].dimse_port is not None
    with (
        TopicFollower(st.kafka, st.topic(Topic.FORWARD_COMPLETED)) as completed,
        RssSampler(roots) as sampler,
    ):
        time.sleep(1)
        idle = dict(sampler.samples[-1][1])
        started = time.time()
        sent_s = storescu_parallel(services["ingest"].dimse_port, [path], 1, "RADFLOW", BENCH_AE)
        completed.wait(1, 3600)
        through = time.time() - started
    path.unlink()
    rows = {
        name: {
            "idle_mb": _mb(idle.get(name)),
            "peak_mb": _mb(hwm),
            "peak_over_size": round(hwm * 1024 / size, 2),
            "growth_over_size": round((hwm - idle.get(name, 0)) * 1024 / size, 2),
            "target_met": hwm * 1024 <= 1.5 * size,
        }
        for name, hwm in sorted(sampler.hwm.items())
    }
    _stop(parts, services, orthanc)
    return {
        "frames": frames,
        "size_mb": round(size / 1e6, 1),
        "sent_s": round(sent_s, 1),
        "end_to_end_s": round(through, 1),
        "processes": rows,
    }


def run(instances: int, frames: int) -> dict[str, Any]:
    info = machine()
    with run_dir() as tmp, Parts(tmp) as parts:
        result_many = many(parts, tmp, instances)
        result_large = large(parts, tmp, frames)
    return {**info, "load_at_end": loadavg(), "many": result_many, "large": result_large}


def plot(result: dict[str, Any], folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["many"]["curve"]
    names = sorted({k for _, row in curve for k in row})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in names:
        ax.plot([t for t, _ in curve], [row.get(name) for _, row in curve], label=name)
    ax.set_xlabel("seconds since the first instance was sent")
    ax.set_ylabel("VmRSS (MB)")
    ax.set_title(f"Resident memory over {result['many']['instances']} instances")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "memory_rss.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(result: dict[str, Any]) -> str:
    m, lg = result["many"], result["large"]
    lines = [
        f"{m['instances']} small instances ({m['instances_per_s']}/s end to end):",
        "",
        "| process | idle MB | after warm-up MB | at the end MB | growth MB | peak MB | flat |",
        "|" + "---|" * 7,
    ]
    for name, r in m["processes"].items():
        lines.append(
            f"| {name} | {fmt(r['idle_mb'])} | {fmt(r['after_warmup_mb'])} | {fmt(r['end_mb'])} "
            f"| {fmt(r['growth_mb'])} | {fmt(r['peak_mb'])} | {'yes' if r['flat'] else '**no**'} |"
        )
    lines += [
        "",
        f"One {lg['size_mb']} MB multi-frame instance ({lg['frames']} frames), "
        f"{lg['end_to_end_s']} s from send to delivery:",
        "",
        "| process | idle MB | peak MB | peak / size (≤ 1.5) | (peak - idle) / size |",
        "|" + "---|" * 5,
    ]
    for name, r in lg["processes"].items():
        verdict = "met" if r["target_met"] else "**missed**"
        lines.append(
            f"| {name} | {fmt(r['idle_mb'])} | {fmt(r['peak_mb'])} | {r['peak_over_size']} "
            f"{verdict} | {r['growth_over_size']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=2000, help="512x512 frames (2000: 1 GB)")
    parser.add_argument("--quick", action="store_true", help="200 instances, a 21 MB instance")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    parser.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args()
    if args.quick:
        args.instances, args.frames = 100, 40
    result = run(args.instances, args.frames)
    write_result(args.out, result)
    plot(result, args.plots)
    print(table(result))


if __name__ == "__main__":
    main()
