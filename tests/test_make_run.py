"""`make run`'s launcher from a newcomer's view: it starts the stack, a storescu send
shows up as an event and a blob, and Ctrl-C/SIGTERM stops everything cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from radflow_core.tls import client_context
from radflow_devstack.kit import procfs
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.parts import http_status
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_devstack.prometheus import PrometheusApi, plain_rules
from support.dicom import bundled_file
from support.stow import multipart

pytestmark = pytest.mark.pipeline

ROOT = Path(__file__).resolve().parents[1]


PORT_NAMES = (
    "broker",
    "s3",
    "dimse",
    "dimse_tls",
    "http",
    "https",
    "ops",
    "issuer",
    "transcode",
    "router",
    "forwarder",
    "report_return",
    "ledger",
    "worklist_mllp",
    "worklist",
    "worklist_ops",
    "mllp",
    "orthanc",
    "orthanc_dicom",
    "prometheus",
)


def _start_devstack(tmp_path: Path, *extra: str) -> tuple[ManagedProcess, dict[str, int]]:
    """``python -m radflow_devstack`` on free ports, its terminal in devstack.out."""
    ports = {name: free_port() for name in PORT_NAMES}
    flags = [f"--{name.replace('_', '-')}-port" for name in PORT_NAMES]
    stack = ManagedProcess(
        "devstack",
        [
            sys.executable,
            "-m",
            "radflow_devstack",
            *[
                arg
                for flag, name in zip(flags, PORT_NAMES, strict=True)
                for arg in (flag, str(ports[name]))
            ],
            "--log-dir",
            str(tmp_path / "logs"),
            *extra,
        ],
        tmp_path / "devstack.out",
    ).start()
    return stack, ports


def test_run_starts_the_stack_and_a_sent_instance_becomes_event_and_blob(tmp_path: Path) -> None:
    stack, ports = _start_devstack(tmp_path)
    try:
        stack.wait_until(lambda: http_status(f"http://127.0.0.1:{ports['ops']}/readyz") == 200, 90)
        sent = storescu(ports["dimse"], bundled_file("CT_small.dcm"), ts="1.2.840.10008.1.2.1")
        assert sent.returncode == 0, sent.stderr
        env = {
            "RADFLOW_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{ports['broker']}",
            "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{ports['s3']}",
            "PATH": "/usr/bin:/bin",
        }
        events = subprocess.run(
            [sys.executable, "-m", "radflow_devstack", "events"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        (line,) = events.stdout.splitlines()
        event = json.loads(line)["event"]
        assert event["type"] == "dicom.instance.received"
        blobs = subprocess.run(
            [sys.executable, "-m", "radflow_devstack", "blobs"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        assert event["data"]["blob"]["key"] in blobs.stdout

        def routed() -> list[str]:
            return _devstack_args(["events", "dicom.forward.requested"], env).splitlines()

        (request,) = wait_for("the instance routed to Orthanc", routed, timeout_s=90)
        data = json.loads(request)["event"]["data"]
        assert (data["destination"], data["rules"]) == ("orthanc", ["everything-to-orthanc"])
        assert data["sop_instance_uid"] == event["data"]["sop_instance_uid"]
        orthanc = f"http://127.0.0.1:{ports['orthanc']}"

        def in_orthanc() -> bool:
            return httpx.get(f"{orthanc}/statistics").json()["CountInstances"] == 1

        wait_for("the instance delivered to Orthanc", in_orthanc, timeout_s=90)
        a_sent_order_is_on_the_worklist(ports, tmp_path)

        def in_the_ledger() -> bool:
            answer = subprocess.run(
                [
                    *(sys.executable, "-m", "radflow_core.cli", "ledger", "study"),
                    *(data["study_instance_uid"], "--json"),
                    *("--url", f"http://127.0.0.1:{ports['ledger']}"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if answer.returncode != 0:
                return False
            (row,) = json.loads(answer.stdout)["destinations"]
            return bool(row["destination"] == "orthanc" and row["delivered"] == 1)

        wait_for("the delivery counted by the ledger", in_the_ledger, timeout_s=60)
        _send_as_the_banner_shows_over_dicom_tls(tmp_path / "devstack.out")

        def received() -> list[str]:
            lines = _devstack_args(["events"], env).splitlines()
            return lines if len(lines) == 2 else []

        both = wait_for("the DICOM TLS instance received", received, timeout_s=30)
        identities = {json.loads(e)["event"]["data"]["sender"]["identity"] for e in both}
        assert identities == {None, "cert:STORESCU"}, "plain DIMSE, then DICOM TLS"
        _prometheus_watches_every_service(ports["prometheus"])
        _stow_with_the_development_token(tmp_path, ports)
        _prometheus_raises_nothing_after_the_traffic(ports["prometheus"])
    finally:
        code = stack.stop(timeout_s=60)
    out = (tmp_path / "devstack.out").read_text()
    assert code == 0, out
    for name in (
        *("prometheus", "stow-forwarder", "orthanc", "router", "transcode", "ingest"),
        *("s3", "tansu"),
    ):
        assert f"stopped  {name} (exit 0)" in out


def _prometheus_watches_every_service(port: int) -> None:
    """make run's Prometheus scrapes every service under the job its ServiceMonitor
    gives it in Kubernetes and evaluates every shipped rule."""
    api = PrometheusApi(f"http://127.0.0.1:{port}")
    services = {f"radflow-{p.parent.name}" for p in ROOT.glob("services/*/pyproject.toml")}

    def every_target_up() -> bool:
        up = {t["labels"]["job"] for t in api.targets() if t["health"] == "up"}
        return up == services

    wait_for("every service scraped by Prometheus", every_target_up, timeout_s=60)
    shipped = plain_rules(ROOT / "deploy/k8s/base/monitoring/alerts.yaml")
    names = {r.get("alert") or r["record"] for g in shipped["groups"] for r in g["rules"]}

    def every_rule_evaluated() -> bool:
        groups = api.rule_groups()
        evaluated = {r["name"] for g in groups for r in g["rules"] if r["health"] == "ok"}
        return evaluated == names

    wait_for("every shipped rule evaluated without error", every_rule_evaluated, timeout_s=60)


def _prometheus_raises_nothing_after_the_traffic(port: int) -> None:
    """No alert pending or firing once Prometheus has seen instances arrive (sent
    after its first scrape) and evaluated the rules since: until then
    RadflowNoInstancesReceived is rightly pending on working days."""
    api = PrometheusApi(f"http://127.0.0.1:{port}")
    arrived = 'sum(increase(radflow_ingest_instances_total{outcome=~"stored|duplicate"}[1h])) > 0'
    wait_for("Prometheus to see instances arrive", lambda: api.query(arrived), timeout_s=60)
    seen = time.time()
    wait_for("the rules evaluated since", lambda: api.evaluated_after(seen), timeout_s=30)
    assert [(a["labels"]["alertname"], a["state"]) for a in api.alerts()] == []


def _stow_with_the_development_token(tmp_path: Path, ports: dict[str, int]) -> None:
    """README's curl lines: STOW-RS needs a token, and ``radflow_devstack token`` prints
    one ingest accepts, over HTTP and over HTTPS with the development CA."""
    token = _devstack_args(
        ["token", "--issuer-port", str(ports["issuer"]), "--folder", str(tmp_path / "auth")],
        {"PATH": "/usr/bin:/bin"},
    ).strip()
    body, ctype = multipart([bundled_file("CT_small.dcm").read_bytes()])
    headers = {"Content-Type": ctype}
    plain = f"http://127.0.0.1:{ports['http']}/dicomweb/studies"
    assert httpx.post(plain, content=body, headers=headers).status_code == 401
    authorized = {**headers, "Authorization": f"Bearer {token}"}
    assert httpx.post(plain, content=body, headers=authorized, timeout=30).status_code == 200
    tls = client_context(ca_file=tmp_path / "tls" / "ca.pem")
    secure = f"https://127.0.0.1:{ports['https']}/dicomweb/studies"
    answer = httpx.post(secure, content=body, headers=authorized, verify=tls, timeout=30)
    assert answer.status_code == 200, answer.text
    assert http_status(f"http://127.0.0.1:{ports['http']}/metrics") == 404, "ops has its own port"


def _send_as_the_banner_shows_over_dicom_tls(banner: Path) -> None:
    """Run the storescu +tls line make run prints, with the development certificates
    it wrote under .run/tls/ (the banner's last lines come once every part is up)."""

    def printed() -> list[str]:
        return [ln for ln in banner.read_text().splitlines() if "storescu +tls" in ln]

    (line,) = wait_for("the banner's storescu +tls line", printed, timeout_s=60)
    words = line.split()
    argv = words[words.index("storescu") :]
    argv[argv.index("FILE.dcm")] = str(bundled_file("MR_small.dcm"))
    sent = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=60
    )
    assert sent.returncode == 0, f"{line}\n{sent.stderr}"


def _devstack(command: str, env: dict[str, str]) -> str:
    """Run a look-inside subcommand of the launcher; return what it printed."""
    return _devstack_args([command], env)


def _devstack_args(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "radflow_devstack", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return done.stdout


def _child_pid(parent: int, module: str) -> int:
    """The pid of ``parent``'s child running ``python -m module`` (or binary ``module``)."""
    for pid in procfs.children(parent):
        argv = procfs.argv(pid)
        if (
            argv[argv.index("-m") + 1 : argv.index("-m") + 2] == [module]
            if "-m" in argv
            else bool(argv) and argv[0].endswith(module)
        ):
            return pid
    raise AssertionError(f"no child {module} of {parent}")


def test_run_reports_a_killed_service_broker_and_s3_server_and_starts_them_again(
    tmp_path: Path,
) -> None:
    stack, ports = _start_devstack(tmp_path, "--durable-broker")
    out = tmp_path / "devstack.out"
    try:
        wait_for("the stack started", lambda: "Ctrl-C stops everything" in out.read_text(), 120)
        assert stack.proc is not None
        router = _child_pid(stack.proc.pid, "router")

        os.kill(router, signal.SIGKILL)

        wait_for(
            "the router's death reported and the router ready again",
            lambda: "ok       router is ready again (restart 1)" in out.read_text(),
            90,
        )
        text = out.read_text()
        assert "!!       router died: killed by SIGKILL" in text
        assert f"last lines of {tmp_path / 'logs' / 'router.log'}:" in text
        assert "restarting router in 1 s (restart 1)" in text
        assert http_status(f"http://127.0.0.1:{ports['router']}/readyz") == 200
        assert _child_pid(stack.proc.pid, "router") != router

        os.kill(_child_pid(stack.proc.pid, "tansu"), signal.SIGKILL)  # durable: comes back

        wait_for(
            "the broker restarted",
            lambda: "ok       tansu is ready again (restart 1)" in out.read_text(),
            60,
        )
        os.kill(_child_pid(stack.proc.pid, "weed"), signal.SIGKILL)  # objects on disk

        wait_for(
            "the S3 server restarted, the broker's log still in it",
            lambda: "ok       s3 is ready again (restart 1)" in out.read_text(),
            60,
        )
        sent = storescu(ports["dimse"], bundled_file("CT_small.dcm"), ts="1.2.840.10008.1.2.1")
        assert sent.returncode == 0, sent.stderr
        orthanc = f"http://127.0.0.1:{ports['orthanc']}"
        wait_for(
            "an instance sent after the broker's restart delivered to Orthanc",
            lambda: httpx.get(f"{orthanc}/statistics").json()["CountInstances"] == 1,
            120,
        )
    finally:
        code = stack.stop(timeout_s=60)
    text = out.read_text()
    assert code == 0, text
    for name in ("stow-forwarder", "router", "tansu", "s3"):
        assert f"stopped  {name} (exit 0)" in text, text


def a_sent_order_is_on_the_worklist(ports: dict[str, int], tmp_path: Path) -> None:
    """The README's worklist example: an order with the devstack's ``order`` command,
    then DCMTK's findscu -W as a modality of the site."""
    worklist = f"http://127.0.0.1:{ports['worklist_ops']}/readyz"
    wait_for("the worklist ready", lambda: http_status(worklist) == 200, timeout_s=60)
    sent = _devstack_args(
        ["order", "--port", str(ports["worklist_mllp"]), "--accession", "MAKERUN1"], {}
    )
    assert "MSA|AA|" in sent
    out = tmp_path / "findscu"
    out.mkdir()
    found = subprocess.run(
        [
            *("findscu", "-W", "-aet", "CT_A", "-aec", "RADFLOW_MWL", "-X", "-od", str(out)),
            *("-k", "AccessionNumber=MAKERUN1", "-k", "PatientName"),
            *("127.0.0.1", str(ports["worklist"])),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert found.returncode == 0, found.stderr
    assert len(list(out.glob("rsp*.dcm"))) == 1
