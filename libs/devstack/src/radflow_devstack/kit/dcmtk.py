"""DCMTK's storescu as a sender: its argument list, one run, and several in parallel.

Every storescu runs with ``TCP_NODELAY=1``: DCMTK leaves Nagle's algorithm on unless
told, which stalls each small PDU for tens of milliseconds (docs/architecture.md).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pydicom

NODELAY = {"TCP_NODELAY": "1"}
"""The environment DCMTK tools (and Orthanc, which uses DCMTK) need to send promptly."""

STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}
"""storescu's option proposing each transfer syntax (with the uncompressed ones)."""


def nodelay_env() -> dict[str, str]:
    """This process's environment with ``TCP_NODELAY=1``, for a DCMTK child."""
    return {**os.environ, **NODELAY}


def storescu_argv(
    port: int,
    files: Sequence[Path],
    *,
    called_ae: str,
    calling_ae: str,
    ts: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """storescu sending ``files`` to 127.0.0.1:``port``. It proposes each file's SOP
    class with ``ts`` (and the uncompressed syntaxes, where storescu has an option for
    ``ts``; exactly ``ts`` otherwise), or as stored (``-R``) when ``ts`` is None."""
    if ts in STORESCU_PROPOSE:
        propose = ["-R", STORESCU_PROPOSE[ts]]
    elif ts:
        propose = ["-xf", str(_profile(files[0], ts)), "Default"]
    else:
        propose = ["-R"]
    return [
        "storescu",
        *propose,
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]


def _profile(path: Path, ts: str) -> Path:
    """A storescu config file proposing exactly ``ts`` for the file's SOP class (for
    syntaxes that have no -x option, e.g. JPEG Lossless process 14)."""
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    config = path.with_suffix(".storescu.cfg")
    config.write_text(
        "[[TransferSyntaxes]]\n[Only]\nTransferSyntax1 = " + ts + "\n"
        "[[PresentationContexts]]\n[Ctx]\nPresentationContext1 = " + sop_class + "\\Only\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = Ctx\n"
    )
    return config


def storescu(
    port: int,
    *files: Path,
    ts: str | None = None,
    called_ae: str = "RADFLOW",
    calling_ae: str = "STORESCU",
    extra: Sequence[str] = (),
    timeout_s: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run storescu once and return its result (stderr has the statuses)."""
    argv = storescu_argv(
        port, files, called_ae=called_ae, calling_ae=calling_ae, ts=ts, extra=extra
    )
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=nodelay_env(), check=False
    )


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``parts`` interleaved shares of ``files`` (each keeps their order)."""
    return [list(files[i::parts]) for i in range(parts) if files[i::parts]]


def storescu_parallel(
    port: int,
    files: Sequence[Path],
    associations: int,
    called_ae: str,
    calling_ae: str,
    timeout_s: float = 1800,
) -> float:
    """Send ``files`` over ``associations`` concurrent storescu processes (``-R``); the
    wall time in seconds from the first start to the last exit. Raises RuntimeError if
    any storescu reports a failure."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            storescu_argv(port, share, called_ae=called_ae, calling_ae=calling_ae),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=nodelay_env(),
        )
        for share in split(files, associations)
    ]
    outputs = [p.communicate(timeout=timeout_s) for p in procs]
    elapsed = time.perf_counter() - started
    for proc, (_, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0 or "E: " in err:
            raise RuntimeError(f"storescu failed ({proc.returncode}): {err[-2000:]}")
    return elapsed
