"""Frame-by-frame normalization from file to file, for instances of any size.

:func:`normalize_file` keeps at most a couple of frames and one encoded fragment in
memory: frames are decoded one at a time from the original file, encoded, and
appended to the output file; verification then walks original and output in
lockstep, frame by frame. The rare shapes it does not stream (1-bit pixels, float
pixel data, elements after Pixel Data, deflated datasets) go through
:func:`codecs.normalize` in memory, and so do small files whose frames pydicom's
frame iterator cannot read but its whole-array decoder can (odd encapsulation).
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.encoders.base import get_encoder
from pydicom.pixels.utils import iter_pixels
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from radflow_codecs.codecs import (
    _J2K,
    LosslessMismatch,
    Normalized,
    Outcome,
    PixelRepresentationMismatch,
    Target,
    UndecodablePixelData,
    UnreadableDataset,
    UnwritableDataset,
    check_j2k_sign,
    decoding_plugin,
    has_pixels,
    mark_lossy_original,
    normalize,
    summary,
)
from radflow_core.instance_header import routing_attributes

_PIXEL_DATA = 0x7FE00010
_PADDING = 0xFFFCFFFC
_OFFSET_TABLES = (0x7FE00001, 0x7FE00002, 0x7FE00003)
_ITEM = 0xE000FFFE
IN_MEMORY_RETRY_BYTES = 64 * 1024 * 1024
"""Files up to this size get a second, in-memory attempt when frame iteration fails."""
_SEQ_DELIMITER = 0xE0DDFFFE


def _read_header(src: Path) -> tuple[Dataset, Any]:
    """The dataset with Pixel Data deferred (not loaded), and Pixel Data's raw element."""
    try:
        ds = dcmread(src, defer_size=1024)
        raw = ds._dict.get(Tag(_PIXEL_DATA))  # the deferred value and its file offset
    except Exception as exc:  # noqa: BLE001 - any parser failure: unreadable
        raise UnreadableDataset(f"dataset unreadable ({type(exc).__name__})") from None
    return ds, raw


def _streamable(ds: Dataset) -> bool:
    if "PixelData" not in ds or int(ds.get("BitsAllocated", 0)) not in (8, 16, 32):
        return False
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return False
    trailing = [t for t in ds._dict if t > _PIXEL_DATA and t != _PADDING]
    return not trailing


def _check_j2k_sign(src: Path, ds: Dataset, raw: Any) -> None:
    with src.open("rb") as f:
        f.seek(raw.value_tell)
        check_j2k_sign(ds, f)


def _frames(src: Path, transfer_syntax: str) -> Iterator[np.ndarray[Any, Any]]:
    """Decoded frames; any decoder failure becomes UndecodablePixelData."""
    try:
        yield from iter_pixels(src, decoding_plugin=decoding_plugin(transfer_syntax))
    except Exception as exc:  # noqa: BLE001 - any decoder failure: undecodable
        raise UndecodablePixelData(f"pixel data not decodable ({type(exc).__name__})") from None


def _output_header(ds: Dataset, source_ts: UID, ts: str) -> tuple[Dataset, str]:
    header = Dataset()
    # By tag, never by iterating ds: that would load the deferred Pixel Data.
    for tag in sorted(ds._dict):
        if tag >= _OFFSET_TABLES[0]:
            break
        header.add(ds[tag])
    header.file_meta = Dataset(ds.file_meta)  # type: ignore[assignment]
    header.file_meta.TransferSyntaxUID = UID(ts)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3 and photometric.startswith("YBR"):
        photometric = "RGB"  # frames are decoded to RGB
    header.PhotometricInterpretation = photometric
    if samples > 1:
        header.PlanarConfiguration = 0
    mark_lossy_original(header, ds, source_ts)
    return header, photometric


def _item(out: BinaryIO, tag: int, data: bytes) -> None:
    out.write(struct.pack("<II", tag, len(data)))
    out.write(data)


def _write_encapsulated(
    out: BinaryIO, src: Path, ds: Dataset, photometric: str, target: Target
) -> int:
    encoder = get_encoder(target.value)
    options: dict[str, Any] = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1)),
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.get("BitsStored", ds.BitsAllocated)),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "photometric_interpretation": photometric,
        "number_of_frames": 1,
        "planar_configuration": 0,
    }
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    _item(out, _ITEM, b"")  # empty Basic Offset Table
    count = 0
    for frame in _frames(src, str(ds.file_meta.TransferSyntaxUID)):
        fragment = encoder.encode(frame, **options)
        _item(out, _ITEM, fragment + b"\0" * (len(fragment) % 2))
        count += 1
    out.write(struct.pack("<II", _SEQ_DELIMITER, 0))
    return count


def _write_native(out: BinaryIO, src: Path, ds: Dataset) -> int:
    bits = int(ds.BitsAllocated)
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    length = frames * int(ds.Rows) * int(ds.Columns) * samples * (bits // 8)
    vr = b"OB" if bits <= 8 else b"OW"
    out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length + length % 2))
    count = 0
    for frame in _frames(src, str(ds.file_meta.TransferSyntaxUID)):
        out.write(frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes())
        count += 1
    if length % 2:
        out.write(b"\0")
    return count


def _write(src: Path, dst: Path, ds: Dataset, source_ts: UID, target: Target) -> tuple[str, int]:
    """Write the canonical file; fall back to native if the target codec refuses."""
    if target is not Target.EXPLICIT_VR_LITTLE_ENDIAN:
        header, photometric = _output_header(ds, source_ts, target.value)
        try:
            with dst.open("wb") as out:
                header.save_as(out, enforce_file_format=True)
                return target.value, _write_encapsulated(out, src, ds, photometric, target)
        except UndecodablePixelData:
            raise
        except Exception:  # noqa: BLE001, S110 - the codec cannot take this image: go native
            pass
    header, _ = _output_header(ds, source_ts, str(ExplicitVRLittleEndian))
    with dst.open("wb") as out:
        header.save_as(out, enforce_file_format=True)
        return str(ExplicitVRLittleEndian), _write_native(out, src, ds)


def _verify(src: Path, src_ts: str, dst: Path, dst_ts: str) -> None:
    frames = zip(_frames(src, src_ts), _frames(dst, dst_ts), strict=True)
    for index, (original, again) in enumerate(frames):
        if original.shape != again.shape or not np.array_equal(original, again):
            raise LosslessMismatch(f"frame {index} differs after re-encoding")


def normalize_file(src: Path, dst: Path, target: Target) -> Normalized:
    """Like :func:`codecs.normalize`, from file ``src`` to file ``dst``, frame by frame.

    ``data`` of the result is None; ``dst`` holds the canonical file unless the outcome
    is ALREADY_CANONICAL or NON_IMAGE (then the original is canonical).
    """
    ds, raw = _read_header(src)
    return dataclasses.replace(
        _normalize(src, dst, target, ds, raw), routing=routing_attributes(ds)
    )


def _normalize(src: Path, dst: Path, target: Target, ds: Dataset, raw: Any) -> Normalized:
    source_ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not has_pixels(ds):
        return Normalized(None, source_ts, Outcome.NON_IMAGE, None)
    if not _streamable(ds):
        return _in_memory(src, dst, target)
    try:
        return _stream(src, dst, target, ds, raw, source_ts)
    except PixelRepresentationMismatch:
        raise
    except UndecodablePixelData:
        if src.stat().st_size > IN_MEMORY_RETRY_BYTES:
            raise
        return _in_memory(src, dst, target)


def _in_memory(src: Path, dst: Path, target: Target) -> Normalized:
    result = normalize(src.read_bytes(), target)
    if result.data is not None:
        dst.write_bytes(result.data)
    return Normalized(
        None,
        result.transfer_syntax_uid,
        result.outcome,
        result.pixels,
        result.decode_s,
        result.encode_s,
        result.verify_s,
    )


def _stream(
    src: Path, dst: Path, target: Target, ds: Dataset, raw: Any, source_ts: UID
) -> Normalized:
    if source_ts in _J2K:
        _check_j2k_sign(src, ds, raw)
    started = time.perf_counter()
    if source_ts == target.value:
        frames = sum(1 for _ in _frames(src, source_ts))
        return Normalized(
            None,
            source_ts,
            Outcome.ALREADY_CANONICAL,
            summary(ds, frames, source_ts),
            decode_s=time.perf_counter() - started,
        )
    try:
        ts, frames = _write(src, dst, ds, source_ts, target)
    except (UndecodablePixelData, LosslessMismatch):
        raise
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - any writer failure: unwritable
        raise UnwritableDataset(f"dataset cannot be written ({type(exc).__name__})") from None
    written = time.perf_counter()
    _verify(src, source_ts, dst, ts)
    outcome = Outcome.ENCODED if ts == target.value else Outcome.NATIVE_FALLBACK
    return Normalized(
        None,
        ts,
        outcome,
        summary(ds, frames, source_ts),
        encode_s=written - started,
        verify_s=time.perf_counter() - written,
    )
