"""Inside an eval kernel: its serve loop, the user's namespace and cell execution.

Interrupts are SIGINT. The kernel turns SIGINT into KeyboardInterrupt only while
a job's user code runs ("armed"), and defers it while a frame is being written,
so an interrupt never tears a frame or breaks the kernel's own loop.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import linecache
import os
import socket
import sys
import traceback
import types
from collections import deque
from typing import Any

from forkd import protocol as p

from . import _display, _kernel_state
from ._kernel_client import MAX_FRAME, READ_SIZE

# Objects of the agent the child must never free: their finalizers would close
# descriptors or flush buffers that no longer belong to them.
KEEP: list = []


class _Interrupt:
    armed = False  # user code of a job is running: SIGINT raises KeyboardInterrupt
    sending = False  # a frame is being written: SIGINT waits until it is out
    deferred = False


def on_sigint(signum: int, frame: Any) -> None:
    if not _Interrupt.armed:
        return
    if _Interrupt.sending:
        _Interrupt.deferred = True
        return
    raise KeyboardInterrupt


def text_stream(fd: int):
    return open(  # noqa: SIM115
        fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )


_OWN_FILES = frozenset((__file__, _display.__file__))
_TOP_LEVEL_AWAIT = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_CO_COROUTINE = 0x80
_EVAL_CACHE_SIZE = 256


class Session:
    """The kernel's serve loop and the user's namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.frames = p.FrameReader(MAX_FRAME)
        self.inbox: deque = deque()
        self.fds: list[int] = []  # descriptors the agent sent with the last message
        self.count = 0
        self.shown: list = []  # figures displayed by this cell
        self.aloop: asyncio.AbstractEventLoop | None = None
        self.eval_cache: dict[str, types.CodeType] = {}
        main = types.ModuleType("__main__")
        # Classes and functions defined in cells pickle by reference to __main__.
        KEEP.append(sys.modules.get("__main__"))
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
            elif method == "export":
                self._job(self._export, params)
            elif method == "restore":
                self._job(self._restore, params)
            if not self.inbox:
                self._close_fds()  # strays: no message is left to claim them

    def _job(self, fn, params: dict) -> None:
        try:
            payload = fn(params)
        except KeyboardInterrupt as exc:  # landed between our own statements
            _Interrupt.armed = False
            payload = {"error": self._describe(exc), "execution_count": self.count}
        self._flush_streams()
        self._send("done", payload)

    def _export(self, params: dict) -> dict:
        return _kernel_state.export(self, self._take_fds(2))

    def _restore(self, params: dict) -> dict:
        report = _kernel_state.restore(self, self._take_fds(1))
        count = params.get("count")
        if type(count) is int and count >= 0:
            self.count = count
        return report

    # -- channel --
    def _take_fds(self, n: int) -> list[int]:
        fds, self.fds = self.fds[:n], self.fds[n:]
        return fds

    def _close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def _recv(self) -> tuple[str, dict] | None:
        while not self.inbox:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_SIZE, 4)
            self.fds.extend(fds)
            if not data:
                return None
            self.frames.feed(data)
            for body in self.frames.frames():
                msg = p.decode(body, MAX_FRAME)
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
                stream = text_stream(1 if name == "stdout" else 2)
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
