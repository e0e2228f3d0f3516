"""Every exception of the SDK (``e2b.exceptions``'s names, plus forkd's own)."""

from ._code import EvalException
from ._exceptions import (
    AuthenticationException,
    CancelledException,
    ConflictException,
    FileNotFoundException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    ProtocolException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxUnreachableException,
    ServiceBusyException,
    TemplateException,
    TimeoutException,
    UnknownMethodException,
)
from ._models import CommandExitException

__all__ = [
    "AuthenticationException",
    "CancelledException",
    "CommandExitException",
    "ConflictException",
    "EvalException",
    "FileNotFoundException",
    "InvalidArgumentException",
    "NotEnoughSpaceException",
    "NotFoundException",
    "ProtocolException",
    "RateLimitException",
    "SandboxException",
    "SandboxNotFoundException",
    "SandboxNotRunningException",
    "SandboxUnreachableException",
    "ServiceBusyException",
    "TemplateException",
    "TimeoutException",
    "UnknownMethodException",
]
