"""STOW-RS ingest rate: our STOW-RS receiver next to Orthanc's (DICOMweb plugin),
receiving the same instances, 1 and 50 per request, in one run. Prints a table and
writes bench/results/stow_rate.json.

    python bench/stow_rate.py [--ct 300] [--small 500] [--repeat 3] [--quick]

Method. The instance sets of bench/ingest_rate.py (CT 512x512 slices; small mix).
Request bodies are multipart/related; type="application/dicom", built beforehand in
memory with the forwarder's own ``MultipartBody`` (so the client spends no time
reading files), and POSTed with httpx over keep-alive connections, with a
Content-Length, asking for application/dicom+json. One client posts its requests one
after the other; with 4 clients, 4 do so concurrently over their own connections.
The time runs from the first request to the last answer; every answer must be 200.

- ours: ``POST /dicomweb/studies`` on ingest; 200 means every instance of the request
  is in S3 and announced on the broker (acks=all). Received events are counted after.
- Orthanc: ``POST /dicom-web/studies``; instances counted by its REST API after.

Fresh receiver for every run; runs interleaved and repeated; medians shown.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
from harness import (
    RESULTS,
    STOW_AUTH,
    Parts,
    TopicFollower,
    ct_series,
    fmt,
    loadavg,
    machine,
    median,
    orthanc_count,
    run_dir,
    small_mix,
    total_bytes,
    write_result,
)

from radflow_core.topics import Topic
from stow_forwarder.stow import MultipartBody

RECEIVERS = ("ours", "orthanc")


async def _body(files: list[Path]) -> tuple[bytes, str]:
    body = MultipartBody.of(files)
    data = b"".join([chunk async for chunk in body.stream()])
    assert len(data) == body.length()
    return data, body.content_type


def bodies(files: list[Path], per_request: int) -> list[tuple[bytes, str]]:
    groups = [files[i : i + per_request] for i in range(0, len(files), per_request)]

    async def build() -> list[tuple[bytes, str]]:
        return [await _body(g) for g in groups]

    return asyncio.run(build())


async def _post_all(
    url: str, requests: list[tuple[bytes, str]], clients: int, auth: dict[str, str] | None = None
) -> float:
    queue: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)

    async def client() -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            while not queue.empty():
                data, content_type = queue.get_nowait()
                answer = await http.post(
                    url,
                    content=data,
                    headers={
                        "Content-Type": content_type,
                        "Accept": "application/dicom+json",
                        **(auth or {}),
                    },
                )
                if answer.status_code != 200:
                    raise RuntimeError(f"{url} answered {answer.status_code}: {answer.text[:500]}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - started


def _ours(parts: Parts, requests: list[tuple[bytes, str]], count: int, clients: int) -> float:
    st = parts.slice()
    ingest = parts.service("ingest", st)
    with TopicFollower(st.kafka, st.topic(Topic.INSTANCE_RECEIVED)) as received:
        elapsed = asyncio.run(
            _post_all(f"{ingest.url}/dicomweb/studies", requests, clients, STOW_AUTH)
        )
        received.wait(count, 60)
        assert received.count == count, f"{received.count} events for {count} sent"
    parts.stop(ingest)
    return elapsed


def _orthanc(parts: Parts, requests: list[tuple[bytes, str]], count: int, clients: int) -> float:
    orthanc = parts.orthanc()
    url = f"http://127.0.0.1:{orthanc.port}/dicom-web/studies"
    elapsed = asyncio.run(_post_all(url, requests, clients))
    held = orthanc_count(orthanc)
    assert held == count, f"Orthanc holds {held} of {count}"
    parts.stop(orthanc)
    return elapsed


def run(ct: int, small: int, repeat: int, clients_list: list[int]) -> dict[str, Any]:
    info = machine()
    rows: list[dict[str, Any]] = []
    with run_dir() as tmp, Parts(tmp) as parts:
        sets = {"ct-512": ct_series(tmp / "ct", ct)}
        if small:
            sets["small-mix"] = small_mix(tmp / "small", small)
        for set_name, files in sets.items():
            size = total_bytes(files)
            for per_request in (1, 50):
                requests = bodies(files, per_request)
                for clients in clients_list:
                    times: dict[str, list[float]] = {r: [] for r in RECEIVERS}
                    for _ in range(repeat):
                        times["ours"].append(_ours(parts, requests, len(files), clients))
                        times["orthanc"].append(_orthanc(parts, requests, len(files), clients))
                    row: dict[str, Any] = {
                        "set": set_name,
                        "instances": len(files),
                        "mb": round(size / 1e6, 1),
                        "per_request": per_request,
                        "clients": clients,
                    }
                    for receiver in RECEIVERS:
                        elapsed = median(times[receiver])
                        row[receiver] = {
                            "seconds": [round(t, 3) for t in times[receiver]],
                            "instances_per_s": round(len(files) / elapsed, 1),
                            "mb_per_s": round(size / 1e6 / elapsed, 1),
                        }
                    row["ours_vs_orthanc"] = round(
                        row["ours"]["instances_per_s"] / row["orthanc"]["instances_per_s"], 2
                    )
                    rows.append(row)
    return {**info, "load_at_end": loadavg(), "repeat": repeat, "rows": rows}


def table(result: dict[str, Any]) -> str:
    head = (
        "| set | per request | clients | ours inst/s (MB/s) | Orthanc inst/s (MB/s) "
        "| ours/Orthanc |"
    )
    lines = [head, "|" + "---|" * 6]
    for r in result["rows"]:
        o, t = r["ours"], r["orthanc"]
        lines.append(
            f"| {r['set']} ({r['instances']}, {r['mb']} MB) | {r['per_request']} | {r['clients']} "
            f"| {fmt(o['instances_per_s'])} ({fmt(o['mb_per_s'])}) "
            f"| {fmt(t['instances_per_s'])} ({fmt(t['mb_per_s'])}) | {r['ours_vs_orthanc']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ct", type=int, default=300, help="CT slices (512x512)")
    parser.add_argument("--small", type=int, default=500, help="small instances (0: none)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quick", action="store_true", help="a few instances, once")
    parser.add_argument("--out", type=Path, default=RESULTS / "stow_rate.json")
    args = parser.parse_args()
    if args.quick:
        args.ct, args.small, args.repeat, args.clients = 12, 0, 1, [1]
    result = run(args.ct, args.small, args.repeat, args.clients)
    write_result(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
