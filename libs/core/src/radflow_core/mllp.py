"""MLLP framing (HL7 v2 over TCP): ``<VT> message <FS><CR>``.

One definition for every side that speaks it: report-return's client, the worklist's
listener and the development tools that send orders.
"""

from __future__ import annotations

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


def frame(message: bytes) -> bytes:
    """``message`` as one MLLP block."""
    return START_BLOCK + message + END_BLOCK


def unframe(block: bytes) -> bytes:
    """The message of a block read up to and including END_BLOCK. Bytes before the
    start block (line noise, a peer's stray newline) are dropped; a block without one
    is taken whole."""
    start = block.find(START_BLOCK)
    return block[start + 1 if start >= 0 else 0 : -len(END_BLOCK)]
