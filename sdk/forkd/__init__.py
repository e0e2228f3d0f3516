"""forkd: a drop-in for ``from e2b import Sandbox`` backed by copy-on-write forks.

    from forkd import Sandbox            # was: from e2b import Sandbox
    with Sandbox.create() as sbx:
        print(sbx.commands.run("echo hi").stdout)

This module must stay importable with only the standard library and msgpack,
and cheap: the guest agent imports ``forkd.protocol`` inside minimal sandbox
images, which runs this file first. So the SDK's classes are imported on first
use (module ``__getattr__``), and third-party libraries only inside functions.
"""

from typing import TYPE_CHECKING

from . import _compat
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

if TYPE_CHECKING:
    from ._branching import AsyncSnapshotPaginator
    from ._code import EvalException
    from ._code_models import (
        Context,
        Execution,
        ExecutionError,
        Logs,
        MIMEType,
        OutputHandler,
        OutputMessage,
        Result,
        RunCodeLanguage,
    )
    from ._commands import AsyncCommandHandle, AsyncCommands, AsyncPty
    from ._config import ApiParams, ConnectionConfig, Username
    from ._files import (
        AsyncFileStreamReader,
        AsyncFilesystem,
        AsyncWatchHandle,
        AsyncWriteData,
        WriteData,
        WriteEntry,
    )
    from ._models import (
        BranchReport,
        CommandExitException,
        CommandResult,
        EntryInfo,
        FilesystemEvent,
        FilesystemEventType,
        FileType,
        ProcessInfo,
        PtyOutput,
        PtySize,
        SandboxInfo,
        SandboxListOrder,
        SandboxQuery,
        SandboxState,
        SnapshotInfo,
        SnapshotMode,
        Stderr,
        Stdout,
        WriteInfo,
    )
    from ._sandbox import AsyncSandbox, AsyncSandboxPaginator
    from ._sync import (
        CommandHandle,
        Commands,
        FileStreamReader,
        Filesystem,
        Pty,
        Sandbox,
        SandboxPaginator,
        SnapshotPaginator,
        WatchHandle,
    )

__version__ = "0.1.0"

# public name -> private module defining it (imported on first access)
_LAZY = {
    **dict.fromkeys(
        ["Sandbox", "SandboxPaginator", "SnapshotPaginator", "Commands", "CommandHandle", "Pty", "Filesystem",
         "FileStreamReader", "WatchHandle"],
        "._sync",
    ),
    **dict.fromkeys(["AsyncSandbox", "AsyncSandboxPaginator"], "._sandbox"),
    "AsyncSnapshotPaginator": "._branching",
    **dict.fromkeys(["AsyncCommands", "AsyncCommandHandle", "AsyncPty"], "._commands"),
    **dict.fromkeys(
        ["AsyncFilesystem", "AsyncFileStreamReader", "AsyncWatchHandle", "WriteEntry", "WriteData", "AsyncWriteData"],
        "._files",
    ),
    **dict.fromkeys(
        ["SandboxInfo", "SandboxQuery", "SandboxState", "SandboxListOrder", "CommandResult", "CommandExitException",
         "ProcessInfo", "PtySize", "PtyOutput", "Stdout", "Stderr", "EntryInfo", "WriteInfo", "FileType",
         "FilesystemEvent", "FilesystemEventType", "SnapshotInfo", "SnapshotMode", "BranchReport"],
        "._models",
    ),
    **dict.fromkeys(
        ["Execution", "Result", "Logs", "ExecutionError", "Context", "OutputMessage", "OutputHandler", "MIMEType",
         "RunCodeLanguage"],
        "._code_models",
    ),
    "EvalException": "._code",
    **dict.fromkeys(["ConnectionConfig", "ApiParams", "Username"], "._config"),
}  # fmt: skip


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


_compat.install(__name__)

__all__ = [
    "__version__",
    # sandboxes
    "Sandbox",
    "AsyncSandbox",
    "SandboxPaginator",
    "AsyncSandboxPaginator",
    "SandboxInfo",
    "SandboxQuery",
    "SandboxState",
    "SandboxListOrder",
    "SnapshotInfo",
    "SnapshotMode",
    "SnapshotPaginator",
    "AsyncSnapshotPaginator",
    "BranchReport",
    "ConnectionConfig",
    "ApiParams",
    "Username",
    # commands and terminals
    "Commands",
    "AsyncCommands",
    "CommandHandle",
    "AsyncCommandHandle",
    "CommandResult",
    "CommandExitException",
    "ProcessInfo",
    "Pty",
    "AsyncPty",
    "PtySize",
    "PtyOutput",
    "Stdout",
    "Stderr",
    # files
    "Filesystem",
    "AsyncFilesystem",
    "FileStreamReader",
    "AsyncFileStreamReader",
    "WatchHandle",
    "AsyncWatchHandle",
    "EntryInfo",
    "WriteInfo",
    "WriteEntry",
    "WriteData",
    "AsyncWriteData",
    "FileType",
    "FilesystemEvent",
    "FilesystemEventType",
    # code interpreter
    "Execution",
    "Result",
    "Logs",
    "ExecutionError",
    "Context",
    "OutputMessage",
    "OutputHandler",
    "MIMEType",
    "RunCodeLanguage",
    "EvalException",
    # exceptions
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
]
