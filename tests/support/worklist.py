"""Talking to the worklist as its peers do: a RIS sending HL7 orders over MLLP (with
python-hl7's MLLP client, independent of the service's code), modalities querying it
with DCMTK's findscu and with pynetdicom."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import hl7
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

SITES = """\
version: 1
sites:
  hospital-a:
    sending_facility: HOSP_A
    sending_applications: [RIS_A]
    accession_issuer: HOSP_A
    character_set: ISO_IR 192
    modalities: [CT_A, MR_A]
  hospital-b:
    sending_facility: HOSP_B
    hl7_encoding: iso-8859-1
    character_set: ISO_IR 100
    modalities: [CT_B]
  reading-room:
    sending_facility: READING
    modalities: [READ_ALL]
    sees: [hospital-a, hospital-b]
"""


@dataclass(frozen=True)
class Order:
    accession: str
    patient_id: str = "MRN123"
    patient_name: str = "Doe^Jane"
    control: str = "NW"
    status: str = ""
    start: str = "202612021030"
    modality: str = "CT"
    station_ae: str = "CT_A"
    step_id: str = "SPS1"
    facility: str = "HOSP_A"
    application: str = "RIS_A"
    priority: str = "R"
    message_type: str = "ORM^O01"
    control_id: str = "MSG0001"
    charset: str = ""

    def er7(self) -> str:
        msh = (
            f"MSH|^~\\&|{self.application}|{self.facility}|RADFLOW|RADFLOW|20261202101500||"
            f"{self.message_type}|{self.control_id}|P|2.5.1||||||{self.charset}"
        ).rstrip("|")
        segments = [
            msh,
            f"PID|1||{self.patient_id}^^^{self.facility}^MR||{self.patient_name}||19700101|F",
            "PV1|1|O|RAD1",
            f"ORC|{self.control}|PO{self.accession}|FO{self.accession}||{self.status}|"
            f"|^^^{self.start}^^{self.priority}||20261202101500|||1234^Welby^Marcus",
            f"OBR|1|PO{self.accession}|FO{self.accession}|CTHEAD^CT head without contrast^L|||"
            f"|||||||||||{self.accession}|RP{self.accession}|{self.step_id}|{self.station_ae}|||"
            f"{self.modality}|||^^^{self.start}^^{self.priority}",
        ]
        return "\r".join(segments)


def send(port: int, message: str, encoding: str = "utf-8") -> hl7.Message:
    """Send one message over MLLP; its acknowledgement, parsed."""
    with MLLPClient("127.0.0.1", port, encoding=encoding) as client:
        answer = client.send_message(message)
    return hl7.parse(answer.decode(encoding))


def ack_code(ack: hl7.Message) -> str:
    return str(ack.segment("MSA")[1])


def ack_text(ack: hl7.Message) -> str:
    return str(ack.segment("MSA")[3]) if len(ack.segment("MSA")) > 3 else ""


def query(
    port: int,
    calling_ae: str,
    *,
    patient_name: str = "",
    patient_id: str = "",
    accession: str = "",
    modality: str = "",
    station_ae: str = "",
    start_date: str = "",
    requested_procedure_id: str = "",
) -> list[Dataset]:
    """A pynetdicom Modality Worklist C-FIND; the matches (raises if not associated)."""
    ds = Dataset()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.RequestedProcedureID = requested_procedure_id
    ds.StudyInstanceUID = ""
    ds.IssuerOfAccessionNumberSequence = []
    sps = Dataset()
    sps.ScheduledStationAETitle = station_ae
    sps.Modality = modality
    sps.ScheduledProcedureStepStartDate = start_date
    sps.ScheduledProcedureStepStartTime = ""
    sps.ScheduledProcedureStepID = ""
    ds.ScheduledProcedureStepSequence = [sps]
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADFLOW_MWL")
    if not assoc.is_established:
        raise ConnectionRefusedError(f"association of {calling_ae} not established")
    try:
        found = []
        for status, identifier in assoc.send_c_find(ds, ModalityWorklistInformationFind):
            if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                found.append(identifier)
        return found
    finally:
        assoc.release()


def findscu(port: int, calling_ae: str, keys: list[str], out: Path) -> list[Dataset]:
    """DCMTK ``findscu -W`` with ``-k`` keys; the answers it wrote (``-X``)."""
    out.mkdir(parents=True, exist_ok=True)
    args = ["findscu", "-W", "-aet", calling_ae, "-aec", "RADFLOW_MWL", "-X", "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "TCP_NODELAY": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]
