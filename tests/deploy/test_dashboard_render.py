"""The dashboard renderer (deploy/monitoring/render_dashboard.py) draws every row of the
shipped dashboard from a real Prometheus, each panel with its title, and says "No data"
where Prometheus has nothing; and docs/operations.md shows a committed picture of every
row, made by it (make dashboard-images)."""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from deploy.manifests import ROOT, dashboards
from radflow_devstack.processes import free_port
from radflow_devstack.prometheus import PrometheusApi, start_prometheus
from support.dicom import make_instance
from support.stow import stow

RENDERER = ROOT / "deploy" / "monitoring" / "render_dashboard.py"
IMAGES = ROOT / "docs" / "images" / "dashboard"
OPERATIONS = ROOT / "docs" / "operations.md"


@functools.cache
def renderer() -> ModuleType:
    """The script, imported as a module (it lives in deploy/, not in a package)."""
    spec = importlib.util.spec_from_file_location("render_dashboard", RENDERER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_dashboard"] = module  # its dataclasses look themselves up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.pipeline
def test_every_row_is_drawn_from_a_live_prometheus_with_no_data_panels_marked(
    start_ingest, tmp_path: Path
) -> None:
    ingest = start_ingest()
    prometheus = start_prometheus(
        free_port(), {"ingest": ingest.ops_port}, tmp_path, rules=None, scrape_interval_s=1
    )
    try:
        api = PrometheusApi(f"http://127.0.0.1:{prometheus.port}")
        for i in range(3):
            answer = stow(ingest.stow_url, [make_instance(tmp_path / f"{i}.dcm").read_bytes()])
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 60
        while not api.query("count_over_time(radflow_ingest_instances_total[5m]) >= 3"):
            assert time.monotonic() < deadline, "Prometheus never scraped ingest's counter"
            time.sleep(0.5)
        module = renderer()
        window = module.make_window(api, 2)
        dashboard = dashboards()["radflow-overview.json"]
        images = module.render_dashboard(api, dashboard, tmp_path / "out", window, dpi=50)
    finally:
        prometheus.stop()

    rows = module.rows(dashboard)
    # Nothing was forwarded: no value of $destination, so its repeated row is drawn once.
    assert [i.path.name for i in images] == [
        f"{module.row_stem(dashboard, r)}.png" for r, _ in rows
    ]
    for image, (row, panels) in zip(images, rows, strict=True):
        assert image.path.is_file(), image.path
        with Image.open(image.path) as png:
            assert png.format == "PNG" and png.width >= 700, image.path
        expected = sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
        assert [p.title for p in image.panels] == [p["title"] for p in expected], row
    drawn = {p.title: p.has_data for i in images for p in i.panels}
    # What ingest exports has data; what only other services export says "No data".
    assert drawn["Stored / s"] is True
    assert drawn["Open DIMSE associations and sends in flight"] is True
    assert drawn["Dead letters (1h)"] is True, "or vector(0) answers 0: that is data"
    assert drawn["Rule file valid"] is False
    assert drawn["HL7 ACK outcomes by site"] is False
    assert drawn["Circuit breaker by destination"] is False
    assert drawn["Compression ratio (original / canonical)"] is False


def test_variables_are_replaced_as_grafana_does_for_all() -> None:
    module = renderer()
    values = {"namespace": ".*", "destination": "orthanc", "__rate_interval": "20s"}
    expr = 'rate(x{namespace=~"$namespace", d="${destination}"}[$__rate_interval])'
    assert module.substitute(expr, values) == 'rate(x{namespace=~".*", d="orthanc"}[20s])'
    assert module.legend_name("p95 {{destination}} {{lane}}", {"destination": "a"}, "q") == "p95 a"
    window = module.Window(start=0, end=900, step_s=5, scrape_interval_s=30)
    assert window.rate_interval_s == 120  # four scrapes, as Grafana's $__rate_interval
    assert module.format_value(0.35, "s") == "350 ms"
    assert module.format_value(1.5, "ops") == "1.5 ops/s"


def test_every_row_of_the_shipped_dashboard_has_its_picture_shown_in_the_operations_guide() -> None:
    module = renderer()
    text = OPERATIONS.read_text()
    shown = set(re.findall(r"!\[[^\]]*\]\(images/dashboard/([^)\s]+\.png)\)", text))
    committed = {p.name for p in IMAGES.glob("*.png")}
    expected: set[str] = set()
    for name, dashboard in dashboards().items():
        for row, _ in module.rows(dashboard):
            stem = module.row_stem(dashboard, row)
            if row.get("repeat"):  # one picture per value the variable had
                found = {c for c in committed if c.startswith(f"{stem}-")} or {f"{stem}.png"}
            else:
                found = {f"{stem}.png"}
            assert found <= committed, f"{name}, row {row['title']!r}: no {found - committed}"
            assert found <= shown, f"docs/operations.md does not show {found - shown}"
            expected |= found
    assert committed <= expected, f"pictures of no row: {committed - expected}"
    assert shown <= committed, f"docs/operations.md shows missing pictures: {shown - committed}"
    sizes = {p.name: p.stat().st_size for p in IMAGES.glob("*.png")}
    assert sum(sizes.values()) < 600_000, f"keep the pictures small: {sizes}"
