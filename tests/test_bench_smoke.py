"""The benchmarks still run (a tiny smoke run of each; the real one is `make bench`).

They assert structure and sanity — every instance accounted for, positive rates, ratios
present — never speed targets: this runs on loaded 2-core CI machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parents[1] / "bench"


def run_bench(name: str, tmp_path: Path, *extra: str, timeout: int = 300) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|---" in done.stdout, "no table printed"
    return json.loads(out.read_text())


def test_codec_benchmark_runs_and_reports_ratios_against_dcmtk(tmp_path: Path) -> None:
    rows = run_bench("codecs", tmp_path)["rows"]
    assert {r["target"] for r in rows} == {"JPEG_LS_LOSSLESS", "JPEG2000_LOSSLESS", "RLE_LOSSLESS"}
    assert all(r["ratio"] > 1 for r in rows)
    assert all("encode_vs_dcmtk" in r for r in rows if r["target"] != "JPEG2000_LOSSLESS")


def test_ingest_rate_benchmark_compares_ours_with_three_receivers(tmp_path: Path) -> None:
    result = run_bench("ingest_rate", tmp_path)
    rows = result["rows"]
    assert {(r["set"], r["associations"]) for r in rows} == {("ct-512", 1), ("ct-512", 4)}
    for r in rows:
        for receiver in ("ours", "pynetdicom", "orthanc", "storescp"):
            assert r[receiver]["instances_per_s"] > 0
        assert all(r[f"ours_vs_{ref}"] > 0 for ref in ("pynetdicom", "orthanc", "storescp"))
        cpu = r["cpu_ms_per_instance"]
        assert r["ingest_cpu_vs_bare_scp"] == round(cpu["ingest"] / cpu["bare-scp"], 2)
    assert result["dcmtk"] != "missing" and result["orthanc"] != "missing"


def test_stow_rate_benchmark_posts_1_and_50_per_request_to_ours_and_orthanc(
    tmp_path: Path,
) -> None:
    rows = run_bench("stow_rate", tmp_path)["rows"]
    assert {r["per_request"] for r in rows} == {1, 50}
    assert all(r["ours"]["instances_per_s"] > 0 and r["ours_vs_orthanc"] > 0 for r in rows)


def test_forward_rate_benchmark_delivers_the_backlog_by_stow_rs_and_dimse(
    tmp_path: Path,
) -> None:
    result = run_bench("forward_rate", tmp_path, "--plots", str(tmp_path))
    for r in result["rows"]:
        assert r["storescu"]["instances_per_s"] > 0
        for kind in ("stow-rs", "dimse"):
            assert r[kind]["instances_per_s"] > 0 and r[f"{kind}_vs_storescu"] > 0
            assert r[kind]["start_to_first_delivery_s"] > 0
            # Every delivery downloads its bytes from S3 at least once.
            assert r[kind]["s3_requests_per_instance"] >= 1
    assert (tmp_path / "forward_throughput.png").stat().st_size > 0


def test_latency_benchmark_reports_percentiles_per_lane(tmp_path: Path) -> None:
    result = run_bench("latency", tmp_path, "--plots", str(tmp_path))
    groups = result["groups"]
    assert set(groups) == {"steady routine", "steady stat", "backlog stat"}
    for g in groups.values():
        lat = g["latency_s"]
        assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert {s["lane"] for s in result["samples"]} == {"routine", "stat"}
    stages = result["s3_requests_per_instance"]["stages"]
    assert set(stages) == {"ingest", "transcode", "router", "stow_forwarder"}
    assert stages["ingest"]["total"] >= 1 and stages["stow_forwarder"]["total"] >= 1
    for png in ("latency_histogram.png", "latency_throughput.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_memory_benchmark_samples_every_service(tmp_path: Path) -> None:
    result = run_bench("memory", tmp_path, "--plots", str(tmp_path))
    for phase in ("many", "large"):
        processes = result[phase]["processes"]
        assert {"ingest", "transcode", "router", "stow_forwarder"} <= set(processes)
        assert all(p["peak_mb"] > 0 for p in processes.values())
    assert result["large"]["size_mb"] > 10
    assert (tmp_path / "memory_rss.png").stat().st_size > 0


def test_s3_requests_benchmark_counts_requests_per_stage_and_operation(tmp_path: Path) -> None:
    result = run_bench("s3_requests", tmp_path)
    counts = result["requests_per_instance"]
    assert counts["delivered"] == 10
    stages = counts["stages"]
    assert set(stages) == {"ingest", "transcode", "router", "stow_forwarder"}
    # Each instance is stored once and downloaded by transcode and the forwarder.
    assert stages["ingest"]["by_operation"]["put PUT"] >= 1
    assert stages["transcode"]["by_operation"]["get GET"] >= 1
    assert stages["stow_forwarder"]["by_operation"]["get GET"] >= 1
    assert counts["total"] == round(sum(s["total"] for s in stages.values()), 3)
    assert result["cpu_ms_per_instance"]["s3"] > 0


def test_s3_server_benchmark_measures_seaweedfs_and_accounts_for_every_candidate(
    tmp_path: Path,
) -> None:
    result = run_bench("s3_servers", tmp_path)
    candidates = result["candidates"]
    assert set(candidates) == {"seaweedfs", "moto", "rclone"}
    seaweedfs = candidates["seaweedfs"]
    for key in ("put_cpu_ms", "head_cpu_ms", "get_cpu_ms", "parallel_put_per_s", "startup_s"):
        assert seaweedfs[key] > 0, key
    for name in ("moto", "rclone"):  # measured if installed, else skipped with a reason
        assert "runs" in candidates[name] or candidates[name]["skipped"], name
    assert result["versions"]["seaweedfs"] not in ("missing", "unknown")


def test_pipeline_vs_orthanc_benchmark_routes_the_same_workload_through_both(
    tmp_path: Path,
) -> None:
    result = run_bench("pipeline_vs_orthanc", tmp_path, timeout=600)
    routers = ["ours", "orthanc-sync", "orthanc-jobs"]
    assert result["routers"] == routers
    throughput, latency = result["throughput"], result["latency"]
    for r in routers:
        assert throughput[r]["instances_per_s"] > 0
        for run in throughput["runs"][r]:
            # every instance arrived at B exactly once, and B holds it as JPEG-LS lossless
            # (Orthanc A's IngestTranscoding really transcoded; so did ours)
            assert run["arrived"] == throughput["instances"]
            assert run["arrived_more_than_once"] == 0
            assert run["destination_instances"] == throughput["instances"] + 1
            assert run["all_jpeg_ls_lossless"], run["destination_syntaxes"]
        lat = latency[r]["latency_s"]
        assert lat["count"] > 0 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert latency[r]["arrived_more_than_once"] == 0
    assert all(throughput[f"ours_vs_{r}"] > 0 for r in routers[1:])
    assert all(latency[f"p99_ours_vs_{r}"] > 0 for r in routers[1:])
    assert result["load_at_start"] and result["load_at_end"]
