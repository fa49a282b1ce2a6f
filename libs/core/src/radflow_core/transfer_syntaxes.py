"""The transfer syntaxes the pipeline accepts, in the receiver's order of preference."""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
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
)

NATIVE: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
"""Uncompressed syntaxes; Explicit VR Little Endian is preferred in negotiation."""

ACCEPTED: tuple[UID, ...] = (
    *NATIVE,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)
"""Every syntax ingest accepts over DIMSE and STOW-RS."""

RECEIVED: tuple[UID, ...] = tuple(ts for ts in ACCEPTED if ts != DeflatedExplicitVRLittleEndian)
"""What ingest negotiates with and accepts from senders: every accepted syntax but
Deflated Explicit VR Little Endian, which a sender could use to make a few megabytes
inflate to gigabytes (docs/security.md, "Limits and structural validation")."""
