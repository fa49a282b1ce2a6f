"""Order references: an order's accession number, as events may carry it.

An accession number identifies a patient's examination (an identifier in the HIPAA
sense), so no event carries it in clear. Worklist items, and the services that match
an arriving instance to its order (ingest for the STAT lane, the router), name an order
by a keyed hash of its accession number and issuer instead. The key is a deployment
secret shared by those services: without it, sequential accession numbers could be
hashed one by one and matched.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from radflow_core.settings import Section

DEVELOPMENT_KEY = "radflow-development-order-key"
"""The embedded development key (`make run`, tests); production sets its own."""


class OrderSettings(Section):
    prefix = "ORDER_"

    reference_key: SecretStr = SecretStr(DEVELOPMENT_KEY)
    """Key of the order references (HMAC-SHA256 of issuer and accession number) that
    worklist items and the routing services share; the same on each of them (a
    Kubernetes Secret). Changing it orphans the open items until they are re-sent."""


def order_ref(accession_number: str, issuer: str | None, key: SecretStr) -> str:
    """The order reference of an accession number and its issuer (may be absent).

    Surrounding spaces are dropped (DICOM pads values to even length; HL7 does not), so
    the value from an image header and the one from an HL7 order match.
    """
    message = f"{(issuer or '').strip()}\x1f{accession_number.strip()}".encode()
    return hmac.new(key.get_secret_value().encode(), message, hashlib.sha256).hexdigest()
