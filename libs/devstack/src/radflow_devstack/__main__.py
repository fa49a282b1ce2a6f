"""``python -m radflow_devstack``: the whole pipeline on this machine (``make run``).

Starts Tansu on 127.0.0.1:9092, an S3 server on 127.0.0.1:9000 with bucket
``radflow``, creates the topics, then starts every service with local settings (the
worklist takes HL7 orders on 127.0.0.1:2576 and answers Modality Worklist queries as
RADFLOW_MWL on 127.0.0.1:11113, sites in ``worklist_sites.yaml``).
STOW-RS authentication is on: a development issuer serves its JWKS on 127.0.0.1:8086
(key under ``.run/auth/``) and ``python -m radflow_devstack token`` prints a token
ingest accepts; ingest's HTTPS door uses the development CA under ``.run/tls/``.
Prints what it started and where the logs are. While it runs it watches every child:
one that dies is reported on the terminal (exit code and the end of its log) and
started again (see :mod:`radflow_devstack.supervise`). ``--durable-broker`` keeps
Tansu's log in the S3 server (bucket ``tansu``) instead of in memory, so the broker
itself can be killed and restarted without losing a record. Ctrl-C (or SIGTERM) stops
everything in reverse order, services first so they can finish in-flight work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from radflow_core.settings import KafkaSettings, S3Settings
from radflow_core.topics import Topic
from radflow_devstack.issuer import DEV_AUDIENCE, DEV_PORT, DEV_SCOPE, Issuer, dev_issuer_url
from radflow_devstack.issuer import ingest_env as issuer_env
from radflow_devstack.order import add_parser as add_order_parser
from radflow_devstack.order import order_command
from radflow_devstack.parts import (
    LOCAL_S3_ACCESS_KEY,
    LOCAL_S3_SECRET_KEY,
    broker_storage,
    http_status,
    prepare,
    start_broker,
    start_issuer,
    start_mllp_peer,
    start_orthanc,
    start_s3,
    start_service,
)
from radflow_devstack.peek import blobs_command, events_command
from radflow_devstack.pki import DevelopmentPki, development_pki
from radflow_devstack.processes import ManagedProcess, StartupFailed
from radflow_devstack.prometheus import find_alerts_file, plain_rules, start_prometheus
from radflow_devstack.supervise import Supervisor

LOCAL_RULES = Path(__file__).with_name("rules.yaml")
LOCAL_SITES = Path(__file__).with_name("sites.yaml")
LOCAL_WORKLIST_SITES = Path(__file__).with_name("worklist_sites.yaml")
BROKER_BUCKET = "tansu"
"""Where a durable broker (``--durable-broker``) keeps its log on the S3 server."""
POLL_S = 0.5
"""How often the children are checked."""


def local_env(broker_port: int, s3_port: int) -> dict[str, str]:
    """Settings every service gets in the local stack."""
    return {
        "RADFLOW_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{broker_port}",
        "RADFLOW_KAFKA_IDEMPOTENCE": "false",  # Tansu has no InitProducerId
        # Tansu holds each consumer-group join for half the session timeout: 1.5 s
        # instead of 5 s for every service start and every rebalance.
        "RADFLOW_KAFKA_SESSION_TIMEOUT_MS": "3000",
        "RADFLOW_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{s3_port}",
        "RADFLOW_S3_ACCESS_KEY": LOCAL_S3_ACCESS_KEY,
        "RADFLOW_S3_SECRET_KEY": LOCAL_S3_SECRET_KEY,
        "RADFLOW_S3_BUCKET": "radflow",
        "RADFLOW_LOG_FORMAT": os.environ.get("RADFLOW_LOG_FORMAT", "json"),
    }


def dicom_tls_env(pki: DevelopmentPki, port: int) -> dict[str, str]:
    """ingest's DICOM TLS listener with the development certificates: a client
    certificate from the development CA is required (any CN, any calling AE)."""
    return {
        "RADFLOW_INGEST_DIMSE_TLS_PORT": str(port),
        "RADFLOW_INGEST_TLS_CERT_FILE": str(pki.server.cert.resolve()),
        "RADFLOW_INGEST_TLS_KEY_FILE": str(pki.server.key.resolve()),
        "RADFLOW_INGEST_TLS_CLIENT_CA_FILE": str(pki.ca_file.resolve()),
    }


def storescu_tls_line(pki: DevelopmentPki, port: int) -> str:
    """The storescu command that sends over make run's DICOM TLS listener."""
    return (
        f"TCP_NODELAY=1 storescu +tls {pki.client.key} {pki.client.cert} +cf {pki.ca_file} "
        f"-aec RADFLOW 127.0.0.1 {port} FILE.dcm"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radflow_devstack",
        description="Run the radflow pipeline locally on real parts (make run), or look "
        "into a running one.",
    )
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="start everything (the default)")
    for p in (parser, run):
        p.add_argument("--broker-port", type=int, default=9092)
        p.add_argument("--s3-port", type=int, default=9000)
        p.add_argument("--dimse-port", type=int, default=11112)
        p.add_argument("--dimse-tls-port", type=int, default=2762, help="DICOM TLS")
        p.add_argument("--http-port", type=int, default=8080, help="STOW-RS over HTTP")
        p.add_argument("--https-port", type=int, default=8443, help="STOW-RS over HTTPS")
        p.add_argument("--ops-port", type=int, default=8085, help="ingest's /metrics, /readyz")
        p.add_argument("--issuer-port", type=int, default=DEV_PORT, help="development JWKS")
        p.add_argument("--transcode-port", type=int, default=8081)
        p.add_argument("--router-port", type=int, default=8082)
        p.add_argument("--forwarder-port", type=int, default=8083)
        p.add_argument("--report-return-port", type=int, default=8084)
        p.add_argument("--ledger-port", type=int, default=8087, help="the ledger's HTTP API")
        p.add_argument("--mllp-port", type=int, default=2575, help="the stand-in RIS's port")
        p.add_argument(
            "--worklist-mllp-port", type=int, default=2576, help="the worklist's HL7 order listener"
        )
        p.add_argument("--worklist-port", type=int, default=11113, help="the Modality Worklist SCP")
        p.add_argument("--worklist-ops-port", type=int, default=8088, help="worklist's /metrics")
        p.add_argument(
            "--prometheus-port", type=int, default=9090, help="Prometheus, with the alerts"
        )
        p.add_argument(
            "--alert-for-max",
            type=float,
            default=None,
            metavar="SECONDS",
            help="cap every alert's 'for:' (default: as shipped); tests see alerts fire in seconds",
        )
        p.add_argument("--orthanc-port", type=int, default=8042, help="Orthanc's HTTP port")
        p.add_argument("--orthanc-dicom-port", type=int, default=4242)
        p.add_argument(
            "--rules",
            type=Path,
            default=LOCAL_RULES,
            help="the router's rule file (default: everything to the local Orthanc)",
        )
        p.add_argument("--log-dir", type=Path, default=Path(".run/logs"))
        p.add_argument(
            "--durable-broker",
            action="store_true",
            help=f"keep the broker's log in the S3 server (bucket {BROKER_BUCKET}) so it "
            "survives a broker restart; default: in memory",
        )
    events = commands.add_parser("events", help="print the events on a topic")
    events.add_argument("topic", nargs="?", default=Topic.INSTANCE_RECEIVED.value)
    events.add_argument("--follow", "-f", action="store_true", help="wait for new events")
    commands.add_parser("blobs", help="list the objects in the bucket")
    add_order_parser(commands)
    token = commands.add_parser(
        "token", help="print a bearer token make run's ingest accepts (STOW-RS)"
    )
    token.add_argument("--scope", default=DEV_SCOPE, help=f"space-separated ({DEV_SCOPE})")
    token.add_argument("--ttl", type=float, default=3600, help="seconds it is valid (3600)")
    token.add_argument("--subject", default="developer", help="the 'sub' claim (developer)")
    token.add_argument("--audience", default=DEV_AUDIENCE)
    token.add_argument("--issuer-port", type=int, default=DEV_PORT)
    token.add_argument("--folder", type=Path, default=Path(".run/auth"), help="the key's folder")
    args = parser.parse_args(argv)
    if args.command == "token":
        issuer = Issuer.kept_in(args.folder, dev_issuer_url(args.issuer_port))
        print(
            issuer.token(
                subject=args.subject, scope=args.scope, audience=args.audience, ttl_s=args.ttl
            )
        )
        return 0
    if args.command == "order":
        return order_command(args)
    environ = {**local_env(9092, 9000), **os.environ}
    if args.command == "events":
        return events_command(environ, args.topic, args.follow)
    if args.command == "blobs":
        return blobs_command(environ)
    return run_stack(args)


def run_stack(args: argparse.Namespace) -> int:

    started: list[ManagedProcess] = []
    supervisor = Supervisor()
    lost_on_restart = "it kept its data in memory; stop make run (Ctrl-C) and start it again"
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def service(name: str, module: str, env: dict[str, str], port: int) -> None:
        ready = f"http://127.0.0.1:{port}/readyz"
        proc = start_service(name, module, env, args.log_dir, ready)
        started.append(proc)
        supervisor.watch(proc, lambda: http_status(ready) == 200)

    try:
        s3_data = args.log_dir.parent / "s3"
        shutil.rmtree(s3_data, ignore_errors=True)  # every make run starts with an empty store
        s3 = start_s3(args.s3_port, args.log_dir, s3_data)
        started.append(s3)
        supervisor.watch(s3, s3.answers)  # its objects are on disk: a restart keeps them
        print(
            f"s3       SeaweedFS S3 server http://127.0.0.1:{args.s3_port}  bucket radflow  "
            f"(data in {s3_data}/)"
        )
        storage = broker_storage(args.s3_port, BROKER_BUCKET) if args.durable_broker else None
        broker = start_broker(args.broker_port, args.log_dir, storage=storage)
        started.append(broker)
        supervisor.watch(broker, restart=broker.durable, not_restarted_because=lost_on_restart)
        kept = f"durable: log in s3://{BROKER_BUCKET}/" if storage else "in memory"
        print(f"broker   Tansu (Kafka API)  127.0.0.1:{args.broker_port}  {kept}")
        env = local_env(args.broker_port, args.s3_port)
        prepare(KafkaSettings.from_env(env), S3Settings.from_env(env), [t.value for t in Topic])
        print(f"topics   {', '.join(t.value for t in Topic)}")
        rules = args.rules.resolve()
        if args.rules == LOCAL_RULES:  # the example, pointed at this run's Orthanc
            rules = args.log_dir.parent / "rules.yaml"
            rules.write_text(
                LOCAL_RULES.read_text().replace("127.0.0.1:8042", f"127.0.0.1:{args.orthanc_port}")
            )
        run_dir = args.log_dir.parent
        issuer_proc = start_issuer(args.issuer_port, run_dir / "auth", args.log_dir)
        started.append(issuer_proc)
        supervisor.watch(issuer_proc)
        issuer = dev_issuer_url(args.issuer_port)
        print(f"issuer   development OAuth2 issuer {issuer}  (key in {run_dir / 'auth'}/)")
        ingest_env = {
            **env,
            **issuer_env(issuer, f"{issuer}/jwks.json"),
            "RADFLOW_INGEST_DIMSE_PORT": str(args.dimse_port),
            "RADFLOW_INGEST_HTTP_PORT": str(args.http_port),
            "RADFLOW_INGEST_HTTPS_PORT": str(args.https_port),  # with the TLS files below
            "RADFLOW_INGEST_OPS_PORT": str(args.ops_port),
            "RADFLOW_INGEST_RULES_FILE": str(rules),  # its stat: policy picks the lane
        }
        pki = development_pki(run_dir / "tls")
        ingest_env.update(dicom_tls_env(pki, args.dimse_tls_port))
        http = f"http://127.0.0.1:{args.http_port}"
        ops = f"http://127.0.0.1:{args.ops_port}"
        service("ingest", "ingest", ingest_env, args.ops_port)
        print(f"ingest   DIMSE  RADFLOW@127.0.0.1:{args.dimse_port}")
        print(f"         DICOM TLS RADFLOW@127.0.0.1:{args.dimse_tls_port} (CA {pki.ca_file})")
        print(f"         STOW-RS {http}/dicomweb/studies  https://127.0.0.1:{args.https_port}/")
        print("         (authentication on: see README, python -m radflow_devstack token)")
        print(f"         metrics {ops}/metrics")
        transcode_http = f"http://127.0.0.1:{args.transcode_port}"
        service(
            "transcode",
            "transcode",
            {
                **env,
                "RADFLOW_TRANSCODE_HTTP_PORT": str(args.transcode_port),
                "RADFLOW_TRANSCODE_RULES_FILE": str(rules),  # its preview: options
            },
            args.transcode_port,
        )
        print(f"transcode metrics {transcode_http}/metrics")
        router_http = f"http://127.0.0.1:{args.router_port}"
        router_env = {
            **env,
            "RADFLOW_ROUTER_HTTP_PORT": str(args.router_port),
            "RADFLOW_ROUTER_RULES_FILE": str(rules),
        }
        service("router", "router", router_env, args.router_port)
        print(
            f"router   rules {rules} (edit it: changes apply live)  metrics {router_http}/metrics"
        )
        orthanc_proc = start_orthanc(args.orthanc_port, args.orthanc_dicom_port, args.log_dir)
        started.append(orthanc_proc)
        supervisor.watch(orthanc_proc)
        orthanc = f"http://127.0.0.1:{args.orthanc_port}"
        print(f"orthanc  example destination {orthanc}/app/explorer.html")
        forwarder_http = f"http://127.0.0.1:{args.forwarder_port}"
        forwarder_env = {
            **env,
            "RADFLOW_FORWARDER_HTTP_PORT": str(args.forwarder_port),
            "RADFLOW_FORWARDER_RULES_FILE": str(rules),
        }
        service("stow-forwarder", "stow_forwarder", forwarder_env, args.forwarder_port)
        print(f"forwarder metrics {forwarder_http}/metrics")
        mllp = start_mllp_peer(
            args.mllp_port,
            args.log_dir,
            tls_cert=pki.server.cert.resolve(),
            tls_key=pki.server.key.resolve(),
        )
        started.append(mllp)
        supervisor.watch(mllp)
        print(f"ris      stand-in RIS (HL7 MLLP over TLS) 127.0.0.1:{args.mllp_port}")
        sites = args.log_dir.parent / "sites.yaml"
        sites.write_text(
            LOCAL_SITES.read_text()
            .replace("port: 2575", f"port: {args.mllp_port}")
            .replace(".run/tls/ca.pem", str(pki.ca_file.resolve()))
        )
        report_http = f"http://127.0.0.1:{args.report_return_port}"
        report_env = {
            **env,
            "RADFLOW_REPORT_RETURN_HTTP_PORT": str(args.report_return_port),
            "RADFLOW_REPORT_RETURN_SITES_FILE": str(sites),
            "RADFLOW_REPORT_RETURN_RULES_FILE": str(rules),
        }
        service("report-return", "report_return", report_env, args.report_return_port)
        print(f"reports  sites {sites}  metrics {report_http}/metrics")
        ledger_http = f"http://127.0.0.1:{args.ledger_port}"
        ledger_env = {
            **env,
            "RADFLOW_LEDGER_HTTP_PORT": str(args.ledger_port),
            # Development: a study counts as delivered after 10 quiet seconds, an instance
            # as overdue after 2 minutes.
            "RADFLOW_LEDGER_QUIET_S": "10",
            "RADFLOW_LEDGER_OVERDUE_AFTER_S": "120",
        }
        service("ledger", "ledger", ledger_env, args.ledger_port)
        print(f"ledger   {ledger_http}/ledger/overdue  (radflow ledger study UID, ... overdue)")
        worklist_env = {
            **env,
            "RADFLOW_WORKLIST_HTTP_PORT": str(args.worklist_ops_port),
            "RADFLOW_WORKLIST_MLLP_PORT": str(args.worklist_mllp_port),
            "RADFLOW_WORKLIST_DIMSE_PORT": str(args.worklist_port),
            "RADFLOW_WORKLIST_SITES_FILE": str(LOCAL_WORKLIST_SITES.resolve()),
        }
        service("worklist", "worklist", worklist_env, args.worklist_ops_port)
        print(
            f"worklist HL7 orders MLLP 127.0.0.1:{args.worklist_mllp_port}  Modality Worklist "
            f"RADFLOW_MWL@127.0.0.1:{args.worklist_port}  sites {LOCAL_WORKLIST_SITES}"
        )
        targets = {
            "ingest": args.ops_port,
            "transcode": args.transcode_port,
            "router": args.router_port,
            "stow-forwarder": args.forwarder_port,
            "report-return": args.report_return_port,
            "ledger": args.ledger_port,
            "worklist": args.worklist_ops_port,
        }
        alerts = find_alerts_file()
        alert_rules = plain_rules(alerts, max_for_s=args.alert_for_max) if alerts else None
        prometheus = start_prometheus(args.prometheus_port, targets, run_dir, rules=alert_rules)
        started.append(prometheus)
        supervisor.watch(prometheus)
        shipped = f"rules of {alerts}" if alerts else "no rules (deploy/ not found)"
        print(
            f"metrics  Prometheus http://127.0.0.1:{args.prometheus_port}/alerts  "
            f"scrapes every service, {shipped}"
        )
        print(f"logs     {args.log_dir}/")
        print(f"try      TCP_NODELAY=1 storescu -aec RADFLOW 127.0.0.1 {args.dimse_port} FILE.dcm")
        print(
            f"         findscu -W -aet CT_A -aec RADFLOW_MWL -k PatientName=* "
            f"127.0.0.1 {args.worklist_port}   (README: sending an order)"
        )
        print(f"         {storescu_tls_line(pki, args.dimse_tls_port)}")
        print("see      .venv/bin/python -m radflow_devstack events   (and: ... blobs)")
        print("A child that dies is reported here and started again. Ctrl-C stops everything.")
        sys.stdout.flush()
        while not stop.wait(POLL_S):
            supervisor.poll()
    except KeyboardInterrupt:
        pass
    except StartupFailed as exc:
        print(f"start-up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(started):
            code = proc.stop()
            print(f"stopped  {proc.name} (exit {code})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
