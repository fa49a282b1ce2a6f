"""write_part10: a generated dataset as a DICOM Part 10 file in Explicit VR Little Endian.

What the tests' instances and the benchmarks' series share; what goes in them differs
on purpose (sentinel demographics and tiny pixels for tests, CT-like pixels for bench).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian


def write_part10(
    target: Path | BinaryIO,
    ds: Dataset,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> None:
    """Give ``ds`` a file meta (Explicit VR LE) and save it to ``target``. The meta's
    SOP class and instance UIDs are the dataset's, or those given (for a dataset that
    lacks them on purpose)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid or ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid or ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(target, enforce_file_format=True)
