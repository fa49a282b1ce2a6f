"""``--check-config`` reads the rule and sites files the settings name, with the loaders
the services start with: a missing or broken mount fails there (exit 2, naming the
file), and the files deploy/k8s/base ships pass it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.manifests import ROOT
from ingest.__main__ import main as ingest
from report_return.__main__ import main as report_return
from router.__main__ import main as router
from stow_forwarder.__main__ import main as stow_forwarder
from worklist.__main__ import main as worklist

CONFIG = ROOT / "deploy" / "k8s" / "base" / "config"
FILES: list[tuple[Callable[[list[str]], int], dict[str, Path]]] = [
    (router, {"RADFLOW_ROUTER_RULES_FILE": CONFIG / "rules.yaml"}),
    (stow_forwarder, {"RADFLOW_FORWARDER_RULES_FILE": CONFIG / "rules.yaml"}),
    (
        report_return,
        {
            "RADFLOW_REPORT_RETURN_SITES_FILE": CONFIG / "sites.yaml",
            "RADFLOW_REPORT_RETURN_RULES_FILE": CONFIG / "rules.yaml",
        },
    ),
    (ingest, {"RADFLOW_INGEST_RULES_FILE": CONFIG / "rules.yaml"}),
    (worklist, {"RADFLOW_WORKLIST_SITES_FILE": CONFIG / "worklist-sites.yaml"}),
]
IDS = ["router", "stow-forwarder", "report-return", "ingest", "worklist"]


@pytest.mark.parametrize(("main", "files"), FILES, ids=IDS)
def test_check_config_passes_with_the_files_the_base_deployment_mounts(
    main: Callable[[list[str]], int],
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for variable, path in files.items():
        monkeypatch.setenv(variable, str(path))
    assert main(["--check-config"]) == 0, capsys.readouterr().err
    assert "settings are valid" in capsys.readouterr().out


@pytest.mark.parametrize(("main", "files"), FILES, ids=IDS)
def test_check_config_fails_naming_a_missing_or_broken_file(
    main: Callable[[list[str]], int],
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nrules: [\n")
    for variable in files:  # each file in turn: missing, then broken, the others good
        for bad in (tmp_path / "absent.yaml", broken):
            for name, path in files.items():
                monkeypatch.setenv(name, str(bad if name == variable else path))
            assert main(["--check-config"]) == 2, (variable, bad)
            err = capsys.readouterr().err
            assert str(bad) in err, err
            assert "settings are valid" not in err
