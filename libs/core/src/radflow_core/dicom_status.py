"""DICOM status codes the pipeline sends or reads, by name (never as bare hex literals).

The same codes serve as C-STORE response statuses (PS3.4 Annex B, with detail in
Error Comment (0000,0902)) and as STOW-RS Failure Reason (0008,1197) values
(PS3.18 §10.5). Codes in the C0xx block are this pipeline's refinements of the
standard "Cannot understand" range, listed in docs/conformance.md. Ingest never
answers with :attr:`StoreStatus.DUPLICATE_SOP_INSTANCE` (a duplicate succeeds); the
forwarder reads it from destinations.
"""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    """STOW-RS: an unexpected failure inside the receiver."""
    DUPLICATE_SOP_INSTANCE = 0x0111
    """The receiver already holds an instance with this SOP Instance UID (PS3.7 C.4.2):
    from a destination, the instance is there, so it counts as delivered."""
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """The SOP Class is not a storage class this receiver accepts."""
    OUT_OF_RESOURCES = 0xA700
    """Blob store or broker unavailable: nothing was kept; the sender should retry."""
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """The dataset's SOP Class UID differs from the one the sender announced."""
    CANNOT_UNDERSTAND = 0xC000
    """The bytes are not a parsable DICOM dataset (truncated, malformed, too deep)."""
    MISSING_ATTRIBUTE = 0xC001
    """A required identifying attribute (SOP/Study/Series UID) is absent."""
    INVALID_UID = 0xC002
    """An identifying UID is not a conformant DICOM UID (PS3.5 §9.1)."""
    SOP_INSTANCE_MISMATCH = 0xC003
    """The dataset's SOP Instance UID differs from the one the sender announced."""
    STUDY_MISMATCH = 0xC004
    """STOW-RS to /studies/{uid}: the instance belongs to another study."""
    INSTANCE_TOO_LARGE = 0xC005
    """The instance exceeds the configured maximum size."""
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
    """The instance's transfer syntax is not one this receiver accepts."""

    @property
    def retriable(self) -> bool:
        """True for the A7xx block: the same request may succeed later."""
        return 0xA700 <= self <= 0xA7FF

    @property
    def label(self) -> str:
        return self.name.lower()
