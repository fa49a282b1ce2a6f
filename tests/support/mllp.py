"""Reading what the stand-in RIS received with python-hl7, a parser independent of the
hl7apy-based code that built the messages: escaping is checked against it."""

from __future__ import annotations

from collections import defaultdict

import hl7

from radflow_devstack.mllp_peer import MllpPeer, Received


def parsed(message: Received) -> hl7.Message:
    return hl7.parse(message.er7)


def field(message: Received, segment: str, number: int) -> str:
    """One field, unescaped (MSH numbered as in the standard)."""
    msg = parsed(message)
    seg = msg.segment(segment)
    return str(msg.unescape(str(seg[number]))) if len(seg) > number else ""


def sections(message: Received) -> list[tuple[str, str]]:
    """(OBX-3 as text, the section's text) per OBX-4 sub-ID, lines joined with LF:
    FT's ``\\.br\\`` and TX's one OBX per line both come back as line breaks."""
    msg = parsed(message)
    texts: dict[str, list[str]] = defaultdict(list)
    identifiers: dict[str, str] = {}
    for obx in msg.segments("OBX"):
        sub_id = str(obx[4])
        identifiers.setdefault(sub_id, str(msg.unescape(str(obx[3]))))
        value = str(msg.unescape(str(obx[5]))) if len(obx) > 5 else ""
        texts[sub_id].append(value.replace("\r", "\n"))
    return [(identifiers[k], "\n".join(v)) for k, v in texts.items()]


def control_ids(peer: MllpPeer) -> list[str]:
    return [m.control_id for m in peer.received]
