"""The ingest service's lifecycle: receivers wired to the claim check, on the shared
shell.

On stop, readiness turns false first (Kubernetes stops sending), the DIMSE listener
closes and open associations get a grace period, in-flight STOW-RS requests finish,
and only then the producer flushes and closes. The broker connection is retried in
the background; until it is up, senders get 0xA7xx / 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor

from ingest import metrics
from ingest.auth import Authenticator, AuthFailure
from ingest.claimcheck import ClaimCheck
from ingest.dimse import DimseReceiver
from ingest.lanes import Lanes
from ingest.settings import IngestConfig, IngestSettings
from ingest.stowrs import StowReceiver
from ingest.workers import WorkerRole
from radflow_core import audit
from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.kafka import EventProducer
from radflow_core.order_table import OrderTable, OrderTableMetrics
from radflow_core.shell import Door, Shell, State
from radflow_core.tls import TlsFilesUnusable, server_context

log = logging.getLogger(__name__)

SERVICE = "ingest"
ORDER_TABLE_METRICS = OrderTableMetrics(metrics.ORDER_ITEMS, metrics.ORDER_TABLE_LOADED)


def stow_doors(settings: IngestSettings, *, shared: bool = False) -> list[Door]:
    """STOW-RS's listeners: plain HTTP unless turned off, HTTPS when a certificate is
    configured (a client certificate optional, verified against the client CA).
    ``shared``: bound with SO_REUSEPORT, as every worker binds them.

    Raises:
        TlsFilesUnusable: the certificate, key or CA file cannot be used.
    """
    doors = []
    if settings.http_enabled:
        doors.append(
            Door("STOW-RS HTTP", settings.http_host, settings.http_port, reuse_port=shared)
        )
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        context = server_context(
            settings.tls_cert_file,
            settings.tls_key_file,
            client_ca_file=settings.tls_client_ca_file,
            require_client_cert=False,
        )
        doors.append(
            Door(
                "STOW-RS HTTPS", settings.http_host, settings.https_port, context, reuse_port=shared
            )
        )
    return doors


class IngestService:
    def __init__(self, config: IngestConfig, worker: WorkerRole | None = None) -> None:
        """``worker``: run as one of RADFLOW_INGEST_WORKERS processes (ingest.workers):
        the public ports shared with the other workers, the operations endpoint on a
        loopback port of its own, announced to the parent that serves the pod's."""
        self._config = config
        self._worker = worker
        settings = config.ingest
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._lanes = Lanes(settings.rules_file)
        self._orders = None
        if config.order_lookup.enabled:
            self._orders = OrderTable(
                config.kafka,
                config.order.reference_key,
                ORDER_TABLE_METRICS,
                config.order_lookup.retry_interval_s,
            )
        self._claim_check = ClaimCheck(
            self._blobs,
            self._producer,
            max_instance_bytes=settings.max_instance_bytes,
            lookup_above_bytes=config.s3.part_size,
            lanes=self._lanes,
            max_sequence_depth=settings.max_sequence_depth,
            audit=self._audit,
            orders=self._orders,
        )
        problem = None
        try:
            self._auth = Authenticator(
                config.auth,
                client_certificates=settings.tls_client_ca_file is not None,
                on_failure=self._audit_authentication_failure,
            )
            doors = stow_doors(settings, shared=worker is not None)
        except (TlsFilesUnusable, OSError, ValueError) as exc:
            self._auth = Authenticator(config.auth.model_copy(update={"api_keys_file": None}))
            doors, problem = [], f"{type(exc).__name__}: {exc}"
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=self._blobs,
            ops=config.ops,
            http_host=settings.http_host if worker is None else "127.0.0.1",
            http_port=settings.ops_port if worker is None else 0,
            routes=StowReceiver(settings, self._claim_check, self._auth).routes(),
            doors=doors,
            http_shutdown_s=settings.shutdown_grace_s,
            audit=self._audit,
        )
        if problem is not None:
            self.shell.cannot_run(
                "STOW-RS cannot be served as configured (TLS files or API keys file)",
                [problem],
            )
        try:
            # Received data sets spool to TMPDIR. tempfile probes the folder on first
            # use; doing it now makes an unwritable TMPDIR stop ingest at start instead
            # of failing the first C-STORE (and keeps the probe out of receive time).
            tempfile.gettempdir()
        except FileNotFoundError as exc:
            self.shell.cannot_run("no usable temporary folder for spooling (TMPDIR)", [str(exc)])
        self.health = self.shell.health
        self.failed = self.shell.failed
        self.shell.loop(
            "rule file watcher", functools.partial(self._lanes.watch, settings.reload_interval_s)
        )
        if self._orders is not None:
            self.shell.loop("order table", self._orders.run)
        self.shell.on_drain(self._close_dimse)
        self.shell.on_close(self._auth.close)
        if not self._auth.enabled:
            log.warning(
                "STOW-RS authentication is OFF (RADFLOW_INGEST_AUTH_MODE=none): anyone "
                "who reaches the STOW-RS port can send instances"
            )
        elif not self._auth.configured:
            log.error(
                "STOW-RS authentication is on but no method is configured (issuer, API "
                "keys or client CA): every STOW-RS request is refused"
            )
        log.info("STOW-RS authentication: %s", self._auth.describe())
        if not doors and problem is None:
            log.warning("STOW-RS is off: plain HTTP is turned off and no TLS certificate is set")
        self._dimse: DimseReceiver | None = None

    @property
    def state(self) -> State:
        return self.shell.state

    async def start(self) -> None:
        """Open the listeners; the broker connection is retried in the background."""
        settings = self._config.ingest
        self._lanes.load()
        await self.shell.start()
        loop = asyncio.get_running_loop()
        # Blob I/O runs in the loop's default executor; size it for every association,
        # each claim check making two blob calls at once.
        loop.set_default_executor(
            ThreadPoolExecutor(2 * settings.max_associations + 8, thread_name_prefix="blob-io")
        )
        self._dimse = DimseReceiver(
            settings,
            self._claim_check,
            loop,
            audit=self._audit,
            worker=None if self._worker is None else self._worker.index,
        )
        self._dimse.start()
        if self._worker is not None and "ops" in self.shell.ports:
            self._worker.announce(self.shell.ports["ops"])

    def _audit_authentication_failure(self, failure: AuthFailure) -> None:
        """The audit trail's User Authentication failure (PS3.15 A.5.3); counting and
        logging are done by the authenticator already."""
        self._audit.authentication_failure(
            audit.Door.STOW_RS,
            reason=f"HTTP {failure.status}: {failure.reason}",
            peer_address=failure.peer_address,
        )

    async def _close_dimse(self) -> None:
        if self._dimse is not None:
            await self._dimse.stop(self._config.ingest.shutdown_grace_s)

    async def stop(self) -> None:
        await self.shell.stop()

    @property
    def dimse_port(self) -> int:
        if self._dimse is None:
            raise RuntimeError("not started")
        return self._dimse.port

    @property
    def dimse_tls_port(self) -> int:
        if self._dimse is None:
            raise RuntimeError("not started")
        return self._dimse.tls_port
