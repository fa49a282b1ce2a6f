"""The lane an instance travels in from the front door on: STAT or routine.

A STAT instance must not wait behind a routine backlog anywhere, so the lane is chosen
here, before the first queue, and every stage reads the STAT topics ahead of the
routine ones. What STAT means is the site's rule file's ``stat:`` policy (C-STORE
priority HIGH, Requested Procedure Priority STAT, listed calling AE titles), the same
one the router applies, read from the same file (``RADFLOW_INGEST_RULES_FILE``) and
watched for changes like the router watches it.

Ingest is the front door: a rule file that is missing or invalid never stops it from
receiving. Until a valid file is seen every instance takes the routine lane (the
router still sends a STAT instance on the STAT delivery lane), and the problem is
logged and shown by ``radflow_ingest_rules_valid``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ingest import metrics
from radflow_core.events import Lane, Sender
from radflow_core.instance_header import InstanceHeader
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError

log = logging.getLogger(__name__)

RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)


class Lanes:
    """Chooses each instance's lane by the rule file's STAT policy (routine without one)."""

    def __init__(self, rules_file: Path | None) -> None:
        self._rules = LiveRules(rules_file, RULES_METRICS) if rules_file is not None else None

    def load(self) -> None:
        """Read the rule file at start; a problem is logged, never raised."""
        if self._rules is None:
            metrics.RULES_VALID.set(1)  # nothing configured, nothing wrong
            log.info("no rule file: every instance takes the routine lane")
            return
        try:
            self._rules.load()
        except RuleFileError as exc:
            metrics.RULES_VALID.set(0)
            log.error(  # noqa: TRY400 - its problems are the message, not a traceback
                "the rule file cannot be used; every instance takes the routine lane "
                "until a valid one is seen",
                extra={"problems": exc.lines},
            )

    async def watch(self, interval_s: float) -> None:
        """Apply valid changes of the rule file (forever; cancel to stop)."""
        if self._rules is not None:
            await self._rules.watch(interval_s)

    def lane(self, header: InstanceHeader, sender: Sender, dimse_priority: str) -> Lane:
        if self._rules is None or not self._rules.loaded:
            return Lane.ROUTINE
        attributes = {
            "RequestedProcedurePriority": header.requested_procedure_priority,
            "calling_ae": sender.calling_ae,
            "sender_identity": sender.identity,
        }
        stat = self._rules.current.stat.is_stat(attributes, dimse_priority)
        return Lane.STAT if stat else Lane.ROUTINE
