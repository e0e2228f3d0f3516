"""Process execution: the process table and the ``exec.*`` methods.

Each process runs in its own session (so its whole group can be signalled) with
its output read into a bounded ring buffer per fd. Clients subscribe to a
process with a stream id; every subscriber sends from the rings at its own
offsets through its own credit window, so a slow client slows only its stream.
Bytes a subscriber has not been sent yet are never evicted: when a ring is full
because of a lagging subscriber, the agent stops reading that pipe and the
process blocks on write. With nobody attached, the oldest bytes go.

A process outlives the connection that started it (unless started with
``keep_on_disconnect=false``), and its output and exit status stay available
for a while after it exits, so a client can reattach and replay what it missed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import TransportClosed
from forkd.protocol import ErrorCode, RpcError

from . import _params as params_
from . import _pty
from ._methods import component, method
from ._reaper import exit_info
from ._ringbuf import RingBuffer
from ._users import User, resolve_path, resolve_user

log = logging.getLogger("forkd.agent.exec")

RING_CAPACITY = 4 * 1024 * 1024  # per fd
_READ_SIZE = 64 * 1024  # a pipe holds 64 KiB by default
# Smaller than protocol.CHUNK_SIZE so stdout and stderr interleave finely and a
# window of credit is spread over several frames.
_SEND_CHUNK = 256 * 1024
STDIN_LIMIT = 8 * 1024 * 1024  # queued, not yet written stdin bytes per process
# After the main process exits, children it left behind (``cmd &``) may hold the
# pipes open: stop reading once they are quiet this long...
_IDLE_AFTER_EXIT = 0.1
# ...or after this many busy ticks of that length (a child that keeps writing).
_BUSY_TICKS_AFTER_EXIT = 20
KEEP_EXITED = 64
KEEP_EXITED_SECONDS = 300.0
KEEP_EXITED_BYTES = 32 * 1024 * 1024  # output kept for exited processes, all together
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- spawning -----------------------------------------------------------------


@dataclass
class Spec:
    cmd: str
    envs: dict[str, str]
    user: User
    cwd: str
    stdin: bool
    timeout: float
    tag: str | None
    pty: tuple[int, int] | None  # (rows, cols)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def _parse_pty(params: dict) -> tuple[int, int] | None:
    value = params.get("pty")
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "parameter 'pty' must be a map {rows, cols}")
    # Absent or 0 means "unknown": use the default rather than a 0x0 terminal.
    rows = value.get("rows") or _pty.DEFAULT_ROWS
    cols = value.get("cols") or _pty.DEFAULT_COLS
    return _pty.check_size(rows, cols)


def _check_envs(envs: dict[str, str]) -> None:
    for k, v in envs.items():
        if not k or "=" in k or "\x00" in k:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"invalid environment variable name {k!r}")
        if "\x00" in v:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"environment variable {k} contains a NUL byte")


def _resolve_cwd(raw: str | None, user: User) -> str:
    if raw is None or raw == "":
        # A missing home (system users, bare images) should not make every
        # command fail; bash copes with any directory.
        return user.home if os.path.isdir(user.home) else "/"
    cwd = resolve_path(raw, user)
    if not os.path.exists(cwd):
        raise RpcError(ErrorCode.FILE_NOT_FOUND, f"working directory '{cwd}' does not exist")
    if not os.path.isdir(cwd):
        raise RpcError(ErrorCode.INVALID_ARGUMENT, f"working directory '{cwd}' is not a directory")
    return cwd


def parse_spec(agent, params: dict) -> Spec:
    pty = _parse_pty(params)
    # Without a command a terminal runs an interactive login shell.
    cmd = params_.get(params, "cmd", str, "") if pty else params_.get(params, "cmd", str)
    if "\x00" in cmd:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "cmd contains a NUL byte")
    envs = params_.get_str_map(params, "envs")
    _check_envs(envs)
    timeout = params_.get_number(params, "timeout", 0.0)
    if not math.isfinite(timeout) or timeout < 0:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, "parameter 'timeout' must be a number >= 0 (0 = no limit)")
    user = resolve_user(params_.get(params, "user", str, None))
    cwd = _resolve_cwd(params_.get(params, "cwd", str, None), user)
    spec = Spec(
        cmd=cmd,
        envs=dict(envs),
        user=user,
        cwd=cwd,
        stdin=bool(params_.get(params, "stdin", bool, False)),
        timeout=timeout,
        tag=params_.get(params, "tag", str, None),
        pty=pty,
    )
    shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"
    if pty and not cmd:
        spec.argv = [shell, "-i", "-l"] if shell == "/bin/bash" else [shell, "-i"]
    else:
        spec.argv = [shell, "-l", "-c", cmd] if shell == "/bin/bash" else [shell, "-c", cmd]
    env = {
        "PATH": os.environ.get("PATH") or _DEFAULT_PATH,
        "HOME": user.home,
        "USER": user.name,
        "LOGNAME": user.name,
        "SHELL": user.shell,
        "LANG": "C.UTF-8",
        "PWD": cwd,
        # Read now, not at import: an identity refresh (fork of a sandbox) changes it.
        "FORKD_SANDBOX_ID": agent.sandbox_id,
        "E2B_SANDBOX_ID": agent.sandbox_id,
    }
    if pty:
        env["TERM"] = "xterm-256color"
    env.update(envs)
    spec.env = env
    return spec


def _spawn_error(exc: Exception, spec: Spec) -> RpcError:
    where = f"as user '{spec.user.name}' in '{spec.cwd}'"
    if isinstance(exc, FileNotFoundError):
        return RpcError(ErrorCode.FILE_NOT_FOUND, f"cannot start the command {where}: {exc}")
    if isinstance(exc, (PermissionError, ValueError)):
        return RpcError(ErrorCode.INVALID_ARGUMENT, f"cannot start the command {where}: {exc}")
    return RpcError(ErrorCode.SANDBOX, f"cannot start the command {where}: {exc}")


# -- one process --------------------------------------------------------------


class _Output:
    """One output fd as the client sees it (1, 2 or 3) and what feeds it."""

    __slots__ = ("fd", "os_fd", "ring", "paused", "closed")

    def __init__(self, fd: int, os_fd: int) -> None:
        self.fd = fd
        self.os_fd = os_fd
        self.ring = RingBuffer(RING_CAPACITY)
        self.paused = False  # reader removed because a subscriber lags
        self.closed = False


class Proc:
    def __init__(
        self, table: Processes, spec: Spec, popen: subprocess.Popen, outputs: dict[int, int], stdin_fd
    ):
        self.table = table
        self.spec = spec
        self.popen = popen
        self.pid = popen.pid
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        self.outputs = {fd: _Output(fd, os_fd) for fd, os_fd in outputs.items()}
        self.subscribers: set[Subscriber] = set()
        self.owner: Connection | None = None  # set when the process dies with its connection
        # Exit
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.exited = False
        self.timed_out = False
        self.finished = False  # exited and all output collected
        self.finished_mono = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._read_since_tick = False
        self._busy_ticks = 0
        # Output order across fds: bumps when reads switch fd (see RingBuffer stamps).
        self._seq = 0
        self._last_fd = 0
        self._waiters: list[asyncio.Future] = []
        # Stdin: a PTY's master doubles as its stdin; a pipe otherwise; None when disabled.
        self._stdin_fd: int | None = stdin_fd
        # open | closing (after the queue drains) | closed | disabled
        self._stdin_state = "open" if stdin_fd is not None else "disabled"
        self._stdin_queue: deque[list] = deque()  # [memoryview, future]
        self._stdin_queued = 0
        self._stdin_writing = False
        self._stdin_close_waiters: list[asyncio.Future] = []

    @property
    def is_pty(self) -> bool:
        return self.spec.pty is not None

    def start(self) -> None:
        for out in self.outputs.values():
            self.loop.add_reader(out.os_fd, self._on_readable, out)
        if self.spec.timeout > 0:
            self._timer = self.loop.call_later(self.spec.timeout, self._on_timeout)

    def info(self) -> dict:
        s = self.spec
        return {
            "pid": self.pid,
            "tag": s.tag,
            "cmd": s.cmd,
            "envs": s.envs,
            "cwd": s.cwd,
            "user": s.user.name,
            "pty": self.is_pty,
            "started_at": self.started_at,
        }

    def end_info(self) -> dict:
        error = None
        if self.timed_out:
            reason, error = "timeout", f"command timed out after {self.spec.timeout:g} s"
        elif self.signal is not None:
            reason, error = "killed", f"signal: {(signal.strsignal(self.signal) or str(self.signal)).lower()}"
        else:
            reason = "exited"
            if self.exit_code:
                error = f"exit status {self.exit_code}"
        return {
            "pid": self.pid,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "reason": reason,
            "error": error,
        }

    # -- signals --
    def kill_group(self, sig: int) -> bool:
        # After the exit is reaped the pid may be reused: never signal it again.
        if self.exited:
            return False
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _on_timeout(self) -> None:
        self._timer = None
        if not self.exited:
            self.timed_out = True
            self.kill_group(signal.SIGKILL)

    def resize(self, rows: int, cols: int) -> None:
        out = self.outputs[p.FD_PTY]
        if out.closed:
            raise RpcError(ErrorCode.NOT_FOUND, f"the terminal of process {self.pid} is closed")
        _pty.set_size(out.os_fd, rows, cols)

    # -- output --
    def _min_offset(self, fd: int) -> int | None:
        return min((s.offsets[fd] for s in self.subscribers), default=None)

    def _room(self, out: _Output) -> int:
        """Bytes we may read now without evicting anything a subscriber still needs."""
        lowest = self._min_offset(out.fd)
        evictable = len(out.ring) if lowest is None else max(0, lowest - out.ring.start)
        return out.ring.free + evictable

    def _on_readable(self, out: _Output) -> None:
        room = self._room(out)
        if room <= 0:
            self.loop.remove_reader(out.os_fd)
            out.paused = True
            return
        try:
            data = os.read(out.os_fd, min(_READ_SIZE, room))
        except BlockingIOError:
            return
        except OSError:  # EIO from a pty master once every slave fd is closed
            data = b""
        if not data:
            self._close_output(out)
            self._maybe_finish()
            return
        self._read_since_tick = True
        if out.fd != self._last_fd:
            self._seq += 1
            self._last_fd = out.fd
        out.ring.append(data, self._seq)
        self._wake()

    def progressed(self) -> None:
        """A subscriber moved on (or left): paused pipes may be readable again."""
        for out in self.outputs.values():
            if out.paused and not out.closed and self._room(out) > 0:
                out.paused = False
                self.loop.add_reader(out.os_fd, self._on_readable, out)

    def next_chunk(self, offsets: dict[int, int]) -> tuple[int, int, bytes] | None:
        """The next bytes for a subscriber at ``offsets``: from the fd whose pending
        bytes were produced first, so replays keep stdout/stderr interleaving."""
        best = None
        for fd, out in self.outputs.items():
            off = max(offsets[fd], out.ring.start)
            if off >= out.ring.end:
                continue
            stamp, run_end = out.ring.stamp_at(off)
            if best is None or stamp < best[0]:
                best = (stamp, fd, off, run_end)
        if best is None:
            return None
        _, fd, off, run_end = best
        return fd, off, self.outputs[fd].ring.read(off, min(run_end - off, _SEND_CHUNK))

    def changed(self) -> asyncio.Future:
        fut = self.loop.create_future()
        self._waiters.append(fut)
        return fut

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _close_output(self, out: _Output) -> None:
        if out.closed:
            return
        if not out.paused:
            self.loop.remove_reader(out.os_fd)
        if out.os_fd == self._stdin_fd:  # the pty master: stdin goes with it
            self._shut_stdin(ErrorCode.NOT_FOUND, f"the terminal of process {self.pid} is closed")
        out.closed = True
        os.close(out.os_fd)

    def retained(self) -> int:
        return sum(len(out.ring) for out in self.outputs.values())

    def release_output(self) -> None:
        for out in self.outputs.values():
            out.ring.clear()

    # -- exit --
    def on_exit(self, status: int) -> None:
        self.exit_code, self.signal = exit_info(status)
        # Popen must never wait for this pid itself: the reaper already did.
        self.popen.returncode = self.exit_code if self.exit_code is not None else -(self.signal or 0)
        self.exited = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.is_pty:  # a pty master stays open: it still carries output
            self._shut_stdin(ErrorCode.NOT_FOUND, f"process {self.pid} has exited")
        if not self._maybe_finish():
            self._read_since_tick = False
            self._tick = self.loop.call_later(_IDLE_AFTER_EXIT, self._drain_tick)

    def _drain_tick(self) -> None:
        self._tick = None
        open_outputs = [out for out in self.outputs.values() if not out.closed]
        if any(out.paused for out in open_outputs):
            pass  # a subscriber is catching up; the pipe is not idle, we are
        elif not self._read_since_tick or self._busy_ticks >= _BUSY_TICKS_AFTER_EXIT:
            self.finish()
            return
        else:
            self._busy_ticks += 1
        self._read_since_tick = False
        self._tick = self.loop.call_later(_IDLE_AFTER_EXIT, self._drain_tick)

    def _maybe_finish(self) -> bool:
        if self.exited and all(out.closed for out in self.outputs.values()):
            self.finish()
            return True
        return False

    def finish(self) -> None:
        """Stop collecting output; subscribers send what is buffered, then stream.end."""
        if self.finished:
            return
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        self._shut_stdin(ErrorCode.NOT_FOUND, f"process {self.pid} has exited")
        for out in self.outputs.values():
            self._close_output(out)
        self.finished = True
        self.finished_mono = time.monotonic()
        self._wake()
        self.table.on_finished(self)

    def shutdown(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.kill_group(signal.SIGKILL)
        self.finish()

    # -- stdin --
    def _check_stdin(self) -> None:
        if self._stdin_state == "disabled":
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT,
                f"process {self.pid} was started without stdin (start it with stdin=true)",
            )
        if self.exited or self.finished:
            raise RpcError(ErrorCode.NOT_FOUND, f"process {self.pid} has exited")
        if self._stdin_state != "open":
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"stdin of process {self.pid} is closed")

    def write_stdin(self, data: bytes) -> asyncio.Future:
        """Queue ``data``; the future resolves once the process's pipe took all of it."""
        self._check_stdin()
        fut = self.loop.create_future()
        if not data:
            fut.set_result(None)
            return fut
        if self._stdin_queue and self._stdin_queued + len(data) > STDIN_LIMIT:
            raise RpcError(
                ErrorCode.SERVICE_BUSY,
                f"stdin of process {self.pid} already has {self._stdin_queued} bytes waiting; "
                "wait for earlier writes to complete",
            )
        self._stdin_queue.append([memoryview(data), fut])
        self._stdin_queued += len(data)
        self._flush_stdin()
        return fut

    def close_stdin(self) -> asyncio.Future:
        if self.is_pty:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT,
                f"process {self.pid} runs on a terminal, which has no separate stdin to close; "
                "send Ctrl-D (b'\\x04') or kill it",
            )
        if self._stdin_state == "disabled":
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"process {self.pid} was started without stdin")
        fut = self.loop.create_future()
        if self._stdin_state == "closed":
            fut.set_result(None)
            return fut
        self._stdin_state = "closing"  # queued data still goes first
        self._stdin_close_waiters.append(fut)
        self._flush_stdin()
        return fut

    def _flush_stdin(self) -> None:
        fd = self._stdin_fd
        if fd is None:
            return
        queue = self._stdin_queue
        while queue:
            item = queue[0]
            try:
                n = os.write(fd, item[0])
            except BlockingIOError:
                if not self._stdin_writing:
                    self.loop.add_writer(fd, self._flush_stdin)
                    self._stdin_writing = True
                return
            except OSError as exc:  # EPIPE: the process closed its end
                self._shut_stdin(
                    ErrorCode.INVALID_ARGUMENT, f"stdin of process {self.pid} is closed: {exc.strerror}"
                )
                return
            self._stdin_queued -= n
            if n < len(item[0]):
                item[0] = item[0][n:]
                continue
            queue.popleft()
            if not item[1].done():  # done if the caller gave up waiting; the data still went
                item[1].set_result(None)
        if self._stdin_writing:
            self.loop.remove_writer(fd)
            self._stdin_writing = False
        if self._stdin_state == "closing":
            self._shut_stdin(None, "")

    def _shut_stdin(self, code: ErrorCode | None, message: str) -> None:
        """Close stdin; queued writes that never reached the pipe fail with ``code``."""
        fd, self._stdin_fd = self._stdin_fd, None
        if fd is None:
            return
        if self._stdin_writing:
            self.loop.remove_writer(fd)
            self._stdin_writing = False
        if not self.is_pty:  # a pty master is closed with the output
            os.close(fd)
        self._stdin_state = "closed"
        while self._stdin_queue:
            _, fut = self._stdin_queue.popleft()
            if not fut.done():
                fut.set_exception(RpcError(code or ErrorCode.INVALID_ARGUMENT, message))
        self._stdin_queued = 0
        waiters, self._stdin_close_waiters = self._stdin_close_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


# -- subscribers ----------------------------------------------------------------


class Subscriber:
    """One stream of one connection following one process's output."""

    def __init__(self, table: Processes, proc: Proc, conn: Connection, stream: int, offsets: dict[int, int]):
        self.table = table
        self.proc = proc
        self.conn = conn
        self.stream = stream
        self.offsets = offsets
        self.task: asyncio.Task | None = None
        self.stopped = False

    async def run(self) -> None:
        proc, conn, sid = self.proc, self.conn, self.stream
        try:
            while not self.stopped:
                item = proc.next_chunk(self.offsets)
                if item is not None:
                    fd, off, data = item
                    await conn.send_stream(sid, fd, off, data)
                    self.offsets[fd] = off + len(data)
                    proc.progressed()
                elif proc.finished:
                    await conn.end_stream(sid, **proc.end_info())
                    break
                else:
                    await proc.changed()
        except (TransportClosed, RpcError, asyncio.CancelledError):
            pass  # the connection went away or the stream was detached
        except Exception:
            log.exception("stream %d of process %d failed", sid, proc.pid)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.table.forget(self)
        self.conn.close_outbound(self.stream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


# -- the table ------------------------------------------------------------------


SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)


@component("processes")
class Processes:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.procs: dict[int, Proc] = {}  # running and recently exited
        self._finished: OrderedDict[int, Proc] = OrderedDict()  # oldest first
        self._subs: dict[tuple[Connection, int], Subscriber] = {}

    def spawn(self, spec: Spec) -> Proc:
        stdin_fd = None
        parent_fds: list[int] = []
        child_fds: list[int] = []
        try:
            if spec.pty:
                owner = None if spec.user.is_self else spec.user.uid
                master, slave = _pty.open_pty(*spec.pty, owner=owner)
                parent_fds.append(master)
                child_fds.append(slave)
                stdio = {"stdin": slave, "stdout": slave, "stderr": slave}
                outputs = {p.FD_PTY: master}
                stdin_fd = master
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                parent_fds += [out_r, err_r]
                child_fds += [out_w, err_w]
                stdio = {"stdout": out_w, "stderr": err_w, "stdin": subprocess.DEVNULL}
                if spec.stdin:
                    in_r, in_w = os.pipe()
                    parent_fds.append(in_w)
                    child_fds.append(in_r)
                    stdio["stdin"] = in_r
                    stdin_fd = in_w
                outputs = {p.FD_STDOUT: out_r, p.FD_STDERR: err_r}
            for fd in parent_fds:
                os.set_blocking(fd, False)
            kw: dict = dict(stdio, cwd=spec.cwd, env=spec.env, start_new_session=True, close_fds=True)
            argv = spec.argv
            if not spec.user.is_self:
                if SETPRIV and not spec.pty:
                    # CPython forks (rather than vforks) whenever it must change the
                    # uid itself, copying the agent's page tables: milliseconds per
                    # command. setpriv switches user after a cheap vfork+exec instead.
                    groups = ",".join(str(g) for g in spec.user.groups()) or str(spec.user.gid)
                    argv = [
                        SETPRIV,
                        f"--reuid={spec.user.uid}",
                        f"--regid={spec.user.gid}",
                        f"--groups={groups}",
                        "--",
                        *argv,
                    ]
                else:
                    kw.update(user=spec.user.uid, group=spec.user.gid, extra_groups=spec.user.groups())
            if spec.pty:
                kw["preexec_fn"] = _pty.become_controlling_tty
            popen = subprocess.Popen(argv, **kw)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in parent_fds + child_fds:
                os.close(fd)
            raise _spawn_error(exc, spec) from None
        for fd in child_fds:
            os.close(fd)
        proc = Proc(self, spec, popen, outputs, stdin_fd)
        self.agent.reaper.watch(proc.pid, proc.on_exit)
        # A pid seen before belongs to a process that was reaped long ago.
        self._finished.pop(proc.pid, None)
        self.procs[proc.pid] = proc
        proc.start()
        return proc

    def lookup(self, pid: int) -> Proc:
        self._trim()
        proc = self.procs.get(pid)
        if proc is None:
            raise RpcError(
                ErrorCode.NOT_FOUND, f"no process with pid {pid} (never started by forkd, or exited long ago)"
            )
        return proc

    def running(self) -> list[Proc]:
        return [proc for proc in self.procs.values() if not proc.exited]

    def on_finished(self, proc: Proc) -> None:
        if self.procs.get(proc.pid) is proc:
            self._finished[proc.pid] = proc
        self._trim()

    def _trim(self) -> None:
        now = time.monotonic()
        for pid, proc in list(self._finished.items()):
            too_many = len(self._finished) > KEEP_EXITED
            if not too_many and now - proc.finished_mono <= KEEP_EXITED_SECONDS:
                break
            if proc.subscribers:
                continue
            del self._finished[pid]
            if self.procs.get(pid) is proc:
                del self.procs[pid]
        total = sum(proc.retained() for proc in self._finished.values())
        for proc in self._finished.values():
            if total <= KEEP_EXITED_BYTES:
                break
            if not proc.subscribers:
                total -= proc.retained()
                proc.release_output()

    # -- subscriptions --
    def check_stream_free(self, conn: Connection, stream: int) -> None:
        if (conn, stream) in self._subs:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT, f"stream {stream} is already in use on this connection"
            )

    def subscribe(
        self, proc: Proc, conn: Connection, stream: int, window: int, offsets: dict[int, int]
    ) -> None:
        """Register now (eviction respects it at once); the pump starts sending on
        the next loop iteration, i.e. after the caller's response went out."""
        self.check_stream_free(conn, stream)
        conn.open_outbound(stream, window)
        sub = Subscriber(self, proc, conn, stream, offsets)
        self._subs[(conn, stream)] = sub
        proc.subscribers.add(sub)
        sub.task = asyncio.get_running_loop().create_task(sub.run())

    def forget(self, sub: Subscriber) -> None:
        if self._subs.get((sub.conn, sub.stream)) is sub:
            del self._subs[(sub.conn, sub.stream)]
        if sub in sub.proc.subscribers:
            sub.proc.subscribers.discard(sub)
            sub.proc.progressed()

    def detach(self, conn: Connection, stream: int) -> bool:
        sub = self._subs.get((conn, stream))
        if sub is None:
            return False
        sub.stop()
        return True

    # -- component hooks --
    def drop_connection(self, conn: Connection) -> None:
        for (c, _), sub in list(self._subs.items()):
            if c is conn:
                sub.stop()
        for proc in self.running():
            if proc.owner is conn:
                proc.kill_group(signal.SIGKILL)

    async def close(self) -> None:
        for sub in list(self._subs.values()):
            sub.stop()
        for proc in list(self.procs.values()):
            proc.shutdown()


# -- methods --------------------------------------------------------------------


def _stream_params(params: dict) -> tuple[int, int]:
    stream = params_.get_int(params, "stream", minimum=0)
    window = params_.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1)
    return stream, window


def _pid(params: dict) -> int:
    return params_.get_int(params, "pid", minimum=1)


def _signal_number(value: object) -> int:
    if type(value) is int:
        try:
            return int(signal.Signals(value))
        except ValueError:
            pass
        if signal.SIGRTMIN <= value <= signal.SIGRTMAX:
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return int(signal.Signals[name])
        except KeyError:
            pass
    raise RpcError(
        ErrorCode.INVALID_ARGUMENT, f"unknown signal {value!r} (use a number or a name like 'SIGTERM')"
    )


# No handler below awaits before its work is done: requests are handled in
# arrival order, and a subscription's first frame goes out after the response.


@method("exec.start")
async def _exec_start(agent, conn: Connection, params: dict) -> dict:
    table: Processes = agent.processes
    spec = parse_spec(agent, params)
    keep = params_.get(params, "keep_on_disconnect", bool, True)
    stream = window = None
    if params.get("stream") is not None:
        stream, window = _stream_params(params)
        table.check_stream_free(conn, stream)
    proc = table.spawn(spec)
    if not keep:
        proc.owner = conn
        if conn.closed.is_set():
            proc.kill_group(signal.SIGKILL)
    if stream is not None:
        table.subscribe(proc, conn, stream, window, {fd: 0 for fd in proc.outputs})
    return {"pid": proc.pid, "started_at": proc.started_at}


def _requested_offsets(params: dict) -> dict[int, int]:
    raw = params_.get(params, "offsets", dict, {})
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            fd = int(k)
        except (TypeError, ValueError):
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"offsets key {k!r} is not an fd number") from None
        if type(v) is not int or v < 0:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"offset for fd {fd} must be an integer >= 0")
        out[fd] = v
    return out


@method("exec.attach")
async def _exec_attach(agent, conn: Connection, params: dict) -> dict:
    table: Processes = agent.processes
    pid = _pid(params)
    stream, window = _stream_params(params)
    requested = _requested_offsets(params)
    proc = table.lookup(pid)
    table.check_stream_free(conn, stream)
    offsets: dict[int, int] = {}
    truncated = False
    for fd, out in proc.outputs.items():
        want = requested.get(fd)
        if want is None:
            offsets[fd] = out.ring.start
        elif want > out.ring.end:
            raise RpcError(
                ErrorCode.INVALID_ARGUMENT,
                f"offset {want} for fd {fd} is past the end of the output ({out.ring.end} bytes so far)",
            )
        elif want < out.ring.start:
            offsets[fd] = out.ring.start
            truncated = True
        else:
            offsets[fd] = want
    table.subscribe(proc, conn, stream, window, offsets)
    return {"pid": pid, "offsets": {str(fd): off for fd, off in offsets.items()}, "truncated": truncated}


@method("exec.detach")
async def _exec_detach(agent, conn: Connection, params: dict) -> dict:
    agent.processes.detach(conn, params_.get_int(params, "stream", minimum=0))
    return {}


@method("exec.stdin")
async def _exec_stdin(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.lookup(_pid(params))
    data = params_.get(params, "data", (bytes, str))
    if isinstance(data, str):
        data = data.encode()
    await proc.write_stdin(data)  # queued in request order before this first await
    return {}


@method("exec.close_stdin")
async def _exec_close_stdin(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.lookup(_pid(params))
    await proc.close_stdin()
    return {}


@method("exec.signal")
async def _exec_signal(agent, conn: Connection, params: dict) -> dict:
    pid = _pid(params)
    sig = _signal_number(params.get("signal"))
    proc = agent.processes.lookup(pid)
    return {"delivered": proc.kill_group(sig)}


@method("exec.kill")
async def _exec_kill(agent, conn: Connection, params: dict) -> dict:
    proc = agent.processes.procs.get(_pid(params))
    return {"killed": proc is not None and proc.kill_group(signal.SIGKILL)}


@method("exec.resize")
async def _exec_resize(agent, conn: Connection, params: dict) -> dict:
    pid = _pid(params)
    rows, cols = _pty.check_size(params.get("rows"), params.get("cols"))
    proc = agent.processes.lookup(pid)
    if not proc.is_pty:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, f"process {pid} has no terminal (start it with pty)")
    proc.resize(rows, cols)
    return {}


@method("exec.list")
async def _exec_list(agent, conn: Connection, params: dict) -> list:
    return [proc.info() for proc in agent.processes.running()]
