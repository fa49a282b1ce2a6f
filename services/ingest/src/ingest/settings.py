"""Settings of the ingest service (``RADFLOW_INGEST_*`` plus the shared sections)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from radflow_core.order_table import OrderLookupSettings
from radflow_core.orders import OrderSettings
from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
    csv_tuple,
)
from radflow_core.uids import is_valid_uid


@dataclass(frozen=True)
class PeerRule:
    """One allow-list entry: an AE title (``*`` for any), optionally bound to a network."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    @classmethod
    def parse(cls, text: str) -> PeerRule:
        """Parse ``AE``, ``AE@address`` or ``AE@network/bits``."""
        ae, _, addr = text.partition("@")
        ae = ae.strip()
        if not ae or len(ae) > 16:
            raise ValueError(f"AE title in {text!r} must be 1 to 16 characters")
        try:
            network = ipaddress.ip_network(addr.strip(), strict=False) if addr else None
        except ValueError:
            raise ValueError(f"{addr!r} in {text!r} is not an IP address or network") from None
        return cls(ae, network)

    def allows(self, ae_title: str, address: str) -> bool:
        if self.ae_title not in ("*", ae_title):
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False


@dataclass(frozen=True)
class CertificatePeer:
    """Which calling AE titles a client certificate may use on the DICOM TLS listener."""

    common_name: str
    ae_titles: frozenset[str]
    """Calling AE titles allowed for the certificate; ``*`` for any."""

    @classmethod
    def parse(cls, text: str) -> CertificatePeer:
        """Parse ``CN=AE`` or ``CN=AE|AE|...`` (``CN=*``: any calling AE)."""
        cn, sep, titles = text.partition("=")
        aes = frozenset(t.strip() for t in titles.split("|") if t.strip())
        if not sep or not cn.strip() or not aes:
            raise ValueError(f"{text!r} is not CN=AE or CN=AE|AE")
        if any(len(ae) > 16 for ae in aes):
            raise ValueError(f"an AE title in {text!r} is longer than 16 characters")
        return cls(cn.strip(), aes)

    def allows(self, ae_title: str) -> bool:
        return "*" in self.ae_titles or ae_title in self.ae_titles


class IngestSettings(Section):
    prefix = "INGEST_"

    workers: int = Field(default=1, ge=1, le=64)
    """Ingest processes sharing the public ports (DIMSE, DICOM TLS, STOW-RS HTTP and
    HTTPS, bound with SO_REUSEPORT: the kernel spreads connections across them), each a
    full ingest with its own broker and S3 clients. 1: one process, no supervisor. More:
    a parent process supervises them (restarts one that dies, stops them all on
    SIGTERM) and serves the pod's one ops port. About one per CPU core of the pod's
    limit. max_associations and max_associations_per_sender apply per worker."""
    ae_title: str = Field(default="RADFLOW", min_length=1, max_length=16)
    """Our AE title; senders must call it exactly (A-ASSOCIATE-RJ reason 7 otherwise)."""
    dimse_host: str = "127.0.0.1"
    """Address the DIMSE listener binds to (0.0.0.0 in a container)."""
    dimse_port: int = Field(default=11112, ge=0, le=65535)
    """DIMSE listener port."""
    dimse_plain: bool = True
    """Open the plain (unencrypted) DIMSE listener on dimse_port. false: DICOM TLS only
    (production), which needs tls_cert_file and tls_key_file."""
    dimse_tls_port: int = Field(default=2762, ge=0, le=65535)
    """DICOM TLS listener port (PS3.15 Annex B; 2762 is the registered dicom-tls
    port), on dimse_host. Opened when tls_cert_file and tls_key_file are set."""
    dimse_tls_require_client_cert: bool = True
    """With tls_client_ca_file set: the DICOM TLS handshake fails without a client
    certificate signed by it. false: a certificate is asked for but optional."""
    dimse_tls_peers: tuple[str, ...] = ()
    """Comma-separated map of verified client-certificate common names to the calling
    AE titles each may use on the DICOM TLS listener: 'STORESCU=STORESCU|CT1,site-b=MR2'
    ('CN=*': any AE). Set: any other certificate, a certificate calling with another AE
    title, or no certificate is rejected (A-ASSOCIATE-RJ, calling AE not recognised).
    Empty: any certificate the CA signed, with any calling AE allowed_peers allows."""
    max_associations_per_sender: int = Field(default=8, ge=1, le=1000)
    """Concurrent DIMSE associations one sender may hold (a sender: its certificate
    identity on DICOM TLS, else calling AE title and address); more are rejected as
    transient (local limit exceeded), so one sender cannot take every slot of
    max_associations."""
    http_host: str = "127.0.0.1"
    """Address the HTTP listeners (STOW-RS over HTTP and HTTPS, ops) bind to."""
    http_port: int = Field(default=8080, ge=0, le=65535)
    """STOW-RS plain HTTP listener port."""
    http_enabled: bool = True
    """Open the plain HTTP STOW-RS listener. Production sets false and serves STOW-RS
    over HTTPS only (https_port)."""
    https_port: int = Field(default=8443, ge=0, le=65535)
    """STOW-RS HTTPS listener port; opened when tls_cert_file and tls_key_file are set.
    With tls_client_ca_file, a client may present a certificate (optional: a token or
    API key serves as well)."""
    ops_port: int = Field(default=8085, ge=0, le=65535)
    """Port of /metrics, /healthz and /readyz, apart from STOW-RS so that probes and
    scrapes never share a door with senders."""
    tls_cert_file: Path | None = None
    """PEM certificate (chain) ingest presents on its TLS listeners (DICOM TLS and
    HTTPS). Unset: no TLS listener is opened."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: Path | None = None
    """CA bundle that client certificates on the TLS listeners are verified against.
    Unset: client certificates are not asked for."""
    allowed_peers: tuple[str, ...] = ()
    """Comma-separated allow-list of calling AE titles, each optionally bound to an
    address or network: 'CT1,MR2@10.1.2.3,*@10.9.0.0/16'. Empty: every caller."""
    max_associations: int = Field(default=32, ge=1, le=1000)
    """Concurrent DIMSE associations; more are rejected as transient (local limit)."""
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    """Maximum PDU size we receive (0 = unlimited). A peer announcing a longer PDU
    (beyond 1 MiB, whatever this says) has its association aborted before the PDU
    is read."""
    acse_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds to wait for association negotiation messages."""
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for the next DIMSE message on an association."""
    network_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds of network silence before an association is aborted."""
    extra_sop_classes: tuple[str, ...] = ()
    """Comma-separated private storage SOP Class UIDs to accept besides the standard ones."""
    max_instance_bytes: int = Field(default=4 * 1024**3, ge=1024)
    """Largest instance accepted, in bytes (larger: status 0xC005 / FailureReason 0xC005).
    Enforced while receiving: a C-STORE data set stops being written to TMPDIR once it
    passes this size, and a STOW-RS part stops being spooled."""
    max_request_bytes: int = Field(default=8 * 1024**3, ge=1024)
    """Largest STOW-RS request body, in bytes, every byte counted (part headers,
    non-DICOM parts, preamble); larger: HTTP 413, read no further."""
    max_parts: int = Field(default=10_000, ge=1)
    """Most parts (DICOM or not) one STOW-RS request may hold; more: HTTP 413."""
    max_sequence_depth: int = Field(default=32, ge=1, le=256)
    """Deepest nesting of sequences accepted; deeper: status 0xC000 / HTTP 400."""
    spool_memory_bytes: int = Field(default=8 * 1024 * 1024, ge=0)
    """STOW-RS parts and C-STORE data sets up to this size are held in memory; larger
    ones spool to TMPDIR. At most one per open association and stow_concurrency per
    STOW-RS request is held at once."""
    stow_concurrency: int = Field(default=8, ge=1, le=256)
    """Parts of one STOW-RS request whose claim checks run at once (1: one after the
    other); the next part is spooled while earlier ones are stored. A request holds at
    most this many parts, each in memory up to spool_memory_bytes, on disk beyond."""
    store_timeout_s: float = Field(default=25.0, gt=0)
    """Seconds one C-STORE's claim check (blob + event) may take before it is answered
    0xA700 "storage timed out; retry" (plus store_timeout_per_gib_s for its size); it
    normally takes well under a second. Shorter than pynetdicom's default DIMSE timeout
    (30 s), so such a sender waiting on a stalled store hears a status it retries
    instead of giving up and aborting the association, and the instances after it on
    that association. Senders that wait less (Orthanc's DicomScuTimeout: 10 s by
    default) still give up first; DCMTK's storescu waits as long as it takes."""
    store_timeout_per_gib_s: float = Field(default=60.0, ge=0)
    """Seconds added to store_timeout_s per GiB of the instance, for a large one's
    hashing and upload (60: at least ~18 MB/s; a 4 GiB instance gets 265 s)."""
    retry_after_s: int = Field(default=30, ge=1)
    """Retry-After seconds sent with HTTP 503."""
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    """On SIGTERM, seconds open associations get to finish before they are aborted."""
    rules_file: Path | None = None
    """The router's rule file; ingest applies its 'stat:' policy to put STAT instances
    on dicom.instance.received.stat, read first by every later stage. Unset: every
    instance takes the routine lane. Missing or invalid: logged, routine lane, and
    watched until it is valid (ingest never stops receiving for it)."""
    reload_interval_s: float = Field(default=2.0, gt=0, le=3600)
    """How often the rule file is checked for changes (by content)."""

    _csv = field_validator("allowed_peers", "extra_sop_classes", "dimse_tls_peers", mode="before")(
        csv_tuple
    )

    @field_validator("dimse_tls_peers")
    @classmethod
    def _certificate_peers_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            CertificatePeer.parse(entry)
        return value

    @model_validator(mode="after")
    def _some_dimse_listener(self) -> IngestSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"{self.env_name('tls_cert_file')} and {self.env_name('tls_key_file')} go together"
            )
        if self.workers > 1:
            unset = [
                self.env_name(name)
                for name in ("dimse_port", "dimse_tls_port", "http_port", "https_port")
                if getattr(self, name) == 0
            ]
            if unset:
                raise ValueError(
                    f"{self.env_name('workers')} > 1 needs fixed ports: port 0 would give "
                    f"each worker a port of its own ({', '.join(unset)})"
                )
        self._listeners_apart()
        if not self.dimse_plain and self.tls_cert_file is None:
            raise ValueError(
                f"{self.env_name('dimse_plain')} is false but no DICOM TLS listener is "
                f"configured (set {self.env_name('tls_cert_file')} and "
                f"{self.env_name('tls_key_file')})"
            )
        return self

    def _listeners_apart(self) -> None:
        """Two listeners opened on one port are refused. Bound with SO_REUSEPORT (as
        workers bind them) both would succeed and the kernel would split connections
        between them: some DICOM TLS handshakes answered by the plain listener."""
        tls = self.tls_cert_file is not None
        opened = [
            ("dimse_port", self.dimse_host, self.dimse_plain),
            ("dimse_tls_port", self.dimse_host, tls),
            ("http_port", self.http_host, self.http_enabled),
            ("https_port", self.http_host, tls),
            ("ops_port", self.http_host, True),
        ]
        seen: list[tuple[str, str, int]] = []
        for name, host, is_open in opened:
            port = getattr(self, name)
            if not is_open or port == 0:
                continue
            for other, other_host, other_port in seen:
                if port == other_port and _overlap(host, other_host):
                    raise ValueError(
                        f"{self.env_name(name)} and {self.env_name(other)} are both {port}: "
                        "each listener needs a port of its own"
                    )
            seen.append((name, host, port))

    def store_timeout_for(self, size: int) -> float:
        """Seconds the claim check of an instance of ``size`` bytes may take."""
        return self.store_timeout_s + self.store_timeout_per_gib_s * size / 2**30

    @field_validator("allowed_peers")
    @classmethod
    def _peers_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            PeerRule.parse(entry)
        return value

    @field_validator("extra_sop_classes")
    @classmethod
    def _uids_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [v for v in value if not is_valid_uid(v)]
        if bad:
            raise ValueError(f"not valid UIDs: {bad}")
        return value

    @property
    def peer_rules(self) -> tuple[PeerRule, ...]:
        return tuple(PeerRule.parse(entry) for entry in self.allowed_peers)

    @property
    def certificate_peers(self) -> dict[str, CertificatePeer]:
        """The dimse_tls_peers map, by common name."""
        peers = (CertificatePeer.parse(entry) for entry in self.dimse_tls_peers)
        return {peer.common_name: peer for peer in peers}


class AuthMode(StrEnum):
    REQUIRED = "required"
    NONE = "none"


ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
"""Signature algorithms a bearer token may use: public-key ones only, so that a key
published in a JWKS can never be used as a shared secret (no 'none', no HS*)."""


class IngestAuthSettings(Section):
    """Who may use STOW-RS (see docs/security.md, "STOW-RS authentication")."""

    prefix = "INGEST_AUTH_"

    mode: AuthMode = AuthMode.REQUIRED
    """required: every STOW-RS request must authenticate (a bearer token, an API key,
    or a client certificate on HTTPS); none: anyone who reaches the port may send
    (logged as a warning at start). With required and no method configured, every
    STOW-RS request is refused."""
    jwt_issuer: str = ""
    """The OAuth2/OIDC issuer whose bearer tokens are accepted (the 'iss' claim must
    equal it). Empty: bearer tokens are not accepted."""
    jwt_jwks_url: str = Field(default="", validate_default=True)
    """The issuer's JSON Web Key Set URL (https://, or http:// on loopback only)."""
    jwt_audience: str = "radflow-ingest"
    """The 'aud' a token must carry."""
    jwt_required_scope: str = "dicom.stow"
    """The scope ('scope' or 'scp' claim) a token needs to store instances (403
    insufficient_scope without it). Empty: any valid token."""
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256")
    """Comma-separated signature algorithms accepted; public-key ones only (none and
    HS* are refused at start)."""
    jwt_leeway_s: float = Field(default=30.0, ge=0, le=300)
    """Clock skew allowed on exp and nbf, in seconds."""
    jwks_cache_s: float = Field(default=3600.0, ge=1)
    """Seconds a fetched key set is used before it is fetched again."""
    jwks_min_refresh_s: float = Field(default=30.0, ge=0)
    """A token with an unknown key id fetches the key set again (key rotation), at
    most once per this many seconds, so unknown ids cannot hammer the issuer."""
    jwks_timeout_s: float = Field(default=5.0, gt=0)
    """Seconds to wait for the key set."""
    jwks_ca_file: Path | None = None
    """CA bundle to verify the JWKS server's certificate (default: the system's)."""
    api_keys: tuple[str, ...] = ()
    """Comma-separated static API keys as 'name:sha256hex' (the SHA-256 of the key, in
    hex; the key itself is never configured). Sent as 'Authorization: ApiKey <key>';
    identity 'apikey:<name>'."""
    api_keys_file: Path | None = None
    """A file of more 'name:sha256hex' lines ('#' comments), e.g. a mounted Secret."""
    allowed_identities: tuple[str, ...] = ()
    """Comma-separated identities allowed to use STOW-RS, shell-style patterns
    ('apikey:site-a', 'cert:*.example.org', 'jwt:https://idp.example.org#*'). Empty:
    every authenticated identity (403 for the others)."""

    _csv = field_validator("jwt_algorithms", "api_keys", "allowed_identities", mode="before")(
        csv_tuple
    )

    @field_validator("jwt_algorithms")
    @classmethod
    def _public_key_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [alg for alg in value if alg not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"not accepted: {bad}; one of {sorted(ASYMMETRIC_ALGORITHMS)} (never none or HS*)"
            )
        if not value:
            raise ValueError("at least one algorithm")
        return value

    @field_validator("jwt_jwks_url")
    @classmethod
    def _jwks_url_secure(cls, value: str, info: ValidationInfo) -> str:
        if bool(value) != bool(info.data.get("jwt_issuer")):
            raise ValueError("the issuer and its JWKS URL are set together")
        if not value or value.startswith("https://"):
            return value
        host = urlsplit(value).hostname or ""
        if value.startswith("http://") and host in ("127.0.0.1", "::1", "localhost"):
            return value
        raise ValueError("expected an https:// URL (http:// only on loopback)")

    @field_validator("api_keys")
    @classmethod
    def _api_keys_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            parse_api_key(entry)
        return value


def parse_api_key(text: str) -> tuple[str, bytes]:
    """('name', sha256 digest) from 'name:sha256hex'."""
    name, _, digest = text.strip().partition(":")
    name = name.strip()
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"API key name in {text.split(':')[0]!r} must be letters, digits, -_.")
    try:
        raw = bytes.fromhex(digest.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"API key {name!r}: expected name:<64 hex digits of its SHA-256>")
    return name, raw


@dataclass(frozen=True)
class IngestConfig(ServiceConfig):
    """Every section the ingest service reads, built once in ``__main__``."""

    ingest: IngestSettings
    auth: IngestAuthSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings
    order: OrderSettings
    order_lookup: OrderLookupSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        IngestSettings,
        IngestAuthSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
        OrderSettings,
        OrderLookupSettings,
    )


_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _overlap(host: str, other: str) -> bool:
    """Two bind addresses that would claim the same port (a wildcard claims all)."""
    return host == other or host in _WILDCARDS or other in _WILDCARDS
