"""The process table (component ``processes``): spawning, lookup, how long
exited processes are kept, and who subscribes to what.

A process outlives the connection that started it (unless started with
``keep_on_disconnect=false``), and its output and exit status stay available
for a while after it exits, so a client can reattach and replay what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import OrderedDict

from forkd import protocol as p
from forkd._connection import Connection
from forkd.protocol import ErrorCode, RpcError

from . import _native, _pty
from ._methods import component
from ._process_io import Proc
from ._process_spec import Spec, spawn_error
from ._process_subscriber import Subscriber
from ._warm_shell import WarmShell

KEEP_EXITED = 64
KEEP_EXITED_SECONDS = 300.0
KEEP_EXITED_BYTES = 32 * 1024 * 1024  # output kept for exited processes, all together

SETPRIV = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)


class Launched:
    """A started process's Popen and the agent's ends of its stdio."""

    def __init__(self, popen: subprocess.Popen, outputs: dict[int, int], stdin_fd: int | None) -> None:
        self.popen = popen
        self.outputs = outputs
        self.stdin_fd = stdin_fd
        self.parked = None  # set by WarmShell while the process waits for its command

    def close(self) -> None:
        for fd in [*self.outputs.values(), self.stdin_fd]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)


@component("processes")
class Processes:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.shell = WarmShell(self, agent)
        self.procs: dict[int, Proc] = {}  # running and recently exited
        self._finished: OrderedDict[int, Proc] = OrderedDict()  # oldest first
        self._subs: dict[tuple[Connection, int], Subscriber] = {}

    def spawn(self, spec: Spec) -> Proc:
        self.shell.last_spawn = time.monotonic()
        launched = self.shell.claim(spec) or self.launch(spec, spec.argv)
        proc = Proc(self, spec, launched.popen, launched.outputs, launched.stdin_fd)
        if not self.shell.adopt(launched, proc):
            self.agent.reaper.watch(proc.pid, proc.on_exit)
        # A pid seen before belongs to a process that was reaped long ago.
        self._finished.pop(proc.pid, None)
        self.procs[proc.pid] = proc
        proc.start()
        return proc

    @staticmethod
    def launch(spec: Spec, argv: list[str], pass_fds: tuple[int, ...] = ()) -> Launched:
        """Start ``argv`` as ``spec`` says (user, cwd, env, stdio); typed errors."""
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
            native = _native.spawner() if not spec.user.is_self and not spec.pty else None
            if native is not None:
                # A process-backend sandbox: its zygote's library switches user in a
                # vfork-style child, without Popen's fork or setpriv's exec.
                popen = _native.spawn(
                    native,
                    argv,
                    spec.env,
                    spec.cwd,
                    (stdio["stdin"], stdio["stdout"], stdio["stderr"]),
                    pass_fds,
                    spec.user.uid,
                    spec.user.gid,
                    spec.user.groups() or [spec.user.gid],
                )
            else:
                popen = Processes._popen(spec, argv, stdio, pass_fds)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in parent_fds + child_fds:
                os.close(fd)
            raise spawn_error(exc, spec) from None
        for fd in child_fds:
            os.close(fd)
        return Launched(popen, outputs, stdin_fd)

    @staticmethod
    def _popen(spec: Spec, argv: list[str], stdio: dict, pass_fds: tuple[int, ...]) -> subprocess.Popen:
        kw: dict = dict(
            stdio, cwd=spec.cwd, env=spec.env, start_new_session=True, close_fds=True, pass_fds=pass_fds
        )
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
        return subprocess.Popen(argv, **kw)

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
        self.shell.want(proc.spec)  # the next command is probably another like it

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

    def files_changed(self) -> None:
        self.shell.files_changed()

    async def close(self) -> None:
        self.shell.close()
        for sub in list(self._subs.values()):
            sub.stop()
        for proc in list(self.procs.values()):
            proc.shutdown()
