"""Instances full of identities for de-identification tests, and the scan that says
which attribute of the PS3.15 Annex E list survived where it must not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radflow_core.events import DeidOption
from stow_forwarder.deidentify import PSEUDONYMOUS, table

CT = "1.2.840.10008.5.1.4.1.1.2"
ORIGINAL_DATE = "20240315"
PIXELS = b"\x01\x00\x02\x00\x03\x00\x04\x00"


def rich(
    patient_id: str = "PID-12345",
    study: str | None = None,
    series: str | None = None,
    source: str | None = None,
) -> Dataset:
    """A CT header with identifying attributes at the top and inside sequences,
    references (``source``: the SOP Instance UID its Source Image Sequence names),
    private tags, an overlay and a curve."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.SourceApplicationEntityTitle = "HOSPITALPACS"
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.PatientWeight = "61"
    ds.OtherPatientIDs = "OTHER-1"
    ds.AccessionNumber = "ACC123"
    ds.StudyID = "S1"
    ds.StudyDate = ORIGINAL_DATE
    ds.SeriesDate = ORIGINAL_DATE
    ds.AcquisitionDateTime = ORIGINAL_DATE + "101500"
    ds.StudyTime = "101500"
    ds.ContentDate = ORIGINAL_DATE
    ds.ContentTime = "101600"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "1 Main Street"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.OperatorsName = "Tech^One"
    ds.StationName = "CT01"
    ds.DeviceSerialNumber = "SN-998877"
    ds.Manufacturer = "ACME"
    ds.StudyDescription = "CT chest for Jane Doe"
    ds.SeriesDescription = "axial"
    ds.ImageComments = "patient was anxious"
    ds.Modality = "CT"
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = PIXELS
    reference = Dataset()
    reference.ReferencedSOPClassUID = CT
    reference.ReferencedSOPInstanceUID = source or generate_uid()
    ds.SourceImageSequence = Sequence([reference])
    referenced_series = Dataset()
    referenced_series.SeriesInstanceUID = ds.SeriesInstanceUID
    referenced_series.ReferencedInstanceSequence = Sequence([Dataset()])
    referenced_series.ReferencedInstanceSequence[0].ReferencedSOPClassUID = CT
    referenced_series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
    ds.ReferencedSeriesSequence = Sequence([referenced_series])
    request = Dataset()
    request.RequestingPhysician = "Smith^John"
    request.AccessionNumber = "ACC123"
    request.StudyInstanceUID = ds.StudyInstanceUID
    ds.RequestAttributesSequence = Sequence([request])
    ds.add_new(0x00091010, "LO", "PRIVATE NAME")
    ds.add_new(0x60003000, "OW", b"\x00\x00")
    ds.add_new(0x50000010, "US", 1)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def every_element(ds: Dataset) -> Iterator[DataElement]:
    for element in ds:
        yield element
        if element.VR == "SQ":
            for item in element.value:
                yield from every_element(item)


def leftovers(ds: Dataset, options: frozenset[DeidOption] = frozenset()) -> list[str]:
    """Every attribute of the profile's list that is still there with content the
    profile does not allow: removed ones present, emptied ones not empty (the patient's
    name and ID: anything but the pseudonym is caught by the caller), private
    attributes, curves and overlays."""
    actions, _ = table(options)
    found = []
    for element in every_element(ds):
        tag = int(element.tag)
        if element.tag.is_private or (element.tag.group & 0xFF00) in (0x5000, 0x6000):
            found.append(f"{element.tag} private or repeating group")
            continue
        action = actions.get(tag)
        if action is None:
            continue
        if action.code == "X":
            found.append(f"{element.keyword} {element.tag} should be removed")
        elif action.code == "Z" and element.value and element.keyword not in PSEUDONYMOUS:
            found.append(f"{element.keyword} {element.tag} should be empty")
    return found
