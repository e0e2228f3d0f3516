"""The shared gateway connection: one per (gateway, API key, event loop).

Every sandbox on a loop that talks to the same gateway with the same key uses
the same ``Connection``, so creating a sandbox costs one round trip, never a
handshake. A connection that died is replaced on the next call; calls that were
waiting on it fail with ``SandboxUnreachableException``.

Heartbeats: after ``heartbeat_interval`` seconds without any frame from the
gateway the client sends ``ping``; after ``heartbeat_timeout`` seconds of
silence it closes the connection, which fails every waiting call and ends every
open stream. A dead gateway never makes a caller hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import protocol as p
from ._config import ConnectionConfig
from ._connection import Connection, InboundStream
from ._exceptions import (
    AuthenticationException,
    SandboxUnreachableException,
    TimeoutException,
    from_rpc_error,
)
from ._transports import Transport, TransportClosed

__all__ = ["Client", "get_client", "gateway_call", "close_all", "map_error", "request_timeout_error"]

log = logging.getLogger("forkd")

CLIENT_NAME = "forkd-python/0.1.0"


def request_timeout_error() -> TimeoutException:
    return TimeoutException(
        "Request timed out — the 'request_timeout' option can be used to increase this timeout"
    )


def map_error(err: BaseException) -> BaseException:
    """The SDK exception for what a call raised (wire errors become their E2B class)."""
    if isinstance(err, TransportClosed):
        return SandboxUnreachableException(f"the connection to the forkd gateway was lost: {err.message}")
    if isinstance(err, p.RpcError):
        return from_rpc_error(err)
    return err


class _WatchedTransport:
    """A transport that remembers when it last received a frame (for heartbeats)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.last_recv = time.monotonic()

    async def send(self, body: bytes) -> None:
        await self.inner.send(body)

    async def recv(self) -> bytes:
        body = await self.inner.recv()
        self.last_recv = time.monotonic()
        return body

    async def close(self) -> None:
        await self.inner.close()


class Client:
    """One live connection to a gateway, plus the routing of its notifications."""

    def __init__(self, config: ConnectionConfig, transport: _WatchedTransport) -> None:
        self.config = config
        self.transport = transport
        self.conn = Connection(transport, self._serve, self._on_notification, name="forkd-sdk")
        self.hello: dict = {}
        # (sandbox_id, watch id) -> callback(name, type); stream id -> callback(result map)
        self.watches: dict[tuple[str, int], Callable[[dict], None]] = {}
        self.code_results: dict[int, Callable[[dict], None]] = {}
        self._heartbeat: asyncio.Task | None = None
        self.conn.add_close_callback(self._connection_closed)

    def _connection_closed(self, conn: Connection) -> None:
        # Watches have no stream that would end: tell each one its connection is gone.
        for cb in list(self.watches.values()):
            cb(None)
        self.watches.clear()
        # Forget it, so that a finished event loop (asyncio.run returned) is not kept alive by its client.
        for loop, clients in list(_clients.items()):
            for key, client in list(clients.items()):
                if client is self:
                    del clients[key]
            if not clients:
                _clients.pop(loop, None)

    @property
    def closed(self) -> bool:
        return self.conn.closed.is_set()

    async def start(self) -> None:
        self.conn.start()
        try:
            self.hello = await self.call(
                "hello",
                {"version": p.PROTOCOL_VERSION, "client": CLIENT_NAME},
                self.config.request_timeout,
            )
        except BaseException:
            await self.conn.close("hello failed")
            raise
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def close(self) -> None:
        beat, self._heartbeat = self._heartbeat, None
        if beat is not None and beat is not asyncio.current_task():
            beat.cancel()
            # Let the cancellation finish: the loop may stop right after us
            # (interpreter exit), and a still-pending task would be destroyed.
            await asyncio.wait([beat])  # does not raise, nor swallow our own cancellation
        await self.conn.close()

    # -- calls ---------------------------------------------------------------
    async def call(self, method: str, params: dict, timeout: float | None) -> Any:
        """One request; wire errors raise their SDK exception, running out of time TimeoutException."""
        try:
            if timeout is None:
                return await self.conn.request(method, params)
            # asyncio.timeout cancels this task on expiry: the request sends
            # `cancel` to the gateway, so nothing keeps running for nobody.
            async with asyncio.timeout(timeout):
                return await self.conn.request(method, params)
        except TimeoutError:
            raise request_timeout_error() from None
        except p.RpcError as exc:
            raise map_error(exc) from None

    def open_stream(self, window: int = p.DEFAULT_WINDOW) -> InboundStream:
        return self.conn.open_inbound(None, window)

    # -- peer-initiated traffic ---------------------------------------------
    async def _serve(self, conn: Connection, method: str, params: dict) -> Any:
        if method == "ping":
            return {"pong": True, "time": time.time()}
        raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"the SDK does not serve {method!r}")

    def _on_notification(self, conn: Connection, method: str, params: dict) -> None:
        if method == "files.event":
            cb = self.watches.get((params.get("sandbox_id"), params.get("watch")))  # type: ignore[arg-type]
            if cb is not None:
                cb(params)
        elif method == "code.result":
            cb = self.code_results.get(params.get("stream"))  # type: ignore[arg-type]
            if cb is not None:
                cb(params.get("result") or {})
        elif method == "error":
            log.warning("the forkd gateway reported an error: %s", params.get("error"))

    async def _beat(self) -> None:
        interval = self.config.heartbeat_interval
        dead_after = self.config.heartbeat_timeout
        conn, transport = self.conn, self.transport
        pinged_at = 0.0
        try:
            while not conn.closed.is_set():
                now = time.monotonic()
                silent = now - transport.last_recv
                if silent >= dead_after:
                    # The loop may have been blocked by its owner: let it read
                    # what already arrived before calling the gateway dead.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    silent = time.monotonic() - transport.last_recv
                    if silent >= dead_after:
                        log.warning("no frame from the forkd gateway for %.1f s: connection dead", silent)
                        await conn.close(f"no heartbeat from the gateway for {silent:.1f} s")
                        return
                if silent >= interval and pinged_at < transport.last_recv:
                    pinged_at = now
                    asyncio.get_running_loop().create_task(self._ping())
                if silent >= interval:
                    delay = dead_after - silent
                else:
                    delay = interval - silent
                # Sleep, but end at once when the connection closes (no task left behind).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.closed.wait(), max(delay, 0.01))
        except asyncio.CancelledError:
            pass

    async def _ping(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.request("ping", {})


# -- the per-loop pool ---------------------------------------------------------

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, Client]] = (
    weakref.WeakKeyDictionary()
)
_connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, asyncio.Future]] = (
    weakref.WeakKeyDictionary()
)


async def get_client(config: ConnectionConfig) -> Client:
    """The live shared client for this config on the running loop (connecting if needed)."""
    loop = asyncio.get_running_loop()
    key = config.connection_key
    while True:
        clients = _clients.get(loop)
        if clients is not None:
            client = clients.get(key)
            if client is not None and not client.closed:
                return client
        pending = _connecting.setdefault(loop, {})
        fut = pending.get(key)
        if fut is None:
            break
        # Someone is connecting already: share their connection (or their error).
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            if not fut.cancelled():
                raise  # we were cancelled ourselves
            # the connecting caller was cancelled: try again
    fut = loop.create_future()
    pending[key] = fut
    try:
        client = await _connect(config)
    except asyncio.CancelledError:
        pending.pop(key, None)
        fut.cancel()
        raise
    except BaseException as exc:
        pending.pop(key, None)
        fut.set_exception(exc)
        fut.exception()  # marked retrieved: the waiters re-raise it themselves
        raise
    pending.pop(key, None)
    _clients.setdefault(loop, {})[key] = client
    fut.set_result(client)
    return client


async def gateway_call(
    method: str, params: dict, config: ConnectionConfig, request_timeout: float | None = None
) -> Any:
    """One request on the shared connection of ``config``'s gateway."""
    client = await get_client(config)
    return await client.call(method, params, config.get_request_timeout(request_timeout))


async def _connect(config: ConnectionConfig) -> Client:
    try:
        if config.transport_factory is not None:
            inner = await config.transport_factory()
        else:
            from ._websocket import WebSocketTransport

            inner = await WebSocketTransport.connect(
                config.url, config.api_key, open_timeout=config.request_timeout
            )
    except AuthenticationException:
        raise
    except TransportClosed as exc:
        raise SandboxUnreachableException(
            f"cannot reach the forkd gateway at {config.url}: {exc.message}"
        ) from None
    except p.RpcError as exc:
        raise map_error(exc) from None
    except OSError as exc:
        raise SandboxUnreachableException(f"cannot reach the forkd gateway at {config.url}: {exc}") from None
    client = Client(config, _WatchedTransport(inner))
    await client.start()
    return client


async def close_all() -> None:
    """Close every shared connection of the running loop."""
    loop = asyncio.get_running_loop()
    clients = _clients.pop(loop, {})
    for client in clients.values():
        with contextlib.suppress(Exception):
            await client.close()
