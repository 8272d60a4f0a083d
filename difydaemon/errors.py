"""
One error hierarchy for the whole daemon.

Every error that can reach Dify knows its envelope ``code`` and its wire
``error_type`` (``http-api.md`` §1.3).  The HTTP layer turns any
:class:`DaemonError` into the ``{code, message, data}`` envelope; everything
else is a bug and becomes ``PluginDaemonInternalServerError``.
"""

from __future__ import annotations


class DaemonError(Exception):
    """
    Base class of errors that are reported to the caller.

    :param message: the human text, sent inside the JSON-encoded message.
    :param args_: the ``args`` object of the wire error (nearly always None).
    """

    code = -500
    error_type = "PluginDaemonInternalServerError"

    def __init__(self, message: str, args_: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.error_args = args_

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InternalServerError(DaemonError):
    """Database failures, missing runtimes, time-outs, generic failures."""


class DatabaseUnavailableError(InternalServerError):
    """
    The database cannot be reached, or stopped answering: connecting
    failed or timed out, or the connection broke.  The message says which,
    after ``database unavailable:``.

    :ivar reason: the text after that prefix.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"database unavailable: {reason}")
        self.reason = reason


class CoordinationUnavailableError(InternalServerError):
    """
    Redis, which coordinates the replicas of a cluster, cannot be reached
    or stopped answering: connecting failed or timed out, the connection
    broke, or a reply did not come in time.  The message says which, after
    ``redis unavailable:``.  Raised at once while Redis is known to be
    down; the client reconnects by itself.

    :ivar reason: the text after that prefix.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"redis unavailable: {reason}")
        self.reason = reason


class BadRequestError(DaemonError):
    """Validation failures, bad packages, violated business rules."""

    code = -400
    error_type = "PluginDaemonBadRequestError"


class NotFoundError(DaemonError):
    """A generic thing (endpoint, readme, installation) does not exist."""

    code = -404
    error_type = "PluginDaemonNotFoundError"


class UniqueIdentifierError(DaemonError):
    """A plugin unique identifier does not match the grammar."""

    code = -400
    error_type = "PluginUniqueIdentifierError"


class PluginNotFoundError(DaemonError):
    """The plugin is not installed for the tenant, or the provider differs."""

    code = -404
    error_type = "PluginNotFoundError"


class UnauthorizedError(DaemonError):
    """The ``X-Api-Key`` header is missing or wrong."""

    code = -401
    error_type = "PluginDaemonUnauthorizedError"


class PermissionDeniedError(DaemonError):
    """The plugin manifest does not grant what was asked for."""

    code = -403
    error_type = "PluginPermissionDeniedError"


class PluginInvokeError(DaemonError):
    """
    The plugin itself reported an error during a dispatch stream.

    ``message`` is already the compact JSON text of the plugin's
    ``{"args", "error_type", "message"}`` object: Dify parses it again.
    """

    error_type = "PluginInvokeError"


class ConnectionClosedError(DaemonError):
    """A plugin connection or process went away."""

    error_type = "ConnectionClosedError"


class PackageError(BadRequestError):
    """
    A ``.difypkg`` (or bundle) was refused.

    Subclasses name the reason so tests and logs can tell them apart; on the
    wire they are all ``PluginDaemonBadRequestError``.
    """


class PackageTooLargeError(PackageError):
    """The package or its uncompressed content is over the size limit."""


class UnsafePackagePathError(PackageError):
    """An entry would escape the package (``..``, absolute, symlink, dir)."""


class MalformedPackageError(PackageError):
    """The zip or one of its YAML files cannot be read."""


class InvalidManifestError(PackageError):
    """The manifest or a declaration file breaks a validation rule."""


class SignatureError(PackageError):
    """Verification was required and the package is not verified."""


class AlreadyInstalledError(BadRequestError):
    """The tenant already has an installation of this plugin_id."""


class RecordNotFoundError(InternalServerError):
    """
    A row that must exist does not.

    Go reports GORM's "record not found" as -500; several routes keep that.
    """

    def __init__(self, message: str = "record not found") -> None:
        super().__init__(message)


class ConfigError(Exception):
    """A configuration variable has a bad value; names the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class ObjectNotFoundError(NotFoundError):
    """An object-storage key does not exist."""


class ObjectStorageError(InternalServerError):
    """
    The object store could not save, load or delete a key: the disk is
    full or read-only, a directory is missing or is a file, permissions.
    The message names the operation, the key and the system's reason
    (``object storage cannot save assets/...: No space left on device``),
    so that the caller and the operator see the storage problem rather
    than an "internal server error".
    """


class StorageQuotaExceededError(BadRequestError):
    """
    A plugin key/value write would take the (tenant, plugin) total over its
    quota (http-api.md §5.7); nothing was written.  The text is the Go
    daemon's.
    """

    def __init__(self, message: str = "allocated size is greater than max storage size") -> None:
        super().__init__(message)
