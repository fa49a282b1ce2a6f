"""`python -m router check|explain`, as an integration engineer runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.dicom import bundled_file

EXAMPLE = Path(__file__).parents[2] / "services" / "router" / "examples" / "rules.yaml"


def _router(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", *args], capture_output=True, text=True, timeout=60
    )


def test_check_accepts_the_shipped_example() -> None:
    done = _router("check", str(EXAMPLE))
    assert done.returncode == 0, done.stderr
    assert "4 rules, 3 destinations: OK" in done.stdout


def test_check_rejects_a_broken_file_with_lines(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(EXAMPLE.read_text().replace("route: [neuro-ai]", "route: [neuro-a1]"))
    done = _router("check", str(broken))
    assert done.returncode == 1
    line = next(
        i for i, text in enumerate(broken.read_text().splitlines(), 1) if "neuro-a1" in text
    )
    assert f"{broken}:{line}: unknown destination 'neuro-a1'" in done.stderr


def test_explain_shows_why_and_where_at_a_given_time(tmp_path: Path) -> None:
    night = _router(
        "explain", str(EXAMPLE), str(bundled_file("CT_small.dcm")), "--at", "2026-11-23T19:30+01:00"
    )
    assert night.returncode == 0, night.stderr
    assert "MATCH night-reading: local Mon 19:30 inside 18:00-07:00 Europe/Zurich" in night.stdout
    assert "-> nighthawk [routine, wait for study complete (120s quiet)]" in night.stdout
    day = _router(
        "explain",
        str(EXAMPLE),
        str(bundled_file("CT_small.dcm")),
        "--at",
        "2026-11-23T10:00+01:00",
        "--calling-ae",
        "ER_CT1",
    )
    assert "-> pacs-main [stat] by day-reading" in day.stdout
    assert "CompressedSamples^CT1" not in day.stdout + night.stdout  # no patient name printed


def test_explain_walks_a_folder_and_reports_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(bundled_file("MR_small.dcm").read_bytes())
    (tmp_path / "notes.txt").write_text("not dicom")
    done = _router("explain", str(EXAMPLE), str(tmp_path), "--at", "2026-11-23T10:00+01:00")
    assert done.returncode == 1
    assert "a.dcm" in done.stdout and "-> pacs-main [routine] by day-reading" in done.stdout
    assert "notes.txt\n  not a readable DICOM file" in done.stdout


def test_explain_takes_the_sender_identity(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\n"
        "destinations:\n  research: {url: 'https://research.example/dicomweb'}\n"
        "rules:\n  - name: partner\n    when: {sender_identity: 'apikey:partner-a'}\n"
        "    route: [research]\n"
        "default: {hold: unknown sender}\n"
    )
    ct = str(bundled_file("CT_small.dcm"))
    partner = _router("explain", str(rules), ct, "--sender-identity", "apikey:partner-a")
    anyone = _router("explain", str(rules), ct)
    assert partner.returncode == 0, partner.stderr
    assert "-> research [routine] by partner" in partner.stdout
    assert "-> HOLD: unknown sender" in anyone.stdout
