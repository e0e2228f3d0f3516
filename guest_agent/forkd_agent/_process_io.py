"""One process's I/O: its output read into a bounded ring buffer per fd, its
queued stdin, and its exit.

Each process runs in its own session (so its whole group can be signalled).
Clients follow its output as subscribers (_process_subscriber.py), each at its
own offsets. Bytes a subscriber has not been sent yet are never evicted: when a
ring is full because of a lagging subscriber, the agent stops reading that pipe
and the process blocks on write. With nobody attached, the oldest bytes go.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import deque
from typing import TYPE_CHECKING

from forkd import protocol as p
from forkd._connection import Connection
from forkd.protocol import ErrorCode, RpcError

from . import _pty
from ._process_spec import Spec
from ._reaper import exit_info
from ._ringbuf import RingBuffer

if TYPE_CHECKING:
    from ._process_subscriber import Subscriber
    from ._process_table import Processes

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
