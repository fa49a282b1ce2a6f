"""Display values for a lossy preview: one frame as a viewer would show it, in 8 bits.

A preview is for a first look, so it carries what the modality chose to show, not the
raw values: grayscale goes through the Modality LUT (rescale slope and intercept, or a
Modality LUT Sequence), then the VOI LUT (the VOI LUT Sequence's first LUT, else the
first Window Center/Width with its VOI LUT Function, PS3.3 C.11.2.1.2), else the
frame's own range, and MONOCHROME1 is inverted so the result is MONOCHROME2. Colour
stays colour: palette colour is looked up, YBR is converted to RGB, and samples of
more than 8 bits are scaled down. Pure: no I/O, unit-tested on arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

MAX = 255.0


def display_frame(frame: np.ndarray, ds: Dataset, frame_index: int = 0) -> np.ndarray:
    """``frame`` (as decoded: rows x columns, or rows x columns x 3 in RGB) as uint8.

    ``ds`` is the original's header; ``frame_index`` (0-based) picks per-frame values
    of an enhanced multi-frame header.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        return _to_8bit(apply_color_lut(frame, ds), _lut_bits(ds))
    if frame.ndim == 3:
        return _to_8bit(frame, int(ds.get("BitsStored", 8)))
    values = _modality(frame, ds, frame_index)
    out = _voi(values, ds, frame_index)
    if photometric == "MONOCHROME1":
        out = MAX - out
    shown: np.ndarray = np.rint(out).astype(np.uint8)
    return shown


def _to_8bit(rgb: np.ndarray, bits: int) -> np.ndarray:
    wide = rgb.astype(np.uint32)
    if bits > 8:
        wide >>= bits - 8
    out: np.ndarray = np.clip(wide, 0, 255).astype(np.uint8)
    return out


def _lut_bits(ds: Dataset) -> int:
    descriptor = ds.get("RedPaletteColorLookupTableDescriptor")
    return int(descriptor[2]) if descriptor else 8


def _frame_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` for this frame: per-frame, else shared."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and index < len(items) and sequence in items[index]:
            found = items[index][sequence].value
            if found:
                item: Dataset = found[0]
                return item
    return None


def _modality(frame: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    transform = _frame_item(ds, frame_index, "PixelValueTransformationSequence")
    if transform is not None and "RescaleSlope" in transform:
        slope = float(transform.RescaleSlope)
        intercept = float(transform.get("RescaleIntercept", 0))
        return frame.astype(np.float64) * slope + intercept
    return np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)


def _first(value: Any) -> float:
    """The first of a possibly multi-valued DS."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)


def _voi(values: np.ndarray, ds: Dataset, frame_index: int) -> np.ndarray:
    lut = ds.get("VOILUTSequence")
    if lut:
        return voi_lut(values, lut[0])
    source: Dataset | None = ds if "WindowCenter" in ds and "WindowWidth" in ds else None
    if source is None:
        source = _frame_item(ds, frame_index, "FrameVOILUTSequence")
    if source is not None and "WindowCenter" in source and "WindowWidth" in source:
        function = str(source.get("VOILUTFunction", "LINEAR")).strip() or "LINEAR"
        center, width = _first(source.WindowCenter), _first(source.WindowWidth)
        if width > 0:
            return window(values, center, width, function)
    return full_range(values)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """PS3.3 C.11.2.1.2.1-2: a window to 0..255 (LINEAR, LINEAR_EXACT or SIGMOID)."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        return MAX / (1 + np.exp(-4 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((x - center) / width + 0.5) * MAX, 0, MAX)
    if width <= 1:  # LINEAR needs width >= 1; a width of 1 is a threshold
        return np.where(x <= center - 0.5, 0.0, MAX)
    return np.clip(((x - (center - 0.5)) / (width - 1) + 0.5) * MAX, 0, MAX)


def voi_lut(values: np.ndarray, item: Dataset) -> np.ndarray:
    """A VOI LUT Sequence item: values below the first mapped one take the first entry,
    above the last the last; the output's bit depth (descriptor value 3) scales to 255."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, bytes):  # OW: 16-bit words, little endian
        table = np.frombuffer(data, dtype="<u2").astype(np.float64)
    elif isinstance(data, MultiValue | list | tuple):
        table = np.asarray(list(data), dtype=np.float64)
    else:
        table = np.asarray([data], dtype=np.float64)
    if entries == 0:
        entries = 65536
    table = table[:entries]
    index = np.clip(np.rint(values - first), 0, len(table) - 1).astype(np.int64)
    mapped: np.ndarray = np.clip(table[index] * MAX / (2**bits - 1), 0, MAX)
    return mapped


def full_range(values: np.ndarray) -> np.ndarray:
    """No window given: the frame's own minimum to maximum."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape)
    return (values - low) * (MAX / (high - low))
