"""Remake docs/images/dashboard/: the local stack under a workload, drawn row by row.

``make dashboard-images`` runs this. It starts ``python -m radflow_devstack`` (the
whole pipeline and its Prometheus, as ``make run``) on free ports, with a rule file
whose destination, the local Orthanc, is reached through a proxy this script can cut.
Then, for a few minutes, it sends what a small site sends: CT series over DICOM
(DCMTK's storescu), mixed small studies and STAT studies over STOW-RS with a token
from the development issuer, verified reports (Structured Reports, returned to the
stand-in RIS as HL7), and a few sends that are refused (an expired token, instances
without a Study Instance UID). In the middle the destination is unreachable for
``--outage`` seconds: the circuit breaker opens, deliveries are retried, and with the
forwarder's retry budget shortened to less than the outage some go to
dicom.forward.failed (the dead letters). After a quiet minute for the backlog to drain
it draws every row of the shipped dashboard over the whole run
(deploy/monitoring/render_dashboard.py) and stops everything.

    .venv/bin/python deploy/monitoring/dashboard_images.py [--minutes 6] [--outage 70]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pydicom

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench"), str(Path(__file__).parent)]

# The tests' and benchmarks' senders and corpora: the same instances they send.
from harness import ct_series, small_mix  # noqa: E402
from render_dashboard import DASHBOARDS, make_window, render_dashboard  # noqa: E402

from radflow_devstack.issuer import Issuer, dev_issuer_url  # noqa: E402
from radflow_devstack.kit.dcmtk import storescu  # noqa: E402
from radflow_devstack.processes import ManagedProcess, free_port  # noqa: E402
from radflow_devstack.prometheus import PrometheusApi  # noqa: E402
from support.dicom import make_instance  # noqa: E402
from support.proxy import FaultProxy  # noqa: E402
from support.reports import make_sr  # noqa: E402
from support.stow import multipart  # noqa: E402

OUT = ROOT / "docs" / "images" / "dashboard"
RULES = """\
# make dashboard-images: make run's rules, the destination behind a proxy that can be cut,
# with latency objectives so that the objective and burn-rate panels have something.
version: 1
timezone: UTC
destinations:
  orthanc:
    url: http://127.0.0.1:{proxy_port}/dicom-web
    slo:                     # tight, so that the outage shows in the burn rate
      stat: {{within_s: 30, percent: 99}}
      routine: {{within_s: 90, percent: 99}}
  ris:
    kind: report-return
    site: local-ris
stat:
  from_priority: true
rules:
  - name: reports-to-the-ris
    when: {{modality: SR}}
    route: [ris]
    continue: true
  - name: mr-when-the-study-is-complete
    when: {{modality: MR}}
    route: [orthanc]
    wait_for_study_complete: {{quiet_seconds: 10, level: study}}
  - name: everything-to-orthanc
    route: [orthanc]
default:
  hold: "no rule matched"
"""
FORWARDER_ENV = {
    # Shorter than the outage, so that part of what waits goes to dicom.forward.failed
    # (retries_exhausted) and the dead-letter panels show it; 6 h in a deployment.
    "RADFLOW_FORWARDER_RETRY_BUDGET_S": "30",
    "RADFLOW_FORWARDER_RETRY_MAX_S": "10",
}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class Stack:
    """``python -m radflow_devstack`` on free ports, in ``run_dir``."""

    def __init__(self, run_dir: Path, rules: Path, orthanc_port: int) -> None:
        self.ports = {
            name: free_port()
            for name in (
                "broker", "s3", "dimse", "dimse-tls", "http", "https", "ops", "issuer",
                "transcode", "router", "forwarder", "report-return", "ledger", "mllp",
                "prometheus", "orthanc-dicom",
            )
        }  # fmt: skip
        self.ports["orthanc"] = orthanc_port
        argv = [sys.executable, "-m", "radflow_devstack", "--rules", str(rules)]
        argv += ["--log-dir", str(run_dir / "logs")]
        for name, port in self.ports.items():
            argv += [f"--{name}-port", str(port)]
        self.run_dir = run_dir
        self.proc = ManagedProcess(
            "radflow_devstack", argv, run_dir / "devstack.log", FORWARDER_ENV
        )

    @property
    def prometheus(self) -> str:
        return f"http://127.0.0.1:{self.ports['prometheus']}"

    def start(self) -> Stack:
        self.proc.start()
        self.proc.wait_until(
            lambda: "Ctrl-C stops everything" in self.proc.log_path.read_text(errors="replace"),
            240,
        )
        return self

    def token(self) -> str:
        issuer = Issuer.kept_in(self.run_dir / "auth", dev_issuer_url(self.ports["issuer"]))
        return str(issuer.token(subject="dashboard-images", ttl_s=3600))

    def stop(self) -> None:
        self.proc.stop(timeout_s=60)


class Workload:
    """The senders, each on its own thread at its own pace, until ``stop``."""

    def __init__(self, stack: Stack, corpus: Path) -> None:
        self.stack = stack
        self.corpus = corpus
        self.stow_url = f"http://127.0.0.1:{stack.ports['http']}/dicomweb/studies"
        self.token = stack.token()
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._n = 0

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.sent[what] = self.sent.get(what, 0) + n

    def _folder(self, kind: str) -> Path:
        with self._lock:
            self._n += 1
            return self.corpus / f"{kind}{self._n:04d}"

    def _every(self, period_s: float, offset_s: float, send: Callable[[], None]) -> None:
        if self.stop.wait(offset_s):
            return
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                send()
            except (OSError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                log(f"send failed: {exc}")  # the destination of the failure is the picture
            self.stop.wait(max(0.0, period_s - (time.monotonic() - began)))

    def _stow(self, files: list[Path], authorization: str | None = None) -> int:
        body, content_type = multipart(f.read_bytes() for f in files)
        answer = httpx.post(
            self.stow_url,
            content=body,
            headers={
                "Content-Type": content_type,
                "Authorization": authorization or f"Bearer {self.token}",
            },
            timeout=120,
        )
        return answer.status_code

    def ct_study(self) -> None:
        """A CT series of 12 slices over DICOM, routine."""
        files = ct_series(self._folder("ct"), 12, rows=256, seed=self._n)
        storescu(self.stack.ports["dimse"], *files, calling_ae="CT_SCANNER")
        self._count("CT over DIMSE", len(files))

    def mixed_study(self) -> None:
        """Small CT and MR instances over STOW-RS (small_mix's header-only SRs left out:
        unverified, the RIS would get nothing readable)."""
        files = [
            f for i, f in enumerate(small_mix(self._folder("mix"), 8, seed=self._n)) if i % 4 != 3
        ]
        self._stow(files)
        self._count("mixed over STOW-RS", len(files))

    def stat_study(self) -> None:
        """A STAT study (Requested Procedure Priority STAT) over STOW-RS."""
        files = small_mix(self._folder("stat"), 3, seed=self._n)  # CT, CT, MR
        for path in files:
            ds = pydicom.dcmread(path)
            ds.RequestedProcedurePriority = "STAT"
            ds.save_as(path)
        self._stow(files)
        self._count("STAT over STOW-RS", len(files))

    def report(self) -> None:
        """A verified report (Basic Text SR): to Orthanc and, as HL7 ORU, to the RIS."""
        path = self._folder("sr").with_suffix(".dcm")
        make_sr(path, findings=["No acute findings."], impression=["Normal study."])
        self._stow([path])
        self._count("reports over STOW-RS")

    def refused(self) -> None:
        """What a misconfigured sender sends: an instance without a Study Instance UID
        over DICOM, and a STOW-RS request with an expired token."""
        folder = self._folder("bad")
        folder.mkdir(parents=True, exist_ok=True)
        bad = make_instance(folder / "no-study.dcm", omit=("StudyInstanceUID",))
        storescu(self.stack.ports["dimse"], bad, calling_ae="OLD_MODALITY")
        issuer = Issuer.kept_in(
            self.stack.run_dir / "auth", dev_issuer_url(self.stack.ports["issuer"])
        )
        expired = issuer.token(subject="dashboard-images", ttl_s=-60)
        self._stow([bad], authorization=f"Bearer {expired}")
        self._count("refused")

    def run(self) -> list[threading.Thread]:
        senders = [
            (20, 0, self.ct_study),
            (15, 4, self.mixed_study),
            (45, 10, self.stat_study),
            (40, 20, self.report),
            (50, 30, self.refused),
        ]
        threads = [
            threading.Thread(target=self._every, args=sender, daemon=True) for sender in senders
        ]
        for thread in threads:
            thread.start()
        return threads


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops it like Ctrl-C: everything is stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0, help="of sending (6)")
    parser.add_argument("--outage", type=float, default=70.0, help="seconds unreachable (70)")
    parser.add_argument("--quiet", type=float, default=60.0, help="seconds to drain after (60)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "dashboard-images")
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the stack and its Prometheus running after drawing, until Ctrl-C",
    )
    args = parser.parse_args(argv)
    for tool in ("storescu", "Orthanc", "prometheus"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is missing: make system-deps", file=sys.stderr)
            return 1

    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    orthanc_port = free_port()
    proxy = FaultProxy(orthanc_port)
    rules = args.run_dir / "rules.yaml"
    rules.write_text(RULES.format(proxy_port=proxy.port))
    stack = Stack(args.run_dir, rules, orthanc_port)
    signal.signal(signal.SIGTERM, _interrupted)
    drawn = False
    try:
        log(f"starting the local stack in {args.run_dir} (log: {stack.proc.log_path})")
        stack.start()
        began = time.time()
        workload = Workload(stack, args.run_dir / "corpus")
        threads = workload.run()
        sending_s = args.minutes * 60
        outage_at = max(60.0, sending_s / 2 - args.outage / 2)
        log(f"sending for {args.minutes:g} min; destination down at +{outage_at:.0f} s")
        time.sleep(outage_at)
        proxy.cut()
        log(f"destination unreachable for {args.outage:g} s")
        time.sleep(args.outage)
        proxy.restore()
        log("destination back")
        time.sleep(max(0.0, sending_s - outage_at - args.outage))
        workload.stop.set()
        for thread in threads:
            thread.join(timeout=180)
        log(f"sent {workload.sent}; {args.quiet:g} s to drain")
        time.sleep(args.quiet)
        end = time.time()
        api = PrometheusApi(stack.prometheus)
        window = make_window(api, (end - began + 30) / 60, end)  # from just before it began
        for old in args.out.glob("*.png"):
            old.unlink()
        for path in sorted(DASHBOARDS.glob("*.json")):
            for image in render_dashboard(
                api, json.loads(path.read_text()), args.out, window, dpi=args.dpi
            ):
                empty = [p.title for p in image.panels if not p.has_data]
                note = f" (no data: {', '.join(empty)})" if empty else ""
                log(f"wrote {image.path}{note}")
        drawn = True
        if args.keep_running:
            log(f"Prometheus {stack.prometheus} (with the run's series); Ctrl-C stops")
            threading.Event().wait()
    except KeyboardInterrupt:
        if not drawn:
            log("interrupted")
            return 1
    finally:
        log("stopping")
        stack.stop()
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
