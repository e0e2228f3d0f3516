"""The agent's handle on an eval kernel: one forked process per code context.

A kernel is a separate process so that user code (os._exit, a segfault, a loop
in C that no exception reaches) never takes the agent down. _kernel_fork.py
starts it; _kernel_session.py is what runs inside it. Its fds 1 and 2 are pipes
the agent reads, so print() and a subprocess's output are captured alike.

Messages are protocol Notifications in length-prefixed frames:
  agent -> kernel: run {code, envs}, eval {expr}, reseed {seed}, ack {},
                   export {} and restore {count} (each with descriptors, see
                   _kernel_state.py)
  kernel -> agent: started {}, result {result}, done {...}
A kernel serves one job (run or eval) at a time: the agent sends the next job
only after the previous one's ``done``. ``reseed`` may be sent at any time; the
kernel handles it between jobs. After a ``result`` the kernel waits for ``ack``:
by then the agent has taken the output written before the result, so output
written after it cannot overtake it.

Interrupts are SIGINT. The agent signals only after the job's ``started``, so
an interrupt is never lost in the gap before the kernel arms (see
_kernel_session.py for how the kernel takes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from typing import Any

from forkd import protocol as p

from ._reaper import exit_info

__all__ = ["Kernel", "Job", "exit_text"]

# The kernel channel is private to the agent and may carry a 3 MiB result.
MAX_FRAME = 64 * 1024 * 1024
READ_SIZE = 256 * 1024
# Output read while no run listens (a background process of an earlier cell),
# kept per fd for the next run; older bytes are dropped.
_BACKLOG = 64 * 1024
# Unsent output a run may hold before the agent stops reading the kernel's
# pipes: the pipes then fill and the kernel's writes block (backpressure).
_HIGH_WATER = 1024 * 1024
# Bound on one "read what is left" sweep of a pipe, for a background writer
# that never stops.
_DRAIN_LIMIT = 4 * 1024 * 1024


def exit_text(status: int | None) -> str:
    if status is None:
        return "exited"
    code, sig = exit_info(status)
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by signal {sig} ({name})"
    return f"exited with code {code}"


class Job:
    """One run or eval on a kernel, as a queue of events for the handler:
    ("out", fd, data), ("result", result, size), ("done", payload), ("dead",)."""

    def __init__(self, output: bool, conn: Any = None) -> None:
        self.output = output  # False: the kernel's output during this job is dropped
        self.conn = conn
        self.events: asyncio.Queue = asyncio.Queue()
        self.buffered = 0
        self.started = False
        self.want_interrupt = False
        self.escalated = False  # an interrupt that ends in SIGKILL if ignored is under way
        self.finished = False
        self.timed_out = False
        self.killed = False  # the agent killed the kernel because it ignored an interrupt
        self.kernel: Kernel | None = None

    def push(self, event: tuple) -> None:
        if event[0] in ("done", "dead"):
            self.finished = True
        elif event[0] == "out":
            self.buffered += len(event[2])
        self.events.put_nowait(event)

    async def next(self) -> tuple:
        event = await self.events.get()
        if event[0] == "out":
            self.buffered -= len(event[2])
            if self.kernel is not None and self.buffered < _HIGH_WATER // 2:
                self.kernel._resume()
        return event


class Kernel:
    """The agent's handle on one kernel process."""

    def __init__(self, pid: int, sock: socket.socket, out_fd: int, err_fd: int) -> None:
        self.pid = pid
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.alive = True  # False once its channel is gone or it exited
        self.status: int | None = None
        self.exited: asyncio.Future = self.loop.create_future()
        self.stop_reason = ""  # why the agent stopped it, if it did
        self.job: Job | None = None
        self._pipes: dict[int, int] = {p.FD_STDOUT: out_fd, p.FD_STDERR: err_fd}
        self._paused = False
        self._backlog = {p.FD_STDOUT: bytearray(), p.FD_STDERR: bytearray()}
        self._frames = p.FrameReader(MAX_FRAME)
        self._wbuf = bytearray()
        self.loop.add_reader(sock.fileno(), self._on_readable)
        for kfd, fd in self._pipes.items():
            self.loop.add_reader(fd, self._on_pipe, kfd)

    # -- jobs --
    def submit(self, job: Job, op: str, params: dict, fds: tuple[int, ...] = ()) -> None:
        """Start a job; its events arrive in ``job``. Synchronous, so jobs reach
        the kernel in the order their handlers called this. ``fds`` travel with
        the job's message (the caller keeps and closes its own copies)."""
        assert self.job is None, "kernel busy"
        job.kernel = self
        if not self.alive:
            job.push(("dead",))
            return
        self.job = job
        if job.output:
            for kfd, buf in self._backlog.items():
                if buf:
                    job.push(("out", kfd, bytes(buf)))
                    buf.clear()
        self._send(op, params, fds)

    def interrupt(self, job: Job) -> bool:
        """SIGINT the job's user code; False when the job is already over."""
        if job is not self.job or job.finished:
            return False
        if job.started:
            self._signal(signal.SIGINT)
        else:
            job.want_interrupt = True  # sent when the kernel reports "started"
        return True

    def reseed(self, seed: bytes) -> None:
        self._send("reseed", {"seed": seed})

    def kill(self, reason: str) -> None:
        """SIGKILL the kernel and every process it started."""
        if not self.stop_reason:
            self.stop_reason = reason
        if self.exited.done():
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except OSError:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)

    def close(self) -> None:
        self.kill("the agent is stopping")
        self._lost()

    # -- events from the loop --
    def _on_exit(self, status: int) -> None:
        self.status = status
        if not self.exited.done():
            self.exited.set_result(status)
        self._lost()

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        self._frames.feed(data)
        try:
            for body in self._frames.frames():
                msg = p.decode(body, MAX_FRAME)
                if type(msg) is p.Notification:
                    self._on_message(msg.method, msg.params, len(body))
        except p.ProtocolError:
            # Only user code writing to the kernel's socket could do this.
            self.kill("its channel to the agent was corrupted")
            self._lost()

    def _on_message(self, method: str, params: dict, size: int) -> None:
        job = self.job
        if job is None:
            if method == "result":
                self._send("ack", {})  # the kernel waits for it, wanted or not
            return
        # Output written before this message must reach the client before it.
        self._drain_pipes()
        if method == "started":
            job.started = True
            if job.want_interrupt:
                self._signal(signal.SIGINT)
        elif method == "result":
            job.push(("result", params.get("result"), size))
            self._send("ack", {})
        elif method == "done":
            self.job = None
            self._resume()
            job.push(("done", params))

    def _on_pipe(self, kfd: int) -> None:
        data = self._read_pipe(kfd)
        if data is not None:
            self._sink(kfd, data)

    def _read_pipe(self, kfd: int) -> bytes | None:
        """One read of a kernel pipe; None when it has nothing now or is gone
        (it is closed here at end of file)."""
        fd = self._pipes.get(kfd)
        if fd is None:
            return None
        try:
            data = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            data = b""
        if not data:
            self._close_pipe(kfd)
            return None
        return data

    def _sink(self, kfd: int, data: bytes) -> None:
        job = self.job
        if job is None:
            buf = self._backlog[kfd]
            buf += data
            if len(buf) > _BACKLOG:
                del buf[: len(buf) - _BACKLOG]
        elif job.output:
            job.push(("out", kfd, data))
            if job.buffered > _HIGH_WATER:
                self._pause()

    def _drain_pipes(self) -> None:
        for kfd in list(self._pipes):
            budget = _DRAIN_LIMIT
            while budget > 0:
                data = self._read_pipe(kfd)
                if data is None:
                    break
                budget -= len(data)
                self._sink(kfd, data)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            for fd in self._pipes.values():
                self.loop.remove_reader(fd)

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            for kfd, fd in self._pipes.items():
                self.loop.add_reader(fd, self._on_pipe, kfd)

    def _close_pipe(self, kfd: int) -> None:
        fd = self._pipes.pop(kfd, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _lost(self) -> None:
        """The kernel is gone (exited, or its channel closed): finish the job
        in flight and release the descriptors."""
        if not self.alive:
            return
        self.alive = False
        self.kill("")  # a kernel without its channel is useless; also ends its children
        self.loop.remove_reader(self.sock.fileno())
        if self._wbuf:
            self.loop.remove_writer(self.sock.fileno())
            self._wbuf.clear()
        self._drain_pipes()
        self._paused = False
        for kfd in list(self._pipes):
            self._close_pipe(kfd)
        self.sock.close()
        job, self.job = self.job, None
        if job is not None:
            job.push(("dead",))

    # -- to the kernel --
    def _signal(self, sig: int) -> None:
        if not self.exited.done():
            with contextlib.suppress(OSError):
                os.kill(self.pid, sig)

    def _send(self, op: str, params: dict, fds: tuple[int, ...] = ()) -> None:
        if not self.alive:
            return
        data = p.frame(p.encode(p.Notification(op, params)))
        if self._wbuf:
            if fds:  # descriptors ride on the message's first byte: it must go now
                raise RuntimeError("the kernel's channel is backed up")
            self._wbuf += data
            return
        try:
            n = socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._lost()
            return
        if n < len(data):
            self._wbuf += data[n:]
            self.loop.add_writer(self.sock.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            n = self.sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del self._wbuf[:n]
        if not self._wbuf:
            self.loop.remove_writer(self.sock.fileno())
