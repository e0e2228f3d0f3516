"""Starting an eval kernel: an os.fork() of the agent itself, so it starts with
the agent's warm-up already imported.

The fork happens while the agent's event loop runs. The child never touches
that loop: it drops every descriptor it inherited except its own, resets signal
handling and serves a plain blocking loop (_kernel_session.py) on its end of a
socketpair. Its fds 1 and 2 are pipes the agent reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ._kernel_client import Kernel
from ._kernel_session import KEEP, Session, on_sigint, text_stream

__all__ = ["spawn"]


_prctl: Callable | None | bool = False  # False: not looked up yet


def _find_prctl() -> Callable | None:
    global _prctl
    if _prctl is False:
        try:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        except Exception:
            _prctl = None
    return _prctl  # type: ignore[return-value]


def spawn(cwd: str, envs: dict[str, str], reaper: Any) -> Kernel:
    """Fork a kernel; the caller's event loop must be running."""
    prctl = _find_prctl()
    parent_sock, child_sock = socket.socketpair()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        status = 70
        try:
            _child_main(child_sock, out_w, err_w, cwd, envs, parent, prctl)
            status = 0
        except BaseException:
            with contextlib.suppress(BaseException):
                os.write(2, traceback.format_exc().encode("utf-8", "replace"))
        finally:
            os._exit(status)
    child_sock.close()
    os.close(out_w)
    os.close(err_w)
    # Also done in the child; whichever runs first wins the race with killpg.
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    parent_sock.setblocking(False)
    os.set_blocking(out_r, False)
    os.set_blocking(err_r, False)
    kernel = Kernel(pid, parent_sock, out_r, err_r)
    reaper.watch(pid, kernel._on_exit)
    return kernel


def _child_main(
    sock: socket.socket,
    out_w: int,
    err_w: int,
    cwd: str,
    envs: dict[str, str],
    parent: int,
    prctl: Callable | None,
) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # its own group, so killpg also ends what user code started
    if prctl is not None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the agent
    if os.getppid() != parent:
        return
    _reset_signals()
    # The agent's objects are never collected here: no finalizer of theirs runs
    # in the child, and their pages stay shared with the agent.
    gc.freeze()
    _rewire_fds(sock.fileno(), out_w, err_w)
    _forget_event_loop()
    _setup_process(cwd, envs)
    Session(sock).serve()


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        # Python-level handlers are the agent's (asyncio's no-op that wakes its loop).
        if callable(handler) and handler is not signal.default_int_handler:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, on_sigint)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _rewire_fds(sock_fd: int, out_w: int, err_w: int) -> None:
    """stdin from /dev/null, stdout/stderr to the agent's pipes, every other
    inherited descriptor (client sockets, the loop's epoll...) replaced by
    /dev/null: replaced rather than closed, so that a stale object of the agent
    closing "its" fd number later cannot close a file of the user's."""
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    keep = {0, 1, 2, sock_fd, devnull}
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd in keep:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)


def _forget_event_loop() -> None:
    # The child inherited "a running loop" (the agent's); user code calling
    # asyncio.run() must not see it.
    KEEP.append(asyncio.get_event_loop_policy())
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop_policy(None)


def _setup_process(cwd: str, envs: dict[str, str]) -> None:
    KEEP.extend((sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__))
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = text_stream(1)
    sys.stderr = sys.__stderr__ = text_stream(2)
    sys.argv = [""]
    if "" not in sys.path:
        sys.path.insert(0, "")  # modules in the context's cwd import, as in a notebook
    logging = sys.modules.get("logging")
    if logging is not None:
        # The agent's handler would format the user's log records and make
        # logging.basicConfig() in a cell a silent no-op.
        KEEP.append(list(logging.root.handlers))
        logging.root.handlers.clear()
        logging.root.setLevel(logging.WARNING)
    os.environ.update({"MPLBACKEND": "Agg", **envs})
    try:
        os.chdir(cwd)
    except OSError as exc:
        print(f"cannot enter {cwd}: {exc}; working in /", file=sys.stderr)
        os.chdir("/")
    matplotlib = sys.modules.get("matplotlib")
    if matplotlib is not None:  # imported by the warm-up, before MPLBACKEND was set
        pyplot = sys.modules.get("matplotlib.pyplot")
        with contextlib.suppress(Exception):
            if pyplot is None or getattr(pyplot, "_backend_mod", None) is None:
                # Resolved at the first figure; use() would load the backend now (~7 ms).
                matplotlib.rcParams["backend"] = "agg"
            else:
                matplotlib.use("Agg")
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        # Unlike `random`, numpy does not reseed on fork: sibling kernels would
        # otherwise share one sequence.
        np_random.seed()
