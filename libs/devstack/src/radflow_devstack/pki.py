"""A private certificate authority for development and tests: a CA, server
certificates for 127.0.0.1 and localhost, and client certificates, written as PEM files.

``make run`` keeps one under ``.run/tls/`` (:func:`development_pki`), so a sender
configured once against ``ca.pem`` keeps working across restarts; tests make a fresh
one per test in ``tmp_path``. Keys are unencrypted EC P-256: this is never a
production CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path

    def combined(self, path: Path) -> Path:
        """Certificate and key in one PEM file (what Orthanc's SslCertificate takes)."""
        path.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A CA whose certificate is ``ca_file`` in ``folder``; :meth:`issue` signs leaf
    certificates into the same folder."""

    def __init__(
        self,
        folder: Path,
        name: str = "radflow test CA",
        *,
        days: int = 1,
        ca_file: Path | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        cert: x509.Certificate | None = None,
    ) -> None:
        """A new CA named ``name`` (its certificate written to ``ca_file``, by default
        ``<name>.pem`` in ``folder``), or, given ``key`` and ``cert``, an existing one."""
        self.folder = folder
        self.days = days
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file = ca_file or folder / f"{name.replace(' ', '-')}.pem"
        if key is not None and cert is not None:
            self._key, self._cert = key, cert
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def kept_in(cls, folder: Path, *, ca_file: str = "ca.pem", days: int = 365) -> Authority:
        """The CA kept in ``folder`` (``ca_file`` and ``ca.key``), created there the
        first time or when it has expired."""
        cert_path, key_path = folder / ca_file, folder / "ca.key"
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            fresh = cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
            if fresh and isinstance(key, ec.EllipticCurvePrivateKey):
                return cls(folder, days=days, ca_file=cert_path, key=key, cert=cert)
        authority = cls(folder, "radflow development CA", days=days, ca_file=cert_path)
        _write_key(authority._key, key_path)
        return authority

    def issue(
        self,
        common_name: str,
        *,
        server: bool,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        file_stem: str | None = None,
    ) -> Issued:
        """A leaf certificate for ``common_name`` (for a server: with ``hosts`` as its
        subject alternative names), written as ``<file_stem>.crt`` and ``.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alt_name(host) for host in hosts]),
                critical=False,
            )
        cert = builder.sign(self._key, hashes.SHA256())
        stem = file_stem or common_name
        cert_path = self.folder / f"{stem}.crt"
        key_path = self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
        return Issued(cert_path, key_path)

    def server_context(self, issued: Issued, *, require_client_cert: bool) -> ssl.SSLContext:
        """A TLS server context with ``issued``'s certificate; it asks for a client
        certificate signed by this CA when ``require_client_cert``."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(issued.cert), str(issued.key))
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=str(self.ca_file))
        return context


@dataclass(frozen=True)
class DevelopmentPki:
    """What ``make run`` serves and hands to senders, all under ``.run/tls/``."""

    ca_file: Path
    """``ca.pem``: trust this to reach make run's TLS listeners."""
    server: Issued
    """``server.crt``/``server.key``: 127.0.0.1 and localhost (ingest's TLS listeners)."""
    client: Issued
    """``client.crt``/``client.key``: CN ``STORESCU``, a sender's client certificate."""


DEV_CLIENT_CN = "STORESCU"
"""The development client certificate's common name: storescu's default calling AE."""


def development_pki(folder: Path) -> DevelopmentPki:
    """The development CA in ``folder`` (kept across runs) and fresh leaf certificates."""
    authority = Authority.kept_in(folder)
    server = authority.issue(
        "radflow-dev-server", server=True, hosts=("127.0.0.1", "localhost"), file_stem="server"
    )
    client = authority.issue(DEV_CLIENT_CN, server=False, file_stem="client")
    return DevelopmentPki(authority.ca_file, server, client)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
