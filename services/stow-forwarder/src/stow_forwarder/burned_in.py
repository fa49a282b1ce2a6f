"""Whether an instance's pixels may carry burned-in text, which removing attributes
does not remove (a de-identifying route refuses such an instance unless its rule
accepts it)."""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

SECONDARY_CAPTURE = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.7(\.[1-4])?$")
ULTRASOUND = re.compile(r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.(6\.[12]|3\.1)$")
SUSPECT_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC"})
"""Where an absent Burned In Annotation is treated as YES: secondary captures and
ultrasound, photographs, endoscopy, documents (screens and scans carry text)."""


def burned_in(ds: Dataset) -> str | None:
    """Why the pixel data may hold burned-in text, or None.

    Burned In Annotation (0028,0301) YES; or, when it is absent, a secondary capture,
    an ultrasound image, or a modality of photographs, screens and scans (the
    conservative reading of an attribute that most modalities leave out)."""
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES":
        return "Burned In Annotation (0028,0301) is YES"
    if value:
        return None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if SECONDARY_CAPTURE.match(sop_class):
        kind = "a secondary capture"
    elif ULTRASOUND.match(sop_class) or modality == "US":
        kind = "an ultrasound image"
    elif modality in SUSPECT_MODALITIES:
        kind = f"modality {modality}"
    else:
        return None
    return f"Burned In Annotation (0028,0301) is absent on {kind}, which often carries text"
