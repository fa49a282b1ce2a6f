"""The HL7 acknowledgement (original mode) of an order message: AA once its steps are
on the broker, AE or AR with the reason in MSA-3 and an ERR segment otherwise.

The reason is the worklist's own text (:class:`~worklist.orders.Refused`), never a
value from the message. ERR is laid out per the message's version: ERR-2 location,
ERR-3 error code, ERR-4 severity from 2.5 on; ERR-1 (location and code) before.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from worklist.er7 import Delimiters, escape
from worklist.orders import AckCode, Header, Refused

_ERROR_TEXT = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    207: "Application internal error",
}
"""HL7 table 0357."""


def build_ack(
    header: Header, code: AckCode, refused: Refused | None, now: datetime | None = None
) -> bytes:
    """The ACK's bytes (inside the MLLP frame), in the message's character set."""
    d = header.delimiters or Delimiters()
    moment = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")
    control = hashlib.sha256(f"ack\n{header.control_id}\n{moment}".encode()).hexdigest()[:20]
    encoding = f"{d.component}{d.repetition}{d.escape}{d.subcomponent}"
    trigger = header.trigger or "O01"

    def e(text: str) -> str:
        return escape(text, d)

    msh = d.field.join(
        [
            "MSH",
            encoding,
            e(header.receiving_application) or "RADFLOW_MWL",
            e(header.receiving_facility),
            e(header.sending_application),
            e(header.sending_facility),
            moment,
            "",
            f"ACK{d.component}{trigger}{d.component}ACK",
            control.upper(),
            "P",
            e(header.version or "2.5.1"),
            "",
            "",
            "",
            "",
            "",
            e(header.charset),
        ]
    ).rstrip(d.field)
    text = "" if refused is None else refused.text
    msa = d.field.join(["MSA", code.value, e(header.control_id), e(text[:80])]).rstrip(d.field)
    lines = [msh, msa]
    if refused is not None:
        lines.append(_err(header, refused, d))
    return ("\r".join(lines) + "\r").encode(header.codec or "utf-8", errors="replace")


def _err(header: Header, refused: Refused, d: Delimiters) -> str:
    location = (refused.location or "").split("^")
    where = d.component.join(escape(p, d) for p in location) if refused.location else ""
    code = refused.hl7_error
    meaning = _ERROR_TEXT.get(code, "")
    if header.version.startswith(("2.3", "2.4")):
        coded = d.subcomponent.join([str(code), meaning, "HL70357"])
        parts = [*location[:3], "", "", "", ""][:3] if refused.location else ["", "", ""]
        return d.field.join(["ERR", d.component.join([*parts, coded])])
    return d.field.join(
        [
            "ERR",
            "",
            where,
            d.component.join([str(code), meaning, "HL70357"]),
            "E",
            "",
            "",
            "",
            escape(refused.text, d),
        ]
    )
