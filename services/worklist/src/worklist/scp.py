"""The Modality Worklist SCP: pynetdicom's C-FIND (Modality Worklist Information Model
- FIND) answered from the merged view.

pynetdicom runs each association in its own thread; the handlers read the view (which
is thread-safe) and never raise. The calling AE title chooses the site, and so which
sites' items are searched (the site's own, and those it ``sees``); an unknown calling
AE title is rejected at association (A-ASSOCIATE-RJ, calling AE title not recognised),
so a modality that is not configured learns it at once instead of seeing an empty list.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from enum import IntEnum
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityWorklistInformationFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from worklist import metrics
from worklist.mwl import answer_character_set, match
from worklist.settings import WorklistSettings
from worklist.sites import Sites
from worklist.view import MergedView

log = logging.getLogger(__name__)


class FindStatus(IntEnum):
    """C-FIND response statuses (PS3.4 K.4.1.1.4) the worklist answers with."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    """One matching step, with its identifier."""
    CANCELLED = 0xFE00
    """The modality sent C-CANCEL."""
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """A query identifier that cannot be read."""
    UNABLE_TO_PROCESS = 0xC000
    """A calling AE title without a site (rejected at association before)."""


_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
"""rejected-permanent, service-user, calling AE title not recognised (PS3.8 9.3.4)."""


class WorklistScp:
    def __init__(self, settings: WorklistSettings, sites: Sites, view: MergedView) -> None:
        self._settings = settings
        self._sites = sites
        self._view = view
        ae = AE(ae_title=settings.ae_title)
        ae.maximum_associations = settings.max_associations
        ae.network_timeout = settings.network_timeout_s
        ae.require_called_aet = True
        ae.add_supported_context(ModalityWorklistInformationFind)
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("worklist SCP not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_ECHO, lambda _: int(FindStatus.SUCCESS)),
        ]
        self._server = self._ae.start_server(
            (self._settings.dimse_host, self._settings.dimse_port),
            block=False,
            evt_handlers=handlers,
        )
        log.info(
            "Modality Worklist SCP listening",
            extra={"port": self.port, "called_ae": self._settings.ae_title},
        )

    def stop(self) -> None:
        """Stop listening and close open associations (a C-FIND is a read: a modality
        asks again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._ae.shutdown()

    def _on_conn_open(self, event: evt.Event) -> None:
        wrapper = event.assoc.dul.socket
        sock = None if wrapper is None else wrapper.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _calling(self, assoc: Any) -> str:
        primitive = assoc.requestor.primitive
        return str(primitive.calling_ae_title).strip() if primitive else ""

    def _on_requested(self, event: evt.Event) -> None:
        calling = self._calling(event.assoc)
        if self._sites.modality(calling) is None:
            metrics.ASSOCIATIONS_REJECTED.labels("unknown_calling_ae").inc()
            log.warning(
                "worklist association rejected",
                extra={
                    "reason": "unknown_calling_ae",
                    "calling_ae": calling,
                    "peer_address": event.assoc.requestor.address,
                },
            )
            event.assoc.acse.send_reject(*_REJECT_CALLING_AE)
            event.assoc.kill()

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """Pending answers, one per matching step, then success; never raises."""
        started = time.perf_counter()
        calling = self._calling(event.assoc)
        site = self._sites.modality(calling)
        label = site.name if site is not None else "unknown"
        outcome = "failed"
        matched = 0
        try:
            if site is None:  # cannot happen after _on_requested; answered as a refusal
                yield int(FindStatus.UNABLE_TO_PROCESS), None
                return
            try:
                query = event.identifier
                answers = []
                for entry in self._view.open_items(site.visible):
                    answer = match(query, entry.dataset)
                    if answer is not None:
                        answer.SpecificCharacterSet = answer_character_set(
                            site.character_set, answer
                        )
                        answers.append(answer)
            except Exception as exc:  # noqa: BLE001 - a query pydicom cannot read: refused
                log.warning(
                    "worklist query not answerable",
                    extra={"calling_ae": calling, "reason": type(exc).__name__},
                )
                yield int(FindStatus.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS), None
                return
            metrics.FIND_SECONDS.observe(time.perf_counter() - started)
            for answer in answers:
                if event.is_cancelled:
                    outcome = "cancelled"
                    yield int(FindStatus.CANCELLED), None
                    return
                matched += 1
                yield int(FindStatus.PENDING), answer
            outcome = "success"
            yield int(FindStatus.SUCCESS), None
        finally:
            metrics.FIND_REQUESTS.labels(label, outcome).inc()
            metrics.FIND_MATCHES.observe(matched)
            log.info(
                "worklist query answered",
                extra={"calling_ae": calling, "site": label, "count": matched, "outcome": outcome},
            )
