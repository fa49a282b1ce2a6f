"""How a destination is reached: its kind, its peer, authentication and TLS, as
written in the rule file.

The rule file never holds a secret: every secret is a reference to an environment
variable or a file (a Kubernetes Secret mounted as either), resolved by the forwarder
when it starts, so a missing one stops it with the variable's name rather than failing
the first delivery.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from radflow_core.errors import ConfigurationError


@dataclass(frozen=True)
class SecretRef:
    env: str | None = None
    file: Path | None = None

    def resolve(self, environ: Mapping[str, str] | None = None) -> str:
        """The secret's value.

        Raises:
            ConfigurationError: naming the variable or file, never a value.
        """
        if self.env is not None:
            value = (os.environ if environ is None else environ).get(self.env)
            if not value:
                raise ConfigurationError(f"environment variable {self.env} is not set")
            return value
        assert self.file is not None
        try:
            return self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigurationError(
                f"secret file {self.file} cannot be read ({type(exc).__name__})"
            ) from None

    def __str__(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"


class DestinationKind(StrEnum):
    STOW_RS = "stow-rs"
    """A DICOMweb server, sent to by STOW-RS (the default)."""
    DIMSE = "dimse"
    """A DICOM peer reached by C-STORE, for PACS that do not speak DICOMweb."""
    REPORT_RETURN = "report-return"
    """Structured reports handed to report-return, which sends them on as HL7 ORU to
    the named site's RIS."""


class Verification(StrEnum):
    """How the forwarder checks, after a destination acknowledged instances, that it
    really holds them (``verify:`` in the rule file). A destination can answer
    "stored" and lose the study; only asking it again tells."""

    OFF = "off"
    """The acknowledgement is trusted (the default)."""
    QIDO = "qido"
    """STOW-RS destinations: a QIDO-RS search per series for the delivered instances,
    each compared by SOP Class UID."""
    STORAGE_COMMITMENT = "storage-commitment"
    """DIMSE destinations: DICOM Storage Commitment (Push Model, N-ACTION then the
    destination's N-EVENT-REPORT, on the same association or one it opens to us)."""


VERIFICATION_KINDS: dict[Verification, DestinationKind] = {
    Verification.QIDO: DestinationKind.STOW_RS,
    Verification.STORAGE_COMMITMENT: DestinationKind.DIMSE,
}
"""Which kind of destination each verification applies to."""


@dataclass(frozen=True)
class DimsePeer:
    """Where a DIMSE destination listens, and the AE titles of both ends."""

    host: str
    port: int
    ae_title: str
    """The destination's AE title (the called AE)."""
    calling_ae_title: str = "RADFLOW"
    """Ours, as the destination knows it."""

    def __str__(self) -> str:
        return f"dicom://{self.ae_title}@{self.host}:{self.port}"


class AuthKind(StrEnum):
    BASIC = "basic"
    BEARER = "bearer"
    OAUTH2 = "oauth2"
    """OAuth2 client credentials grant."""


@dataclass(frozen=True)
class Auth:
    kind: AuthKind
    username: str | None = None
    password: SecretRef | None = None
    token: SecretRef | None = None
    token_url: str | None = None
    client_id: str | None = None
    client_secret: SecretRef | None = None
    scope: str | None = None


AUTH_FIELDS: dict[AuthKind, tuple[set[str], set[str]]] = {
    AuthKind.BASIC: ({"username"}, {"password"}),
    AuthKind.BEARER: (set(), {"token"}),
    AuthKind.OAUTH2: ({"token_url", "client_id"}, {"client_secret"}),
}
"""Per kind: (plain fields, secret fields); every one is required except ``scope``."""


@dataclass(frozen=True)
class Tls:
    ca_file: Path | None = None
    """CA bundle to verify the destination's certificate (default: the system's)."""
    cert_file: Path | None = None
    """Client certificate (PEM) for mutual TLS."""
    key_file: Path | None = None
    """Its private key (PEM)."""
    server_name: str | None = None
    """The name the peer's certificate must carry, when it is not the host dialled
    (a DIMSE peer reached by IP address whose certificate names its DNS name). The
    certificate is always verified; this only changes which name it is checked for."""


def is_private_channel(url: str) -> bool:
    """Whether a secret may be sent to ``url``: over https://, or over http:// to this
    host's loopback interface (a sidecar, a test server), which never leaves the
    machine. A credential sent to any other http:// address crosses a network in
    clear text, so a rule file that asks for it is refused."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
