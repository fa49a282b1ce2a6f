"""Reading Linux's /proc: a process's children, command line, memory and CPU time.

Every function answers for a process that has gone (None, an empty list, "?") instead
of raising: the processes measured come and go (codec workers, storescp's forks).
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def argv(pid: int) -> list[str]:
    """The command line of ``pid``; empty when it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def parent(pid: int) -> int | None:
    """The parent's pid, or None if ``pid`` is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def children(pid: int) -> list[int]:
    """The living children of ``pid`` (of all its threads)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (codec workers, forkserver)."""
    found = [pid]
    for current in found:
        found += children(current)
    return found


def status_kb(pid: int, field_name: str) -> int | None:
    """A ``/proc/<pid>/status`` field in kB (VmRSS, VmHWM), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def process_name(pid: int) -> str:
    """A short label: the module of ``python -m module``, "codec_worker" for a child of
    multiprocessing's forkserver, else the executable's name; "?" if gone."""
    args = argv(pid)
    if not args:
        return "?"
    text = " ".join(args)
    if "-m " in text:
        return text.split("-m ", 1)[1].split()[0]
    if "resource_tracker" in text:
        return "resource_tracker"
    if "forkserver" in text:
        # The forkserver's children inherit its command line: they are the workers.
        above = parent(pid)
        return "codec_worker" if above and "forkserver" in " ".join(argv(above)) else "forkserver"
    return Path(args[0]).name


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid``, its living descendants and its reaped children
    (storescp's forked ones), seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return total / ticks
