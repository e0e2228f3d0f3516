"""Every exception of the SDK (``e2b.exceptions``'s names, plus forkd's own)."""

from ._code import EvalException
from ._exceptions import (
    AuthenticationException,
    CancelledException,
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
