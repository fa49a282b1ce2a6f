"""One tree of errors, with retriability as data.

Retry and dead-letter logic reads :attr:`PipelineError.retriable` and
:attr:`PipelineError.reason`, never the message text. Third-party exceptions are
mapped to these types where they enter (blob store, Kafka), with ``raise ... from``.
"""

from __future__ import annotations

from typing import ClassVar


class PipelineError(Exception):
    """Root of everything the pipeline raises on purpose."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "pipeline_error"
    """Machine-readable reason, used in dead letters, metrics labels and logs."""


class ConfigurationError(PipelineError):
    """A setting is missing or malformed; raised at start-up, before any work."""

    reason = "configuration_error"


class BlobStoreUnavailable(PipelineError):
    """The S3 server could not be reached or answered with a server error."""

    retriable = True
    reason = "blob_store_unavailable"


class BlobStoreMisconfigured(PipelineError):
    """The S3 server answered, and said no in a way that only a change of configuration
    fixes: an unknown access key, a wrong secret (SignatureDoesNotMatch), AccessDenied,
    or a bucket that does not exist. The message names the S3 error code (and the
    bucket), never a key or secret. Not retriable: retrying cannot help, so records go
    to the dead-letter topic with this reason and readiness names it."""

    reason = "blob_store_misconfigured"


class BlobNotFound(PipelineError):
    """The event names a blob that is not in the store."""

    reason = "blob_not_found"


class BlobIntegrityError(PipelineError):
    """The bytes in the store do not hash to the sha256 the event announced."""

    reason = "blob_integrity_error"


class BrokerUnavailable(PipelineError):
    """Kafka did not acknowledge in time or could not be reached."""

    retriable = True
    reason = "broker_unavailable"


class EventDecodeError(PipelineError):
    """A record on a topic is not a valid event of the expected type and version."""

    reason = "undecodable_event"
