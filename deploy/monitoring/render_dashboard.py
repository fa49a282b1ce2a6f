"""Draw each row of a shipped Grafana dashboard from a live Prometheus: one PNG per row.

So that an operator sees what the dashboard looks like before deploying it, and so that
docs/operations.md shows pictures made from real series rather than mock-ups. It is not
Grafana: it reads the dashboard JSON (deploy/k8s/base/monitoring/dashboards/) and asks
Prometheus the panels' own queries over a window, with Grafana's variables replaced as
Grafana would for "All" (``$namespace`` → its ``allValue``, ``.*``), ``$__rate_interval``
computed from the scrape interval as Grafana computes it, and a repeated row
(``repeat: destination``) drawn once per value the variable has in that window. Each
panel sits at its ``gridPos``, with its title and unit; a time series is lines with its
legend (last and max, as the dashboard asks), a stat its last value coloured by its
thresholds, a state timeline coloured bands with the value mappings' names, a table,
bar gauge or gauge the last value of each series. A panel whose queries return nothing
says "No data", as Grafana does; nothing is drawn that Prometheus did not answer.

    .venv/bin/python deploy/monitoring/render_dashboard.py \\
        --prometheus http://127.0.0.1:9090 --window 15m --out /tmp/dashboard

``make dashboard-images`` runs it on the local stack under a workload
(deploy/monitoring/dashboard_images.py) to remake docs/images/dashboard/.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, MultipleLocator
from PIL import Image

from radflow_devstack.prometheus import PrometheusApi, duration_s

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "dashboards"

Obj = dict[str, Any]

FIGURE_WIDTH_IN = 16.0
"""Grafana's 24 grid columns across this width."""
GRID_HEIGHT_IN = 0.42
"""One gridPos height unit (Grafana: 30 px plus margin, about half a column)."""
ROW_HEADER_IN = 0.42
PANEL_TITLE_IN = 0.27
LEGEND_LINE_IN = 0.145
POINTS = 240
"""Samples per series across the window (Grafana asks about one per pixel column)."""

PALETTE = (
    "#7EB26D", "#EAB839", "#6ED0E0", "#EF843C", "#E24D42", "#1F78C1", "#BA43A9",
    "#705DA0", "#508642", "#CCA300", "#447EBC", "#C15C17", "#890F02", "#0A437C",
)  # fmt: skip
"""Grafana's classic series colours, in its order."""
NAMED_COLOURS = {
    "green": "#56A64B",
    "red": "#E02F44",
    "yellow": "#F2CC0C",
    "orange": "#FF9830",
    "blue": "#3274D9",
    "purple": "#A352CC",
    "transparent": "#FFFFFF00",
    "text": "#464C54",
}
"""Grafana's names for its base colours, as its light theme draws them."""
TEXT = "#24292E"
MUTED = "#6E7781"
PANEL_EDGE = "#D0D7DE"
PANEL_FACE = "#FFFFFF"
PAGE = "#F4F5F5"


def colour(name: str | None, default: str = PALETTE[0]) -> str:
    if not name:
        return default
    return NAMED_COLOURS.get(name, name)


# --- the dashboard model -------------------------------------------------------------


@dataclass
class Row:
    """One row as drawn: the row panel of the JSON, its panels and, for a row Grafana
    repeats, the variable and the value this copy is for."""

    template: Obj
    panels: list[Obj]
    repeat: str | None = None
    value: str | None = None


def rows(dashboard: Obj) -> list[tuple[Obj, list[Obj]]]:
    """The dashboard's rows with their panels, in order: a row's panels are those
    nested in it (a collapsed row) and those after it up to the next row. Panels above
    the first row form a row of their own, titled as the dashboard."""
    found: list[tuple[Obj, list[Obj]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.append((panel, list(panel.get("panels", []))))
        elif not found:
            found.append(({"type": "row", "title": dashboard["title"]}, [panel]))
        else:
            found[-1][1].append(panel)
    return [(row, panels) for row, panels in found if panels]


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Grafana's ``$var``, ``${var}``, ``${var:format}`` and ``[[var]]`` replaced by
    ``values``; unknown names are left as they are."""

    def one(found: re.Match[str]) -> str:
        name = found.group(1) or found.group(2) or found.group(3)
        return values.get(name, found.group(0))

    return _VARIABLE.sub(one, text)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "row"


def row_stem(dashboard: Obj, row: Obj, value: str | None = None) -> str:
    """The file name (without .png) of a row's image: the dashboard's uid and the row's
    title without its variables, then the repeat value for a repeated row."""
    title = _VARIABLE.sub("", row.get("title", ""))
    stem = f"{dashboard['uid']}-{slug(title)}"
    return f"{stem}-{slug(value)}" if value is not None else stem


def legend_name(template: str, metric: Mapping[str, str], expr: str) -> str:
    """A series' name as Grafana shows it: the target's legendFormat with ``{{label}}``
    filled in, or else its labels, or else the query."""
    if template:
        return " ".join(_LEGEND.sub(lambda m: metric.get(m.group(1), ""), template).split())
    labels = {k: v for k, v in metric.items() if k != "__name__"}
    if labels:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        return f"{metric.get('__name__', '')}{{{inner}}}"
    return expr


# --- asking Prometheus ---------------------------------------------------------------


@dataclass
class Series:
    name: str
    ref_id: str
    times: np.ndarray
    values: np.ndarray

    @property
    def has_data(self) -> bool:
        return bool(np.isfinite(self.values).any())

    def last(self) -> float | None:
        finite = self.values[np.isfinite(self.values)]
        return float(finite[-1]) if finite.size else None

    def max(self) -> float | None:
        finite = self.values[np.isfinite(self.values)]
        return float(finite.max()) if finite.size else None


@dataclass
class Window:
    start: float
    end: float
    step_s: float
    scrape_interval_s: float

    @property
    def rate_interval_s(self) -> float:
        """Grafana's ``$__rate_interval``: max($__interval + scrape interval, 4 x scrape
        interval), so a rate always spans at least four samples."""
        return max(self.step_s + self.scrape_interval_s, 4 * self.scrape_interval_s)

    def builtins(self) -> dict[str, str]:
        return {
            "__rate_interval": f"{round(self.rate_interval_s)}s",
            "__interval": f"{round(self.step_s)}s",
            "__interval_ms": str(round(self.step_s * 1000)),
            "__range": f"{round(self.end - self.start)}s",
            "__range_s": str(round(self.end - self.start)),
        }


def make_window(api: PrometheusApi, minutes: float, end: float | None = None) -> Window:
    """The last ``minutes`` up to ``end`` (now), about :data:`POINTS` samples across but
    never finer than Prometheus scrapes."""
    end = time.time() if end is None else end
    scrape = api.scrape_interval_s()
    span = minutes * 60
    step = max(scrape, math.ceil(span / POINTS))
    return Window(start=end - span, end=end, step_s=step, scrape_interval_s=scrape)


def panel_series(
    api: PrometheusApi, panel: Obj, values: Mapping[str, str], window: Window
) -> list[Series]:
    """Every series the panel's targets answer over the window."""
    found: list[Series] = []
    for target in panel.get("targets", []):
        if target.get("hide") or not target.get("expr"):
            continue
        expr = substitute(target["expr"], values)
        for result in api.query_range(expr, window.start, window.end, window.step_s):
            points = result.get("values", [])
            times = np.array([float(t) for t, _ in points])
            data = np.array([float(v) for _, v in points])  # "NaN", "+Inf" parse too
            data[~np.isfinite(data)] = np.nan
            name = legend_name(target.get("legendFormat", ""), result["metric"], expr)
            found.append(Series(name, target.get("refId", ""), times, data))
    return found


def variable_values(
    api: PrometheusApi, dashboard: Obj, window: Window
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(what each variable stands for when "All" is chosen, the values each query
    variable has in the window). Query variables are Grafana's
    ``label_values(selector, label)``."""
    chosen: dict[str, str] = {}
    listed: dict[str, list[str]] = {}
    for variable in dashboard.get("templating", {}).get("list", []):
        name = variable["name"]
        if variable["type"] != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        text = substitute(text, chosen)
        found = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", text)
        values = (
            api.label_values(found.group(1), found.group(2), window.start, window.end)
            if found
            else []
        )
        listed[name] = values
        if variable.get("allValue"):
            chosen[name] = variable["allValue"]
        else:
            chosen[name] = "(" + "|".join(re.escape(v) for v in values) + ")" if values else ".*"
    return chosen, listed


# --- units ---------------------------------------------------------------------------


def _short(value: float) -> str:
    magnitude = abs(value)
    for limit, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " Mil"), (1e3, " K")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    if magnitude == 0:
        return "0"
    if magnitude >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _seconds(value: float) -> str:
    magnitude = abs(value)
    if magnitude == 0:
        return "0 s"
    for limit, divisor, unit in (
        (86400, 86400, "day"),
        (3600, 3600, "hour"),
        (60, 60, "min"),
        (1, 1, "s"),
        (1e-3, 1e-3, "ms"),
    ):
        if magnitude >= limit:
            return f"{value / divisor:.3g} {unit}"
    return f"{value / 1e-6:.3g} µs"


def format_value(value: float | None, unit: str | None) -> str:
    """A value as Grafana prints it in the panel's unit (the units the dashboards use;
    any other unit is a suffix)."""
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "s":
        return _seconds(value)
    if unit == "ops":
        return f"{_short(value)} ops/s"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "percent":
        return f"{value:.3g}%"
    if unit in (None, "", "short", "none"):
        return _short(value)
    return f"{_short(value)} {unit}"


# --- drawing -------------------------------------------------------------------------


@dataclass
class PanelImage:
    title: str
    type: str
    has_data: bool


@dataclass
class RowImage:
    title: str
    path: Path
    panels: list[PanelImage] = field(default_factory=list)


class Canvas:
    """A row's figure, addressed in Grafana's grid units (x 0 to 24 across, y down)."""

    def __init__(self, title: str, subtitle: str, top: int, height: int) -> None:
        self.top = top
        self.height_in = ROW_HEADER_IN + height * GRID_HEIGHT_IN
        self.figure: Figure = plt.figure(
            figsize=(FIGURE_WIDTH_IN, self.height_in), facecolor=PAGE, dpi=100
        )
        self.figure.text(
            0.006, 1 - 0.1 / self.height_in, title, fontsize=11, fontweight="bold",
            color=TEXT, va="top",
        )  # fmt: skip
        self.figure.text(
            0.994, 1 - 0.12 / self.height_in, subtitle, fontsize=7, color=MUTED,
            va="top", ha="right",
        )  # fmt: skip

    def box(self, grid: Mapping[str, int]) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) in inches of a panel's gridPos, with a gap."""
        gap = 0.05
        left = grid["x"] / 24 * FIGURE_WIDTH_IN + gap
        width = grid["w"] / 24 * FIGURE_WIDTH_IN - 2 * gap
        top = ROW_HEADER_IN + (grid["y"] - self.top) * GRID_HEIGHT_IN + gap
        height = grid["h"] * GRID_HEIGHT_IN - 2 * gap
        return left, self.height_in - top - height, width, height

    def fraction(
        self, left: float, bottom: float, width: float, height: float
    ) -> tuple[float, float, float, float]:
        return (
            left / FIGURE_WIDTH_IN,
            bottom / self.height_in,
            width / FIGURE_WIDTH_IN,
            height / self.height_in,
        )

    def text(self, x_in: float, y_in: float, text: str, **style: Any) -> None:
        self.figure.text(x_in / FIGURE_WIDTH_IN, y_in / self.height_in, text, **style)


def _fit(text: str, width_in: float, fontsize: float) -> str:
    """``text`` cut with an ellipsis to about ``width_in`` at ``fontsize``."""
    chars = max(4, int(width_in / (fontsize * 0.55 / 72)))
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _thresholds(panel: Obj) -> list[tuple[float, str]]:
    steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
    return [
        (-math.inf if s.get("value") is None else float(s["value"]), colour(s.get("color")))
        for s in steps
    ]


def threshold_colour(panel: Obj, value: float | None, default: str) -> str:
    found = default
    for limit, shade in _thresholds(panel):
        if value is not None and value >= limit:
            found = shade
    return found


def mapped(panel: Obj, value: float | None) -> tuple[str | None, str | None]:
    """(text, colour) a value mapping gives ``value``, or (None, None)."""
    if value is None:
        return None, None
    for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", []):
        if mapping.get("type") == "value":
            for key, result in mapping.get("options", {}).items():
                try:
                    if float(key) == value:
                        return result.get("text"), colour(result.get("color"), "")
                except ValueError:
                    continue
        if mapping.get("type") == "range":
            options = mapping.get("options", {})
            low = options.get("from")
            high = options.get("to")
            if (low is None or value >= low) and (high is None or value <= high):
                result = options.get("result", {})
                return result.get("text"), colour(result.get("color"), "")
    return None, None


def _unit(panel: Obj) -> str | None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    return str(unit) if unit else None


def _override_style(panel: Obj, series: Series) -> dict[str, Any]:
    """Line style, fill and colour a fieldConfig override gives the series (matched by
    query refId or by name)."""
    style: dict[str, Any] = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        hit = (matcher.get("id") == "byFrameRefID" and matcher.get("options") == series.ref_id) or (
            matcher.get("id") == "byName" and matcher.get("options") == series.name
        )
        if not hit:
            continue
        for prop in override.get("properties", []):
            if prop["id"] == "custom.lineStyle" and prop["value"].get("fill") == "dash":
                style["linestyle"] = (0, (5, 4))
            elif prop["id"] == "custom.fillOpacity":
                style["fill"] = float(prop["value"]) / 100
            elif prop["id"] == "color" and prop["value"].get("mode") == "fixed":
                style["color"] = colour(prop["value"].get("fixedColor"))
    return style


def _frame(canvas: Canvas, panel: Obj, title: str) -> tuple[float, float, float, float]:
    """Draw the panel's box and title; returns the inner area (inches) below the title."""
    left, bottom, width, height = canvas.box(panel["gridPos"])
    canvas.figure.patches.append(
        FancyBboxPatch(
            (left / FIGURE_WIDTH_IN, bottom / canvas.height_in),
            width / FIGURE_WIDTH_IN,
            height / canvas.height_in,
            boxstyle="round,pad=0,rounding_size=0.002",
            transform=canvas.figure.transFigure,
            facecolor=PANEL_FACE,
            edgecolor=PANEL_EDGE,
            linewidth=0.8,
            zorder=-1,  # under the panel's axes, which figure patches are drawn after
        )
    )
    canvas.text(
        left + 0.08, bottom + height - 0.07, _fit(title, width - 0.2, 8.5),
        fontsize=8.5, fontweight="bold", color=TEXT, va="top",
    )  # fmt: skip
    return left, bottom, width, height - PANEL_TITLE_IN


def _no_data(canvas: Canvas, area: tuple[float, float, float, float]) -> None:
    left, bottom, width, height = area
    canvas.text(
        left + width / 2, bottom + height / 2, "No data",
        fontsize=12, color=MUTED, ha="center", va="center", style="italic",
    )  # fmt: skip


def _time_axis(axes: Axes, window: Window) -> None:
    """Unix seconds across, labelled HH:MM (UTC) every round number of minutes."""
    axes.set_xlim(window.start, window.end)
    span = window.end - window.start
    every = next(
        (s for s in (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200) if span / s <= 7),
        86400,
    )
    margin = span * 0.04  # no label half under the value axis's
    first = math.ceil((window.start + margin) / every) * every
    ticks = range(first, int(window.end - margin) + 1, every)
    axes.xaxis.set_major_locator(FixedLocator(list(ticks)))
    axes.xaxis.set_major_formatter(
        FuncFormatter(lambda t, _: f"{datetime.fromtimestamp(t, UTC):%H:%M}")
    )


def _style_axes(axes: Axes) -> None:
    axes.set_facecolor(PANEL_FACE)
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    axes.spines["bottom"].set_color(PANEL_EDGE)
    axes.tick_params(labelsize=6.5, colors=MUTED, length=0, pad=2)
    axes.grid(True, color="#EBEDF0", linewidth=0.6)


def _value_axis(axes: Axes, shown: list[Series], unit: str | None) -> None:
    """From 0 (or the lowest value) to a little above the highest, with about four
    ticks at round numbers of the unit the labels use (seconds: ms, s, min or hours)."""
    values = np.concatenate([s.values[np.isfinite(s.values)] for s in shown])
    low, high = min(0.0, float(values.min())), float(values.max())
    if high <= low:
        high = low + 1
    scale = 1.0
    if unit == "s":
        magnitude = max(abs(low), abs(high))
        scale = next((d for d in (86400, 3600, 60, 1) if magnitude >= d), 0.001)
    raw = (high - low) / scale / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m for m in (1, 2, 2.5, 5, 10) if m * power >= raw) * power * scale
    axes.set_ylim(low, high + (high - low) * 0.08)
    axes.yaxis.set_major_locator(MultipleLocator(step))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, unit)))


def draw_timeseries(
    canvas: Canvas, panel: Obj, title: str, series: list[Series], window: Window
) -> bool:
    left, bottom, width, height = _frame(canvas, panel, title)
    shown = [s for s in series if s.has_data]
    if not shown:
        _no_data(canvas, (left, bottom, width, height))
        return False
    legend = panel.get("options", {}).get("legend", {})
    calcs = [c for c in legend.get("calcs", []) if c in ("lastNotNull", "last", "max", "mean")]
    show_legend = legend.get("showLegend", True) and legend.get("displayMode") != "hidden"
    max_lines = max(1, int((height * 0.45) / LEGEND_LINE_IN) - 1)
    legend_rows = min(len(shown), max_lines) + (1 if len(shown) > max_lines else 0)
    legend_in = (legend_rows + (1 if calcs else 0)) * LEGEND_LINE_IN + 0.05 if show_legend else 0
    plot = (left + 0.62, bottom + legend_in + 0.22, width - 0.75, height - legend_in - 0.3)
    axes = canvas.figure.add_axes(canvas.fraction(*plot))
    _style_axes(axes)
    unit = _unit(panel)
    custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
    fill = float(custom.get("fillOpacity", 0)) / 100
    colours: list[str] = []
    for i, s in enumerate(shown):
        style: dict[str, Any] = {"color": PALETTE[i % len(PALETTE)], "linestyle": "-"}
        style["fill"] = fill
        style.update(_override_style(panel, s))
        colours.append(style["color"])
        x = s.times
        axes.plot(x, s.values, color=style["color"], linestyle=style["linestyle"], linewidth=1.1)
        if style["fill"] > 0:
            axes.fill_between(
                x, s.values, 0, color=style["color"], alpha=style["fill"], linewidth=0
            )
    _time_axis(axes, window)
    _value_axis(axes, shown, unit)
    if custom.get("thresholdsStyle", {}).get("mode") in ("dashed", "line", "line+area"):
        low, high = axes.get_ylim()
        for limit, shade in _thresholds(panel):
            if low < limit < high:
                axes.axhline(limit, color=shade, linestyle=(0, (4, 3)), linewidth=0.9)
    if show_legend:
        _legend(canvas, (left, bottom, width, legend_in), shown, colours, calcs, unit, max_lines)
    return True


def _legend(
    canvas: Canvas,
    area: tuple[float, float, float, float],
    shown: list[Series],
    colours: list[str],
    calcs: list[str],
    unit: str | None,
    max_lines: int,
) -> None:
    left, bottom, width, _ = area
    labels = {"lastNotNull": "Last *", "last": "Last", "max": "Max", "mean": "Mean"}
    column_in = 0.85
    name_in = width - 0.45 - column_in * len(calcs)
    y = bottom + 0.05 + (min(len(shown), max_lines) + (len(shown) > max_lines)) * LEGEND_LINE_IN
    if calcs:
        for j, calc in enumerate(calcs):
            canvas.text(
                left + width - 0.12 - column_in * (len(calcs) - 1 - j), y, labels[calc],
                fontsize=6.5, color=MUTED, ha="right", va="bottom", fontweight="bold",
            )  # fmt: skip
    for i, s in enumerate(shown[:max_lines]):
        y -= LEGEND_LINE_IN
        canvas.figure.patches.append(
            Rectangle(
                ((left + 0.12) / FIGURE_WIDTH_IN, (y + 0.05) / canvas.height_in),
                0.16 / FIGURE_WIDTH_IN,
                0.03 / canvas.height_in,
                transform=canvas.figure.transFigure,
                color=colours[i],
            )
        )
        canvas.text(
            left + 0.33, y, _fit(s.name, name_in - 0.2, 6.5), fontsize=6.5, color=TEXT, va="bottom"
        )
        for j, calc in enumerate(calcs):
            value = s.max() if calc == "max" else s.last()
            if calc == "mean":
                finite = s.values[np.isfinite(s.values)]
                value = float(finite.mean()) if finite.size else None
            canvas.text(
                left + width - 0.12 - column_in * (len(calcs) - 1 - j), y,
                format_value(value, unit), fontsize=6.5, color=TEXT, ha="right", va="bottom",
            )  # fmt: skip
    if len(shown) > max_lines:
        y -= LEGEND_LINE_IN
        canvas.text(
            left + 0.33, y, f"… and {len(shown) - max_lines} more series",
            fontsize=6.5, color=MUTED, va="bottom",
        )  # fmt: skip


def draw_stat(
    canvas: Canvas,
    panel: Obj,
    title: str,
    series: list[Series],
    window: Window,
    *,
    gauge: bool = False,
) -> bool:
    left, bottom, width, height = _frame(canvas, panel, title)
    shown = [s for s in series if s.has_data]
    if not shown:
        _no_data(canvas, (left, bottom, width, height))
        return False
    unit = _unit(panel)
    options = panel.get("options", {})
    background = options.get("colorMode", "value") == "background" and not gauge
    each = width / len(shown)
    for i, s in enumerate(shown):
        value = s.last()
        text, mapped_colour = mapped(panel, value)
        shade = mapped_colour or threshold_colour(panel, value, NAMED_COLOURS["green"])
        cell = (left + i * each + 0.06, bottom + 0.06, each - 0.12, height - 0.02)
        if background:
            canvas.figure.patches.append(
                Rectangle(
                    (cell[0] / FIGURE_WIDTH_IN, cell[1] / canvas.height_in),
                    cell[2] / FIGURE_WIDTH_IN,
                    cell[3] / canvas.height_in,
                    transform=canvas.figure.transFigure,
                    color=shade,
                )
            )
        if options.get("graphMode") == "area" and not gauge:
            axes = canvas.figure.add_axes(
                canvas.fraction(cell[0], cell[1], cell[2], cell[3] * 0.45)
            )
            axes.set_axis_off()
            x = s.times
            line = "#FFFFFF" if background else shade
            axes.plot(x, s.values, color=line, linewidth=0.9, alpha=0.8)
            axes.fill_between(x, s.values, 0, color=line, alpha=0.18, linewidth=0)
            _time_axis(axes, window)
            low, high = axes.get_ylim()
            axes.set_ylim(min(0.0, low), high if high > 0 else 1.0)
        if gauge:
            _gauge_bar(canvas, panel, cell, value, shade)
        label = text or format_value(value, unit)
        canvas.text(
            cell[0] + cell[2] / 2, cell[1] + cell[3] * 0.55, label,
            fontsize=min(22, max(11, cell[2] * 9)), fontweight="bold",
            color="#FFFFFF" if background else shade, ha="center", va="center",
        )  # fmt: skip
        if len(shown) > 1:
            canvas.text(
                cell[0] + cell[2] / 2, cell[1] + cell[3] * 0.9, _fit(s.name, cell[2], 6.5),
                fontsize=6.5, color="#FFFFFF" if background else MUTED, ha="center", va="top",
            )  # fmt: skip
    return True


def _gauge_bar(
    canvas: Canvas,
    panel: Obj,
    cell: tuple[float, float, float, float],
    value: float | None,
    shade: str,
) -> None:
    """A gauge as a horizontal bar between its min and max (0 and the top threshold)."""
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    limits = [t for t, _ in _thresholds(panel) if math.isfinite(t)]
    low = float(defaults.get("min", 0))
    high = float(defaults.get("max", max([*limits, value or 0, 1])))
    share = (
        0.0 if value is None or high <= low else min(1.0, max(0.0, (value - low) / (high - low)))
    )
    x, y, w, _ = cell
    for shade_, width in (("#E9EBEE", w - 0.2), (shade, (w - 0.2) * share)):
        canvas.figure.patches.append(
            Rectangle(
                ((x + 0.1) / FIGURE_WIDTH_IN, (y + 0.12) / canvas.height_in),
                width / FIGURE_WIDTH_IN,
                0.12 / canvas.height_in,
                transform=canvas.figure.transFigure,
                color=shade_,
            )
        )


def draw_state_timeline(
    canvas: Canvas, panel: Obj, title: str, series: list[Series], window: Window
) -> bool:
    left, bottom, width, height = _frame(canvas, panel, title)
    shown = [s for s in series if s.has_data]
    if not shown:
        _no_data(canvas, (left, bottom, width, height))
        return False
    legend_in = LEGEND_LINE_IN + 0.08
    axes = canvas.figure.add_axes(
        canvas.fraction(
            left + 1.1, bottom + legend_in + 0.22, width - 1.25, height - legend_in - 0.3
        )
    )
    _style_axes(axes)
    axes.grid(False)
    seen: dict[str, str] = {}
    for row, s in enumerate(reversed(shown)):
        x = s.times
        step = (x[1] - x[0]) if len(x) > 1 else window.step_s
        start = 0
        for i in range(1, len(x) + 1):
            if i < len(x) and (
                s.values[i] == s.values[start]
                or (np.isnan(s.values[i]) and np.isnan(s.values[start]))
            ):
                continue
            value = s.values[start]
            if not np.isnan(value):
                text, shade = mapped(panel, float(value))
                shade = shade or threshold_colour(panel, float(value), PALETTE[0])
                label = text or format_value(float(value), _unit(panel))
                seen.setdefault(label, shade)
                span = x[i - 1] - x[start] + step
                axes.broken_barh([(x[start], span)], (row + 0.1, 0.8), color=shade, alpha=0.85)
                if span > (x[-1] - x[0]) * 0.08:
                    axes.text(
                        x[start] + span / 2, row + 0.5, label,
                        fontsize=6.5, color="#FFFFFF", ha="center", va="center",
                    )  # fmt: skip
            start = i
    axes.set_ylim(0, len(shown))
    axes.set_yticks([i + 0.5 for i in range(len(shown))])
    axes.set_yticklabels([_fit(s.name, 1.0, 6.5) for s in reversed(shown)])
    _time_axis(axes, window)
    x_in = left + 0.12
    for label, shade in seen.items():
        canvas.figure.patches.append(
            Rectangle(
                (x_in / FIGURE_WIDTH_IN, (bottom + 0.1) / canvas.height_in),
                0.12 / FIGURE_WIDTH_IN,
                0.08 / canvas.height_in,
                transform=canvas.figure.transFigure,
                color=shade,
            )
        )
        canvas.text(x_in + 0.16, bottom + 0.08, label, fontsize=6.5, color=TEXT, va="bottom")
        x_in += 0.3 + len(label) * 0.055
    return True


def draw_bars(canvas: Canvas, panel: Obj, title: str, series: list[Series]) -> bool:
    """A bar gauge: each series' last value as a horizontal bar, coloured by thresholds."""
    left, bottom, width, height = _frame(canvas, panel, title)
    shown = [s for s in series if s.has_data]
    if not shown:
        _no_data(canvas, (left, bottom, width, height))
        return False
    unit = _unit(panel)
    axes = canvas.figure.add_axes(
        canvas.fraction(left + 1.3, bottom + 0.1, width - 2.1, height - 0.15)
    )
    axes.set_axis_off()
    lasts = [s.last() or 0.0 for s in shown]
    rows_ = range(len(shown))[::-1]
    axes.barh(
        list(rows_), lasts,
        color=[threshold_colour(panel, v, PALETTE[0]) for v in lasts], height=0.7,
    )  # fmt: skip
    axes.set_xlim(0, max([*lasts, 1e-9]) * 1.05)
    for row, s, value in zip(rows_, shown, lasts, strict=True):
        axes.text(
            0, row, _fit(s.name, 1.2, 6.5) + "  ", fontsize=6.5, ha="right", va="center", color=TEXT
        )
        axes.text(
            axes.get_xlim()[1],
            row,
            "  " + format_value(value, unit),
            fontsize=6.5,
            va="center",
            color=TEXT,
        )
    return True


def draw_table(canvas: Canvas, panel: Obj, title: str, series: list[Series]) -> bool:
    """A table: one line per series, its name and last value."""
    left, bottom, width, height = _frame(canvas, panel, title)
    shown = [s for s in series if s.has_data]
    if not shown:
        _no_data(canvas, (left, bottom, width, height))
        return False
    unit = _unit(panel)
    y = bottom + height - 0.05
    canvas.text(left + 0.12, y, "Series", fontsize=7, fontweight="bold", color=MUTED, va="top")
    canvas.text(
        left + width - 0.12,
        y,
        "Last",
        fontsize=7,
        fontweight="bold",
        color=MUTED,
        va="top",
        ha="right",
    )
    lines = max(1, int((height - 0.2) / LEGEND_LINE_IN) - 1)
    for s in shown[:lines]:
        y -= LEGEND_LINE_IN
        canvas.text(
            left + 0.12, y, _fit(s.name, width - 1.3, 6.5), fontsize=6.5, color=TEXT, va="top"
        )
        canvas.text(
            left + width - 0.12,
            y,
            format_value(s.last(), unit),
            fontsize=6.5,
            color=TEXT,
            va="top",
            ha="right",
        )
    if len(shown) > lines:
        canvas.text(
            left + 0.12,
            y - LEGEND_LINE_IN,
            f"… and {len(shown) - lines} more",
            fontsize=6.5,
            color=MUTED,
            va="top",
        )
    return True


def draw_text(canvas: Canvas, panel: Obj, title: str) -> bool:
    left, bottom, _, height = _frame(canvas, panel, title)
    content = str(panel.get("options", {}).get("content", ""))
    canvas.text(
        left + 0.12,
        bottom + height - 0.05,
        content[:600],
        fontsize=7,
        color=TEXT,
        va="top",
        wrap=True,
    )
    return bool(content)


def draw_panel(
    canvas: Canvas, panel: Obj, title: str, series: list[Series], window: Window
) -> bool:
    """Draw one panel; True when it showed data."""
    kind = panel["type"]
    if kind == "stat":
        return draw_stat(canvas, panel, title, series, window)
    if kind == "gauge":
        return draw_stat(canvas, panel, title, series, window, gauge=True)
    if kind == "state-timeline":
        return draw_state_timeline(canvas, panel, title, series, window)
    if kind == "bargauge":
        return draw_bars(canvas, panel, title, series)
    if kind == "table":
        return draw_table(canvas, panel, title, series)
    if kind == "text":
        return draw_text(canvas, panel, title)
    return draw_timeseries(canvas, panel, title, series, window)


def save_png(figure: Figure, path: Path, dpi: int) -> None:
    """The figure as a palette PNG: a few tens of KB instead of a few hundred."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor=figure.get_facecolor())
    buffer.seek(0)
    with Image.open(buffer) as image:
        quantized = image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
        path.parent.mkdir(parents=True, exist_ok=True)
        quantized.save(path, format="PNG", optimize=True)


def expand(dashboard: Obj, listed: Mapping[str, list[str]]) -> Iterator[Row]:
    """The rows as Grafana shows them: a repeated row once per value of its variable
    (or once, empty, when the variable has none)."""
    for row, panels in rows(dashboard):
        repeat = row.get("repeat")
        if repeat and listed.get(repeat):
            for value in listed[repeat]:
                yield Row(row, panels, repeat, value)
        else:
            yield Row(row, panels, repeat)


def render_dashboard(
    api: PrometheusApi,
    dashboard: Obj,
    out: Path,
    window: Window,
    *,
    dpi: int = 110,
) -> list[RowImage]:
    """One PNG per row of ``dashboard`` in ``out`` (named by :func:`row_stem`)."""
    chosen, listed = variable_values(api, dashboard, window)
    base = {**chosen, **window.builtins()}
    span = (
        f"{datetime.fromtimestamp(window.start, UTC):%Y-%m-%d %H:%M} to "
        f"{datetime.fromtimestamp(window.end, UTC):%H:%M} UTC · step {window.step_s:g} s · "
        f"$__rate_interval {window.builtins()['__rate_interval']} · {api.url}"
    )
    images: list[RowImage] = []
    for row in expand(dashboard, listed):
        values = dict(base)
        if row.repeat and row.value is not None:
            values[row.repeat] = row.value
        title = substitute(row.template.get("title", ""), values)
        if row.repeat and row.value is None:
            bare = _VARIABLE.sub("", row.template.get("title", "")).strip()
            title = f"{bare} (no value of ${row.repeat} in this window)"
        top = min(p["gridPos"]["y"] for p in row.panels)
        bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in row.panels)
        canvas = Canvas(f"{dashboard['title']} / {title}", span, top, bottom - top)
        image = RowImage(title, out / f"{row_stem(dashboard, row.template, row.value)}.png")
        for panel in sorted(row.panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
            named = {k: v for k, v in values.items() if k != row.repeat or row.value}
            panel_title = substitute(panel.get("title", ""), named)  # "$destination" if none
            series = panel_series(api, panel, values, window)
            shown = draw_panel(canvas, panel, panel_title, series, window)
            image.panels.append(PanelImage(panel_title, panel["type"], shown))
        save_png(canvas.figure, image.path, dpi)
        plt.close(canvas.figure)
        images.append(image)
    return images


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Draw each row of the shipped Grafana dashboards from a Prometheus, "
        "one PNG per row."
    )
    parser.add_argument(
        "dashboards", nargs="*", type=Path, help="dashboard JSON (default: the shipped ones)"
    )
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="its base URL")
    parser.add_argument("--window", default="15m", help="how far back from --end (15m)")
    parser.add_argument("--end", type=float, default=None, help="Unix time (default: now)")
    parser.add_argument("--out", type=Path, default=Path("dashboard-images"), help="folder")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    api = PrometheusApi(args.prometheus)
    window = make_window(api, duration_s(args.window) / 60, args.end)
    for path in args.dashboards or sorted(DASHBOARDS.glob("*.json")):
        for image in render_dashboard(
            api, json.loads(path.read_text()), args.out, window, dpi=args.dpi
        ):
            empty = [p.title for p in image.panels if not p.has_data]
            note = f"; no data: {', '.join(empty)}" if empty else ""
            print(f"{image.path}  {image.title}: {len(image.panels)} panels{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
