"""``python -m radflow_devstack order``: send make run's worklist one HL7 ORM^O01 (or
its cancel) over MLLP, as a site's RIS would, and print the acknowledgement.

A development convenience, not an interface engine: one message, one connection.
"""

from __future__ import annotations

import argparse
import socket
import uuid
from datetime import datetime

from radflow_core.mllp import END_BLOCK, START_BLOCK, frame


def orm(args: argparse.Namespace) -> str:
    """The ORM^O01 the arguments describe (fields per docs/hl7-interface.md)."""
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    start = args.start or datetime.now().strftime("%Y%m%d%H%M")
    timing = f"^^^{start}^^{args.priority}"
    obr = ["OBR", "1", args.accession, "", f"{args.procedure}^{args.procedure_text}^L"]
    obr += [""] * 13 + [args.accession, args.accession, args.step, args.station, "", ""]
    obr += [args.modality, "", "", timing]
    return "\r".join(
        [
            f"MSH|^~\\&|{args.application}|{args.facility}|RADFLOW|RADFLOW|{now}||ORM^O01|"
            f"{uuid.uuid4().hex[:20].upper()}|P|2.5.1||||||UNICODE UTF-8",
            f"PID|1||{args.patient_id}^^^{args.facility}^MR||{args.patient_name}||"
            f"{args.birth_date}|{args.sex}",
            f"ORC|{args.control}|{args.accession}|||||{timing}",
            "|".join(obr),
        ]
    )


def send(host: str, port: int, message: str, timeout_s: float = 30.0) -> str:
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(frame(message.encode()))
        answer = b""
        while not answer.endswith(END_BLOCK):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.strip(START_BLOCK + END_BLOCK).decode(errors="replace")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    order = commands.add_parser(
        "order", help="send the worklist an HL7 order (ORM^O01) and print its ACK"
    )
    order.add_argument("--port", type=int, default=2576, help="the worklist's MLLP port")
    order.add_argument("--accession", required=True, help="accession number (OBR-18)")
    order.add_argument("--patient-id", default="MRN0001")
    order.add_argument("--patient-name", default="Doe^Jane", help="family^given")
    order.add_argument("--birth-date", default="19700101")
    order.add_argument("--sex", default="F")
    order.add_argument("--modality", default="CT")
    order.add_argument("--station", default="CT_A", help="Scheduled Station AE Title")
    order.add_argument("--start", default="", help="YYYYMMDDHHMM (default: now)")
    order.add_argument("--priority", default="R", help="S (stat), A (asap) or R (routine)")
    order.add_argument("--step", default="1", help="Scheduled Procedure Step ID")
    order.add_argument("--procedure", default="CTHEAD")
    order.add_argument("--procedure-text", default="CT head")
    order.add_argument("--control", default="NW", help="ORC-1: NW new, CA cancel, DC ...")
    order.add_argument("--facility", default="HOSP_A", help="MSH-4 (a site of the sites file)")
    order.add_argument("--application", default="RIS_A", help="MSH-3")


def order_command(args: argparse.Namespace) -> int:
    answer = send("127.0.0.1", args.port, orm(args))
    print(answer.replace("\r", "\n").strip())
    return 0 if "|AA|" in answer else 1
