"""The synchronous API: ``Sandbox`` and its modules, thin wrappers over the async ones.

Every method runs the matching ``AsyncSandbox`` coroutine on the background loop
(``_portal``) and returns its result; no logic lives here twice. Callbacks given
to sync calls run in the caller's thread, in order, as E2B's sync SDK runs them.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import IO, Any, Literal, Self

from . import protocol as p
from ._branching import AsyncSnapshotPaginator
from ._code_models import Context, Execution
from ._commands import AsyncCommandHandle, AsyncCommands, AsyncPty, OutputEvent
from ._config import ConnectionConfig
from ._dual import dual
from ._exceptions import InvalidArgumentException, SandboxException
from ._files import AsyncFileStreamReader, AsyncFilesystem, AsyncWatchHandle, _is_file_like
from ._models import (
    BranchReport,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    ProcessInfo,
    PtySize,
    SandboxInfo,
    SandboxQuery,
    SnapshotInfo,
    WriteInfo,
)
from ._paging import SyncPages
from ._portal import run, run_calling_back
from ._sandbox import AsyncSandbox, AsyncSandboxPaginator

__all__ = [
    "Sandbox",
    "SandboxPaginator",
    "SnapshotPaginator",
    "Commands",
    "CommandHandle",
    "Pty",
    "Filesystem",
    "FileStreamReader",
    "WatchHandle",
]


class CommandHandle:
    """A running (or finished) command: iterate its output, ``wait()`` for it, or end it.

    Iterating yields ``(stdout, stderr, pty)`` tuples with exactly one item set.
    """

    def __init__(self, handle: AsyncCommandHandle, on_stdout: Any = None, on_stderr: Any = None) -> None:
        self._h = handle
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr

    @property
    def pid(self) -> int:
        return self._h.pid

    @property
    def stdout(self) -> str:
        return self._h.stdout

    @property
    def stderr(self) -> str:
        return self._h.stderr

    @property
    def exit_code(self) -> int | None:
        return self._h.exit_code

    @property
    def error(self) -> str | None:
        return self._h.error

    def __iter__(self) -> Iterator[OutputEvent]:
        while True:
            batch = run(self._h._next_events())
            if batch is None:
                break
            yield from batch
        if self._h._error is not None:
            raise self._h._error

    def wait(
        self,
        on_pty: Any = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
    ) -> CommandResult:
        """Wait for the command to end; raises CommandExitException on a non-zero exit code."""
        on_stdout = on_stdout or self._on_stdout
        on_stderr = on_stderr or self._on_stderr
        for out, err, pty in self:
            if out is not None and on_stdout:
                on_stdout(out)
            elif err is not None and on_stderr:
                on_stderr(err)
            elif pty is not None and on_pty:
                on_pty(pty)
        return self._h._outcome()

    def kill(self) -> bool:
        """SIGKILL the command. False if it was not running."""
        return run(self._h.kill())

    def send_stdin(self, data: str | bytes, request_timeout: float | None = None) -> None:
        run(self._h.send_stdin(data, request_timeout))

    def close_stdin(self, request_timeout: float | None = None) -> None:
        run(self._h.close_stdin(request_timeout))

    def disconnect(self) -> None:
        """Stop receiving output; the command keeps running."""
        run(self._h.disconnect())

    def __repr__(self) -> str:
        return f"<CommandHandle pid={self.pid} exit_code={self.exit_code}>"


class Commands:
    """``sbx.commands``: run commands in the sandbox (``/bin/bash -l -c <cmd>``)."""

    def __init__(self, commands: AsyncCommands) -> None:
        self._a = commands

    def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        return run(self._a.list(request_timeout))

    def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        return run(self._a.kill(pid, request_timeout))

    def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        run(self._a.send_stdin(pid, data, request_timeout))

    def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        run(self._a.close_stdin(pid, request_timeout))

    def run(
        self,
        cmd: str,
        background: bool | None = None,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        stdin: bool | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        retain_output: bool = True,
    ) -> Any:
        """Run a command: a ``CommandResult`` (foreground) or a ``CommandHandle`` (``background=True``).

        A non-zero exit code raises ``CommandExitException``; exceeding ``timeout``
        (seconds, 0 = none) raises ``TimeoutException``.
        """
        if background:
            handle = run(
                self._a._start(
                    cmd, envs, user, cwd, stdin, timeout, request_timeout, None, None, retain_output, True
                )
            )
            return CommandHandle(handle, on_stdout, on_stderr)
        if on_stdout is None and on_stderr is None:
            return run(self._a.run(cmd, False, envs, user, cwd, None, None, stdin, timeout, request_timeout,
                                   retain_output=retain_output))  # fmt: skip
        return run_calling_back(
            lambda on_stdout, on_stderr: self._a.run(
                cmd,
                False,
                envs,
                user,
                cwd,
                on_stdout,
                on_stderr,
                stdin,
                timeout,
                request_timeout,
                retain_output=retain_output,
            ),  # fmt: skip
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )

    def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        retain_output: bool = True,
    ) -> CommandHandle:
        """Attach to a running command (its retained output is replayed). Unknown pid: NotFoundException."""
        return CommandHandle(
            run(
                self._a.connect(pid, timeout, request_timeout, retain_output=retain_output, queue_events=True)
            )
        )


class Pty:
    """``sbx.pty``: interactive terminals. Output comes through ``handle.wait(on_pty=...)`` or iteration."""

    def __init__(self, pty: AsyncPty) -> None:
        self._a = pty

    def create(
        self,
        size: PtySize | None = None,
        user: str | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandHandle:
        return CommandHandle(
            run(self._a.create(size, None, user, cwd, envs, timeout, request_timeout, queue_events=True))
        )

    def connect(
        self, pid: int, timeout: float | None = 60, request_timeout: float | None = None
    ) -> CommandHandle:
        return CommandHandle(run(self._a.connect(pid, None, timeout, request_timeout, queue_events=True)))

    def send_stdin(self, pid: int, data: bytes, request_timeout: float | None = None) -> None:
        run(self._a.send_stdin(pid, data, request_timeout))

    def resize(self, pid: int, size: PtySize, request_timeout: float | None = None) -> None:
        run(self._a.resize(pid, size, request_timeout))

    def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        return run(self._a.kill(pid, request_timeout))


class FileStreamReader(Iterator[bytes]):
    """A file being read, as an iterator of byte chunks. Close it (or use ``with``) if you stop early."""

    def __init__(self, reader: AsyncFileStreamReader) -> None:
        self._r = reader

    def __iter__(self) -> FileStreamReader:
        return self

    def __next__(self) -> bytes:
        try:
            return run(self._r.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        run(self._r.aclose())

    def __enter__(self) -> FileStreamReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class WatchHandle:
    """A directory watch: ``get_new_events()`` returns what happened since the last call; ``stop()`` ends it."""

    def __init__(self, events: collections.deque, exits: list) -> None:
        self._events = events
        self._exits = exits
        self._handle: AsyncWatchHandle | None = None
        self._stopped = False

    def get_new_events(self, request_timeout: float | None = None) -> list[FilesystemEvent]:
        if self._stopped:
            raise SandboxException("The watcher is already stopped")
        run(_yield())  # let notifications that already arrived be delivered
        out = []
        while self._events:
            out.append(self._events.popleft())
        if not out and self._exits and self._exits[0] is not None:
            raise self._exits[0]
        return out

    def stop(self, request_timeout: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._handle is not None:
            run(self._handle.stop())


async def _yield() -> None:
    import asyncio

    await asyncio.sleep(0)


class Filesystem:
    """``sbx.files``. Relative paths resolve against the user's home (``/home/user``)."""

    def __init__(self, files: AsyncFilesystem) -> None:
        self._a = files

    def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        stream_idle_timeout: float | None = None,
    ) -> Any:
        """Read a file as str (``"text"``), bytearray (``"bytes"``) or an iterator of chunks (``"stream"``)."""
        if format == "stream":
            return FileStreamReader(run(self._a._open_read(path, user, request_timeout)))
        return run(self._a.read(path, format, user, request_timeout))

    def write(
        self,
        path: str,
        data: str | bytes | IO | Iterable[bytes],
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        use_octet_stream: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> WriteInfo:
        """Write str, bytes, a file object or an iterable of bytes; big data is streamed in chunks."""
        if metadata:
            raise InvalidArgumentException("forkd does not store file metadata")
        if isinstance(data, str | bytes | bytearray | memoryview):
            return run(self._a.write(path, data, user, request_timeout))
        if isinstance(data, AsyncIterable) and not isinstance(data, Iterable):
            raise InvalidArgumentException(
                "Async iterable data is only supported by `AsyncSandbox`; pass a sync iterable of bytes, "
                "a file-like object or bytes to `Sandbox.files.write`."
            )
        if not _is_file_like(data) and not isinstance(data, Iterable):
            raise InvalidArgumentException(f"Unsupported data type for file {path}: {type(data)}")
        # The caller's file or iterator is read here, in the caller's thread; each chunk is sent on the loop.
        upload = run(self._a._open_write(path, user, request_timeout))
        try:
            if _is_file_like(data):
                while chunk := data.read(p.CHUNK_SIZE):  # type: ignore[union-attr]
                    run(upload.send(chunk))
            else:
                for chunk in data:  # type: ignore[union-attr]
                    run(upload.send(chunk))
            return run(upload.close())
        except BaseException:
            run(upload.abort())
            raise

    def write_files(
        self,
        files: list[Any],
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        use_octet_stream: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[WriteInfo]:
        """Write several files (``[{"path": ..., "data": ...}]``); returns one WriteInfo each."""
        if all(isinstance(f["data"], str | bytes) for f in files):
            return run(self._a.write_files(files, user, request_timeout, metadata=metadata))
        return [self.write(f["path"], f["data"], user, request_timeout, metadata=metadata) for f in files]

    def list(
        self, path: str, depth: int | None = 1, user: str | None = None, request_timeout: float | None = None
    ) -> list[EntryInfo]:
        return run(self._a.list(path, depth, user, request_timeout))

    def exists(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        return run(self._a.exists(path, user, request_timeout))

    def get_info(self, path: str, user: str | None = None, request_timeout: float | None = None) -> EntryInfo:
        return run(self._a.get_info(path, user, request_timeout))

    def remove(self, path: str, user: str | None = None, request_timeout: float | None = None) -> None:
        run(self._a.remove(path, user, request_timeout))

    def rename(
        self, old_path: str, new_path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        return run(self._a.rename(old_path, new_path, user, request_timeout))

    def make_dir(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        return run(self._a.make_dir(path, user, request_timeout))

    def watch_dir(
        self,
        path: str,
        user: str | None = None,
        request_timeout: float | None = None,
        recursive: bool = False,
        include_entry: bool = False,
        allow_network_mounts: bool = False,
    ) -> WatchHandle:
        """Watch a directory; poll ``handle.get_new_events()`` and ``handle.stop()`` at the end."""
        events: collections.deque = collections.deque()
        exits: list = []
        handle = WatchHandle(events, exits)
        handle._handle = run(
            self._a.watch_dir(
                path, events.append, exits.append, user, request_timeout, timeout=0, recursive=recursive
            )
        )
        return handle


class SandboxPaginator(SyncPages):
    """Pages of ``Sandbox.list()``: ``while p.has_next: items = p.next_items()``."""

    def __init__(
        self,
        query: SandboxQuery | AsyncSandboxPaginator | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: str | None = None,
        **opts: Any,
    ) -> None:
        if isinstance(query, AsyncSandboxPaginator):
            self._p = query
        else:
            self._p = AsyncSandboxPaginator(query, limit, next_token, order, **opts)

    @property
    def query(self) -> SandboxQuery | None:
        return self._p.query


class SnapshotPaginator(SyncPages):
    """Pages of ``Sandbox.list_snapshots()``: ``while p.has_next: items = p.next_items()``."""

    def __init__(
        self,
        sandbox_id: str | AsyncSnapshotPaginator | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> None:
        if isinstance(sandbox_id, AsyncSnapshotPaginator):
            self._p = sandbox_id
        else:
            self._p = AsyncSnapshotPaginator(sandbox_id, limit, next_token, name, **opts)

    @property
    def sandbox_id(self) -> str | None:
        return self._p.sandbox_id

    @property
    def name(self) -> str | None:
        return self._p.name


class Sandbox:
    """A forkd sandbox (sync API). Create one with ``Sandbox.create()``.

    A drop-in for ``e2b.Sandbox`` and ``e2b_code_interpreter.Sandbox``.
    """

    default_template = AsyncSandbox.default_template
    default_sandbox_timeout = AsyncSandbox.default_sandbox_timeout

    def __init__(
        self,
        sandbox_id: str | None = None,
        connection_config: ConnectionConfig | None = None,
        info: SandboxInfo | None = None,
        *,
        _async: AsyncSandbox | None = None,
        **opts: Any,
    ) -> None:
        if _async is None:
            if sandbox_id is None:
                raise InvalidArgumentException("use Sandbox.create() to create a sandbox")
            _async = AsyncSandbox(sandbox_id, connection_config, info, **opts)
        self._async = _async
        self._commands = Commands(_async.commands)
        self._files = Filesystem(_async.files)
        self._pty = Pty(_async.pty)

    @classmethod
    def _wrap(cls, a: AsyncSandbox) -> Self:
        return cls(_async=a)

    # -- properties ------------------------------------------------------------
    @property
    def sandbox_id(self) -> str:
        return self._async.sandbox_id

    @property
    def commands(self) -> Commands:
        return self._commands

    @property
    def files(self) -> Filesystem:
        return self._files

    @property
    def pty(self) -> Pty:
        return self._pty

    @property
    def connection_config(self) -> ConnectionConfig:
        return self._async.connection_config

    @property
    def sandbox_domain(self) -> str | None:
        return self._async.sandbox_domain

    def get_host(self, port: int) -> str:
        return self._async.get_host(port)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.sandbox_id}>"

    # -- lifecycle ---------------------------------------------------------------
    @classmethod
    def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool | None = None,
        allow_internet_access: bool | None = None,
        mcp: Any = None,
        network: Any = None,
        iam: Any = None,
        lifecycle: Any = None,
        volume_mounts: Any = None,
        logger: Any = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> Self:
        """Create a sandbox from ``template`` (default ``"base"``) that lives ``timeout`` seconds (default 300)."""
        return cls._wrap(
            run(
                AsyncSandbox.create(
                    template or cls.default_template,
                    timeout if timeout is not None else cls.default_sandbox_timeout,
                    metadata,
                    envs,
                    secure,
                    allow_internet_access,
                    mcp,
                    network,
                    iam,
                    lifecycle,
                    volume_mounts,
                    logger,
                    idempotency_key,
                    **opts,
                )
            )
        )

    @classmethod
    def _cls_connect(
        cls, sandbox_id: str, timeout: int | None = None, *, on_resume: str = "restore", **opts: Any
    ) -> Self:
        return cls._wrap(run(AsyncSandbox._cls_connect(sandbox_id, timeout, **opts)))

    @dual("_cls_connect")
    def connect(self, timeout: int | None = None, *, on_resume: str = "restore", **opts: Any) -> Self:
        """Connect to a running sandbox (``Sandbox.connect(sandbox_id)`` or ``sbx.connect()``)."""
        run(self._async.connect(timeout, **opts))
        return self

    @classmethod
    def _cls_kill(cls, sandbox_id: str, **opts: Any) -> bool:
        return run(AsyncSandbox._cls_kill(sandbox_id, **opts))

    @dual("_cls_kill")
    def kill(self, **opts: Any) -> bool:
        """Kill the sandbox. False if it did not exist (anymore)."""
        return run(self._async.kill(**opts))

    @classmethod
    def _cls_set_timeout(cls, sandbox_id: str, timeout: int, **opts: Any) -> None:
        run(AsyncSandbox._cls_set_timeout(sandbox_id, timeout, **opts))

    @dual("_cls_set_timeout")
    def set_timeout(self, timeout: int, **opts: Any) -> None:
        """Make the sandbox expire ``timeout`` seconds from now."""
        run(self._async.set_timeout(timeout, **opts))

    @classmethod
    def _cls_get_info(cls, sandbox_id: str, **opts: Any) -> SandboxInfo:
        return run(AsyncSandbox._cls_get_info(sandbox_id, **opts))

    @dual("_cls_get_info")
    def get_info(self, **opts: Any) -> SandboxInfo:
        """SandboxInfo of the sandbox. Missing: SandboxNotFoundException."""
        return run(self._async.get_info(**opts))

    def is_running(self, request_timeout: float | None = None) -> bool:
        return run(self._async.is_running(request_timeout))

    @classmethod
    def list(
        cls,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: str | None = None,
        **opts: Any,
    ) -> SandboxPaginator:
        """Your sandboxes, a page at a time: ``while p.has_next: p.next_items()``."""
        return SandboxPaginator(AsyncSandbox.list(query, limit, next_token, order, **opts))

    # -- BRANCH and snapshots ------------------------------------------------------
    @property
    def last_branch_report(self) -> BranchReport | None:
        """forkd extension: what the last ``fork()``/``branch()`` of this sandbox captured."""
        return self._async.last_branch_report

    @property
    def branch_report(self) -> BranchReport | None:
        """forkd extension: on a sandbox made by ``fork``/``branch``, the report of that branch."""
        return self._async.branch_report

    @classmethod
    def _wrap_all(cls, out: list[Any]) -> list[Any]:
        return [cls._wrap(s) if isinstance(s, AsyncSandbox) else s for s in out]

    @classmethod
    def _cls_fork(
        cls,
        sandbox_id: str,
        timeout: int | None = None,
        count: int | None = None,
        logger: Any = None,
        **opts: Any,
    ) -> list[Self | Exception]:
        return cls._wrap_all(run(AsyncSandbox._cls_fork(sandbox_id, timeout, count, **opts)))

    @dual("_cls_fork")
    def fork(
        self, timeout: int | None = None, count: int | None = None, **opts: Any
    ) -> list[Self | Exception]:
        """E2B's fork (see ``AsyncSandbox.fork``): one entry per requested fork, a running
        sandbox or the exception that stopped it."""
        return self._wrap_all(run(self._async.fork(timeout, count, **opts)))

    @classmethod
    def _cls_branch(
        cls, sandbox_id: str, count: int = 1, timeout: int | None = None, **opts: Any
    ) -> list[Self]:
        return cls._wrap_all(run(AsyncSandbox._cls_branch(sandbox_id, count, timeout, **opts)))

    @dual("_cls_branch")
    def branch(self, count: int = 1, timeout: int | None = None, **opts: Any) -> list[Self]:
        """forkd extension (see ``AsyncSandbox.branch``): all ``count`` children, or the first
        failure raised after the started ones are killed."""
        return self._wrap_all(run(self._async.branch(count, timeout, **opts)))

    @classmethod
    def _cls_create_snapshot(
        cls, sandbox_id: str, name: str | None = None, *, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        return run(AsyncSandbox._cls_create_snapshot(sandbox_id, name, mode=mode, **opts))

    @dual("_cls_create_snapshot")
    def create_snapshot(
        self, name: str | None = None, *, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        """A snapshot of this sandbox as it is now; ``Sandbox.create(template=info.snapshot_id)``
        starts sandboxes from it (see ``AsyncSandbox.create_snapshot``)."""
        return run(self._async.create_snapshot(name, mode=mode, **opts))

    @classmethod
    def _cls_list_snapshots(
        cls,
        sandbox_id: str | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> SnapshotPaginator:
        return SnapshotPaginator(
            AsyncSandbox._cls_list_snapshots(sandbox_id, limit, next_token, name, **opts)
        )

    @dual("_cls_list_snapshots")
    def list_snapshots(
        self, limit: int | None = None, next_token: str | None = None, name: str | None = None, **opts: Any
    ) -> SnapshotPaginator:
        """This sandbox's snapshots, a page at a time (``Sandbox.list_snapshots()``: all of yours)."""
        return SnapshotPaginator(self._async.list_snapshots(limit, next_token, name, **opts))

    @classmethod
    def delete_snapshot(cls, snapshot_id: str, **opts: Any) -> bool:
        """Delete one of your snapshots: True, or False if there is none with this id;
        ``ConflictException`` while sandboxes still depend on it."""
        return run(AsyncSandbox.delete_snapshot(snapshot_id, **opts))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.kill()

    # -- code interpreter ---------------------------------------------------------
    def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_result: Any = None,
        on_error: Any = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> Execution:
        """Run a notebook cell (see ``AsyncSandbox.run_code``); callbacks run in this thread."""
        return run_calling_back(
            lambda on_stdout, on_stderr, on_result, on_error: self._async.run_code(
                code,
                language,
                context,
                on_stdout,
                on_stderr,
                on_result,
                on_error,
                envs,
                timeout,
                request_timeout,
            ),
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_result=on_result,
            on_error=on_error,
        )

    def create_code_context(
        self, cwd: str | None = None, language: str | None = None, request_timeout: float | None = None
    ) -> Context:
        return run(self._async.create_code_context(cwd, language, request_timeout))

    def list_code_contexts(self) -> list[Context]:
        return run(self._async.list_code_contexts())

    def remove_code_context(self, context: Context | str) -> None:
        run(self._async.remove_code_context(context))

    def restart_code_context(self, context: Context | str) -> None:
        run(self._async.restart_code_context(context))

    def eval(
        self, expr: str, context: Context | str | None = None, request_timeout: float | None = None
    ) -> Any:
        """forkd extension: evaluate one Python expression; the value when plain data, else its text."""
        return run(self._async.eval(expr, context, request_timeout))
