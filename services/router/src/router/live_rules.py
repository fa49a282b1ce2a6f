"""The rules in force, and hot reload: a changed file takes effect without a restart;
an invalid change is rejected, logged with its lines, and the last valid rules stay.

Changes are detected by content (sha256), not mtime, so the symlink swap Kubernetes
does when a ConfigMap changes is seen like any edit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from router.loader import RuleFileError, load_text, read_text
from router.metrics import RULES_GENERATION, RULES_RELOADS, RULES_VALID
from router.rules import RuleSet

log = logging.getLogger(__name__)


class LiveRules:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._digest: str | None = None
        self._rules: RuleSet | None = None
        self._rejected: str | None = None
        self.generation = 0

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
        RULES_RELOADS.labels("applied").inc()
        return True

    async def watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.reload()

    def _read(self) -> tuple[str, str]:
        text = read_text(self.path)
        return text, hashlib.sha256(text.encode("utf-8")).hexdigest()

    def _apply(self, rules: RuleSet, digest: str) -> None:
        self._rules, self._digest = rules, digest
        self.generation += 1
        RULES_GENERATION.set(self.generation)
        RULES_VALID.set(1)
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
        if digest is not None and digest == self._rejected:
            return False  # already reported this version of the file
        self._rejected = digest
        # Log first: whoever sees the metric move must find the reason already logged.
        log.error(
            "rule file change rejected; the last valid rules stay in force",
            extra={
                "problems": exc.lines,
                "rules_digest": self.current.digest,
            },
        )
        RULES_VALID.set(0)
        RULES_RELOADS.labels("rejected").inc()
        return False
