"""The QEMU fork server: every QEMU process of the VM backend forked from one
QEMU that the dynamic linker has already prepared (``_qemu_zygote.c`` says
why: ~4 MiB of private memory per QEMU process become shared).

The backend starts one on first use and a new one every ``FORKS_PER_SERVER``
QEMU processes or when the last one died (``VmBackend._fork_server``); a
retired server lives until its last child is reaped. Children are ordinary
QEMU processes with the runtime's command line and fds; they are the server's
children, so their exit status comes back over the socket (and
``ForkedQemu.poll`` shows it), while the runtime watches and kills them
through the pidfd the server sends with each. If no server can be built or
started here, ``VmProcesses`` starts QEMU directly (``FORKD_VM_QEMU_ZYGOTE=0``
always does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
from collections import deque
from pathlib import Path

from .._native_build import build_cached

__all__ = ["FORKS_PER_SERVER", "ForkedQemu", "QemuZygote", "ZygoteError"]

log = logging.getLogger("forkd.runtime.vm")

SOURCE = Path(__file__).with_name("_qemu_zygote.c")
MAGIC = 0x6B71657A
MAX_FDS = 16
MAX_TARGET = 1 << 20  # _qemu_zygote.c: a sanity bound on fd numbers
FLAG_NEWNET, FLAG_NO_THP, FLAG_MERGEABLE = 1, 2, 4
EV_READY, EV_SPAWNED, EV_EXITED = 0, 1, 2
_EVENT = struct.Struct("=iii")
_REQUEST = struct.Struct(f"=IIII{MAX_FDS}iI")
READY_TIMEOUT = 20.0
# Forked processes share their parent's address-space layout, so the children of
# one server share one ASLR layout: a fresh server (a new exec, a new layout) every
# this many QEMU processes bounds how many sandboxes a leaked address is valid in,
# for ~1/this of the memory the server saves.
FORKS_PER_SERVER = 32


class ZygoteError(Exception):
    """A QEMU the server could not fork; ``server_gone``: nor will it fork any more."""

    def __init__(self, message: str, server_gone: bool = True) -> None:
        super().__init__(message)
        self.server_gone = server_gone


class ForkedQemu:
    """The part of ``subprocess.Popen`` the VM backend uses, for a QEMU the
    server forked: its exit status arrives from the server."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    def poll(self) -> int | None:
        return self.returncode

    def _exited(self, status: int) -> None:
        self.returncode = _returncode(status)
        self._ended.set()

    async def wait_status(self, timeout: float) -> int | None:
        """The exit status, once the server has reaped it (None after ``timeout``,
        or at once if its server is gone: nobody will tell)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        return self.returncode


def _returncode(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def library(into: Path) -> Path | None:
    """``_qemu_zygote.c`` built into ``into`` (once per source), or None."""
    return build_cached(SOURCE, into, "libforkd_qemu_zygote.so", hosted=True)


class QemuZygote:
    def __init__(self, binary: str, env: dict[str, str], lib: Path, cwd: Path, log_path: Path) -> None:
        self.binary = binary
        self.env = env
        self.lib = lib
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._ready: asyncio.Future | None = None
        self._replies: deque[asyncio.Future] = deque()
        self._children: dict[int, ForkedQemu] = {}
        self.forks = 0
        self.retired = False
        self._lock = asyncio.Lock()
        self.closed = False

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**self.env, "LD_PRELOAD": str(self.lib), "FORKD_QEMU_ZYGOTE": str(theirs.fileno())}
        try:
            with open(self.log_path, "ab") as logf:
                # Harmless if the library did not take over: a QEMU that waits, stopped, with nothing.
                self.proc = subprocess.Popen(
                    [self.binary, "-M", "none", "-S", "-display", "none", "-nodefaults", "-no-user-config"],
                    env=env,
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=self.cwd,
                )
        except OSError as exc:
            ours.close()
            raise ZygoteError(f"cannot start the QEMU fork server: {exc}") from None
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        loop.add_reader(ours.fileno(), self._on_readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except (TimeoutError, ZygoteError) as exc:
            self.close()
            raise ZygoteError(f"the QEMU fork server did not come up: {exc or 'timeout'}") from None

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._sock, _EVENT.size, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"its socket failed: {exc}")
                return
            if not data:
                self._fail("it exited")
                return
            kind, pid, value = _EVENT.unpack(data[: _EVENT.size])
            if kind == EV_READY and self._ready is not None and not self._ready.done():
                self._ready.set_result(pid)
            elif kind == EV_SPAWNED:
                fut = self._replies.popleft() if self._replies else None
                pidfd = fds[0] if fds else -1
                if fut is None or fut.done():
                    # Its request was given up (timed out, cancelled): nobody will run this QEMU.
                    if pidfd >= 0:
                        with contextlib.suppress(OSError):
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                        os.close(pidfd)
                    continue
                if pid <= 0:
                    fut.set_exception(ZygoteError(f"fork failed: {os.strerror(value)}", server_gone=False))
                else:
                    child = self._children.setdefault(pid, ForkedQemu(pid))
                    fut.set_result((child, pidfd))
            elif kind == EV_EXITED:
                child = self._children.pop(pid, None)
                if child is not None:
                    child._exited(value)
                if self.retired and not self._children:
                    self.close()
                    return
            for fd in fds[1:] if kind == EV_SPAWNED else fds:
                os.close(fd)

    def _fail(self, why: str) -> None:
        err = ZygoteError(f"the QEMU fork server is gone: {why}")
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(err)
        while self._replies:
            fut = self._replies.popleft()
            if not fut.done():
                fut.set_exception(err)
        self.close()

    async def spawn(
        self,
        argv: list[str],
        fds: dict[int, int],
        cwd: Path,
        *,
        newnet: bool,
        no_thp: bool,
        mergeable: bool,
        cgroup_procs: list[int] = (),
    ) -> tuple[ForkedQemu, int]:
        """Fork a QEMU running ``argv`` with ``fds`` ({number in QEMU: our fd}),
        first joining the cgroups whose ``cgroup.procs`` files are open as
        ``cgroup_procs``; (its process, a pidfd for it)."""
        if self.closed or self._sock is None:
            raise ZygoteError("the QEMU fork server is closed")
        cgroup_procs = list(cgroup_procs)
        if len(fds) + len(cgroup_procs) > MAX_FDS or any(not 0 <= t < MAX_TARGET for t in fds):
            raise ZygoteError(f"at most {MAX_FDS} fds, numbered below {MAX_TARGET}", server_gone=False)
        targets = list(fds)
        flags = (FLAG_NEWNET if newnet else 0) | (FLAG_NO_THP if no_thp else 0)
        flags |= FLAG_MERGEABLE if mergeable else 0
        pad = [0] * (MAX_FDS - len(fds))
        head = _REQUEST.pack(MAGIC, flags, len(fds), len(argv), *targets, *pad, len(cgroup_procs))
        body = head + b"".join(s.encode() + b"\0" for s in [str(cwd), *argv])
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        async with self._lock:  # a request and its place in the reply queue together
            while True:
                try:
                    socket.send_fds(self._sock, [body], [fds[t] for t in targets] + cgroup_procs)
                    break
                except BlockingIOError:
                    try:
                        await self._writable(loop)  # the server is behind: wait, in order
                    except TimeoutError:
                        self._fail("it stopped reading requests")
                        raise ZygoteError("the QEMU fork server stopped reading requests") from None
                except OSError as exc:
                    self._fail(f"a request could not be sent: {exc}")
                    raise ZygoteError(str(exc)) from None
            self._replies.append(fut)
            self.forks += 1
        try:
            return await asyncio.wait_for(fut, READY_TIMEOUT)
        except TimeoutError:
            self._fail(f"no answer to a fork request within {READY_TIMEOUT:.0f} s")
            raise ZygoteError(f"the QEMU fork server did not answer within {READY_TIMEOUT:.0f} s") from None

    async def _writable(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._sock is not None
        ready = loop.create_future()
        fd = self._sock.fileno()
        loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, READY_TIMEOUT)
        finally:
            loop.remove_writer(fd)

    @property
    def can_fork(self) -> bool:
        """Alive and not yet due for replacement (see ``FORKS_PER_SERVER``)."""
        return not self.closed and self.forks < FORKS_PER_SERVER

    def retire(self) -> None:
        """No more forks; stop once the last child has been reaped."""
        self.retired = True
        if not self._children and not self._replies:
            self.close()

    def close(self) -> None:
        """Stop the server (its QEMU children live on: the runtime kills those)."""
        if self.closed:
            return
        self.closed = True
        for child in self._children.values():
            child._ended.set()  # their status will not come
        if self._sock is not None:
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
