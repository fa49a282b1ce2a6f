"""The codecs on pydicom's bundled files: every decodable image re-encodes to each
lossless target with identical values, broken ones fail with their reason, and DCMTK
reads what we write."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radflow_codecs.codecs import (
    LosslessMismatch,
    Normalized,
    Outcome,
    Target,
    decode,
    normalize,
)
from radflow_codecs.streaming import normalize_file
from radflow_core.errors import PipelineError
from support.dicom import bundled_file

IMAGES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "693_J2KI.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_palette.dcm",
    "examples_ybr_color.dcm",
    "image_dfl.dcm",
    "liver_expb_1frame.dcm",
    "rtdose_expb.dcm",
    "ExplVR_BigEnd.dcm",
]
NON_IMAGES = ["test-SR.dcm", "reportsi.dcm", "rtplan.dcm", "waveform_ecg.dcm"]
BROKEN = {
    "JPEG-lossy.dcm": "undecodable_pixel_data",
    "JPEG2000-embedded-sequence-delimiter.dcm": "undecodable_pixel_data",
    "J2K_pixelrep_mismatch.dcm": "pixel_representation_mismatch",
    "MR_truncated.dcm": "undecodable_pixel_data",
    "no_meta.dcm": "unreadable_dataset",
}


def _pixels(data: bytes) -> np.ndarray:
    return decode(pydicom.dcmread(io.BytesIO(data)))


def in_memory(src: Path, _: Path, target: Target) -> tuple[Normalized, bytes | None]:
    result = normalize(src.read_bytes(), target)
    return result, result.data


def from_file(src: Path, tmp: Path, target: Target) -> tuple[Normalized, bytes | None]:
    dst = tmp / "canonical.dcm"
    result = normalize_file(src, dst, target)
    assert result.data is None
    return result, dst.read_bytes() if dst.exists() else None


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("run", [in_memory, from_file], ids=["in-memory", "frame-by-frame"])
@pytest.mark.parametrize("target", list(Target), ids=lambda t: t.name)
@pytest.mark.parametrize("name", IMAGES)
def test_images_become_canonical_with_identical_values(
    name: str, target: Target, run, tmp_path: Path
) -> None:
    original = bundled_file(name).read_bytes()
    result, canonical = run(bundled_file(name), tmp_path, target)
    assert result.pixels is not None
    if result.outcome is Outcome.ALREADY_CANONICAL:
        assert canonical is None
        return
    assert canonical is not None
    out = pydicom.dcmread(io.BytesIO(canonical))
    expected = (
        target.value if result.outcome is Outcome.ENCODED else Target.EXPLICIT_VR_LITTLE_ENDIAN
    )
    assert out.file_meta.TransferSyntaxUID == expected
    assert out.file_meta.TransferSyntaxUID.is_little_endian
    src = pydicom.dcmread(io.BytesIO(original))
    assert out.SOPInstanceUID == src.SOPInstanceUID  # lossless: same instance
    assert np.array_equal(_pixels(canonical), _pixels(original))
    if result.pixels.lossy_original:
        assert out.LossyImageCompression == "01"


@pytest.mark.parametrize("name", NON_IMAGES)
def test_non_images_pass_through_unchanged(name: str) -> None:
    result = normalize(bundled_file(name).read_bytes(), Target.JPEG_LS_LOSSLESS)
    assert result.outcome is Outcome.NON_IMAGE
    assert result.data is None and result.pixels is None


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("run", [in_memory, from_file], ids=["in-memory", "frame-by-frame"])
@pytest.mark.parametrize(("name", "reason"), BROKEN.items())
def test_broken_files_fail_with_their_reason(name: str, reason: str, run, tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as info:
        run(bundled_file(name), tmp_path, Target.JPEG_LS_LOSSLESS)
    assert info.value.reason == reason
    assert not info.value.retriable


def test_big_endian_values_survive_as_little_endian() -> None:
    original = bundled_file("MR_small_bigendian.dcm").read_bytes()
    result = normalize(original, Target.EXPLICIT_VR_LITTLE_ENDIAN)
    assert result.data is not None
    le = pydicom.dcmread(io.BytesIO(result.data))
    be = pydicom.dcmread(io.BytesIO(original))
    assert le.pixel_array.dtype.byteorder in ("<", "=")
    assert np.array_equal(le.pixel_array, be.pixel_array)
    assert int(le.pixel_array.max()) == int(be.pixel_array.max()) > 255  # not byte-swapped


def test_a_codec_that_changes_values_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    import radflow_codecs.codecs as codecs

    real = codecs.decode
    calls = {"n": 0}

    def corrupting(ds: pydicom.Dataset) -> np.ndarray:
        arr = real(ds)
        calls["n"] += 1
        return arr + 1 if calls["n"] == 2 else arr  # the verify pass sees other values

    monkeypatch.setattr(codecs, "decode", corrupting)
    with pytest.raises(LosslessMismatch):
        normalize(bundled_file("CT_small.dcm").read_bytes(), Target.RLE_LOSSLESS)


@pytest.mark.parametrize(
    ("target", "tool"),
    [(Target.JPEG_LS_LOSSLESS, "dcmdjpls"), (Target.RLE_LOSSLESS, "dcmdrle")],
)
def test_dcmtk_decodes_our_canonical_output(target: Target, tool: str, tmp_path: Path) -> None:
    for name in ("CT_small.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_bigendian.dcm"):
        result = normalize(bundled_file(name).read_bytes(), target)
        assert result.data is not None
        encoded, decoded = tmp_path / f"{name}.enc", tmp_path / f"{name}.dec"
        encoded.write_bytes(result.data)
        run = subprocess.run([tool, str(encoded), str(decoded)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        theirs = pydicom.dcmread(decoded).pixel_array
        assert np.array_equal(theirs, _pixels(result.data)), f"{tool} disagrees on {name}"


_PEAK_RSS = """
import resource, sys
from pathlib import Path
from radflow_codecs.codecs import Target
from radflow_codecs.streaming import normalize_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = normalize_file(Path(sys.argv[1]), Path(sys.argv[2]), Target.JPEG_LS_LOSSLESS)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(result.outcome.value, (after - before) * 1024)
"""


def test_a_large_multiframe_instance_is_normalized_without_holding_it_in_memory(
    tmp_path: Path,
) -> None:
    import sys

    frames = np.random.default_rng(3).integers(0, 4096, (160, 512, 512), dtype=np.uint16)
    src, dst = tmp_path / "big.dcm", tmp_path / "out.dcm"
    ds = pydicom.dcmread(bundled_file("CT_small.dcm"))
    ds.set_pixel_data(frames, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(src, enforce_file_format=True)
    size = src.stat().st_size
    del frames, ds
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    outcome, grown = run.stdout.split()
    assert outcome == "encoded"
    assert size > 80_000_000
    assert int(grown) < size * 0.25, f"peak memory grew by {int(grown) / size:.2f}x the instance"
    assert pydicom.dcmread(dst, stop_before_pixels=True).NumberOfFrames == 160
