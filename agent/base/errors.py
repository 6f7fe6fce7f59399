"""Errors of the agent, one tree, by cause.

::

    AgentError
    ├── ConfigError            the operator's config is wrong (fix the file, restart)
    ├── IncompatibleStateError the state folder was written by a newer agent (install it)
    ├── UntrustedInputError    something from outside was rejected (never retried blindly)
    │   ├── BundleError        a bundle or its manifest is malformed or unsafe
    │   │   └── NewerFormatError   (also UnsupportedContractError) a bundle format unknown here
    │   └── DesiredStateError  the fleet's desired state is malformed
    ├── FetchError             a transient transport failure (retried on the next poll)
    │   └── TamperedDownloadError  bytes did not match their signed length or hash
    ├── InsufficientSpaceError not enough disk for an install (retried on the next check)
    ├── StorageError           the device's own disk failed a write (full, read-only, I/O)
    ├── ModelError             a model could not be loaded or failed its golden vectors
    │   ├── GoldenMismatchError
    │   └── RuntimeTooOldError (also UnsupportedContractError) needs a newer ONNX Runtime
    ├── UnsupportedContractError  a candidate this agent cannot read, another version may
    └── InferenceError         a request could not be served
        ├── InvalidRequestError    the client sent something wrong (HTTP 400)
        ├── ModelNotFoundError     unknown model or version (HTTP 404)
        ├── NotReadyError          the model exists but cannot serve now (HTTP 503)
        └── AgentUnreachableError  (client side) nothing answers on the socket

HTTP status codes are chosen at the HTTP edge (``agent.serving.server``), not here.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The agent's configuration is invalid."""


class IncompatibleStateError(AgentError):
    """The state folder holds a file a newer agent wrote, in a schema this one cannot read.

    The agent refuses to start rather than forget (or overwrite) what it records: the
    operator installs the newer agent again.
    """


class UntrustedInputError(AgentError):
    """Input from outside the device was rejected."""


class BundleError(UntrustedInputError):
    """A bundle or its manifest is malformed or unsafe to unpack."""


class UnsupportedContractError(AgentError):
    """A candidate needs a contract this agent does not have (a newer bundle format, a
    newer ONNX Runtime): not the release's fault, nor an integrity failure, but this
    agent's. It fails the install here, and the journal records which agent version
    refused, so that an agent of another version (an upgrade) tries the candidate again
    (``agent.update.journal.should_skip``). Raised through its subclasses only."""


class NewerFormatError(BundleError, UnsupportedContractError):
    """A bundle in a format this agent does not read: an unknown manifest schema of the
    ``edgefleet.manifest/<n>`` form, member encoding or container kind."""


class DesiredStateError(UntrustedInputError):
    """A fleet's desired-state document is malformed."""


class FetchError(AgentError):
    """A transient failure to fetch metadata or a target."""


class TamperedDownloadError(FetchError):
    """Downloaded bytes did not match the length or hash that signed metadata gives.

    The transport (a mirror, a proxy, a cut connection) is to blame, not the release,
    so the download is refused now and tried again on the next check.
    """


class InsufficientSpaceError(AgentError):
    """Not enough free disk for a download and its unpacked copy.

    Not the release's fault: the install is put back and tried again on the next check,
    so freeing space is all an operator has to do.
    """


class StorageError(AgentError):
    """The device's own disk refused a read or write (full, out of inodes, read-only, I/O).

    Not the release's fault either: whatever was in progress is put back and tried
    again on the next check, once the disk is healthy.
    """


class ModelError(AgentError):
    """A model could not be loaded or checked."""


class GoldenMismatchError(ModelError):
    """A model did not reproduce its golden vectors within tolerance."""


class RuntimeTooOldError(ModelError, UnsupportedContractError):
    """A bundle needs a newer ONNX Runtime (``min_ort_version``) than this agent ships."""


class InferenceError(AgentError):
    """A request could not be served."""


class InvalidRequestError(InferenceError):
    """The client's request is malformed or does not match the model's signature."""


class ModelNotFoundError(InferenceError):
    """The requested model or version is not served here."""


class NotReadyError(InferenceError):
    """The model is known but cannot serve right now."""


class AgentUnreachableError(InferenceError):
    """Nothing answers on the socket (the agent is not running, or no permission)."""
