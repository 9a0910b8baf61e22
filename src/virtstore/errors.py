"""The one error hierarchy: every failure a user can see is a VirtstoreError with a stable code.

The CLI prints ``str(err)`` on one line; the REST API maps ``err.code`` to an HTTP status.
Messages follow libvirt's wording where libvirt has one, so scripts that match on
virsh's errors keep working.
"""

from __future__ import annotations


class VirtstoreError(Exception):
    """Base of every error virtstore raises on purpose."""

    code = "internal-error"
    http_status = 500

    def __init__(self, message: str) -> None:
        # One line, always: a multi-line tool message is folded so the CLI contract holds.
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class NoSuchPool(VirtstoreError):
    code = "no-such-pool"
    http_status = 404


class NoSuchVolume(VirtstoreError):
    code = "no-such-volume"
    http_status = 404


class NoSuchSecret(VirtstoreError):
    code = "no-such-secret"
    http_status = 404


class NoSuchJob(VirtstoreError):
    code = "no-such-job"
    http_status = 404


class AlreadyExists(VirtstoreError):
    code = "already-exists"
    http_status = 409


class InvalidArgument(VirtstoreError):
    code = "invalid-argument"
    http_status = 400


class XMLError(InvalidArgument):
    """Malformed, hostile or schema-violating XML."""

    code = "xml-error"


class OperationInvalid(VirtstoreError):
    """The object's state forbids the operation (e.g. starting an active pool)."""

    code = "operation-invalid"
    http_status = 409


class Unsupported(VirtstoreError):
    """The backend, format or host cannot do this."""

    code = "unsupported"
    http_status = 501


class Busy(VirtstoreError):
    code = "busy"
    http_status = 409


class NoSpace(VirtstoreError):
    code = "no-space"
    http_status = 507


class AuthFailed(VirtstoreError):
    code = "auth-failed"
    http_status = 401


class Forbidden(VirtstoreError):
    code = "forbidden"
    http_status = 403


class CommandFailed(VirtstoreError):
    """An outside program exited non-zero, timed out or is missing."""

    code = "command-failed"
    http_status = 500

    def __init__(self, message: str, argv: list[str] | None = None, returncode: int | None = None,
                 stderr: str = "") -> None:
        super().__init__(message)
        self.argv = argv or []
        self.returncode = returncode
        self.stderr = stderr


class Cancelled(VirtstoreError):
    """A job was cancelled before it finished."""

    code = "cancelled"
    http_status = 409


class InternalError(VirtstoreError):
    code = "internal-error"
    http_status = 500


class ClusterUnavailable(VirtstoreError):
    """This member cannot reach the cluster's control plane (etcd), or its session
    there expired: it takes no new write leases on shared storage until it can."""

    code = "cluster-unavailable"
    http_status = 503


ALL_ERRORS: tuple[type[VirtstoreError], ...] = (
    NoSuchPool, NoSuchVolume, NoSuchSecret, NoSuchJob, AlreadyExists, InvalidArgument,
    XMLError, OperationInvalid, Unsupported, Busy, NoSpace, AuthFailed, Forbidden,
    CommandFailed, Cancelled, InternalError, ClusterUnavailable,
)


def error_for_code(code: str) -> type[VirtstoreError]:
    """Map a stable code back to its class (used by remote clients)."""
    for cls in ALL_ERRORS:
        if cls.code == code:
            return cls
    return VirtstoreError
