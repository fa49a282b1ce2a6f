"""The operator CLI (``radflow``) run as an operator runs it: the console script the
venv installs, as a subprocess, with a test stack's RADFLOW_* settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.stack import Stack

RADFLOW = Path(sys.executable).with_name("radflow")


def radflow(stack: Stack, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RADFLOW), *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def json_lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """Its ``--json`` output, one object per line; it must have exited 0."""
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]
