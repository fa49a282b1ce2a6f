"""A real DICOM storage SCP on loopback whose answers a test scripts: the on-premise
PACS a DIMSE destination stands for, including the ones that say no.

It is pynetdicom's own SCP (a real association over TCP), answering each C-STORE
with the next status scripted for that SOP Instance UID (0x0000 when nothing is
scripted), and recording what arrived, in which syntax and with which priority.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer


@dataclass
class Received:
    sop_instance_uid: str
    transfer_syntax_uid: str
    priority: int
    dataset: Dataset
    status: int


@dataclass
class DimsePeer:
    port: int
    ae_title: str = "PACS"
    transfer_syntaxes: list[str] = field(default_factory=lambda: list(ALL_TRANSFER_SYNTAXES))
    """What it accepts; e.g. only the uncompressed ones for an old PACS."""
    script: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    """SOP Instance UID → statuses to answer, in order (then 0x0000)."""
    received: list[Received] = field(default_factory=list)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def uncompressed_only(cls, port: int) -> DimsePeer:
        return cls(port, transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    def start(self) -> DimsePeer:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = 4
        for sop_class in _STORAGE_CLASSES.values():
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def stored(self) -> list[str]:
        """SOP Instance UIDs it stored (answered with success), in arrival order."""
        with self._lock:
            return [r.sop_instance_uid for r in self.received if r.status == 0]

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        uid = str(ds.SOPInstanceUID)
        with self._lock:
            queue = self.script.get(uid)
            status = queue.pop(0) if queue else 0x0000
            self.received.append(
                Received(
                    uid,
                    str(event.context.transfer_syntax),
                    int(event.request.Priority),
                    ds,
                    status,
                )
            )
        return status
