"""Why a report cannot be returned: one error type per machine-readable reason, and the
report document read from its JSON with those reasons.

All of these are final (retrying cannot fix the input): the report goes to
report.failed with the reason, and nothing is sent to the RIS.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from radflow_core.errors import PipelineError
from radflow_core.report_document import ReportDocument


class ReportError(PipelineError):
    """The report does not match radflow.report v1."""

    reason = "invalid_report"


class MissingAccessionNumber(ReportError):
    reason = "missing_accession_number"


class MissingPatientIdentifier(ReportError):
    reason = "missing_patient_identifier"


class EmptyReport(ReportError):
    """No text to send."""

    reason = "empty_report"


class NotVerified(ReportError):
    """A Structured Report whose Verification Flag is not VERIFIED."""

    reason = "not_verified"


class NotComplete(ReportError):
    """A Structured Report whose Completion Flag is not COMPLETE."""

    reason = "not_complete"


class UnreadableReport(ReportError):
    """Not JSON, not DICOM, or not a Structured Report."""

    reason = "unreadable_report"


class ReportTooLarge(ReportError):
    reason = "report_too_large"


class UnencodableText(ReportError):
    """The report has characters the site's encoding cannot carry."""

    reason = "unencodable_text"


class UnknownSite(ReportError):
    """The report names a site that is not in the sites file."""

    reason = "unknown_site"


def document_from(data: Any) -> ReportDocument:
    """Validate a parsed report document (JSON object or a dict built from an SR).

    Raises:
        ReportError: the most specific subtype; the message names fields, never values.
    """
    if isinstance(data, dict):
        data = {**data}
        accession = data.get("accession_number")
        if isinstance(accession, str):
            data["accession_number"] = accession.strip()
    try:
        document = ReportDocument.model_validate(data)
    except ValidationError as exc:
        locations = [tuple(str(p) for p in error["loc"]) for error in exc.errors()]
        if any(loc[:1] == ("accession_number",) for loc in locations):
            raise MissingAccessionNumber("the report has no accession number") from None
        if any(loc == ("patient",) or loc[:2] == ("patient", "identifiers") for loc in locations):
            raise MissingPatientIdentifier("the report has no patient identifier") from None
        if any(loc == ("sections",) for loc in locations):
            raise EmptyReport("the report has no text") from None
        fields = sorted({".".join(loc) for loc in locations})
        raise ReportError(
            f"the report document does not match radflow.report v1: {fields}"
        ) from None
    if (
        not any(s.text.strip() for s in document.sections)
        and not (document.impression or "").strip()
    ):
        raise EmptyReport("the report has no text")
    return document
