"""The rules in force, and hot reload: a changed file takes effect without a restart;
an invalid change is rejected, logged with its lines, and the last valid rules stay.

Changes are detected by content (sha256), not mtime, so the symlink swap Kubernetes
does when a ConfigMap changes is seen like any edit. The router, ingest (its STAT
policy) and the forwarder (its destinations) each watch the file with metric families
of their own, passed in: nothing here registers a metric.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from radflow_core.audit import Auditor
from radflow_rules.loader import RuleFileError, load_text, read_text
from radflow_rules.rules import RuleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RulesMetrics:
    """The metric families a service reports its rule file's state with (its own names)."""

    generation: Gauge
    """Valid rule files applied since start (1 after start)."""
    valid: Gauge
    """1 while the file on disk is the one in use; 0 after a rejected change."""
    reloads: Counter
    """Changes seen, by outcome: applied, rejected."""


class LiveRules:
    def __init__(self, path: Path, metrics: RulesMetrics, audit: Auditor | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self._audit = audit
        """Writes a Software Configuration security alert for each change applied or
        rejected on reload."""
        self._digest: str | None = None
        self._rules: RuleSet | None = None
        self._rejected: str | None = None
        self.generation = 0

    @property
    def loaded(self) -> bool:
        """True once a valid file was applied (at start or by a later reload)."""
        return self._rules is not None

    @property
    def current(self) -> RuleSet:
        if self._rules is None:
            raise RuntimeError("rules not loaded yet")
        return self._rules

    def load(self) -> RuleSet:
        """Load the file at start.

        Raises:
            RuleFileError: the router must not start with it.
        """
        text, digest = self._read()
        self._apply(load_text(text, str(self.path)), digest)
        return self.current

    def reload(self) -> bool:
        """Check the file; apply a valid change. True if new rules took effect."""
        try:
            text, digest = self._read()
        except RuleFileError as exc:
            return self._reject(exc, None)
        if digest == self._digest:
            return False
        try:
            rules = load_text(text, str(self.path))
        except RuleFileError as exc:
            return self._reject(exc, digest)
        self._apply(rules, digest)
        self._metrics.reloads.labels("applied").inc()
        if self._audit is not None:
            self._audit.configuration_change(self.path, accepted=True, digest=digest)
        return True

    async def watch(
        self,
        interval_s: float,
        on_change: Callable[[RuleSet], Awaitable[None]] | None = None,
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if self.reload() and on_change is not None:
                await on_change(self.current)

    def _read(self) -> tuple[str, str]:
        text = read_text(self.path)
        return text, hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _apply(self, rules: RuleSet, digest: str) -> None:
        self._rules, self._digest, self._rejected = rules, digest, None
        self.generation += 1
        self._metrics.generation.set(self.generation)
        self._metrics.valid.set(1)
        log.info(
            "rules in force",
            extra={
                "rules_digest": rules.digest,
                "generation": self.generation,
                "rules": len(rules.rules),
                "destinations": len(rules.destinations),
            },
        )
        for warning in rules.warnings:
            log.warning("rule file warning", extra={"problem": warning})

    def _reject(self, exc: RuleFileError, digest: str | None) -> bool:
        seen = digest or "unreadable"
        if seen == self._rejected:
            return False  # already reported this version of the file (or its absence)
        self._rejected = seen
        # Log first: whoever sees the metric move must find the reason already logged.
        log.error(
            "rule file change rejected; the last valid rules stay in force",
            extra={
                "problems": exc.lines,
                "rules_digest": self._rules.digest if self._rules else None,
            },
        )
        self._metrics.valid.set(0)
        self._metrics.reloads.labels("rejected").inc()
        if self._audit is not None:
            self._audit.configuration_change(
                self.path, accepted=False, digest=digest, problem="; ".join(exc.lines)
            )
        return False
