"""The synchronous API's engine: one background event loop thread per process.

``Sandbox`` and friends are thin wrappers: each call builds the coroutine of the
matching ``AsyncSandbox`` method and runs it here. All sync sandboxes therefore
share one loop and, through it, one gateway connection. User callbacks of the
sync API never run on this thread (they run in the caller's thread), so a
callback may itself call the sync API.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["run", "run_calling_back", "portal_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid = 0


def portal_loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    loop = _loop
    if loop is not None and _pid == os.getpid():
        return loop
    with _lock:
        if _loop is None or _pid != os.getpid():
            # A forked child inherits the loop object but not its thread.
            ready = threading.Event()
            new_loop = asyncio.new_event_loop()

            def serve() -> None:
                asyncio.set_event_loop(new_loop)
                new_loop.call_soon(ready.set)
                new_loop.run_forever()

            _thread = threading.Thread(target=serve, name="forkd-sync", daemon=True)
            _thread.start()
            ready.wait()
            _loop, _pid = new_loop, os.getpid()
        return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the background loop and return its result (or raise its exception)."""
    loop = portal_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("the synchronous forkd API cannot be called from its own event loop thread")
    fut = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return fut.result()
    except concurrent.futures.CancelledError:
        raise asyncio.CancelledError() from None
    except BaseException:
        # KeyboardInterrupt while waiting: cancel the call (the request sends `cancel`).
        if not fut.done():
            fut.cancel()
        raise


def run_calling_back(make: Callable[..., Coroutine[Any, Any, T]], **callbacks: Any) -> T:
    """Run ``make(**wrapped)`` on the background loop, calling the callbacks in this thread.

    Each wrapped callback only queues its argument; this thread calls the real
    callback, in order, while the coroutine runs. A callback that raises cancels
    the call and the exception propagates.
    """
    loop = portal_loop()
    if threading.current_thread() is _thread:
        raise RuntimeError("the synchronous forkd API cannot be called from its own event loop thread")
    q: queue.SimpleQueue = queue.SimpleQueue()
    wrapped = {
        name: (None if cb is None else functools.partial(_enqueue, q, cb)) for name, cb in callbacks.items()
    }
    fut = asyncio.run_coroutine_threadsafe(make(**wrapped), loop)
    fut.add_done_callback(lambda _: q.put(_END))
    try:
        while True:
            item = q.get()
            if item is _END:
                break
            cb, arg = item
            cb(arg)
        return fut.result()
    except concurrent.futures.CancelledError:
        raise asyncio.CancelledError() from None
    except BaseException:
        if not fut.done():
            fut.cancel()
        raise


_END = object()


def _enqueue(q: queue.SimpleQueue, cb: Callable[[Any], Any], arg: Any) -> None:
    q.put((cb, arg))


@atexit.register
def _shutdown() -> None:
    # Close the gateway connections cleanly so the gateway sees a goodbye, not a drop.
    loop = _loop
    if loop is None or _pid != os.getpid() or not loop.is_running():
        return
    from ._client import close_all

    fut = asyncio.run_coroutine_threadsafe(close_all(), loop)
    with contextlib.suppress(BaseException):
        fut.result(timeout=2)
    loop.call_soon_threadsafe(loop.stop)
