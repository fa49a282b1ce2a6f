"""A preview is a new, derived, lossy instance that says so, and DCMTK reads it."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pydicom
import pytest

from support.dicom import bundled_file
from transcode.preview_instance import PreviewFailed, make_previews


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_ct_preview_carries_every_flag_of_a_derived_lossy_instance(tmp_path: Path) -> None:
    src = bundled_file("CT_small.dcm")
    original = pydicom.dcmread(src)
    (made,) = make_previews(src, tmp_path, (1,), sha(src), 85)
    ds = pydicom.dcmread(made.path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.SeriesInstanceUID != original.SeriesInstanceUID
    assert ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.LossyImageCompression == "01"
    assert float(ds.LossyImageCompressionRatio) == made.ratio > 1
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert "not for diagnosis" in ds.DerivationDescription
    assert ds.DerivationCodeSequence[0].CodeValue == "113040"
    (source,) = ds.SourceImageSequence
    assert source.ReferencedSOPClassUID == original.SOPClassUID
    assert source.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert source.PurposeOfReferenceCodeSequence[0].CodeValue == "121320"
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored) == ("MONOCHROME2", 8, 8)
    assert "WindowCenter" not in ds and "RescaleSlope" not in ds, "already applied"
    assert ds.pixel_array.shape == (original.Rows, original.Columns)
    assert ds.pixel_array.std() > 10, "an image, not a blank"
    dump = subprocess.run(["dcmdump", str(made.path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    png = subprocess.run(
        ["dcmj2pnm", "+on", str(made.path), str(tmp_path / "p.png")], capture_output=True
    )
    assert png.returncode == 0, png.stderr


def test_the_same_original_gives_the_same_preview_uids_and_bytes(tmp_path: Path) -> None:
    src = bundled_file("CT_small.dcm")
    (one,) = make_previews(src, tmp_path, (1,), sha(src), 85)
    again = tmp_path / "again"
    again.mkdir()
    (two,) = make_previews(src, again, (1,), sha(src), 85)
    assert (one.sop_instance_uid, one.series_instance_uid) == (
        two.sop_instance_uid,
        two.series_instance_uid,
    )
    assert one.path.read_bytes() == two.path.read_bytes()


def test_key_frames_of_a_colour_multi_frame_stay_colour_and_name_their_frame(
    tmp_path: Path,
) -> None:
    src = bundled_file("examples_ybr_color.dcm")
    made = make_previews(src, tmp_path, (1, 15, 30), sha(src), 85)
    assert [m.frame for m in made] == [1, 15, 30]
    assert len({m.sop_instance_uid for m in made}) == 3
    assert len({m.series_instance_uid for m in made}) == 1, "one preview series per series"
    ds = pydicom.dcmread(made[1].path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.SamplesPerPixel == 3
    assert "NumberOfFrames" not in ds
    assert ds.SourceImageSequence[0].ReferencedFrameNumber == 15
    assert ds.pixel_array.shape[-1] == 3


def test_a_frame_that_does_not_exist_is_a_preview_failure(tmp_path: Path) -> None:
    with pytest.raises(PreviewFailed):
        make_previews(bundled_file("CT_small.dcm"), tmp_path, (2,), "0" * 64, 85)
