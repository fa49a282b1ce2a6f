"""A lossy preview of one frame as a new, derived DICOM instance (runs in a codec worker).

The preview must never pass for a diagnostic image, so it is its own instance, marked
as what it is: Secondary Capture (8-bit is not a valid CT or MR image), Image Type
DERIVED\\SECONDARY, Lossy Image Compression 01 with its ratio and method, a Derivation
Description, and a Source Image Sequence naming the original as its "uncompressed
predecessor". It lives in a series of its own in the original's study (so its events
keep the study's partition) and leaves the original and its canonical variant alone.

Its UIDs are derived from the original's (SOP Instance UID, bytes, frame; series),
and the encoding is deterministic, so a preview made again after a replay has the same
UIDs and bytes, and is recognised downstream like any repeated instance.

The header is the original's (patient and study attributes included: the preview is
for the same patient's reading), minus what described the original's pixels: group
0028, functional groups, overlays, icons, private and security elements.
"""

from __future__ import annotations

import copy
import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, JPEGBaseline8Bit

from radflow_codecs.codecs import UndecodablePixelData, UnreadableDataset
from radflow_core.errors import PipelineError
from radflow_core.file_meta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from transcode.voi import display_frame

SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
JPEG_METHOD = "ISO_10918_1"
_DROPPED_GROUPS = (0x0028, 0x6000, 0x5000, 0x7FE0)
"""Image Pixel and presentation (rewritten), overlays, curves, pixel data."""
_DROPPED = (
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "IconImageSequence",
    "DigitalSignaturesSequence",
    "MACParametersSequence",
    "EncryptedAttributesSequence",
    "SourceImageSequence",
    "ReferencedImageSequence",
    "DerivationCodeSequence",
    "DerivationDescription",
    "NumberOfFrames",
    "FrameIncrementPointer",
)
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, f"{IMPLEMENTATION_CLASS_UID}.preview")
"""radflow's namespace for preview UIDs."""
_KEPT_0028 = ("BurnedInAnnotation", "RecognizableVisualFeatures")
"""Group 0028 elements that describe what the image shows, not how it is stored."""


class PreviewFailed(PipelineError):
    """A preview could not be made (the original's pixels are fine: it was normalized)."""

    reason = "preview_failed"


@dataclass(frozen=True)
class PreviewMade:
    """One preview instance written to ``path``."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    frame: int
    ratio: float
    """Uncompressed size of the original frame / JPEG size."""
    photometric_interpretation: str


def preview_uids(
    sop_instance_uid: str, original_sha256: str, series_uid: str, frame: int
) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of a preview, as 2.25 UIDs of name-based
    UUIDs (RFC 9562 version 5): the same original bytes and frame always give the same
    UIDs, and all previews of one series share one preview series."""
    instance = uuid.uuid5(_NAMESPACE, f"instance|{sop_instance_uid}|{original_sha256}|{frame}")
    series = uuid.uuid5(_NAMESPACE, f"series|{series_uid}")
    return f"2.25.{instance.int}", f"2.25.{series.int}"


def make_previews(
    src: Path, out_dir: Path, frames: tuple[int, ...], original_sha256: str, quality: int
) -> list[PreviewMade]:
    """One preview instance per frame in ``frames`` (1-based) of the Part 10 file ``src``.

    Raises:
        UnreadableDataset: ``src`` is not DICOM.
        UndecodablePixelData: a frame cannot be decoded.
        PreviewFailed: the frame cannot be shown in 8 bits or encoded.
    """
    try:
        header = dcmread(src, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any parser failure means unreadable
        raise UnreadableDataset(f"header cannot be parsed ({type(exc).__name__})") from None
    frame_count = int(header.get("NumberOfFrames") or 1)
    made = []
    for frame in frames:
        if not 1 <= frame <= frame_count:
            raise PreviewFailed(f"frame {frame} of {frame_count} does not exist")
        try:
            decoded = pixel_array(src, index=frame - 1)
        except Exception as exc:  # noqa: BLE001 - any decoder failure
            raise UndecodablePixelData(f"frame cannot be decoded ({type(exc).__name__})") from None
        try:
            shown = display_frame(decoded, header, frame - 1)
            jpeg = _jpeg(shown, quality)
        except Exception as exc:  # noqa: BLE001 - a value we cannot display or encode
            raise PreviewFailed(
                f"frame cannot be shown or encoded ({type(exc).__name__})"
            ) from None
        uncompressed = decoded.shape[0] * decoded.shape[1] * _samples(decoded)
        uncompressed *= (int(header.get("BitsAllocated", 8)) + 7) // 8
        ratio = round(uncompressed / len(jpeg), 2)
        ds = derived_dataset(header, shown, jpeg, frame, frame_count, ratio, original_sha256)
        path = out_dir / f"preview-{frame}.dcm"
        ds.save_as(path, enforce_file_format=True)
        made.append(
            PreviewMade(
                path,
                str(ds.SOPInstanceUID),
                str(ds.SeriesInstanceUID),
                frame,
                ratio,
                str(ds.PhotometricInterpretation),
            )
        )
    return made


def _samples(array: np.ndarray) -> int:
    return int(array.shape[2]) if array.ndim == 3 else 1


def _jpeg(shown: np.ndarray, quality: int) -> bytes:
    """8-bit JPEG baseline (ISO 10918-1 process 1): sequential, Huffman, no restart
    markers; colour as YCbCr with 4:2:2 chroma (YBR_FULL_422)."""
    buffer = io.BytesIO()
    mode = "RGB" if shown.ndim == 3 else "L"
    options: dict[str, object] = {"quality": quality, "optimize": False, "progressive": False}
    if mode == "RGB":
        options["subsampling"] = 1  # 4:2:2
    Image.fromarray(shown, mode=mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def derived_dataset(
    header: Dataset,
    shown: np.ndarray,
    jpeg: bytes,
    frame: int,
    frame_count: int,
    ratio: float,
    original_sha256: str,
) -> Dataset:
    """The preview's data set and file meta around the JPEG stream of ``shown``."""
    ds = Dataset()
    for element in header:
        if element.tag.group in _DROPPED_GROUPS and element.keyword not in _KEPT_0028:
            continue
        if element.keyword in _DROPPED or element.tag.is_private:
            continue
        ds.add(copy.deepcopy(element))
    sop_uid, series_uid = preview_uids(
        str(header.SOPInstanceUID), original_sha256, str(header.SeriesInstanceUID), frame
    )
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    if frame_count > 1:
        ds.InstanceNumber = frame
    description = str(header.get("SeriesDescription") or "").strip()
    ds.SeriesDescription = f"PREVIEW lossy {description}".strip()[:64]
    ds.DerivationDescription = (
        f"Lossy preview for a first look, not for diagnosis: frame {frame} of "
        f"{frame_count} of the source image, {_voi_used(header)}, 8 bits, JPEG baseline "
        f"(ISO 10918-1) at about {ratio}:1. The lossless original follows."
    )
    ds.DerivationCodeSequence = [_code("113040", "DCM", "Lossy Compression")]
    source = Dataset()
    source.ReferencedSOPClassUID = UID(str(header.SOPClassUID))
    source.ReferencedSOPInstanceUID = UID(str(header.SOPInstanceUID))
    if frame_count > 1:
        source.ReferencedFrameNumber = frame
    source.PurposeOfReferenceCodeSequence = [_code("121320", "DCM", "Uncompressed predecessor")]
    ds.SourceImageSequence = [source]
    colour = shown.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(shown.shape[0]), int(shown.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ratios, methods = _earlier_lossy(header)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.2f}"]
    ds.LossyImageCompressionMethod = [*methods, JPEG_METHOD]
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _voi_used(header: Dataset) -> str:
    if header.get("VOILUTSequence"):
        return "VOI LUT of the source applied"
    if "WindowCenter" in header and "WindowWidth" in header:
        return "window of the source applied"
    if str(header.get("PhotometricInterpretation", "")).startswith("MONOCHROME"):
        return "full range of the frame (the source has no window)"
    return "colour kept"


def _earlier_lossy(header: Dataset) -> tuple[list[str], list[str]]:
    """A lossy original's own ratios and methods, which come first (PS3.3 C.7.6.1.1.5)."""
    if header.get("LossyImageCompression") != "01":
        return [], []

    def listed(keyword: str) -> list[str]:
        value = header.get(keyword)
        if value is None or value == "":
            return []
        return [str(v) for v in value] if not isinstance(value, str | float) else [str(value)]

    ratios, methods = listed("LossyImageCompressionRatio"), listed("LossyImageCompressionMethod")
    if len(ratios) != len(methods):
        return [], []
    return ratios, methods


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
