"""The STOW-RS concurrency setting: a sensible default, and a bad value names its variable."""

from __future__ import annotations

import pytest

from ingest.settings import IngestConfig, IngestSettings
from radflow_core.errors import ConfigurationError


def test_parts_of_a_request_are_claim_checked_eight_at_a_time_by_default() -> None:
    assert IngestSettings.from_env({}).stow_concurrency == 8
    settings = IngestSettings.from_env({"RADFLOW_INGEST_STOW_CONCURRENCY": "1"})
    assert settings.stow_concurrency == 1


@pytest.mark.parametrize("value", ["0", "-3", "many", "100000"])
def test_bad_concurrency_fails_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError, match="RADFLOW_INGEST_STOW_CONCURRENCY"):
        IngestConfig.from_env({"RADFLOW_INGEST_STOW_CONCURRENCY": value})
