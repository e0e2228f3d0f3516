"""The HTTP face of a Gateway: a starlette app served by uvicorn.

- ``/v1/ws`` (websocket, subprotocol ``forkd.v1``): one client session per connection. The API key comes
  from ``Authorization: Bearer``, ``X-API-Key`` or the subprotocol ``forkd.key.<key>``; a wrong or missing
  key is refused during the handshake with HTTP 401. Without configured keys only loopback clients are
  accepted.
- ``GET /health``: JSON status (200 when serving, 503 otherwise).
- ``GET /metrics``: Prometheus text format.
- Any request or websocket whose Host is ``{port}-{sandbox_id}.<domain>``: proxied to that sandbox's port
  (``_proxy``).

Frames above ``MAX_FRAME_SIZE`` get a typed ``protocol_error`` and the connection carries on; messages above
``WS_MAX_SIZE`` (a hard cap on what the server buffers) close the connection (1009).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from forkd import protocol as p
from forkd._transports import TransportClosed

from ._auth import check_bind, key_from_request
from ._gateway import Gateway
from ._metrics import CONTENT_TYPE
from ._proxy import PortProxy

__all__ = ["create_app", "AsgiWebSocketTransport", "running_server", "uvicorn_config", "WS_MAX_SIZE"]

log = logging.getLogger("forkd.gateway.app")

WS_MAX_SIZE = 2 * p.MAX_FRAME_SIZE


class AsgiWebSocketTransport:
    """A starlette WebSocket as a forkd Transport: one binary message per frame body."""

    def __init__(self, ws: WebSocket, max_frame_size: int = p.MAX_FRAME_SIZE) -> None:
        self._ws = ws
        self._max = max_frame_size
        self._closed = False

    async def send(self, body: bytes) -> None:
        if self._closed:
            raise TransportClosed()
        try:
            await self._ws.send({"type": "websocket.send", "bytes": body})
        except Exception as exc:  # starlette, uvicorn and the OS each have their own way to say "gone"
            self._closed = True
            raise TransportClosed(f"client connection lost: {exc or type(exc).__name__}") from None

    async def recv(self) -> bytes:
        if self._closed:
            raise TransportClosed()
        try:
            msg = await self._ws.receive()
        except Exception as exc:
            self._closed = True
            raise TransportClosed(f"client connection lost: {exc or type(exc).__name__}") from None
        if msg["type"] == "websocket.disconnect":
            self._closed = True
            raise TransportClosed(f"client disconnected (code {msg.get('code')})")
        body = msg.get("bytes")
        if body is None:
            raise p.ProtocolError("text websocket message: frames are binary")
        if len(body) > self._max:
            raise p.FrameTooLarge(f"frame of {len(body)} bytes exceeds the limit of {self._max}")
        return body

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._ws.close(1000)


def create_app(gateway: Gateway, *, manage: bool = True) -> Starlette:
    """The app; with ``manage`` its lifespan starts and closes the gateway."""

    async def ws_endpoint(ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols") or []
        key = key_from_request(ws.headers, offered)
        client = ws.client.host if ws.client else None
        key_id = gateway.authenticate(key, client)
        if key_id is None:
            msg = (
                "missing or wrong API key"
                if gateway.config.keys
                else "this gateway accepts only local clients"
            )
            await _deny(ws, 401, msg)
            return
        if not gateway.accepting:
            await _deny(ws, 503, f"the gateway is {gateway.state}")
            return
        # Accept only forkd.v1, never echo a forkd.key.* subprotocol (that is the key).
        await ws.accept(subprotocol=p.SUBPROTOCOL if p.SUBPROTOCOL in offered else None)
        await gateway.serve(AsgiWebSocketTransport(ws), key_id)

    async def health(_request: Request) -> Response:
        ok = gateway.accepting
        body = {
            "status": "ok" if ok else gateway.state,
            "backend": gateway.backend.name if gateway.backend is not None else None,
            "sandboxes": len(gateway.sandboxes),
            "sessions": len(gateway.sessions),
            "pools": gateway.pool_stats(),
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(_request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    @contextlib.asynccontextmanager
    async def lifespan(_app) -> AsyncIterator[None]:
        if manage:
            await gateway.start()
        try:
            yield
        finally:
            if manage:
                await gateway.close()

    routes = [
        WebSocketRoute("/v1/ws", ws_endpoint),
        Route("/health", health),
        Route("/metrics", metrics),
    ]
    # Sandbox ports ({port}-{sandbox_id}.<domain>) are recognised by their Host header before any route.
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(PortProxy, gateway=gateway)])


async def _deny(ws: WebSocket, status: int, message: str) -> None:
    try:
        await ws.send_denial_response(PlainTextResponse(message, status_code=status))
    except Exception:  # a server without the denial extension answers 403 to a close instead
        with contextlib.suppress(Exception):
            await ws.close(1008)


def uvicorn_config(app, host: str, port: int, *, log_level: str = "info", lifespan: str = "on"):
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        ws="websockets-sansio",
        ws_max_size=WS_MAX_SIZE,
        ws_per_message_deflate=False,  # output is mostly binary: compressing costs more than it saves
        ws_ping_interval=None,  # heartbeats are the protocol's own ping requests
        lifespan=lifespan,
        log_level=log_level,
        timeout_graceful_shutdown=5,
        access_log=False,
    )


@contextlib.asynccontextmanager
async def running_server(
    gateway: Gateway,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    manage: bool = False,
    log_level: str = "warning",
) -> AsyncIterator[str]:
    """Serve ``gateway`` with uvicorn on this event loop; yields its base URL (``http://host:port``).

    With ``manage`` the server starts and closes the gateway; otherwise the caller does.
    """
    import uvicorn

    check_bind(host, gateway.config.keys)
    app = create_app(gateway, manage=manage)
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level))
    server.capture_signals = contextlib.nullcontext  # the caller's process, the caller's signals
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.01)
        sock = server.servers[0].sockets[0]
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        yield f"http://{shown}:{bound[1]}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
