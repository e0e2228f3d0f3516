"""Commands and terminals: ``sbx.commands`` and ``sbx.pty`` (async), and the command handle.

A command's output is one credit-windowed stream (``exec.start`` / ``exec.attach``
with a client-allocated stream id). The handle consumes it in a task from the
moment it exists, as E2B's async handle does: callbacks are called, output is
decoded (invalid UTF-8 becomes U+FFFD) and accumulated, and the exit status is
kept for ``wait()``. The synchronous handle asks for an event queue on top and
iterates it from the caller's thread.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from typing import Any

from . import protocol as p
from ._client import Client, map_error
from ._exceptions import SandboxException, TimeoutException
from ._link import Link, call_back
from ._models import CommandExitException, CommandResult, ProcessInfo, PtySize

__all__ = ["AsyncCommandHandle", "AsyncCommands", "AsyncPty"]

_DONE = object()

OutputEvent = tuple[str | None, str | None, bytes | None]


def command_timeout_error(detail: str) -> TimeoutException:
    return TimeoutException(
        f"{detail}: This error is likely due to exceeding 'timeout' — the total time a long running "
        "request (like command execution or directory watch) can be active. It can be modified by "
        "passing 'timeout' when making the request. Use '0' to disable the timeout."
    )


_tasks: set[asyncio.Task] = set()


def _background(coro: Any) -> None:
    """Run a best-effort clean-up call without waiting for it (kept referenced until done)."""

    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await coro

    task = asyncio.get_running_loop().create_task(quietly())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def _no_limit(timeout: float | None) -> float:
    return float(timeout) if timeout else 0.0


class AsyncCommandHandle:
    """A running (or finished) command: its pid, its output so far, and how to wait for or end it."""

    def __init__(
        self,
        pid: int,
        link: Link,
        client: Client,
        stream: Any,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_pty: Any = None,
        retain_output: bool = True,
        deadline: float | None = None,
        queue_events: bool = False,
    ) -> None:
        self._pid = pid
        self._link = link
        self._client = client
        self._stream = stream
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._on_pty = on_pty
        self._stdout_chunks: list[str] | None = [] if retain_output else None
        self._stderr_chunks: list[str] | None = [] if retain_output else None
        self._stdout_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stderr_decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._result: CommandResult | None = None
        self._error: BaseException | None = None
        self._deadline = deadline
        self._queue: asyncio.Queue | None = asyncio.Queue() if queue_events else None
        self._wait = asyncio.get_running_loop().create_task(self._consume())

    # -- E2B's properties --------------------------------------------------
    @property
    def pid(self) -> int:
        """Process id of the command in the sandbox."""
        return self._pid

    @property
    def stdout(self) -> str:
        """Everything the command wrote to stdout so far."""
        return None if self._stdout_chunks is None else "".join(self._stdout_chunks)  # type: ignore[return-value]

    @property
    def stderr(self) -> str:
        """Everything the command wrote to stderr so far."""
        return None if self._stderr_chunks is None else "".join(self._stderr_chunks)  # type: ignore[return-value]

    @property
    def exit_code(self) -> int | None:
        """The exit code once the command has finished, else None."""
        return None if self._result is None else self._result.exit_code

    @property
    def error(self) -> str | None:
        """The command's error message once it has finished (e.g. ``"exit status 1"``)."""
        return None if self._result is None else self._result.error

    # -- consuming the stream ----------------------------------------------
    async def _emit(self, event: OutputEvent) -> None:
        out, err, pty = event
        if out is not None:
            if self._stdout_chunks is not None:
                self._stdout_chunks.append(out)
            if self._on_stdout is not None:
                await call_back(self._on_stdout, out)
        elif err is not None:
            if self._stderr_chunks is not None:
                self._stderr_chunks.append(err)
            if self._on_stderr is not None:
                await call_back(self._on_stderr, err)
        elif pty is not None and self._on_pty is not None:
            await call_back(self._on_pty, pty)
        if self._queue is not None:
            self._queue.put_nowait(event)

    async def _flush(self) -> None:
        out = self._stdout_decoder.decode(b"", final=True)
        if out:
            await self._emit((out, None, None))
        err = self._stderr_decoder.decode(b"", final=True)
        if err:
            await self._emit((None, err, None))

    async def _read(self) -> None:
        async for fd, _offset, data in self._stream:
            if fd == p.FD_STDOUT:
                text = self._stdout_decoder.decode(data)
                if text:
                    await self._emit((text, None, None))
            elif fd == p.FD_STDERR:
                text = self._stderr_decoder.decode(data)
                if text:
                    await self._emit((None, text, None))
            else:
                await self._emit((None, None, data))

    async def _consume(self) -> None:
        try:
            if self._deadline is None:
                await self._read()
            else:
                try:
                    async with asyncio.timeout_at(self._deadline):
                        await self._read()
                except TimeoutError:
                    await self._detach()
                    self._error = command_timeout_error("the command connection timed out")
                    return
            await self._flush()
            self._finish(self._stream.end_info or {})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a callback failed: stop following, report it from wait()
            self._error = map_error(exc)
            await self._detach()
        finally:
            if self._queue is not None:
                self._queue.put_nowait(_DONE)

    def _finish(self, end: dict) -> None:
        if end.get("closed"):
            return  # disconnected locally: no result
        err = end.get("error")
        if isinstance(err, list):  # the stream itself failed (sandbox gone, connection lost)
            self._error = map_error(self._stream.error)
            return
        if end.get("reason") == "timeout":
            self._error = command_timeout_error(err or "command timed out")
            return
        code = end.get("exit_code")
        self._result = CommandResult(
            stderr=self.stderr,
            stdout=self.stdout,
            exit_code=code if code is not None else -1,
            error=err if err else None,
        )

    async def _detach(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()
        if not self._client.closed:
            with contextlib.suppress(Exception):
                await self._link.call("exec.detach", {"stream": self._stream.id}, 5)

    async def _next_events(self) -> list[OutputEvent] | None:
        """The events available now (waiting for at least one); None at the end. Sync layer only."""
        q = self._queue
        assert q is not None
        item = await q.get()
        if item is _DONE:
            q.put_nowait(_DONE)
            return None
        batch = [item]
        while not q.empty():
            item = q.get_nowait()
            if item is _DONE:
                q.put_nowait(_DONE)
                break
            batch.append(item)
        return batch

    def _outcome(self) -> CommandResult:
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise SandboxException("Command ended without an end event")
        if self._result.exit_code != 0:
            raise CommandExitException(
                stderr=self.stderr,
                stdout=self.stdout,
                exit_code=self._result.exit_code,
                error=self._result.error,
            )
        return self._result

    # -- E2B's methods -------------------------------------------------------
    async def wait(self) -> CommandResult:
        """Wait for the command to finish; raises CommandExitException on a non-zero exit code."""
        await asyncio.shield(self._wait)
        return self._outcome()

    async def kill(self) -> bool:
        """SIGKILL the command (its whole process group). False if it was not running."""
        res = await self._link.call("exec.kill", {"pid": self._pid})
        return bool(res.get("killed"))

    async def send_stdin(self, data: str | bytes, request_timeout: float | None = None) -> None:
        """Write to the command's stdin (it must have been started with ``stdin=True``)."""
        await self._link.call("exec.stdin", {"pid": self._pid, "data": data}, request_timeout)

    async def close_stdin(self, request_timeout: float | None = None) -> None:
        """Close the command's stdin (EOF)."""
        await self._link.call("exec.close_stdin", {"pid": self._pid}, request_timeout)

    async def disconnect(self) -> None:
        """Stop receiving output; the command keeps running (``commands.connect(pid)`` reattaches)."""
        self._wait.cancel()
        with contextlib.suppress(BaseException):
            await self._wait
        await self._detach()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self._pid} exit_code={self.exit_code}>"


async def _open(
    link: Link,
    method: str,
    params: dict,
    request_timeout: float | None,
    deadline_after: float | None = None,
    **handle_opts: Any,
) -> AsyncCommandHandle:
    """Open the output stream, send the request that feeds it, wrap both in a handle."""
    client = await link.client()
    stream = client.open_stream(p.DEFAULT_WINDOW)
    params["stream"] = stream.id
    params["window"] = p.DEFAULT_WINDOW
    params["sandbox_id"] = link.sandbox_id
    try:
        res = await client.call(method, params, link.timeout(request_timeout))
    except BaseException:
        await stream.close()
        raise
    deadline = None
    if deadline_after:
        deadline = asyncio.get_running_loop().time() + deadline_after
    return AsyncCommandHandle(
        res.get("pid", params.get("pid")), link, client, stream, deadline=deadline, **handle_opts
    )


class AsyncCommands:
    """``sbx.commands``: run commands in the sandbox (``/bin/bash -l -c <cmd>``)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        """The running commands and PTY sessions."""
        res = await self._link.call("exec.list", {}, request_timeout)
        return [ProcessInfo._from_wire(d) for d in res]

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """SIGKILL a command (its process group). False if no such command is running."""
        res = await self._link.call("exec.kill", {"pid": pid}, request_timeout)
        return bool(res.get("killed"))

    async def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        """Write to a command's stdin. Unknown pid: NotFoundException."""
        await self._link.call("exec.stdin", {"pid": pid, "data": data}, request_timeout)

    async def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        """Close a command's stdin (EOF)."""
        await self._link.call("exec.close_stdin", {"pid": pid}, request_timeout)

    async def run(
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
        """Run a command.

        Foreground (default): wait and return a ``CommandResult``; a non-zero exit code
        raises ``CommandExitException``; running longer than ``timeout`` seconds (0 = no
        limit) kills it and raises ``TimeoutException``. ``background=True`` returns an
        ``AsyncCommandHandle`` at once. ``on_stdout``/``on_stderr`` get output as it
        comes (coroutine functions are awaited).
        """
        handle = await self._start(
            cmd, envs, user, cwd, stdin, timeout, request_timeout, on_stdout, on_stderr, retain_output,
            keep_on_disconnect=bool(background),
        )  # fmt: skip
        if background:
            return handle
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            # Nobody waits for a foreground command any more: it must not run on unseen.
            handle._wait.cancel()
            _background(self._link.call("exec.kill", {"pid": handle.pid}, 5))
            _background(handle._detach())
            raise

    async def _start(
        self,
        cmd: str,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        stdin: bool | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        retain_output: bool = True,
        queue_events: bool = False,
        keep_on_disconnect: bool = True,
    ) -> AsyncCommandHandle:
        params: dict[str, Any] = {"cmd": cmd, "stdin": bool(stdin), "timeout": _no_limit(timeout)}
        if not keep_on_disconnect:
            params["keep_on_disconnect"] = False  # a foreground command dies with its connection
        if envs:
            params["envs"] = envs
        if user:
            params["user"] = user
        if cwd:
            params["cwd"] = cwd
        return await _open(
            self._link,
            "exec.start",
            params,
            request_timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            retain_output=retain_output,
            queue_events=queue_events,
        )

    async def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        *,
        retain_output: bool = True,
        queue_events: bool = False,
    ) -> AsyncCommandHandle:
        """Attach to a running (or just finished) command: its retained output is replayed, then live.

        Unknown pid: NotFoundException. ``timeout`` bounds how long the handle follows
        the command (0 = no limit); the command itself is not affected by it.
        """
        return await _open(
            self._link,
            "exec.attach",
            {"pid": pid},
            request_timeout,
            deadline_after=timeout,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            retain_output=retain_output,
            queue_events=queue_events,
        )


class AsyncPty:
    """``sbx.pty``: interactive terminals (``/bin/bash -i -l``, TERM=xterm-256color)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def create(
        self,
        size: PtySize | None = None,
        on_data: Any = None,
        user: str | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        queue_events: bool = False,
    ) -> AsyncCommandHandle:
        """Start a terminal; its output (bytes) goes to ``on_data``. Default size 24×80."""
        size = size or PtySize(rows=24, cols=80)
        envs = dict(envs or {})
        envs.setdefault("TERM", "xterm-256color")
        envs.setdefault("LANG", "C.UTF-8")
        envs.setdefault("LC_ALL", "C.UTF-8")
        params: dict[str, Any] = {
            "pty": {"rows": size.rows, "cols": size.cols},
            "envs": envs,
            "timeout": _no_limit(timeout),
        }
        if user:
            params["user"] = user
        if cwd:
            params["cwd"] = cwd
        return await _open(
            self._link, "exec.start", params, request_timeout, on_pty=on_data, queue_events=queue_events
        )

    async def connect(
        self,
        pid: int,
        on_data: Any = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        queue_events: bool = False,
    ) -> AsyncCommandHandle:
        """Attach to a running terminal (its retained output is replayed first)."""
        return await _open(
            self._link,
            "exec.attach",
            {"pid": pid},
            request_timeout,
            deadline_after=timeout,
            on_pty=on_data,
            queue_events=queue_events,
        )

    async def send_stdin(self, pid: int, data: bytes, request_timeout: float | None = None) -> None:
        """Type into the terminal."""
        await self._link.call("exec.stdin", {"pid": pid, "data": data}, request_timeout)

    async def resize(self, pid: int, size: PtySize, request_timeout: float | None = None) -> None:
        """Change the terminal size (the foreground job gets SIGWINCH)."""
        await self._link.call(
            "exec.resize", {"pid": pid, "rows": size.rows, "cols": size.cols}, request_timeout
        )

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """SIGKILL the terminal's process group. False if it was not running."""
        res = await self._link.call("exec.kill", {"pid": pid}, request_timeout)
        return bool(res.get("killed"))
