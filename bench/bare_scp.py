"""The "Python floor": a bare pynetdicom storage SCP that only writes what it receives
to disk, as pynetdicom's documentation recommends (``event.encoded_dataset()``: the
received bytes behind a file meta, no decoding), with TCP_NODELAY on like ours. No S3, no Kafka, no
checks: what ingest would cost without its claim check.

    python bench/bare_scp.py PORT OUTDIR        # AE title BARESCP; prints "ready"
"""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import _STORAGE_CLASSES

from radflow_core.transfer_syntaxes import ACCEPTED


def main() -> None:
    port, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)

    def on_store(event: Any) -> int:
        path = out / f"{event.request.AffectedSOPInstanceUID}.dcm"
        path.write_bytes(event.encoded_dataset())
        return 0x0000

    def on_open(event: Any) -> None:
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title="BARESCP")
    ae.maximum_associations = 32
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, list(ACCEPTED))
    ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open)],
    )
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
