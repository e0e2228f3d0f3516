"""A login shell started ahead of the next command.

Starting ``bash -l -c CMD`` as another user costs ~3 ms of a command's latency
in a sandbox (setpriv, bash, its profile scripts; more under TCG). Most
commands of a sandbox look alike: same user, working directory, environment
and stdin setting, only the command line differs. So once a sandbox has been
quiet for a moment the agent starts the shell the next command will probably
need, and parks it before it reads its command::

    bash -l -c 'read -r -u GO ...; read ... BASH_EXECUTION_STRING <&SCRIPT; eval "$BASH_EXECUTION_STRING"'

A command whose spec matches takes it: the agent writes the command line into
the SCRIPT memfd (a regular file: bash reads it in one go, where it reads a
pipe byte by byte), then a line on the GO pipe with what may have changed
since the shell started: the sandbox ids, the hostname and a seed for
``$RANDOM`` (a forked sandbox has new ones; its parked shell, inherited from
the parent, must not repeat the parent's ``$RANDOM``); ``$SECONDS`` restarts.
A command that does not match starts its own shell as before. Closing GO
without a line makes the parked shell exit.

What a user can tell apart from ``bash -l -c CMD``: the shell was started a
little earlier (ps, /proc; it read the login scripts then: a files-API write
discards the parked shell, a script changed by a command that is still
running does not), a syntax error says ``eval:`` where it said ``-c:``, and
the last command of the line is not exec'd in place of the shell (the shell
waits for it; the reported pid is still the shell's, and killing the group
ends both). An idle parked ``bash`` shows up in ``ps`` as the user's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

from ._process_spec import Spec

if TYPE_CHECKING:
    from ._process_io import Proc
    from ._process_table import Launched, Processes

__all__ = ["WarmShell", "speculation_key"]

# The sandbox ids are not part of a spec's key: they are handed over on the GO line.
_ID_VARS = ("FORKD_SANDBOX_ID", "E2B_SANDBOX_ID")
# Park a shell only after the sandbox has been quiet this long: a shell started while the
# user's commands run (or while the sandbox is being killed) competes with them for CPU.
QUIET_BEFORE_PARKING = 0.02
_BOOT = (
    "exec {ready}>&-; read -r -u {go} FORKD_SANDBOX_ID E2B_SANDBOX_ID HOSTNAME RANDOM || exit 0; "
    "export FORKD_SANDBOX_ID E2B_SANDBOX_ID; SECONDS=0; exec {go}<&-; "
    'IFS= read -r -d "" BASH_EXECUTION_STRING <&{script}; exec {script}<&-; '
    'eval "$BASH_EXECUTION_STRING"'
)


def _same_cwd(pid: int, cwd: str) -> bool:
    # A directory removed and made again since the shell started is another directory.
    try:
        a, b = os.stat(f"/proc/{pid}/cwd"), os.stat(cwd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def speculation_key(spec: Spec) -> tuple | None:
    """What two specs must share for one's parked shell to serve the other; None: never parked."""
    if spec.pty is not None or spec.argv[1:3] != ["-l", "-c"]:
        return None
    env = tuple(sorted((k, v) for k, v in spec.env.items() if k not in _ID_VARS))
    return (spec.argv[0], spec.user, spec.cwd, spec.stdin, env)


class _Parked:
    def __init__(
        self, spec: Spec, key: tuple, launched: Launched, go_fd: int, script_fd: int, ready_fd: int
    ) -> None:
        self.spec = spec
        self.key = key
        self.launched = launched
        self.go_fd: int | None = go_fd
        self.script_fd: int | None = script_fd
        # Reads EOF once the shell has read its login scripts and waits for GO.
        self.ready_fd: int | None = ready_fd
        self.proc: Proc | None = None
        self.exited = False

    @property
    def pid(self) -> int:
        return self.launched.popen.pid

    def on_exit(self, status: int) -> None:
        if self.proc is not None:
            self.proc.on_exit(status)
            return
        self.exited = True
        self.launched.popen.returncode = -1  # reaped here: Popen must never wait itself
        self.launched.close()
        self.close_fds()

    def wait_ready(self, timeout: float) -> bool:
        """Block until the shell waits for its command (before a VM snapshot: its
        forks must not each finish starting it); False on timeout or death."""
        if self.ready_fd is None:
            return False
        ready, _, _ = select.select([self.ready_fd], [], [], timeout)
        if not ready or self.exited:
            return False
        try:  # EOF also comes when it died (not reaped yet where no reaper runs)
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    def close_fds(self) -> None:
        for name in ("go_fd", "script_fd", "ready_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                with contextlib.suppress(OSError):
                    os.close(fd)


class WarmShell:
    """At most one parked shell per sandbox, for the spec of the last command started."""

    def __init__(self, table: Processes, agent: Any) -> None:
        self.table = table
        self.agent = agent
        self.parked: _Parked | None = None
        self._want: Spec | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.enabled = hasattr(os, "memfd_create")
        self.last_spawn = 0.0  # time.monotonic() of the last command started

    # -- taking one --
    def claim(self, spec: Spec) -> Launched | None:
        """The parked shell, running ``spec``'s command, if it fits; else None."""
        parked = self.parked
        key = speculation_key(spec)
        if parked is None or key is None or parked.key != key:
            return None
        words = [spec.env.get(name, "") for name in _ID_VARS] + [socket.gethostname()]
        if any(not v or v.split() != [v] for v in words):
            return None  # not one word each: the GO line could not carry them
        self.parked = None
        reaper = getattr(self.agent, "reaper", None)
        if reaper is not None:
            reaper.reap()  # a parked shell killed a moment ago must not take the command
        if parked.exited or not _same_cwd(parked.pid, spec.cwd):
            self._discard(parked)
            return None
        words.append(str(int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF))
        try:
            data = spec.cmd.encode("utf-8", "surrogateescape")
            os.ftruncate(parked.script_fd, len(data))  # exactly the command, whatever was there
            os.pwrite(parked.script_fd, data, 0)
            os.write(parked.go_fd, (" ".join(words) + "\n").encode())
        except OSError:  # died before the reaper saw it: start the command the usual way
            self._discard(parked)
            return None
        parked.close_fds()
        return parked.launched

    def adopt(self, launched: Launched, proc: Proc) -> bool:
        """Route a claimed shell's exit to ``proc``; False when ``launched`` was not parked here."""
        owner = getattr(launched, "parked", None)
        if owner is None:
            return False
        owner.proc = proc
        return True

    # -- parking one --
    def want(self, spec: Spec) -> None:
        """Park a shell for ``spec`` once the sandbox has been quiet a moment."""
        if not self.enabled or speculation_key(spec) is None:
            return
        self._want = spec
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(QUIET_BEFORE_PARKING, self._park_wanted)

    def _park_wanted(self) -> None:
        self._timer = None
        quiet_for = time.monotonic() - self.last_spawn
        if quiet_for < QUIET_BEFORE_PARKING:
            self._timer = asyncio.get_running_loop().call_later(
                QUIET_BEFORE_PARKING - quiet_for, self._park_wanted
            )
            return
        spec, self._want = self._want, None
        if spec is not None:
            self.park_now(spec)

    def _park(self, spec: Spec, key: tuple) -> _Parked | None:
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            script = os.memfd_create("forkd-command", os.MFD_CLOEXEC)
        except OSError:
            self.enabled = False
            for fd in (go_r, go_w, ready_r, ready_w):
                os.close(fd)
            return None
        boot = _BOOT.format(go=go_r, script=script, ready=ready_w)
        try:
            launched = self.table.launch(
                spec, [spec.argv[0], "-l", "-c", boot], pass_fds=(go_r, script, ready_w)
            )
        except Exception:
            for fd in (go_w, script, ready_r):
                os.close(fd)
            return None
        finally:
            os.close(go_r)
            os.close(ready_w)
        parked = _Parked(spec, key, launched, go_w, script, ready_r)
        launched.parked = parked
        self._watch(parked)
        return parked

    def _watch(self, parked: _Parked) -> None:
        # Before a VM's full agent exists there is no reaper: the shell is watched once it
        # takes over (inherit), and an exit meanwhile is kept for it by the kernel (a zombie).
        reaper = getattr(self.agent, "reaper", None)
        if reaper is not None:
            reaper.watch(parked.pid, parked.on_exit)

    def inherit(self, other: WarmShell) -> None:
        """Take over the shell ``other`` parked (the VM guest's early loop, at the hand-over)."""
        parked, other.parked = other.parked, None
        if parked is None:
            return
        if self.parked is not None:
            self._discard(self.parked)
        self.parked = parked
        self._watch(parked)

    def _discard(self, parked: _Parked) -> None:
        # Without its GO line the shell exits by itself (read fails); its pipes close with it.
        parked.close_fds()

    def park_now(self, spec: Spec) -> bool:
        """Park a shell for ``spec`` at once (``exec.prepare``); False if that spec is never parked."""
        key = speculation_key(spec)
        if not self.enabled or key is None:
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._want = None
        if self.parked is not None and self.parked.key == key and not self.parked.exited:
            return True
        if self.parked is not None:
            self._discard(self.parked)
        self.parked = self._park(spec, key)
        return self.parked is not None

    # -- hooks --
    def files_changed(self) -> None:
        # A login script may be among them: the next command reads them afresh.
        parked, self.parked = self.parked, None
        if parked is not None:
            self._discard(parked)
            self.want(parked.spec)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parked, self.parked = self.parked, None
        if parked is not None and not parked.exited:
            self._discard(parked)
            # The agent is going away (or priming a zygote): wait for the shell rather than leave a zombie.
            with contextlib.suppress(OSError):
                os.killpg(parked.pid, 9)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                os.waitpid(parked.pid, 0)
            parked.exited = True
            parked.launched.popen.returncode = -9
            parked.launched.close()
