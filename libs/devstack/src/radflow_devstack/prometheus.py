"""A real Prometheus on loopback that scrapes the local services with the shipped rules.

``make run`` and the tests start the Debian package's ``prometheus`` binary with a
configuration written here: one scrape job per service named as the ServiceMonitors
name it in Kubernetes (``radflow-<service>``) and the label ``namespace`` the shipped
alerts and dashboard group by, so the same PromQL answers on a laptop and in a cluster.
The rules are the PrometheusRule of ``deploy/k8s/base/monitoring/alerts.yaml``, as a
plain rules file (Prometheus does not read the CRD); a test may shorten every ``for:``
so that an alert's firing is seen in seconds instead of minutes.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from radflow_devstack.parts import http_status
from radflow_devstack.processes import ManagedProcess, StartupFailed, port_open
from radflow_devstack.prometheus_rules import rules_file

NAMESPACE = "radflow"
"""The ``namespace`` label every local series carries, like a deployment's namespace."""
SCRAPE_INTERVAL_S = 5.0
"""Faster than a cluster's 30 s: a rate over the dashboard's windows has data sooner."""


def find_alerts_file(start: Path | None = None) -> Path | None:
    """``deploy/k8s/base/monitoring/alerts.yaml`` of the checkout this runs from (the
    working directory's, or one above the package), or None outside a checkout."""
    candidates = [Path.cwd(), *(start or Path(__file__).resolve()).parents]
    for directory in candidates:
        path = directory / "deploy" / "k8s" / "base" / "monitoring" / "alerts.yaml"
        if path.is_file():
            return path
    return None


_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_s(text: str) -> float:
    """A Prometheus duration (``5m``, ``1h30m``) in seconds."""
    text = text.strip()
    if not _DURATION.match(text):
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * _SECONDS[unit] for n, unit in _PART.findall(text))


def duration(seconds: float) -> str:
    """``seconds`` as a Prometheus duration: whole milliseconds, since Prometheus
    accepts no fraction (``0.5s`` is an error, ``500ms`` is not)."""
    millis = max(1, round(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def plain_rules(crd: Path, *, max_for_s: float | None = None) -> dict[str, Any]:
    """The rule groups of every PrometheusRule in ``crd`` as a Prometheus rules file
    (:func:`radflow_devstack.prometheus_rules.rules_file`).

    ``max_for_s`` caps each alert's ``for:`` (tests: a fault raises its alert within
    seconds); the expressions are left exactly as shipped.
    """
    rules = rules_file(crd.read_text())
    if max_for_s is not None:
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule and duration_s(rule["for"]) > max_for_s:
                    rule["for"] = duration(max_for_s)
    return rules


def write_config(
    directory: Path,
    targets: Mapping[str, int],
    *,
    rules: Mapping[str, Any] | None,
    scrape_interval_s: float = SCRAPE_INTERVAL_S,
) -> Path:
    """prometheus.yml (and rules.yml) in ``directory``: a job ``radflow-<name>`` per
    ``targets`` entry (service name → its /metrics port on 127.0.0.1)."""
    directory.mkdir(parents=True, exist_ok=True)
    interval = duration(scrape_interval_s)
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "scrape_timeout": interval,
        },
        "scrape_configs": [
            {
                "job_name": f"radflow-{name}",
                "metrics_path": "/metrics",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": NAMESPACE, "service": f"radflow-{name}"},
                    }
                ],
            }
            for name, port in targets.items()
        ],
    }
    if rules is not None:
        rules_path = directory / "rules.yml"
        rules_path.write_text(yaml.safe_dump(dict(rules), sort_keys=False))
        config["rule_files"] = [str(rules_path.resolve())]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(
    port: int,
    targets: Mapping[str, int],
    run_dir: Path,
    *,
    rules: Mapping[str, Any] | None,
    scrape_interval_s: float = SCRAPE_INTERVAL_S,
    name: str = "prometheus",
) -> ManagedProcess:
    """Prometheus (Debian package ``prometheus``) on 127.0.0.1:port, its data and
    configuration in ``run_dir/<name>``, its log in ``run_dir/<name>.log``; returns once
    it is ready."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).exists():
        raise FileNotFoundError("Prometheus is not installed (apt-get install prometheus)")
    if port_open("127.0.0.1", port):
        # The Debian package starts its own prometheus service on :9090 where systemd
        # runs: its /-/ready would pass for this one's.
        raise StartupFailed(
            f"something already listens on 127.0.0.1:{port} (the prometheus package's "
            "own service? sudo systemctl disable --now prometheus), or pick another port "
            "(--prometheus-port)"
        )
    home = run_dir / name
    shutil.rmtree(home / "data", ignore_errors=True)  # every start is a fresh history
    config = write_config(home, targets, rules=rules, scrape_interval_s=scrape_interval_s)
    proc = ManagedProcess(
        name,
        [
            binary,
            f"--config.file={config.resolve()}",
            f"--storage.tsdb.path={(home / 'data').resolve()}",
            "--storage.tsdb.retention.time=2d",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        run_dir / f"{name}.log",
    ).start()
    proc.port = port
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if http_status(f"{url}/-/ready") != 200:
            return False
        flags = PrometheusApi(url).flags()  # this one, not another on the port
        return flags.get("config.file") == str(config.resolve())

    proc.wait_until(ready, 60)
    return proc


class PrometheusApi:
    """The few HTTP API calls the tests and the dashboard renderer make."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as answer:  # noqa: S310 - loopback
                body = json.load(answer)
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the parser's error
            body = json.loads(exc.read() or b"{}")
            raise RuntimeError(f"Prometheus {path} {params}: {body.get('error', exc)}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) ``expr`` evaluates to now."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[Any]:
        data = self._get(
            "/api/v1/query_range", query=expr, start=str(start), end=str(end), step=f"{step_s}"
        )
        return list(data["result"])

    def label_values(self, selector: str, label: str, start: float, end: float) -> list[str]:
        """Values ``label`` takes in the series of ``selector`` between start and end
        (what Grafana's ``label_values(selector, label)`` variable query lists)."""
        values = self._get(
            f"/api/v1/label/{urllib.parse.quote(label)}/values",
            **{"match[]": selector, "start": str(start), "end": str(end)},
        )
        return sorted(str(v) for v in values)

    def scrape_interval_s(self) -> float:
        """The global scrape interval of the running configuration (Grafana's data
        source setting of the same name, which ``$__rate_interval`` is computed from)."""
        config = yaml.safe_load(self._get("/api/v1/status/config")["yaml"]) or {}
        return duration_s(str(config.get("global", {}).get("scrape_interval", "1m")))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts pending or firing now."""
        return list(self._get("/api/v1/alerts")["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self._get("/api/v1/rules")["groups"])

    def evaluated_after(self, moment: float) -> bool:
        """Whether every rule group has been evaluated after ``moment`` (seconds since
        the epoch): its alerts then reflect the samples scraped before it."""
        return all(_epoch_s(g["lastEvaluation"]) > moment for g in self.rule_groups())

    def flags(self) -> dict[str, str]:
        """The command-line flags it runs with."""
        return dict(self._get("/api/v1/status/flags"))


def _epoch_s(text: str) -> float:
    """An RFC 3339 UTC time of the API (with nanoseconds) in seconds since the epoch."""
    whole, _, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp() + float(
        f"0.{fraction or 0}"
    )
