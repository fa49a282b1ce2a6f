"""Pixel-data codecs: decode every frame, re-encode to a canonical lossless syntax,
and prove the result decodes to the same values.

Pure functions over bytes, with no I/O, so they run in a worker process (CPU-bound
codec work must not stall a consumer's heartbeat) and can be reused by the forwarder
when a destination needs another syntax. Errors are :class:`PipelineError` types
whose ``reason`` names the problem; their messages never quote dataset values.

Encoders, all through pydicom's pixel backends: RLE Lossless (pylibjpeg-rle), JPEG
2000 Lossless (pylibjpeg-openjpeg), JPEG-LS Lossless (pyjpegls / CharLS). JPEG
Lossless SV1 is decode-only: no maintained Python encoder exists.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from radflow_core.errors import PipelineError

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
NATIVE_LITTLE_ENDIAN = frozenset(
    {
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    }
)
ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless})
_J2K = frozenset({JPEG2000, JPEG2000Lossless})
_JPEG_LS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
_LOSSY_METHOD = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
}


class Target(StrEnum):
    """Canonical transfer syntaxes a policy may choose (all lossless)."""

    EXPLICIT_VR_LITTLE_ENDIAN = str(ExplicitVRLittleEndian)
    RLE_LOSSLESS = str(RLELossless)
    JPEG2000_LOSSLESS = str(JPEG2000Lossless)
    JPEG_LS_LOSSLESS = str(JPEGLSLossless)


class UndecodablePixelData(PipelineError):
    """The pixel data cannot be decoded (corrupt stream, unsupported or vendor syntax)."""

    reason = "undecodable_pixel_data"


class PixelRepresentationMismatch(UndecodablePixelData):
    """A JPEG 2000 stream's signedness contradicts Pixel Representation (0028,0103):
    values would come out wrong, so the instance is refused rather than guessed at."""

    reason = "pixel_representation_mismatch"


class UnreadableDataset(PipelineError):
    """The stored bytes do not parse as a DICOM Part 10 file."""

    reason = "unreadable_dataset"


class LosslessMismatch(PipelineError):
    """A lossless re-encode did not decode to the original values: a codec bug."""

    reason = "lossless_mismatch"


class UnwritableDataset(PipelineError):
    """The dataset cannot be written again (an element value pydicom cannot encode)."""

    reason = "unwritable_dataset"


class Outcome(StrEnum):
    ENCODED = "encoded"
    """Re-encoded to the target and verified."""
    ALREADY_CANONICAL = "already_canonical"
    """Already in the target syntax; decoded fully, so decodability is verified."""
    NATIVE_FALLBACK = "native_fallback"
    """The target codec cannot encode this image (bit depth, size); stored as Explicit
    VR Little Endian instead, verified."""
    NON_IMAGE = "non_image"
    """No pixel data (SR, KOS, PR, encapsulated documents…): passed through unchanged."""


@dataclass(frozen=True)
class PixelSummary:
    frames: int
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    photometric_interpretation: str
    lossy_original: bool


@dataclass(frozen=True)
class Normalized:
    data: bytes | None
    """The canonical Part 10 file, or None when the original bytes are canonical."""
    transfer_syntax_uid: str
    outcome: Outcome
    pixels: PixelSummary | None
    decode_s: float = 0.0
    encode_s: float = 0.0
    verify_s: float = 0.0
    routing: dict[str, str | None] | None = None
    """The original's routing attributes by keyword
    (:func:`radflow_core.instance_header.routing_attributes`), read from the dataset
    parsed for the codec work anyway; set by :func:`streaming.normalize_file`."""


def decoding_plugin(transfer_syntax: str) -> str:
    """The fastest installed decoder for a syntax ('' lets pydicom choose).

    For JPEG-LS, CharLS (pyjpegls) decodes 4x faster than pylibjpeg-libjpeg, which
    pydicom would otherwise pick first (bench/README.md).
    """
    if transfer_syntax in _JPEG_LS:
        decoder = get_decoder(UID(transfer_syntax))
        if "pyjpegls" in decoder.available_plugins:
            return "pyjpegls"
    return ""


def has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in PIXEL_KEYWORDS)


def _read(data: bytes) -> Dataset:
    try:
        return dcmread(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any parser failure: unreadable
        raise UnreadableDataset(f"dataset unreadable ({type(exc).__name__})") from None


def decode(ds: Dataset) -> np.ndarray[Any, Any]:
    """Every frame's values, as pydicom's backends decode them (YBR converted to RGB)."""
    if ds.file_meta.get("TransferSyntaxUID") in _J2K:
        _check_j2k_sign(ds)
    try:
        plugin = decoding_plugin(str(ds.file_meta.get("TransferSyntaxUID", "")))
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure: undecodable
        raise UndecodablePixelData(f"pixel data not decodable ({type(exc).__name__})") from None


def _check_j2k_sign(ds: Dataset) -> None:
    check_j2k_sign(ds, ds.PixelData)


def check_j2k_sign(ds: Dataset, encapsulated: Any) -> None:
    """Refuse a JPEG 2000 stream whose signedness contradicts Pixel Representation.

    ``encapsulated`` is the Pixel Data value, as bytes or as a file positioned at it.
    """
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        first = next(generate_frames(encapsulated, number_of_frames=frames))
        params = get_j2k_parameters(first)
    except Exception as exc:  # noqa: BLE001 - any parser failure: undecodable
        raise UndecodablePixelData(f"JPEG 2000 stream unreadable ({type(exc).__name__})") from None
    signed = params.get("is_signed")
    if signed is not None and bool(signed) != bool(ds.get("PixelRepresentation", 0)):
        raise PixelRepresentationMismatch(
            "JPEG 2000 stream signedness differs from Pixel Representation"
        )


def summary(ds: Dataset, frames: int, source_ts: UID) -> PixelSummary:
    """The geometry of ``ds``'s pixel data, with ``frames`` as actually decoded."""
    return PixelSummary(
        frames=frames,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1)),
        bits_allocated=int(ds.BitsAllocated),
        bits_stored=int(ds.get("BitsStored", ds.BitsAllocated)),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "")),
        lossy_original=source_ts in ALWAYS_LOSSY or ds.get("LossyImageCompression") == "01",
    )


def _write(ds: Dataset) -> bytes:
    out = io.BytesIO()
    try:
        ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # noqa: BLE001 - any writer failure: unwritable
        raise UnwritableDataset(f"dataset cannot be written ({type(exc).__name__})") from None
    return out.getvalue()


def _as_native(ds: Dataset, arr: np.ndarray[Any, Any], source_ts: UID) -> Dataset:
    """A copy of ``ds`` in Explicit VR Little Endian holding ``arr`` uncompressed."""
    out = Dataset(ds)
    out.file_meta = Dataset(ds.file_meta)  # type: ignore[assignment]
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if source_ts in NATIVE_LITTLE_ENDIAN:
        return out  # the encoded values are already little endian: only the framing changes
    native = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if (
        native.ndim >= 3
        and int(ds.get("SamplesPerPixel", 1)) == 3
        and photometric.startswith("YBR")
    ):
        photometric = "RGB"  # decode() converted the colour space
    bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    try:
        out.set_pixel_data(native, photometric, bits_stored, generate_instance_uid=False)
    except ValueError:
        # set_pixel_data stops at 16 bits; 32-bit data (RT dose) is written directly.
        out.PixelData = native.tobytes()
        out["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
        out.PhotometricInterpretation = photometric
        if int(ds.get("SamplesPerPixel", 1)) > 1:
            out.PlanarConfiguration = 0
    mark_lossy_original(out, ds, source_ts)
    return out


def mark_lossy_original(out: Dataset, ds: Dataset, source_ts: UID) -> None:
    """A lossless copy of a lossy original stays marked lossy (PS3.3 C.7.6.1.1.5)."""
    if source_ts in ALWAYS_LOSSY or ds.get("LossyImageCompression") == "01":
        out.LossyImageCompression = "01"
        if "LossyImageCompressionMethod" not in out and source_ts in _LOSSY_METHOD:
            out.LossyImageCompressionMethod = _LOSSY_METHOD[source_ts]


def normalize(data: bytes, target: Target) -> Normalized:
    """Decode ``data`` fully and produce its canonical lossless form in ``target``.

    Raises:
        UnreadableDataset, UndecodablePixelData, PixelRepresentationMismatch,
        LosslessMismatch, UnwritableDataset: each with its machine-readable ``reason``.
    """
    ds = _read(data)
    source_ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not has_pixels(ds):
        return Normalized(None, source_ts, Outcome.NON_IMAGE, None)
    started = time.perf_counter()
    original = decode(ds)
    decoded = time.perf_counter()
    frames = original.shape[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 1
    pixels = summary(ds, frames, source_ts)
    if source_ts == target.value:
        return Normalized(None, source_ts, Outcome.ALREADY_CANONICAL, pixels, decoded - started)

    out = _as_native(ds, original, source_ts)
    outcome = Outcome.ENCODED
    if target is not Target.EXPLICIT_VR_LITTLE_ENDIAN:
        try:
            out.compress(target.value, generate_instance_uid=False)
        except Exception:  # noqa: BLE001 - the codec cannot take this image: stay native
            out = _as_native(ds, original, source_ts)
            outcome = Outcome.NATIVE_FALLBACK
    encoded_bytes = _write(out)
    encoded = time.perf_counter()

    again = decode(_read(encoded_bytes))
    if again.shape != original.shape or not np.array_equal(again, original):
        raise LosslessMismatch(f"re-encoded pixels differ from the original ({target.name})")
    verified = time.perf_counter()
    ts = str(out.file_meta.TransferSyntaxUID)
    return Normalized(
        encoded_bytes,
        ts,
        outcome,
        pixels,
        decode_s=decoded - started,
        encode_s=encoded - decoded,
        verify_s=verified - encoded,
    )
