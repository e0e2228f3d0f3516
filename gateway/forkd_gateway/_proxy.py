"""Sandbox ports: HTTP requests and websockets for ``{port}-{sandbox_id}.<anything>`` reach ``port`` in that
sandbox.

An ASGI middleware in front of the gateway's own routes. It reads the Host header; one of the form
``{port}-{sandbox_id}.<domain>[:port]`` is proxied, any other goes to the gateway's routes. The bytes travel
through the sandbox's agent (``port.connect``: a TCP connection to ``127.0.0.1:<port>`` in the sandbox, its two
directions as credit-windowed streams of the agent channel), so this works for every backend, whatever network
the sandbox has. One tunnel per request or websocket:

- HTTP: h11 writes the request (``Connection: close``; body streamed up as the client sends it) and parses the
  response, whose body is streamed down as the server sends it. The response is read only as fast as the client
  takes it: the tunnel's window (``TUNNEL_WINDOW``) is all the gateway holds, and the agent reads the server's
  socket only within it.
- Websockets: the client's websocket is accepted once the server in the sandbox accepted ours (websockets'
  sans-I/O client over the tunnel); messages and close codes are relayed both ways.

No API key is asked for, as in E2B: whoever knows a sandbox's host name reaches its ports, and the sandbox id
is the secret (docs/gateway-protocol.md, "Sandbox ports").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import TYPE_CHECKING

import h11
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Close, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State
from websockets.uri import parse_uri

from forkd import protocol as p

from ._relay import agent_call

if TYPE_CHECKING:
    from ._gateway import Gateway
    from ._sandbox import Sandbox

__all__ = ["PortProxy", "parse_host", "TUNNEL_WINDOW"]

log = logging.getLogger("forkd.gateway.proxy")

# What the gateway holds of one proxied response (and the agent may read ahead of the client).
TUNNEL_WINDOW = 1024 * 1024
# port.connect: the agent itself gives up connecting after 10 s.
CONNECT_TIMEOUT = 15.0
# Bounds h11's buffer for a response head, and one websocket message from the server.
MAX_HEAD = 64 * 1024
MAX_WS_MESSAGE = 2 * p.MAX_FRAME_SIZE
# After the client closed its websocket, how long the server gets to finish the closing handshake.
WS_CLOSE_TIMEOUT = 5.0
# Close code for "the server in the sandbox went away" (1006 cannot be sent in a close frame).
WS_BAD_GATEWAY = 1014

_HOST = re.compile(r"^(\d{1,5})-([^:]+)(?::\d+)?$")
_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
}  # fmt: skip
# Headers of the client's websocket handshake that the gateway's own handshake with the server replaces.
_WS_HANDSHAKE = {
    b"host", b"upgrade", b"connection", b"origin", b"sec-websocket-key", b"sec-websocket-version",
    b"sec-websocket-extensions", b"sec-websocket-protocol", b"content-length", b"transfer-encoding",
}  # fmt: skip


def parse_host(host: str) -> tuple[int, str] | None:
    """``(port, rest)`` for a Host of the form ``{port}-{rest}`` where rest is ``{sandbox_id}.<domain>``
    (the ``:port`` suffix removed), else None."""
    m = _HOST.match(host)
    if m is None or "." not in m[2]:
        return None
    return int(m[1]), m[2]


def _find_sandbox(gateway: Gateway, rest: str) -> tuple[Sandbox | None, str]:
    """The sandbox whose id ``rest`` starts with (before one of its dots), and the id as shown in errors.
    Ids may contain dots (a branch's id embeds its template's name), so each split is tried."""
    i = rest.find(".")
    shown = rest[:i]
    while i != -1:
        sandbox = gateway.sandboxes.get(rest[:i])
        if sandbox is not None:
            return sandbox, rest[:i]
        i = rest.find(".", i + 1)
    return None, shown


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def _target(scope: dict) -> bytes:
    path = scope.get("raw_path") or scope.get("path", "/").encode()
    query = scope.get("query_string") or b""
    return path + b"?" + query if query else path


def _connection_tokens(headers) -> set[bytes]:
    return {t.strip().lower() for k, v in headers if k.lower() == b"connection" for t in v.split(b",")}


def _request_headers(scope: dict) -> list[tuple[bytes, bytes]]:
    headers = scope.get("headers") or []
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    out = [(k, v) for k, v in headers if k not in drop]
    if any(k == b"transfer-encoding" for k, _ in headers):
        out.append((b"transfer-encoding", b"chunked"))  # h11 re-frames the body as it streams it up
    out.append((b"connection", b"close"))  # one tunnel per request
    return out


def _response_headers(headers) -> list[tuple[bytes, bytes]]:
    drop = _HOP_BY_HOP | _connection_tokens(headers)
    return [(bytes(k), bytes(v)) for k, v in headers if bytes(k).lower() not in drop]


async def _plain(scope: dict, send, status: int, text: str) -> None:
    """An error as plain text: an HTTP response, or the refusal of a websocket handshake."""
    body = text.encode() + b"\n"
    headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in (scope.get("extensions") or {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


class Tunnel:
    """One ``port.connect`` on a sandbox's agent connection: ``down`` (sandbox → gateway) is read by
    iterating it, ``send`` writes to the sandbox."""

    def __init__(self, proxy: PortProxy, sandbox: Sandbox, port: int) -> None:
        self.proxy = proxy
        self.sandbox = sandbox
        self.port = port
        self.conn = sandbox.conn
        self.down = self.conn.open_inbound(None, TUNNEL_WINDOW)
        self.up = self.conn.new_stream_id()
        self.sent = 0
        self.ended = False
        self.closed = False

    async def open(self) -> None:
        params = {"port": self.port, "stream": self.down.id, "up_stream": self.up, "window": TUNNEL_WINDOW}
        try:
            res = await self.conn.request("port.connect", params, timeout=CONNECT_TIMEOUT)
        except BaseException:
            self.closed = True
            await self.down.close()
            raise
        self.conn.open_outbound(self.up, int(res.get("up_window") or p.DEFAULT_WINDOW))

    async def send(self, data: bytes) -> None:
        """Waits for the agent's credit: the client is read no faster than the server takes its bytes."""
        for i in range(0, len(data), p.CHUNK_SIZE):
            chunk = data[i : i + p.CHUNK_SIZE]
            await self.conn.send_stream(self.up, 0, self.sent, chunk)
            self.sent += len(chunk)

    async def end(self) -> None:
        """Half close: the server reads EOF."""
        if not self.ended and not self.closed:
            self.ended = True
            await self.conn.end_stream(self.up)

    async def close(self) -> None:
        """Tear the tunnel down in the gateway now and in the agent soon (the socket is closed there)."""
        if self.closed:
            return
        self.closed = True
        self.conn.close_outbound(self.up)  # a send waiting for credit wakes and fails
        await self.down.close()
        self.proxy.background(agent_call(self.sandbox, "port.close", {"stream": self.down.id}))

    def gone_error(self) -> str | None:
        """Why the tunnel broke, if the sandbox died or the agent reported an error."""
        if not self.sandbox.running:
            return f"sandbox {self.sandbox.id} stopped"
        err = self.down.error
        return err.message if err is not None else None


class PortProxy:
    """ASGI middleware: requests for sandbox ports are served here, all others by ``app``."""

    def __init__(self, app, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        self._tasks: set[asyncio.Task] = set()

    def background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            target = parse_host(_header(scope, b"host") or "")
            if target is not None:
                await self._proxy(scope, receive, send, *target)
                return
        await self.app(scope, receive, send)

    async def _proxy(self, scope: dict, receive, send, port: int, rest: str) -> None:
        kind = scope["type"]
        outcome = "error"  # an exception escaped: uvicorn logs it
        try:
            sandbox, shown = _find_sandbox(self.gateway, rest)
            if kind == "websocket" and (await receive())["type"] != "websocket.connect":
                outcome = "client_closed"
            elif not self.gateway.accepting:
                outcome = "unavailable"
                await _plain(scope, send, 503, f"the gateway is {self.gateway.state}")
            elif not 1 <= port <= 65535:
                outcome = "bad_request"
                await _plain(scope, send, 400, f"bad port {port}")
            elif sandbox is None or not sandbox.running:
                outcome = "not_found"
                await _plain(scope, send, 404, f"sandbox {shown} not found")
            else:
                tunnel = Tunnel(self, sandbox, port)
                try:
                    outcome = await self._open(scope, send, tunnel)
                    if outcome == "ok":
                        relay = self._http if kind == "http" else self._websocket
                        outcome = await relay(scope, receive, send, tunnel)
                finally:
                    await tunnel.close()
        finally:
            self.gateway.metrics.port_requests.labels(kind, outcome).inc()

    async def _open(self, scope: dict, send, tunnel: Tunnel) -> str:
        sandbox, port = tunnel.sandbox, tunnel.port
        try:
            await tunnel.open()
            return "ok"
        except p.RpcError as exc:
            if exc.code is p.ErrorCode.NOT_FOUND:
                await _plain(scope, send, 502, f"nothing listens on port {port} in sandbox {sandbox.id}")
                return "refused"
            if not sandbox.running:
                await _plain(scope, send, 502, f"sandbox {sandbox.id} stopped")
                return "failed"
            status = 504 if exc.code is p.ErrorCode.TIMEOUT else 502
            await _plain(scope, send, status, f"port {port} in sandbox {sandbox.id}: {exc.message}")
            return "failed"

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _http(self, scope: dict, receive, send, tunnel: Tunnel) -> str:
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        try:
            head = h.send(
                h11.Request(method=scope["method"], target=_target(scope), headers=_request_headers(scope))
            )
        except h11.LocalProtocolError as exc:
            await _plain(scope, send, 400, f"bad request: {exc}")
            return "bad_request"
        client_gone = asyncio.Event()

        async def upload() -> None:
            """The request up; then wait for the client to go away, which ends the exchange."""
            try:
                await tunnel.send(head)
                more = True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        break
                    if msg.get("body"):
                        await tunnel.send(h.send(h11.Data(data=msg["body"])))
                    more = msg.get("more_body", False)
                else:
                    await tunnel.send(h.send(h11.EndOfMessage()))
                    while (await receive())["type"] != "http.disconnect":
                        pass
            except p.RpcError:
                return  # the tunnel broke: the response side reports it
            except h11.LocalProtocolError:
                await tunnel.close()  # a body that breaks its own framing: the exchange cannot go on
                return
            client_gone.set()
            await tunnel.close()  # ends the response loop below

        uploader = asyncio.get_running_loop().create_task(upload())
        started = False
        try:
            async for _fd, _offset, data in tunnel.down:
                h.receive_data(data)
                done, started = await self._relay_response(h, send, started)
                if done:
                    return "ok"
            if client_gone.is_set():
                return "client_closed"
            why = tunnel.gone_error()
            if why is None:  # the server closed the connection: maybe the end of a close-delimited body
                h.receive_data(b"")
                done, started = await self._relay_response(h, send, started)
                if done:
                    return "ok"
                why = f"the server on port {tunnel.port} closed the connection before the response ended"
                if not started:
                    why = f"the server on port {tunnel.port} closed the connection without answering"
        except h11.RemoteProtocolError as exc:
            why = f"the server on port {tunnel.port} sent an invalid HTTP response: {exc}"
        finally:
            uploader.cancel()
        if started:
            # Too late for a status: returning with the response incomplete makes the server drop the
            # connection, so the client sees a truncated response rather than a complete-looking one.
            log.info("response from port %d of %s cut short: %s", tunnel.port, tunnel.sandbox.id, why)
            return "failed"
        await _plain(scope, send, 502, why)
        return "failed"

    @staticmethod
    async def _relay_response(h: h11.Connection, send, started: bool) -> tuple[bool, bool]:
        """Pass on the events h11 has parsed; (response complete, response started)."""
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return False, started
            if isinstance(event, h11.Response):
                headers = _response_headers(event.headers)
                await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return True, started
            # InformationalResponse (100 Continue): the client's own server sends its own.

    # -- websockets ---------------------------------------------------------------------------------

    async def _websocket(self, scope: dict, receive, send, tunnel: Tunnel) -> str:
        port, sandbox = tunnel.port, tunnel.sandbox
        try:
            uri = parse_uri("ws://sandbox" + _target(scope).decode("latin-1"))
        except InvalidURI as exc:
            await _plain(scope, send, 400, f"bad websocket path: {exc}")
            return "bad_request"
        ws = ClientProtocol(
            uri,
            origin=_header(scope, b"origin"),
            subprotocols=list(scope.get("subprotocols") or []) or None,
            max_size=MAX_WS_MESSAGE,
        )
        request = ws.connect()
        del request.headers["Host"]
        request.headers["Host"] = _header(scope, b"host") or ""
        for key, value in scope.get("headers") or ():
            if key not in _WS_HANDSHAKE:
                request.headers[key.decode("latin-1")] = value.decode("latin-1")
        ws.send_request(request)

        async def flush() -> None:
            for data in ws.data_to_send():
                if data:
                    await tunnel.send(data)
                else:
                    await tunnel.end()  # websockets asks for the TCP connection to be half-closed

        # The handshake with the server first: the client is accepted only if the server accepted us.
        response: WsResponse | None = None
        early: list = []
        try:
            await flush()
            async for _fd, _offset, data in tunnel.down:
                ws.receive_data(data)
                for event in ws.events_received():
                    if isinstance(event, WsResponse):
                        response = event
                    else:
                        early.append(event)  # frames that came in the same chunk as the handshake
                if response is not None:
                    break
        except p.RpcError:
            pass
        if response is None or ws.handshake_exc is not None:
            why = tunnel.gone_error()
            if why is None:
                status = f"HTTP {response.status_code}" if response is not None else "no answer"
                why = f"the server on port {port} in sandbox {sandbox.id} refused the websocket ({status})"
            await _plain(scope, send, 502, why)
            return "failed"
        await send(
            {"type": "websocket.accept", "subprotocol": response.headers.get("Sec-WebSocket-Protocol")}
        )

        client_closed = False

        async def to_client(message: dict) -> None:
            nonlocal client_closed
            if client_closed:
                return
            if message["type"] == "websocket.close":
                client_closed = True
            try:
                await send(message)
            except Exception:  # the client is gone (each server says it its own way)
                client_closed = True

        async def upstream() -> None:
            """Client → server, until the client closes."""
            nonlocal client_closed
            while True:
                msg = await receive()
                if msg["type"] == "websocket.receive":
                    if ws.state is not State.OPEN:
                        continue  # the server is closing: its close reaches the client next
                    if msg.get("text") is not None:
                        ws.send_text(msg["text"].encode())
                    else:
                        ws.send_binary(msg.get("bytes") or b"")
                elif msg["type"] == "websocket.disconnect":
                    client_closed = True
                    code = msg.get("code") or 1000
                    with contextlib.suppress(Exception):  # the server may be closing already
                        ws.send_close(code if _sendable(code) else 1001, msg.get("reason") or "")
                    with contextlib.suppress(p.RpcError):
                        await flush()
                    return
                await flush()

        async def downstream() -> None:
            """Server → client, until the server closes (or the tunnel breaks)."""
            parts: list[bytes] = []
            text = False
            events = early
            chunks = aiter(tunnel.down)
            try:
                while True:
                    for frame in events:
                        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                            parts, text = [frame.data], frame.opcode is Opcode.TEXT
                        elif frame.opcode is Opcode.CONT:
                            parts.append(frame.data)
                        elif frame.opcode is Opcode.CLOSE:
                            close = Close.parse(frame.data) if frame.data else None
                            code = close.code if close is not None and _sendable(close.code) else 1000
                            await to_client(
                                {
                                    "type": "websocket.close",
                                    "code": code,
                                    "reason": close.reason if close else "",
                                }
                            )
                            continue
                        else:
                            continue  # ping/pong: websockets answers pings itself
                        if frame.fin:
                            message = b"".join(parts)
                            parts = []
                            if text:
                                try:
                                    await to_client({"type": "websocket.send", "text": message.decode()})
                                except UnicodeDecodeError:
                                    ws.fail(1007, "invalid UTF-8 in a text message")
                            else:
                                await to_client({"type": "websocket.send", "bytes": message})
                    await flush()  # pongs, the echo of a close, a close for a protocol error
                    if ws.close_sent is not None and ws.close_rcvd is None and not client_closed:
                        # We failed the connection (a protocol error, a message too big): tell the client.
                        sent = ws.close_sent
                        await to_client({"type": "websocket.close", "code": sent.code, "reason": sent.reason})
                    if client_closed and ws.close_rcvd is not None:
                        return
                    item = await anext(chunks, None)
                    if item is None:
                        break
                    ws.receive_data(item[2])
                    events = ws.events_received()
            except p.RpcError:
                pass
            ws.receive_eof()
            await to_client(
                {"type": "websocket.close", "code": WS_BAD_GATEWAY, "reason": "the server went away"}
            )

        loop = asyncio.get_running_loop()
        up = loop.create_task(upstream())
        down = loop.create_task(downstream())
        try:
            done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up in done and not down.done():
                # The client left: give the server a moment to answer our close.
                await asyncio.wait({down}, timeout=WS_CLOSE_TIMEOUT)
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        for task in (up, down):
            if task.done() and not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                log.warning("websocket to port %d of %s failed: %r", port, sandbox.id, exc)
        return "ok"


def _sendable(code: int) -> bool:
    """A close code that may appear in a close frame (1005, 1006 and 1015 only describe)."""
    return (
        code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
        or 3000 <= code < 5000
    )
