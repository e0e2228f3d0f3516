"""One protocol peer over one transport: requests, notifications, streams.

The same class serves the SDK (client), the gateway (both sides) and the guest
agent (server). Design of concurrency, cancellation and backpressure
(docs/protocol.md has the long form):

- One reader task per connection decodes frames in order. Incoming requests are
  each run as their own task, so responses may go out of order. A handler that
  must observe request order (stdin chunks) does its order-sensitive work before
  its first ``await``: asyncio starts tasks in creation order.
- Cancel is explicit: ``cancel`` {id} cancels the handler task, which answers
  with error ``cancelled``. A dropped connection cancels every handler it started
  and fails every request it was waiting on with TransportClosed.
- Streams are credit-windowed per stream id. The receiver allocates the id and
  grants a window (bytes) in the request that opens the stream; it returns credit
  with ``stream.ack`` {stream, bytes} as its consumer takes data. A sender waits
  in ``send_stream`` when its credit is spent, so a slow consumer slows its own
  stream only, and no hop buffers more than the window per stream.
- ``stream.end`` {stream, ...} closes an inbound stream; extra keys (exit status,
  error) become ``InboundStream.end_info``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol as p
from ._transports import Transport, TransportClosed

__all__ = ["Connection", "InboundStream", "RequestHandler", "NotificationHandler"]

log = logging.getLogger("forkd.connection")

RequestHandler = Callable[["Connection", str, dict], Awaitable[Any]]
NotificationHandler = Callable[["Connection", str, dict], Awaitable[None] | None]

_END = object()


def _int_or_none(value: Any) -> int | None:
    # Ids in a peer's params are used as dict keys: an unhashable one (a list)
    # must not raise inside the reader task and take the connection down.
    return value if type(value) is int else None


class InboundStream:
    """Receiving side of one stream: async-iterate ``(fd, offset, data)``."""

    def __init__(self, conn: Connection, stream_id: int, window: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.window = window
        self.end_info: dict | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._outstanding = 0  # bytes received and not yet acknowledged
        self._unacked = 0  # bytes consumed and not yet acknowledged
        self._done = False

    # -- fed by the connection's reader task --
    def _push(self, item: p.StreamData) -> None:
        self._outstanding += len(item.data)
        # One chunk of overshoot is legal: a sender with any credit left may send a whole chunk.
        if self._outstanding > self.window + p.MAX_FRAME_SIZE:
            # The peer ignored its credit: a protocol violation that would let it
            # make us buffer without bound. End the stream with an error.
            self._end({"error": [p.ErrorCode.PROTOCOL.value, "stream window exceeded"]})
            return
        self._queue.put_nowait((item.fd, item.offset, item.data))

    def _end(self, info: dict) -> None:
        if self.end_info is None:
            self.end_info = info
            self._queue.put_nowait(_END)

    # -- consumer API --
    def __aiter__(self):
        return self

    async def __anext__(self) -> tuple[int, int, bytes]:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._done = True
            self.conn._inbound.pop(self.id, None)
            raise StopAsyncIteration
        n = len(item[2])
        self._outstanding -= n
        self._unacked += n
        # Ack in batches of a quarter window: few acks, and the sender never stalls
        # while a full window is still ahead of it.
        if self._unacked * 4 >= self.window:
            n, self._unacked = self._unacked, 0
            with contextlib.suppress(TransportClosed):
                await self.conn.notify("stream.ack", {"stream": self.id, "bytes": n})
        return item

    @property
    def error(self) -> p.RpcError | None:
        err = (self.end_info or {}).get("error")
        if not err:
            return None
        if isinstance(err, list) and len(err) >= 2 and isinstance(err[0], str) and isinstance(err[1], str):
            return p.RpcError(err[0], err[1])
        # A peer's malformed error still means the stream failed; never raise here.
        return p.RpcError(p.ErrorCode.SANDBOX, f"stream ended with error {err!r}")

    async def close(self) -> None:
        """Stop receiving (locally); the caller tells the peer by its own request."""
        self._end({"closed": True})
        self.conn._inbound.pop(self.id, None)


class _Credit:
    __slots__ = ("available", "event")

    def __init__(self, window: int) -> None:
        self.available = window
        self.event = asyncio.Event()
        self.event.set()

    def grant(self, n: int) -> None:
        self.available += n
        if self.available > 0:
            self.event.set()


class Connection:
    def __init__(
        self,
        transport: Transport,
        handler: RequestHandler | None = None,
        on_notification: NotificationHandler | None = None,
        *,
        name: str = "",
    ) -> None:
        self.transport = transport
        self.handler = handler
        self.on_notification = on_notification
        self.name = name
        self.closed = asyncio.Event()
        self.close_reason: str = ""
        self._ids = itertools.count(1)
        self._stream_ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._handlers: dict[int, asyncio.Task] = {}
        self._inbound: dict[int, InboundStream] = {}
        self._credits: dict[int, _Credit] = {}
        self._on_close: list[Callable[[Connection], Any]] = []
        self._reader: asyncio.Task | None = None

    # -- lifecycle --
    def start(self) -> Connection:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    async def __aenter__(self) -> Connection:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def add_close_callback(self, cb: Callable[[Connection], Any]) -> None:
        self._on_close.append(cb)

    async def close(self, reason: str = "closed") -> None:
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self._shutdown(reason)

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def _shutdown(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        with contextlib.suppress(Exception):
            await self.transport.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportClosed(reason))
        self._pending.clear()
        for task in list(self._handlers.values()):
            task.cancel()
        for stream in list(self._inbound.values()):
            stream._end({"error": [p.ErrorCode.SANDBOX_UNREACHABLE.value, reason]})
        for credit in self._credits.values():
            credit.event.set()  # waiters wake and see the closed connection
        for cb in self._on_close:
            try:
                res = cb(self)
                if asyncio.iscoroutine(res):
                    await res
            except Exception:
                log.exception("close callback failed")

    # -- sending --
    async def send(self, msg: p.Message) -> None:
        if self.closed.is_set():
            raise TransportClosed(self.close_reason)
        body = p.encode(msg)
        if len(body) > p.MAX_FRAME_SIZE:
            # The peer would drop it without knowing which request it answers,
            # and that request would wait forever: refuse it here instead.
            raise p.FrameTooLarge(
                f"{type(msg).__name__} of {len(body)} bytes exceeds the frame limit of {p.MAX_FRAME_SIZE}"
            )
        await self.transport.send(body)

    async def request(self, method: str, params: dict | None = None, timeout: float | None = None) -> Any:
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(p.Request(rid, method, params or {}))
            if timeout is None:
                return await fut
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                with contextlib.suppress(TransportClosed):
                    await self.notify("cancel", {"id": rid})
                raise p.RpcError(p.ErrorCode.TIMEOUT, f"{method}: no answer within {timeout} s") from None
        except asyncio.CancelledError:
            if not self.closed.is_set():
                with contextlib.suppress(Exception):
                    await self.notify("cancel", {"id": rid})
            raise
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: dict) -> None:
        await self.send(p.Notification(method, params))

    # -- streams --
    def new_stream_id(self) -> int:
        return next(self._stream_ids)

    def open_inbound(self, stream_id: int | None = None, window: int = p.DEFAULT_WINDOW) -> InboundStream:
        if stream_id is None:
            stream_id = self.new_stream_id()
        stream = InboundStream(self, stream_id, window)
        self._inbound[stream_id] = stream
        return stream

    def open_outbound(self, stream_id: int, window: int) -> None:
        self._credits[stream_id] = _Credit(max(int(window), 1))

    def close_outbound(self, stream_id: int) -> None:
        credit = self._credits.pop(stream_id, None)
        if credit is not None:
            credit.event.set()

    async def send_stream(self, stream_id: int, fd: int, offset: int, data: bytes) -> None:
        credit = self._credits.get(stream_id)
        while credit is not None and credit.available <= 0:
            # Checked before waiting too: after shutdown nobody would wake us.
            if self.closed.is_set():
                raise TransportClosed(self.close_reason)
            credit.event.clear()
            await credit.event.wait()
            credit = self._credits.get(stream_id)
        if credit is None:
            raise p.RpcError(p.ErrorCode.CANCELLED, f"stream {stream_id} is closed")
        credit.available -= len(data)
        await self.send(p.StreamData(stream_id, fd, offset, data))

    async def end_stream(self, stream_id: int, **info: Any) -> None:
        self.close_outbound(stream_id)
        await self.notify("stream.end", {"stream": stream_id, **info})

    # -- receiving --
    async def _read_loop(self) -> None:
        reason = "closed"
        try:
            while True:
                try:
                    body = await self.transport.recv()
                    msg = p.decode(body)
                except TransportClosed as exc:
                    reason = exc.message
                    break
                except p.ProtocolError as exc:
                    await self._on_protocol_error(exc)
                    continue
                self._dispatch(msg)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a bug here must not leave peers hanging
            log.exception("reader of %s failed", self.name)
            reason = f"internal error: {exc}"
        await self._shutdown(reason)

    async def _on_protocol_error(self, exc: p.ProtocolError) -> None:
        log.debug("%s: protocol error: %s", self.name, exc.message)
        with contextlib.suppress(TransportClosed):
            if exc.request_id is not None:
                await self.send(p.Response(exc.request_id, exc, None))
            else:
                await self.notify("error", {"error": exc.to_wire()})

    def _dispatch(self, msg: p.Message) -> None:
        if type(msg) is p.StreamData:
            stream = self._inbound.get(msg.stream)
            if stream is not None:
                stream._push(msg)
            return
        if type(msg) is p.Response:
            fut = self._pending.get(msg.id)
            if fut is not None and not fut.done():
                if msg.error is not None:
                    fut.set_exception(msg.error)
                else:
                    fut.set_result(msg.result)
            return
        if type(msg) is p.Request:
            if msg.id in self._handlers:
                self._spawn(
                    self._reply_error(msg.id, p.RpcError(p.ErrorCode.PROTOCOL, "duplicate request id"))
                )
                return
            task = asyncio.get_running_loop().create_task(self._handle(msg))
            self._handlers[msg.id] = task
            return
        method, params = msg
        if method == "stream.ack":
            credit = self._credits.get(_int_or_none(params.get("stream")))
            n = params.get("bytes")
            if credit is not None and type(n) is int and n > 0:
                credit.grant(n)
        elif method == "stream.end":
            stream = self._inbound.get(_int_or_none(params.get("stream")))
            if stream is not None:
                stream._end(params)
        elif method == "cancel":
            task = self._handlers.get(_int_or_none(params.get("id")))
            if task is not None:
                task.cancel()
        elif self.on_notification is not None:
            self._spawn(self._notify_handler(method, params))

    def _spawn(self, coro) -> None:
        asyncio.get_running_loop().create_task(coro)

    async def _notify_handler(self, method: str, params: dict) -> None:
        try:
            res = self.on_notification(self, method, params)
            if asyncio.iscoroutine(res):
                await res
        except Exception:
            log.exception("notification handler for %s failed", method)

    async def _reply_error(self, rid: int, err: p.RpcError) -> None:
        with contextlib.suppress(TransportClosed):
            await self.send(p.Response(rid, err, None))

    async def _handle(self, req: p.Request) -> None:
        try:
            if self.handler is None:
                raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"no handler for {req.method}")
            result = await self.handler(self, req.method, req.params)
            response = p.Response(req.id, None, result)
        except asyncio.CancelledError:
            response = p.Response(req.id, p.RpcError(p.ErrorCode.CANCELLED, f"{req.method} cancelled"), None)
        except p.RpcError as exc:
            response = p.Response(req.id, exc, None)
        except Exception as exc:
            log.exception("handler for %s failed", req.method)
            response = p.Response(
                req.id, p.RpcError(p.ErrorCode.SANDBOX, f"{type(exc).__name__}: {exc}"), None
            )
        finally:
            self._handlers.pop(req.id, None)
        if self.closed.is_set():
            return
        try:
            await self.send(response)
        except TransportClosed:
            pass
        except Exception as exc:  # e.g. a result msgpack cannot encode
            log.exception("cannot send response to %s", req.method)
            await self._reply_error(req.id, p.RpcError(p.ErrorCode.SANDBOX, f"unencodable result: {exc}"))
