"""Eval kernels: one forked process per code context, and the agent's handle on it.

A kernel is a separate process so that user code (os._exit, a segfault, a loop
in C that no exception reaches) never takes the agent down. It is an os.fork()
of the agent itself, so it starts with the agent's warm-up already imported.

The fork happens while the agent's event loop runs. The child never touches
that loop: it drops every descriptor it inherited except its own, resets signal
handling and serves a plain blocking loop on its end of a socketpair. Its fds 1
and 2 are pipes the agent reads, so print() and a subprocess's output are
captured alike.

Messages are protocol Notifications in length-prefixed frames:
  agent -> kernel: run {code, envs}, eval {expr}, reseed {seed}, ack {}
  kernel -> agent: started {}, result {result}, done {...}
A kernel serves one job (run or eval) at a time: the agent sends the next job
only after the previous one's ``done``. ``reseed`` may be sent at any time; the
kernel handles it between jobs. After a ``result`` the kernel waits for ``ack``:
by then the agent has taken the output written before the result, so output
written after it cannot overtake it.

Interrupts are SIGINT. The kernel turns SIGINT into KeyboardInterrupt only while
a job's user code runs ("armed"), and defers it while a frame is being written,
so an interrupt never tears a frame or breaks the kernel's own loop. The agent
signals only after the job's ``started``, so an interrupt is never lost in the
gap before the kernel arms.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import gc
import linecache
import os
import signal
import socket
import sys
import traceback
import types
from collections import deque
from collections.abc import Callable
from typing import Any

from forkd import protocol as p

from . import _display
from ._reaper import exit_info

__all__ = ["Kernel", "Job", "spawn", "exit_text"]

# The kernel channel is private to the agent and may carry a 3 MiB result.
_MAX_FRAME = 64 * 1024 * 1024
_READ = 256 * 1024
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


# == agent side ===============================================================


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
        self._frames = p.FrameReader(_MAX_FRAME)
        self._wbuf = bytearray()
        self.loop.add_reader(sock.fileno(), self._on_readable)
        for kfd, fd in self._pipes.items():
            self.loop.add_reader(fd, self._on_pipe, kfd)

    # -- jobs --
    def submit(self, job: Job, op: str, params: dict) -> None:
        """Start a job; its events arrive in ``job``. Synchronous, so jobs reach
        the kernel in the order their handlers called this."""
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
        self._send(op, params)

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
            data = self.sock.recv(_READ)
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
                msg = p.decode(body, _MAX_FRAME)
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
        fd = self._pipes.get(kfd)
        if fd is None:
            return
        try:
            data = os.read(fd, _READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipe(kfd)
            return
        self._sink(kfd, data)

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
            while budget > 0 and kfd in self._pipes:
                try:
                    data = os.read(self._pipes[kfd], _READ)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    data = b""
                if not data:
                    self._close_pipe(kfd)
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

    def _send(self, op: str, params: dict) -> None:
        if not self.alive:
            return
        data = p.frame(p.encode(p.Notification(op, params)))
        if self._wbuf:
            self._wbuf += data
            return
        try:
            n = self.sock.send(data)
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


# == kernel side ==============================================================

# Objects of the agent the child must never free: their finalizers would close
# descriptors or flush buffers that no longer belong to them.
_KEEP: list = []


class _Interrupt:
    armed = False  # user code of a job is running: SIGINT raises KeyboardInterrupt
    sending = False  # a frame is being written: SIGINT waits until it is out
    deferred = False


def _on_sigint(signum: int, frame: Any) -> None:
    if not _Interrupt.armed:
        return
    if _Interrupt.sending:
        _Interrupt.deferred = True
        return
    raise KeyboardInterrupt


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
    _Session(sock).serve()


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
    signal.signal(signal.SIGINT, _on_sigint)
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
    _KEEP.append(asyncio.get_event_loop_policy())
    asyncio.events._set_running_loop(None)
    asyncio.set_event_loop_policy(None)


def _setup_process(cwd: str, envs: dict[str, str]) -> None:
    _KEEP.extend((sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__))
    sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = _text_stream(1)
    sys.stderr = sys.__stderr__ = _text_stream(2)
    sys.argv = [""]
    if "" not in sys.path:
        sys.path.insert(0, "")  # modules in the context's cwd import, as in a notebook
    logging = sys.modules.get("logging")
    if logging is not None:
        # The agent's handler would format the user's log records and make
        # logging.basicConfig() in a cell a silent no-op.
        _KEEP.append(list(logging.root.handlers))
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


def _text_stream(fd: int):
    return open(  # noqa: SIM115
        fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )


_OWN_FILES = frozenset((__file__, _display.__file__))
_TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_CO_COROUTINE = 0x80
_EVAL_CACHE_SIZE = 256


class _Session:
    """The kernel's serve loop and the user's namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.frames = p.FrameReader(_MAX_FRAME)
        self.inbox: deque = deque()
        self.count = 0
        self.shown: list = []  # figures displayed by this cell
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.eval_cache: dict[str, types.CodeType] = {}
        main = types.ModuleType("__main__")
        # Classes and functions defined in cells pickle by reference to __main__.
        _KEEP.append(sys.modules.get("__main__"))
        sys.modules["__main__"] = main
        self.ns = main.__dict__
        self.ns["__builtins__"] = builtins
        self.ns["display"] = self.display
        _display.watch_pyplot(self.show_figures)

    def serve(self) -> None:
        while True:
            msg = self._recv()
            if msg is None:
                return
            method, params = msg
            if method == "run":
                self._job(self._run, params)
            elif method == "eval":
                self._job(self._eval, params)
            elif method == "reseed":
                self._reseed(params)

    def _job(self, fn, params: dict) -> None:
        try:
            payload = fn(params)
        except KeyboardInterrupt as exc:  # landed between our own statements
            _Interrupt.armed = False
            payload = {"error": self._describe(exc), "execution_count": self.count}
        self._flush_streams()
        self._send("done", payload)

    # -- channel --
    def _recv(self) -> tuple[str, dict] | None:
        while not self.inbox:
            data = self.sock.recv(_READ)
            if not data:
                return None
            self.frames.feed(data)
            for body in self.frames.frames():
                msg = p.decode(body, _MAX_FRAME)
                if type(msg) is p.Notification:
                    self.inbox.append(msg)
        return self.inbox.popleft()

    def _send(self, method: str, params: dict, wait_ack: bool = False) -> None:
        if os.getpid() != self.pid:
            # A process user code forked, come back out of the cell: it must
            # not speak for the kernel.
            if method == "done":
                os._exit(0)
            return
        try:
            body = p.encode(p.Notification(method, params))
        except Exception:  # lone surrogates, odd types in a repr method's output
            body = p.encode(p.Notification(method, _sanitize(params)))
        _Interrupt.sending = True
        try:
            self.sock.sendall(p.frame(body))
            if wait_ack:
                self._wait_ack()
        finally:
            _Interrupt.sending = False
        if _Interrupt.deferred:
            _Interrupt.deferred = False
            if _Interrupt.armed:
                raise KeyboardInterrupt

    def _wait_ack(self) -> None:
        early = []  # a reseed sent meanwhile; handled in order after the job
        while True:
            msg = self._recv()
            if msg is None:
                os._exit(0)  # the agent is gone
            if msg.method == "ack":
                break
            early.append(msg)
        self.inbox.extendleft(reversed(early))

    def _arm(self) -> None:
        _Interrupt.deferred = False
        _Interrupt.armed = True
        self._send("started", {})

    # -- jobs --
    def _run(self, params: dict) -> dict:
        self.count += 1
        count = self.count
        saved = _apply_env(params.get("envs") or {})
        self.shown.clear()
        error = None
        try:
            self._arm()
            try:
                self._cell(params.get("code") or "", count)
            except BaseException as exc:
                error = self._describe(exc)
            try:
                self.show_figures()
            except BaseException as exc:
                error = error or self._describe(exc)
            self._flush_streams()
        except KeyboardInterrupt as exc:
            error = error or self._describe(exc)
        finally:
            _Interrupt.armed = False
            self.shown.clear()
            _restore_env(saved)
        return {"error": error, "execution_count": count}

    def _cell(self, code: str, count: int) -> None:
        filename = f"<cell-{count}>"
        # Tracebacks show the cell's source lines.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        try:
            tree = ast.parse(code, filename=filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr) and not _silenced(code, tree.body[-1]):
                last = ast.Expression(tree.body.pop().value)
            body = compile(tree, filename, "exec", flags=_TOP_LEVEL_AWAIT, dont_inherit=True)
            if last is not None:
                last = compile(last, filename, "eval", flags=_TOP_LEVEL_AWAIT, dont_inherit=True)
        except SyntaxError as exc:
            raise _CompileError(exc) from None
        if tree.body:
            self._execute(body)
        if last is not None:
            value = self._execute(last)
            if value is not None:
                self.ns["_"] = value
                self._publish(value, main=True)

    def _execute(self, code: types.CodeType) -> Any:
        if code.co_flags & _CO_COROUTINE:  # top-level await, as in a notebook
            if self.aloop is None:
                self.aloop = asyncio.new_event_loop()
            return self.aloop.run_until_complete(eval(code, self.ns))
        return eval(code, self.ns)

    def _eval(self, params: dict) -> dict:
        payload: dict[str, Any] = {"text": None, "value": None, "error": None}
        try:
            self._arm()
            try:
                expr = params.get("expr") or ""
                code = self.eval_cache.get(expr)
                if code is None:
                    try:
                        code = compile(expr, "<eval>", "eval", flags=_TOP_LEVEL_AWAIT, dont_inherit=True)
                    except SyntaxError as exc:
                        raise _CompileError(exc) from None
                    if len(self.eval_cache) >= _EVAL_CACHE_SIZE:
                        self.eval_cache.clear()
                    self.eval_cache[expr] = code
                value = self._execute(code)
                payload["text"] = _display.text_of(value)
                payload["value"] = _display.plain_value(value)
            except BaseException as exc:
                payload["error"] = self._describe(exc)
        except KeyboardInterrupt as exc:
            payload["error"] = payload["error"] or self._describe(exc)
        finally:
            _Interrupt.armed = False
        return payload

    def _reseed(self, params: dict) -> None:
        seed = params.get("seed")
        if not isinstance(seed, bytes) or not seed:
            return
        import random

        random.seed(int.from_bytes(seed, "big"))
        np_random = sys.modules.get("numpy.random")
        if np_random is not None:
            with contextlib.suppress(Exception):
                np_random.seed([int.from_bytes(seed[i : i + 4], "big") for i in range(0, len(seed) - 3, 4)])

    # -- display --
    def display(self, *objs: Any, raw: bool = False, **_ignored: Any) -> None:
        """Show objects as results of the running cell (IPython's display())."""
        for obj in objs:
            self._publish(obj, main=False, raw=raw)

    def show_figures(self) -> None:
        """Display every open pyplot figure and close it (a notebook's inline backend)."""
        for fig in _display.open_figures():
            if not any(fig is seen for seen in self.shown):
                self._publish(fig, main=False)
            _display.close_figure(fig)

    def _publish(self, obj: Any, main: bool, raw: bool = False) -> None:
        import threading

        if not _Interrupt.armed or threading.current_thread() is not threading.main_thread():
            # No job to attach it to (a background thread, or between jobs).
            print(_display.text_of(obj))
            return
        if raw and isinstance(obj, dict):
            result = _display.from_bundle(obj)
        else:
            result = _display.format_result(obj)
        result["is_main_result"] = main
        if _display.is_figure(obj):
            self.shown.append(obj)
        self._flush_streams()
        self._send("result", {"result": result}, wait_ack=True)

    # -- helpers --
    def _flush_streams(self) -> None:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, f"__{name}__")
            if stream is None or stream.closed:  # user code closed it: give print() a new one
                stream = _text_stream(1 if name == "stdout" else 2)
                setattr(sys, f"__{name}__", stream)
                setattr(sys, name, stream)
            with contextlib.suppress(Exception):
                stream.flush()

    def _describe(self, exc: BaseException) -> dict:
        if isinstance(exc, _CompileError):  # the code itself is wrong: no frames to show
            exc = exc.error
            exc.__traceback__ = None
        # Drop the kernel's own frames: the traceback starts in the user's cell.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES:
            tb = tb.tb_next
        try:
            text = "".join(traceback.format_exception(type(exc), exc, tb))
        except Exception:
            text = f"{type(exc).__name__}: (traceback unavailable)\n"
        try:
            value = str(exc)
        except Exception:
            value = f"<unprintable {type(exc).__name__}>"
        return {"name": type(exc).__name__, "value": value, "traceback": text}


class _CompileError(Exception):
    def __init__(self, error: SyntaxError) -> None:
        super().__init__(str(error))
        self.error = error


def _silenced(code: str, stmt: ast.stmt) -> bool:
    """A trailing ';' after the last expression hides its value, as in a notebook."""
    lines = code.splitlines()
    if stmt.end_lineno is None or stmt.end_lineno > len(lines):
        return False
    rest = lines[stmt.end_lineno - 1].encode("utf-8")[stmt.end_col_offset or 0 :]
    return rest.decode("utf-8", "replace").lstrip().startswith(";")


def _apply_env(envs: dict) -> dict:
    saved = {}
    for key, value in envs.items():
        if isinstance(key, str) and isinstance(value, str):
            saved[key] = os.environ.get(key)
            os.environ[key] = value
    return saved


def _restore_env(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _sanitize(value: Any) -> Any:
    """Plain msgpack-able data: odd strings made valid, unknown types as str()."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, (bool, int, float, bytes)):
        return value
    if isinstance(value, dict):
        return {_sanitize(k): _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return _sanitize(str(value))
