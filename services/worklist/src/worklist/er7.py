"""Reading HL7 v2 ER7 text: segments, fields, repetitions, components, escapes.

hl7apy checks that a message is HL7 at all (:func:`worklist.orders.read_message`); the
fields are read here, with the message's own encoding characters (MSH-1, MSH-2), because
an order's fields are read by position, component by component, the same way in every
version from 2.3 to 2.8, including the Z-segments and OMI's IPC that hl7apy's structures
for older versions do not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_BREAK = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @classmethod
    def of(cls, msh: str) -> Delimiters:
        """From the start of an MSH segment (MSH-1 and MSH-2)."""
        if len(msh) < 8 or not msh.startswith("MSH"):
            raise ValueError("no MSH segment")
        chars = msh[3:8]
        if chars[4] == chars[0]:  # only three encoding characters given
            chars = chars[:4] + "&"
        if len(set(chars)) != 5:
            raise ValueError("MSH-1/MSH-2 delimiters repeat")
        return cls(*chars)


def segments(text: str) -> list[str]:
    """Segments of a message (CR, LF or CR LF between them; empty ones dropped)."""
    return [s for s in _LINE_BREAK.split(text) if s.strip()]


class Segment:
    """One segment, read by HL7 position (``seg.value(3, 1)`` is PID-3.1)."""

    def __init__(self, text: str, delimiters: Delimiters) -> None:
        self.delimiters = delimiters
        parts = text.split(delimiters.field)
        self.name = parts[0][:3]
        # MSH-1 is the field separator itself: MSH fields are numbered one further.
        self._fields = ["", delimiters.field, *parts[1:]] if self.name == "MSH" else parts

    def raw(self, field: int) -> str:
        """Field ``field`` as sent (every repetition, escapes kept); '' when absent."""
        return self._fields[field] if 0 < field < len(self._fields) else ""

    def repetitions(self, field: int) -> list[str]:
        raw = self.raw(field)
        return raw.split(self.delimiters.repetition) if raw else []

    def value(self, field: int, component: int = 1, repetition: str | None = None) -> str:
        """Component ``component`` (first subcomponent) of the first repetition (or of
        ``repetition``), unescaped and stripped; '' when absent."""
        reps = self.repetitions(field) if repetition is None else [repetition]
        if not reps:
            return ""
        parts = reps[0].split(self.delimiters.component)
        if component > len(parts):
            return ""
        return unescape(
            parts[component - 1].split(self.delimiters.subcomponent)[0], self.delimiters
        ).strip()

    def components(self, field: int, repetition: str | None = None) -> list[str]:
        """Every component of the first repetition (or of ``repetition``), unescaped."""
        reps = self.repetitions(field) if repetition is None else [repetition]
        if not reps:
            return []
        return [
            unescape(p.split(self.delimiters.subcomponent)[0], self.delimiters).strip()
            for p in reps[0].split(self.delimiters.component)
        ]


def unescape(text: str, d: Delimiters) -> str:
    """Text of an escaped value: \\F\\ \\S\\ \\T\\ \\R\\ \\E\\, \\.br\\ as a space,
    \\Xhh\\ as Latin-1 bytes; highlighting and unknown sequences dropped."""
    if d.escape not in text:
        return text
    e = re.escape(d.escape)
    table = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape}

    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code in table:
            return table[code]
        if code == ".br":
            return " "
        if code.startswith("X"):
            try:
                return bytes.fromhex(code[1:]).decode("latin-1")
            except ValueError:
                return ""
        return ""

    return re.sub(f"{e}([^{e}]*){e}", one, text)


def escape(text: str, d: Delimiters) -> str:
    """A value for an ER7 field: delimiters escaped, line breaks as spaces."""
    out = []
    codes = {d.escape: "E", d.field: "F", d.component: "S", d.subcomponent: "T", d.repetition: "R"}
    for char in _LINE_BREAK.sub(" ", text):
        out.append(f"{d.escape}{codes[char]}{d.escape}" if char in codes else char)
    return "".join(out)
