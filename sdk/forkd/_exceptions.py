"""Exception classes of the E2B contract, plus the wire-code mapping.

Every wire ErrorCode maps to exactly one class here (``ERROR_CLASSES``), so an
error raised in the guest agent surfaces in the SDK as the class a user of E2B
would catch.
"""

from __future__ import annotations

from .protocol import ErrorCode, RpcError

__all__ = [
    "SandboxException",
    "TimeoutException",
    "SandboxNotRunningException",
    "SandboxUnreachableException",
    "InvalidArgumentException",
    "NotEnoughSpaceException",
    "NotFoundException",
    "FileNotFoundException",
    "SandboxNotFoundException",
    "TemplateException",
    "RateLimitException",
    "AuthenticationException",
    "ServiceBusyException",
    "ProtocolException",
    "UnknownMethodException",
    "CancelledException",
    "ConflictException",
    "ERROR_CLASSES",
    "from_rpc_error",
]


class SandboxException(Exception):
    """Base of the sandbox errors."""

    code: ErrorCode = ErrorCode.SANDBOX

    def __init__(self, message: str = "", status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class TimeoutException(SandboxException):
    code = ErrorCode.TIMEOUT


class SandboxNotRunningException(TimeoutException):
    code = ErrorCode.SANDBOX_NOT_RUNNING


class SandboxUnreachableException(TimeoutException):
    code = ErrorCode.SANDBOX_UNREACHABLE


class InvalidArgumentException(SandboxException):
    code = ErrorCode.INVALID_ARGUMENT


class NotEnoughSpaceException(SandboxException):
    code = ErrorCode.NOT_ENOUGH_SPACE


class NotFoundException(SandboxException):
    code = ErrorCode.NOT_FOUND


class FileNotFoundException(NotFoundException):
    code = ErrorCode.FILE_NOT_FOUND


class SandboxNotFoundException(NotFoundException):
    code = ErrorCode.SANDBOX_NOT_FOUND


class TemplateException(SandboxException):
    code = ErrorCode.TEMPLATE


class RateLimitException(SandboxException):
    code = ErrorCode.RATE_LIMIT


class ProtocolException(SandboxException):
    """forkd extension: a peer sent frames that are not valid protocol."""

    code = ErrorCode.PROTOCOL


class UnknownMethodException(InvalidArgumentException):
    """forkd extension: the peer does not implement the method."""

    code = ErrorCode.UNKNOWN_METHOD


class CancelledException(SandboxException):
    """forkd extension: the request was cancelled before it finished."""

    code = ErrorCode.CANCELLED


class ConflictException(SandboxException):
    """forkd extension: the sandbox or snapshot cannot do this now (a sandbox busy
    being captured; a snapshot that sandboxes or other snapshots still depend on)."""

    code = ErrorCode.CONFLICT


# As in E2B, these two are not SandboxExceptions.
class AuthenticationException(Exception):
    code = ErrorCode.AUTHENTICATION

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class ServiceBusyException(Exception):
    code = ErrorCode.SERVICE_BUSY

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


ERROR_CLASSES: dict[ErrorCode, type[Exception]] = {
    cls.code: cls
    for cls in (
        SandboxException,
        TimeoutException,
        SandboxNotRunningException,
        SandboxUnreachableException,
        InvalidArgumentException,
        NotEnoughSpaceException,
        NotFoundException,
        FileNotFoundException,
        SandboxNotFoundException,
        TemplateException,
        RateLimitException,
        AuthenticationException,
        ServiceBusyException,
        ProtocolException,
        UnknownMethodException,
        CancelledException,
        ConflictException,
    )
}


def from_rpc_error(err: RpcError) -> Exception:
    """The SDK exception for a wire error."""
    cls = ERROR_CLASSES.get(err.code, SandboxException)
    return cls(err.message)
