"""Port tunnels: the bytes of one TCP connection to a port inside the sandbox, carried over the agent channel.

Sandboxes have no network the host can reach (loopback only; VM guests none at all), so the gateway reaches a
server in the sandbox through its agent: ``port.connect`` connects to ``127.0.0.1:<port>`` here and relays
the connection's bytes both ways over two credit-windowed streams of the client's Connection, the same
streams ``files.read`` (sandbox → client) and ``files.write_open`` (client → sandbox) use.

- Backpressure: the socket is read only when the client has credit, a chunk at a time, so a slow client
  leaves the bytes in the server's socket buffer (and then the server) rather than in the agent.
- Half close: the end of the client's stream shuts down the socket's write side; the server closing its side
  ends the sandbox → client stream. The tunnel goes away when both directions have ended, when the client
  calls ``port.close``, ends its stream with an error, or drops the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from typing import Any

from forkd import protocol as p
from forkd._connection import Connection, InboundStream
from forkd._transports import TransportClosed

from . import _params
from ._methods import component, method

log = logging.getLogger("forkd.agent.ports")

# What one read from the server may take: a chunk of the kind exec output uses, so many tunnels share a
# connection fairly.
READ_SIZE = 256 * 1024
# What the client may have in flight towards the server before the agent acknowledges it.
UP_WINDOW = p.DEFAULT_WINDOW
# A loopback connect answers at once unless the server's accept backlog is full.
CONNECT_TIMEOUT = 10.0
_REFUSED = (errno.ECONNREFUSED, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENETUNREACH)


def _invalid(message: str) -> p.RpcError:
    return p.RpcError(p.ErrorCode.INVALID_ARGUMENT, message)


async def _connect_once(family: int, address: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_local(port: int) -> socket.socket:
    """A connected non-blocking socket to ``port`` on loopback: IPv4 first, then IPv6 (servers that bind
    ``localhost`` may get ``::1`` only)."""
    refused: OSError | None = None
    for family, address in ((socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port, 0, 0))):
        try:
            return await asyncio.wait_for(_connect_once(family, address), CONNECT_TIMEOUT)
        except TimeoutError:
            raise p.RpcError(
                p.ErrorCode.TIMEOUT, f"port {port}: no connection within {CONNECT_TIMEOUT:g} s"
            ) from None
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise p.RpcError(p.ErrorCode.SANDBOX, f"port {port}: {exc.strerror or exc}") from None
            refused = refused or exc
    raise p.RpcError(p.ErrorCode.NOT_FOUND, f"nothing listens on port {port}") from None


class Tunnel:
    """One connection: ``down`` is the client's stream id (sandbox → client), ``up`` the client → sandbox
    inbound stream."""

    def __init__(
        self, ports: Ports, conn: Connection, sock: socket.socket, down: int, up: InboundStream
    ) -> None:
        self.ports = ports
        self.conn = conn
        self.sock = sock
        self.down = down
        self.up = up
        self.tasks: list[asyncio.Task] = []
        self.closed = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._pump_down()), loop.create_task(self._pump_up())]
        for task in self.tasks:
            task.add_done_callback(self._pump_done)

    async def _pump_down(self) -> None:
        loop = asyncio.get_running_loop()
        conn, sid, offset = self.conn, self.down, 0
        try:
            while True:
                try:
                    data = await loop.sock_recv(self.sock, READ_SIZE)
                except OSError as exc:  # reset by the server
                    await conn.end_stream(sid, error=[p.ErrorCode.SANDBOX.value, f"connection lost: {exc}"])
                    return
                if not data:
                    await conn.end_stream(sid)
                    return
                # Waits for credit: the next read happens only once the client can take it.
                await conn.send_stream(sid, 0, offset, data)
                offset += len(data)
        except (TransportClosed, p.RpcError):
            pass  # the client is gone or closed its side of the stream
        finally:
            conn.close_outbound(sid)

    async def _pump_up(self) -> None:
        loop = asyncio.get_running_loop()
        broken = False
        async for _fd, _offset, data in self.up:
            if broken:
                continue  # keep taking (and acknowledging) the client's bytes: it must never stall on credit
            try:
                await loop.sock_sendall(self.sock, data)
            except OSError:
                broken = True  # the server closed or reset; the down stream tells the client
        info = self.up.end_info or {}
        if info.get("error") or info.get("closed"):
            self.abort()  # the client gave up (or the connection dropped): no orderly shutdown
        elif not broken:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    def _pump_done(self, _task: asyncio.Task) -> None:
        if not all(t.done() for t in self.tasks):
            return
        self.abort()
        # Closed only once neither pump waits on it: a cancelled sock_recv/sock_sendall unregisters the fd
        # from the loop in a callback, and a closed fd could by then belong to another socket.
        self.sock.close()

    def abort(self) -> None:
        """Stop both directions now (idempotent); the socket closes once the pumps have stopped."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.conn.close_outbound(self.down)
        # InboundStream.close() without its await: drop_connection hooks are synchronous.
        self.up._end({"closed": True})
        self.conn._inbound.pop(self.up.id, None)
        self.ports.forget(self)


@component("ports")
class Ports:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.tunnels: dict[tuple[Connection, int], Tunnel] = {}

    def forget(self, tunnel: Tunnel) -> None:
        key = (tunnel.conn, tunnel.down)
        if self.tunnels.get(key) is tunnel:
            del self.tunnels[key]

    def drop_connection(self, conn: Connection) -> None:
        for key in [k for k in self.tunnels if k[0] is conn]:
            self.tunnels[key].abort()

    async def close(self) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel.abort()


def _ports(agent: Any) -> Ports:
    return agent.ports


@method("port.connect")
async def _connect(agent: Any, conn: Connection, params: dict) -> dict:
    port = _params.get(params, "port", int)
    if not 1 <= port <= 65535:
        raise _invalid(f"port must be in 1..65535, not {port}")
    down = _params.get_int(params, "stream", minimum=0)
    up_id = _params.get_int(params, "up_stream", minimum=0)
    window = _params.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1)
    ports = _ports(agent)
    if (conn, down) in ports.tunnels or down in conn._credits:
        raise _invalid(f"stream {down} is already in use")
    if up_id in conn._inbound:
        raise _invalid(f"stream {up_id} is already in use")
    # Claimed before the connect awaits, so a concurrent request cannot take the same ids.
    up = conn.open_inbound(up_id, UP_WINDOW)
    conn.open_outbound(down, window)
    try:
        sock = await connect_local(port)
    except BaseException:
        conn.close_outbound(down)
        await up.close()
        raise
    tunnel = Tunnel(ports, conn, sock, down, up)
    ports.tunnels[(conn, down)] = tunnel
    # The pumps first run after this handler has answered, so the answer precedes the first chunk.
    tunnel.start()
    return {"up_window": UP_WINDOW}


@method("port.close")
async def _close(agent: Any, conn: Connection, params: dict) -> dict:
    tunnel = _ports(agent).tunnels.get((conn, _params.get_int(params, "stream", minimum=0)))
    if tunnel is not None:
        tunnel.abort()
    return {}
