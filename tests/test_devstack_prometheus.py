"""make run's Prometheus: the configuration it is given, and a start that cannot be
fooled by another Prometheus already on the port."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import yaml

from radflow_devstack.processes import StartupFailed, free_port
from radflow_devstack.prometheus import (
    _epoch_s,
    duration,
    duration_s,
    find_alerts_file,
    plain_rules,
    start_prometheus,
    write_config,
)


def test_durations_are_read_with_several_units_and_written_without_fractions() -> None:
    assert duration_s("5m") == 300
    assert duration_s("1h30m") == 5400
    assert duration_s("250ms") == 0.25
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        duration_s("1.5m")  # Prometheus has no fractions either
    assert duration(2) == "2s"
    assert duration(0.5) == "500ms"  # "0.5s" would not load
    assert duration(1.25) == "1250ms"


def test_the_api_s_times_are_read_to_the_nanosecond() -> None:
    assert _epoch_s("1970-01-01T00:00:01.5Z") == 1.5
    assert _epoch_s("2026-12-02T07:30:00.123456789Z") == pytest.approx(1796196600.123456789)
    assert _epoch_s("2026-12-02T07:30:00Z") == 1796196600


def test_a_capped_for_is_shortened_and_the_expressions_are_left_as_shipped() -> None:
    alerts = find_alerts_file()
    assert alerts is not None
    shipped = plain_rules(alerts)
    capped = plain_rules(alerts, max_for_s=2.5)
    for before, after in zip(shipped["groups"], capped["groups"], strict=True):
        for old, new in zip(before["rules"], after["rules"], strict=True):
            assert new["expr"] == old["expr"]
            if "for" in old:
                assert duration_s(new["for"]) == min(duration_s(old["for"]), 2.5)
    assert any("for" in r for g in shipped["groups"] for r in g["rules"])


def test_the_configuration_names_jobs_and_labels_as_the_cluster_does(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ingest": 8085}, rules={"groups": []}, scrape_interval_s=0.5)
    config = yaml.safe_load(path.read_text())
    assert config["global"]["scrape_interval"] == "500ms"
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "radflow-ingest"
    (static,) = job["static_configs"]
    assert static == {
        "targets": ["127.0.0.1:8085"],
        "labels": {"namespace": "radflow", "service": "radflow-ingest"},
    }
    assert Path(config["rule_files"][0]).is_file()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_a_port_already_taken_is_refused_rather_than_taken_for_ready(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(StartupFailed, match="already listens"):
            start_prometheus(port, {"ingest": free_port()}, tmp_path, rules=None)
