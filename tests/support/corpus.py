"""The transfer-syntax corpus: pydicom's bundled files plus two generated with DCMTK
(one instance per transfer syntax ingest accepts; Deflated Explicit VR Little Endian is
refused at ingest, see tests/ingest/test_hostile_inputs.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from support.dicom import bundled_file

BUNDLED = {
    ImplicitVRLittleEndian: "MR_small_implicit.dcm",
    ExplicitVRLittleEndian: "CT_small.dcm",
    ExplicitVRBigEndian: "MR_small_bigendian.dcm",
    JPEGBaseline8Bit: "SC_rgb_jpeg_dcmtk.dcm",
    JPEGExtended12Bit: "JPGExtended.dcm",
    JPEGLosslessSV1: "SC_rgb_jpeg_gdcm.dcm",
    JPEGLSLossless: "MR_small_jpeg_ls_lossless.dcm",
    JPEG2000Lossless: "MR_small_jp2klossless.dcm",
    JPEG2000: "JPEG2000.dcm",
    RLELossless: "MR_small_RLE.dcm",
}


def build_corpus(out: Path) -> dict[str, Path]:
    """One instance per accepted transfer syntax: {transfer syntax UID: file}."""
    corpus = {str(ts): bundled_file(name) for ts, name in BUNDLED.items()}

    # JPEG-LS near-lossless: pydicom's sample lacks study/series UIDs; add them.
    ds = pydicom.dcmread(bundled_file("JPEGLSNearLossless_16.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    near = out / "jpegls_near.dcm"
    ds.save_as(near)
    corpus[str(JPEGLSNearLossless)] = near

    # JPEG Lossless, process 14 (selection value not fixed): encoded by DCMTK.
    lossless = out / "jpeg_lossless_p14.dcm"
    subprocess.run(
        ["dcmcjpeg", "+el", str(bundled_file("CT_small.dcm")), str(lossless)],
        check=True,
        capture_output=True,
    )
    corpus[str(JPEGLossless)] = lossless

    for ts, path in corpus.items():
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ts, path
    return corpus
