"""`make run`'s launcher from a newcomer's view: it starts the stack, a storescu send
shows up as an event and a blob, and Ctrl-C/SIGTERM stops everything cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from radflow_devstack.parts import http_status
from radflow_devstack.processes import ManagedProcess, free_port
from support.dicom import bundled_file, storescu
from support.waiting import wait_for

pytestmark = pytest.mark.pipeline


def test_run_starts_the_stack_and_a_sent_instance_becomes_event_and_blob(tmp_path: Path) -> None:
    names = (
        "broker",
        "s3",
        "dimse",
        "http",
        "transcode",
        "router",
        "forwarder",
        "report_return",
        "mllp",
        "orthanc",
    )
    ports = {name: free_port() for name in (*names, "orthanc_dicom")}
    stack = ManagedProcess(
        "devstack",
        [
            sys.executable,
            "-m",
            "radflow_devstack",
            "--broker-port",
            str(ports["broker"]),
            "--s3-port",
            str(ports["s3"]),
            "--dimse-port",
            str(ports["dimse"]),
            "--http-port",
            str(ports["http"]),
            "--transcode-port",
            str(ports["transcode"]),
            "--router-port",
            str(ports["router"]),
            "--forwarder-port",
            str(ports["forwarder"]),
            "--report-return-port",
            str(ports["report_return"]),
            "--mllp-port",
            str(ports["mllp"]),
            "--orthanc-port",
            str(ports["orthanc"]),
            "--orthanc-dicom-port",
            str(ports["orthanc_dicom"]),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        tmp_path / "devstack.out",
    ).start()
    try:
        stack.wait_until(lambda: http_status(f"http://127.0.0.1:{ports['http']}/readyz") == 200, 90)
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
    finally:
        code = stack.stop(timeout_s=60)
    out = (tmp_path / "devstack.out").read_text()
    assert code == 0, out
    for name in ("stow-forwarder", "orthanc", "router", "transcode", "ingest", "s3", "tansu"):
        assert f"stopped  {name} (exit 0)" in out


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
