"""End-to-end latency through the whole pipeline: a steady stream of CT slices sent by
C-STORE, through ingest → transcode → router → stow-forwarder → Orthanc (DICOMweb),
with STAT instances sent beside it, then during a routine backlog. Prints a table,
writes bench/results/latency.json and two plots (bench/plots/latency_histogram.png,
bench/plots/latency_throughput.png).

    python bench/latency.py [--rate 20] [--seconds 60] [--backlog 600] [--quick]

Method. Every service runs as ``make run`` starts it (default settings, one transcode
worker, JPEG-LS canonical), on one broker and S3 server, into a fresh Orthanc. The
rule file routes everything to Orthanc by STOW-RS and makes calling AE ER_CT1 STAT
(``stat: {calling_aes: [ER_CT1]}``); ingest is given the same file, so STAT instances
travel on the ``.stat`` topics from ingest on. Instances are 512x512 16-bit CT slices
(0.5 MB). The sender is pynetdicom in this process (chunked send from the files,
TCP_NODELAY on), one association per lane, paced open-loop: instance i is sent at
start + i/rate, or at once if the previous answer came later than that.

1. Warm-up: one instance end to end (consumer groups joined), not measured.
2. Steady: routine at ``--rate`` per second from calling AE MODALITY1 for
   ``--seconds``, and STAT at 1 per second from ER_CT1 beside it.
3. Backlog: ``--backlog`` routine slices sent as fast as ingest takes them (storescu,
   4 associations) while STAT continues at 1 per second until the backlog is
   delivered (and at least 3 STAT instances were sent).

Latency of an instance = the ``delivered_at`` of its ``dicom.forward.completed``
event (stamped by the forwarder when Orthanc's STOW-RS answer has arrived) minus
the time the sender got its C-STORE response (both wall clock, same machine). The
C-STORE round trip (which includes ingest's claim check) is reported on its own.
Where the time goes is read from the events' own stamps: received_at (ingest),
normalized_at (transcode), routed_at (router), delivered_at (forwarder).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    PLOTS,
    RESULTS,
    Parts,
    TopicFollower,
    blob_requests,
    ct_series,
    fmt,
    loadavg,
    machine,
    percentile,
    requests_per_instance,
    run_dir,
    sop_uid,
    timestamp,
    write_result,
)
from pynetdicom import AE, _config

from radflow_core.scu import keep_responses
from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import nodelay_env, split, storescu_argv
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for

EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Sent:
    sop_instance_uid: str
    phase: str
    lane: str
    sent_at: float
    answered_at: float
    status: int


class PacedSender:
    """Sends files over one association at a fixed rate (open loop), in a thread."""

    def __init__(
        self, port: int, calling_ae: str, files: list[Path], rate: float, phase: str, lane: str
    ) -> None:
        self._port = port
        self._calling_ae = calling_ae
        self._files = files
        self._rate = rate
        self._phase = phase
        self._lane = lane
        self.sent: list[Sent] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PacedSender:
        self._thread.start()
        return self

    def join(self) -> list[Sent]:
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"{self._calling_ae} sender failed") from self.error
        return self.sent

    def _run(self) -> None:
        try:
            self._send_all()
        except BaseException as exc:  # noqa: BLE001 - re-raised in join()
            self.error = exc

    def _send_all(self) -> None:
        ae = AE(ae_title=self._calling_ae)
        ae.add_requested_context(CT_IMAGE_STORAGE, [EXPLICIT_LE])
        assoc = ae.associate("127.0.0.1", self._port, ae_title="RADFLOW")
        if not assoc.is_established:
            raise RuntimeError("association not established")
        # pynetdicom's reactor would now and then take a quick response for itself: the
        # sender waited 30 s and its association was cut (radflow_core.scu).
        keep_responses(assoc)
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            start = time.time()
            for i, path in enumerate(self._files):
                if self.stop.is_set():
                    break
                delay = start + i / self._rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                sent_at = time.time()
                uid = sop_uid(path)
                rsp = assoc.send_c_store(path)
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else -1
                self.sent.append(Sent(uid, self._phase, self._lane, sent_at, time.time(), status))
        finally:
            assoc.release()


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3) if values else float("nan"),
    }


def run(rate: float, seconds: float, backlog: int, rows: int) -> dict[str, Any]:
    info = machine()
    _config.STORE_SEND_CHUNKED_DATASET = True
    with run_dir() as tmp, Parts(tmp) as parts:
        routine_files = ct_series(tmp / "routine", int(rate * seconds) + 1, rows, seed=1)
        stat_files = ct_series(tmp / "stat", int(seconds) + max(30, backlog // 3), rows, seed=2)
        backlog_files = ct_series(tmp / "backlog", backlog, rows, seed=3)
        instance_kb = round(routine_files[0].stat().st_size / 1024, 1)
        st = parts.slice()
        orthanc = parts.orthanc()
        rules = write_rules(
            tmp / "rules.yaml",
            {"dest": f"url: 'http://127.0.0.1:{orthanc.port}/dicom-web'"},
            ["dest"],
            stat_calling_aes=["ER_CT1"],
        )
        with (
            TopicFollower(st.kafka, st.topic(Topic.FORWARD_COMPLETED)) as completed,
            TopicFollower(st.kafka, st.topic(Topic.INSTANCE_NORMALIZED)) as normalized,
            TopicFollower(st.kafka, st.topic(Topic.INSTANCE_NORMALIZED_STAT)) as normalized_stat,
            TopicFollower(st.kafka, st.topic(Topic.FORWARD_REQUESTED)) as routed,
            TopicFollower(st.kafka, st.topic(Topic.FORWARD_REQUESTED_STAT)) as routed_stat,
        ):
            ingest = parts.service("ingest", st, rules_file=str(rules))
            services = {
                "ingest": ingest,
                "transcode": parts.service("transcode", st),
                "router": parts.service("router", st, rules_file=str(rules)),
                "stow_forwarder": parts.service("stow_forwarder", st, rules_file=str(rules)),
            }
            assert ingest.dimse_port is not None
            port = ingest.dimse_port

            # 1. warm-up
            PacedSender(port, "MODALITY1", routine_files[:1], 1, "warmup", "routine").start().join()
            completed.wait(1, 120)
            requests_before = {name: blob_requests(svc) for name, svc in services.items()}

            # 2. steady routine + STAT beside it
            stat_iter = iter(stat_files)
            steady_started = time.time()
            routine = PacedSender(port, "MODALITY1", routine_files[1:], rate, "steady", "routine")
            stat = PacedSender(
                port, "ER_CT1", [next(stat_iter) for _ in range(int(seconds))], 1, "steady", "stat"
            )
            routine.start(), stat.start()
            sent = [*routine.join(), *stat.join()]
            completed.wait(1 + len(sent), 300)

            # 3. backlog + STAT during it
            backlog_started = time.time()
            stat_b = PacedSender(port, "ER_CT1", list(stat_iter), 1, "backlog", "stat").start()
            burst = [
                subprocess.Popen(
                    storescu_argv(port, share, called_ae="RADFLOW", calling_ae="MODALITY2"),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env=nodelay_env(),
                )
                for share in split(backlog_files, 4)
            ]
            for proc in burst:
                proc.wait(timeout=1800)
                assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
            burst_sent = time.time()
            routine_total = 1 + len(routine.sent) + backlog
            while True:  # STAT keeps coming until the routine backlog is delivered
                done = [d for d in completed.events() if d["lane"] == "routine"]
                finished = len(done) >= routine_total and len(stat_b.sent) >= 3
                if finished or time.time() - burst_sent > 900:
                    break
                time.sleep(0.2)
            stat_b.stop.set()
            sent += stat_b.join()
            expected = routine_total + len(stat.sent) + len(stat_b.sent)
            completed.wait(expected, 300)
            drained = time.time()
            requests_after = {name: blob_requests(svc) for name, svc in services.items()}
            # Each topic is read by its own thread: the earlier stages' events can be
            # read after the completed ones.
            uids = {s.sop_instance_uid for s in sent}
            wait_for(
                "every instance's normalized and routed events",
                lambda: (
                    uids
                    <= {
                        d["sop_instance_uid"]
                        for d in [*normalized.events(), *normalized_stat.events()]
                    }
                    and uids
                    <= {d["sop_instance_uid"] for d in [*routed.events(), *routed_stat.events()]}
                ),
                60,
                every_s=0.05,
            )
            events = completed.timed()
            normalized_at = {
                d["sop_instance_uid"]: timestamp(d["normalized_at"])
                for d in [*normalized.events(), *normalized_stat.events()]
            }
            routed_at = {
                d["sop_instance_uid"]: timestamp(d["routed_at"])
                for d in [*routed.events(), *routed_stat.events()]
            }
    assert all(s.status == 0 for s in sent), "a C-STORE was not answered with success"
    by_uid = {d["sop_instance_uid"]: d for _, d in events}
    assert len(by_uid) == expected, f"{len(by_uid)} delivered of {expected}"
    samples = []
    for s in sent:
        d = by_uid[s.sop_instance_uid]
        assert d["lane"] == s.lane, f"{s.sop_instance_uid} went {d['lane']}, sent {s.lane}"
        delivered = timestamp(d["delivered_at"])
        received = timestamp(d["received_at"])
        samples.append(
            {
                "phase": s.phase,
                "lane": s.lane,
                "sent_at": round(s.sent_at, 4),
                "c_store_rtt_s": round(s.answered_at - s.sent_at, 4),
                "latency_s": round(delivered - s.answered_at, 4),
                "ingest_to_normalized_s": round(normalized_at[s.sop_instance_uid] - received, 4),
                "normalized_to_routed_s": round(
                    routed_at[s.sop_instance_uid] - normalized_at[s.sop_instance_uid], 4
                ),
                "routed_to_delivered_s": round(delivered - routed_at[s.sop_instance_uid], 4),
            }
        )
    groups: dict[str, dict[str, Any]] = {}
    for phase, lane in (("steady", "routine"), ("steady", "stat"), ("backlog", "stat")):
        mine = [x for x in samples if x["phase"] == phase and x["lane"] == lane]
        groups[f"{phase} {lane}"] = {
            "latency_s": _stats([x["latency_s"] for x in mine]),
            "c_store_rtt_s": _stats([x["c_store_rtt_s"] for x in mine]),
            "stages_p50_s": {
                k: round(percentile([x[k] for x in mine], 50), 3)
                for k in (
                    "ingest_to_normalized_s",
                    "normalized_to_routed_s",
                    "routed_to_delivered_s",
                )
            },
            "stages_p99_s": {
                k: round(percentile([x[k] for x in mine], 99), 3)
                for k in (
                    "ingest_to_normalized_s",
                    "normalized_to_routed_s",
                    "routed_to_delivered_s",
                )
            },
        }
    routine_p99 = groups["steady routine"]["latency_s"]["p99"]
    # Saturated: the steady phase itself queued (the pipeline could not keep up), so
    # "steady" is not a no-backlog baseline.
    saturated = groups["steady routine"]["stages_p99_s"]["ingest_to_normalized_s"] > 2.0
    stat_base, stat_backlog = (
        groups[g]["latency_s"]["p99"] for g in ("steady stat", "backlog stat")
    )
    steady_sent = [x for x in samples if x["phase"] == "steady" and x["lane"] == "routine"]
    achieved = (len(steady_sent) - 1) / (steady_sent[-1]["sent_at"] - steady_sent[0]["sent_at"])
    return {
        **info,
        "load_at_end": loadavg(),
        "rows": rows,
        "instance_kb": instance_kb,
        "saturated": saturated,
        "rate": rate,
        "achieved_rate": round(achieved, 2),
        "seconds": seconds,
        "backlog": backlog,
        "backlog_drain_s": round(drained - backlog_started, 1),
        "s3_requests_per_instance": requests_per_instance(
            requests_before, requests_after, expected - 1
        ),
        "groups": groups,
        "targets": {
            "routine_p99_under_0.5s": routine_p99 < 0.5,
            "stat_p99_unaffected_by_backlog": (
                not saturated and stat_backlog <= max(1.5 * stat_base, stat_base + 0.1)
            ),
        },
        "samples": samples,
        "deliveries": [
            (round(timestamp(d["delivered_at"]) - steady_started, 3), d["lane"]) for _, d in events
        ],
        "phase_starts": {"steady": 0.0, "backlog": round(backlog_started - steady_started, 2)},
    }


def plot(result: dict[str, Any], folder: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for phase, lane in (("steady", "routine"), ("steady", "stat"), ("backlog", "stat")):
        values = [
            s["latency_s"] for s in result["samples"] if s["phase"] == phase and s["lane"] == lane
        ]
        if values:
            ax.hist(values, bins=40, alpha=0.6, label=f"{lane}, {phase} (n={len(values)})")
    ax.axvline(0.5, color="k", linestyle="--", linewidth=1, label="routine p99 target 0.5 s")
    ax.set_xlabel("latency: C-STORE response → Orthanc's STOW-RS answer (s)")
    ax.set_ylabel("instances")
    ax.set_title(
        f"End-to-end latency, {result['rows']}x{result['rows']} CT at {result['rate']:g}/s"
    )
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    hist = folder / f"{name}_histogram.png"
    fig.savefig(hist, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    sent = [s["sent_at"] for s in result["samples"]]
    t0 = min(sent) if sent else 0.0
    end = max((t for t, _ in result["deliveries"]), default=1.0)
    bins = [float(b) for b in range(int(end) + 2)]
    for lane in ("routine", "stat"):
        times = [t for t, lane_ in result["deliveries"] if lane_ == lane]
        ax.hist(times, bins=bins, histtype="step", linewidth=1.5, label=f"delivered, {lane}")
    paced = [s["sent_at"] - t0 for s in result["samples"]]
    ax.hist(paced, bins=bins, histtype="step", linestyle=":", label="sent (paced senders)")
    ax.axvline(result["phase_starts"]["backlog"], color="k", linestyle="--", linewidth=1)
    ax.text(result["phase_starts"]["backlog"], ax.get_ylim()[1] * 0.9, " backlog sent")
    ax.set_xlabel("seconds since the steady phase started")
    ax.set_ylabel("instances per second")
    ax.set_title("Throughput over time (1 s bins)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    over_time = folder / f"{name}_throughput.png"
    fig.savefig(over_time, dpi=100)
    plt.close(fig)
    return [hist, over_time]


def table(result: dict[str, Any]) -> str:
    head = (
        "| lane, phase | n | latency p50 / p95 / p99 (s) | C-STORE RTT p50 / p99 (s) "
        "| p50 ingest→normalized / →routed / →delivered (s) |"
    )
    lines = [head, "|" + "---|" * 5]
    for name, g in result["groups"].items():
        lat, rtt, st = g["latency_s"], g["c_store_rtt_s"], g["stages_p50_s"]
        lines.append(
            f"| {name} | {lat['count']} | {fmt(lat['p50'], 3)} / {fmt(lat['p95'], 3)} / "
            f"{fmt(lat['p99'], 3)} | {fmt(rtt['p50'], 3)} / {fmt(rtt['p99'], 3)} "
            f"| {fmt(st['ingest_to_normalized_s'], 3)} / {fmt(st['normalized_to_routed_s'], 3)} / "
            f"{fmt(st['routed_to_delivered_s'], 3)} |"
        )
    t = result["targets"]
    lines.append("")
    if result["saturated"]:
        lines.append(
            "**Saturated**: the pipeline did not keep up with the steady phase (instances "
            "queued before transcode), so there is no no-backlog baseline for STAT."
        )
    lines.append(
        f"{result['rows']}x{result['rows']} CT ({result['instance_kb']} KB). "
        f"Rate asked {result['rate']:g}/s, achieved {result['achieved_rate']}/s; backlog of "
        f"{result['backlog']} drained in {result['backlog_drain_s']} s. Targets: routine p99 < "
        f"0.5 s {'met' if t['routine_p99_under_0.5s'] else '**missed**'}; STAT p99 unaffected "
        f"by the backlog {'met' if t['stat_p99_unaffected_by_backlog'] else '**missed**'}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20.0, help="routine instances per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the steady phase")
    parser.add_argument("--backlog", type=int, default=600, help="routine slices in the burst")
    parser.add_argument("--rows", type=int, default=512, help="CT slice size (rows x rows)")
    parser.add_argument("--name", default="latency", help="names the result and plot files")
    parser.add_argument("--quick", action="store_true", help="a few seconds, a small backlog")
    parser.add_argument("--out", type=Path, help="default: bench/results/NAME.json")
    parser.add_argument("--plots", type=Path, default=PLOTS)
    args = parser.parse_args()
    if args.quick:
        args.rate, args.seconds, args.backlog = 5.0, 3.0, 12
    result = run(args.rate, args.seconds, args.backlog, args.rows)
    write_result(args.out or RESULTS / f"{args.name}.json", result)
    plot(result, args.plots, args.name)
    print(table(result))


if __name__ == "__main__":
    main()
