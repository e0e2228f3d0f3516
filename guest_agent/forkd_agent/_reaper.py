"""Reaps every child of the agent and hands each exit status to its watcher.

The agent may be PID 1 of a sandbox, so it must reap orphans too, and it forks
(eval kernels, zygote children), so it must not start threads: asyncio's
subprocess support in 3.11 waits for children in threads. Processes are spawned
with subprocess.Popen or os.fork and reaped here, driven by SIGCHLD through the
event loop's signal wakeup (no thread).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Reaper", "exit_info"]

_EARLY_LIMIT = 1024


def exit_info(status: int) -> tuple[int | None, int | None]:
    """(exit_code, signal) from a wait status; exactly one is not None."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status), None


class Reaper:
    def __init__(self) -> None:
        self._watchers: dict[int, Callable[[int], None]] = {}
        # Statuses of children that exited before anyone watched them (orphans
        # re-parented to PID 1, or a watch registered late). Bounded.
        self._early: OrderedDict[int, int] = OrderedDict()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_signal_handler(signal.SIGCHLD)

    def watch(self, pid: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(wait_status)`` once ``pid`` exits."""
        status = self._early.pop(pid, None)
        if status is not None:
            asyncio.get_running_loop().call_soon(callback, status)
        else:
            self._watchers[pid] = callback

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            callback = self._watchers.pop(pid, None)
            if callback is not None:
                try:
                    callback(status)
                except Exception:  # one watcher's bug must not stop reaping
                    import logging

                    logging.getLogger("forkd.agent").exception("exit callback for %d failed", pid)
            else:
                self._early[pid] = status
                while len(self._early) > _EARLY_LIMIT:
                    self._early.popitem(last=False)
