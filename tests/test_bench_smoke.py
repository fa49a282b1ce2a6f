"""The benchmarks still run (a tiny smoke run; the real one is `make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def test_codec_benchmark_runs_and_reports_ratios_against_dcmtk(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    subprocess.run(
        [sys.executable, str(BENCH / "codecs.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["target"] for r in rows} == {"JPEG_LS_LOSSLESS", "JPEG2000_LOSSLESS", "RLE_LOSSLESS"}
    assert all(r["ratio"] > 1 for r in rows)
    assert all("encode_vs_dcmtk" in r for r in rows if r["target"] != "JPEG2000_LOSSLESS")
