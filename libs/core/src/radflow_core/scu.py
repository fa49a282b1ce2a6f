"""pynetdicom as a sender (SCU): keep each response for the request that waits for it.

pynetdicom runs a reactor thread per association that takes every decoded DIMSE
message off the association's queue and serves it as a request. A ``send_c_store``
(and every other ``send_*``) pauses that reactor while it waits for its response: it
clears a checkpoint and waits until the reactor says it is paused. The reactor says
so *before* it stops at the checkpoint, so one that has just gone past the checkpoint
still reads as paused: the sender goes on, and when the peer answers quickly and the
reactor thread is scheduled before the sender's (a loaded machine), the reactor takes
the response, drops it as "Received unexpected C-STORE service message" (a warning
on the ``pynetdicom`` logger) and the sender waits out its whole DIMSE timeout for a
response that already came, then aborts the association (pynetdicom 3.0.4).

Seen as the paced pynetdicom sender of bench/pipeline_vs_orthanc.py cut after its
30 s DIMSE timeout (in 2 of 9 runs, once more in another) although ingest, caught in
the act, had answered in 12 ms; in the forwarder it is a delivery to a DIMSE
destination that waits ``request_timeout_s``, is retried on a new association and
reaches the PACS twice.

:func:`keep_responses` closes the gap without touching pynetdicom's timing: the
reactor (the only caller of the non-blocking ``get_msg``) takes a message off the
queue only when it is a request; a response stays there for the ``send_*`` waiting
for it (the only callers of the blocking ``get_msg``). pynetdicom is not imported
here: only the association's DIMSE provider is touched.
"""

from __future__ import annotations

from typing import Any

_GUARDED = "_radflow_keeps_responses"


def keep_responses(assoc: Any) -> Any:
    """Make ``assoc``'s reactor leave responses for the sender; returns ``assoc``.

    Call it right after ``AE.associate()`` (on an established association, before the
    first ``send_*``); calling it twice changes nothing. Requests from the peer (a
    C-STORE sub-operation of a C-GET, say) are still served by the reactor.
    """
    dimse = assoc.dimse
    if getattr(dimse, _GUARDED, False):
        return assoc
    waiting = dimse.msg_queue
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if block:
            return blocking_get(block=True)  # type: ignore[no-any-return]
        # The reactor: under the queue's own lock, so the head it looks at is the one
        # it takes.
        with waiting.mutex:
            # (None, None) is pynetdicom's wake-up for a waiting sender when the
            # association is aborted or its connection closes: the sender's too.
            head = waiting.queue[0][1] if waiting.queue else None
            if head is None or not head.is_valid_request:
                return None, None
            item = waiting.queue.popleft()
            waiting.not_full.notify()
        return item  # type: ignore[no-any-return]

    dimse.get_msg = get_msg
    setattr(dimse, _GUARDED, True)
    return assoc
