"""forkd: a drop-in for ``from e2b import Sandbox`` backed by copy-on-write forks.

This module must stay importable with only the standard library and msgpack:
the guest agent imports ``forkd.protocol`` inside minimal sandbox images, which
runs this file first. Import third-party libraries inside functions.
"""

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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AuthenticationException",
    "CancelledException",
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
