"""The agent object and the byte streams it serves on.

The agent's state (processes, contexts, watches...) outlives any one client
connection: a background process keeps running when the client that started it
goes away, and another connection can reattach to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from typing import Any

from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport

from . import __version__
from ._methods import COMPONENTS, METHODS, method
from ._reaper import Reaper

log = logging.getLogger("forkd.agent")

__all__ = ["Agent", "serve_unix", "serve_fd", "serve_device"]


class Agent:
    def __init__(
        self,
        *,
        sandbox_id: str = "",
        warm: dict | None = None,
        exit_when_idle: bool = False,
    ) -> None:
        self.sandbox_id = sandbox_id or socket.gethostname()
        self.warm = warm or {"marker": None}
        self.started_monotonic = time.monotonic()
        self.started_at = time.time()
        self.reaper = Reaper()
        self.connections: set[Connection] = set()
        self.exit_when_idle = exit_when_idle
        self.stopping = asyncio.Event()
        # Feature modules register components; each gets the agent.
        self.components: dict[str, Any] = {}
        for name, cls in COMPONENTS.items():
            comp = cls(self)
            self.components[name] = comp
            setattr(self, name, comp)

    async def start(self) -> None:
        self.reaper.install(asyncio.get_running_loop())
        for comp in self.components.values():
            start = getattr(comp, "start", None)
            if start is not None:
                await start()

    def notify(self, event: str) -> None:
        """Call each component's ``event()`` hook, if it has one (e.g. ``files_changed``)."""
        for comp in self.components.values():
            hook = getattr(comp, event, None)
            if hook is not None:
                hook()

    async def close(self) -> None:
        for conn in list(self.connections):
            await conn.close("agent stopping")
        for comp in self.components.values():
            close = getattr(comp, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        with contextlib.suppress(Exception):
            self.reaper.uninstall(asyncio.get_running_loop())

    async def handle(self, conn: Connection, name: str, params: dict) -> Any:
        fn = METHODS.get(name)
        if fn is None:
            raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"unknown method '{name}'")
        return await fn(self, conn, params)

    def attach(self, transport, name: str = "") -> Connection:
        conn = Connection(transport, self.handle, name=name or "client")
        self.connections.add(conn)
        conn.add_close_callback(self._dropped)
        return conn.start()

    def _dropped(self, conn: Connection) -> None:
        self.connections.discard(conn)
        for comp in self.components.values():
            drop = getattr(comp, "drop_connection", None)
            if drop is not None:
                try:
                    drop(conn)
                except Exception:
                    log.exception("dropping a connection failed")

    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic


# -- core methods -----------------------------------------------------------


def hello_result(params: dict, sandbox_id: str) -> dict:
    version = params.get("version")
    if version != p.PROTOCOL_VERSION:
        raise p.RpcError(
            p.ErrorCode.PROTOCOL,
            f"protocol version {version!r} is not supported; this agent speaks {p.PROTOCOL_VERSION}",
        )
    return {"version": p.PROTOCOL_VERSION, "agent": __version__, "sandbox_id": sandbox_id}


def ping_result() -> dict:
    return {"pong": True, "time": time.time()}


@method("hello")
async def _hello(agent: Agent, conn: Connection, params: dict) -> dict:
    return hello_result(params, agent.sandbox_id)


@method("ping")
async def _ping(agent: Agent, conn: Connection, params: dict) -> dict:
    return ping_result()


@method("info")
async def _info(agent: Agent, conn: Connection, params: dict) -> dict:
    return {
        "agent": __version__,
        "protocol": p.PROTOCOL_VERSION,
        "pid": os.getpid(),
        "uptime": agent.uptime(),
        "started_at": agent.started_at,
        "sandbox_id": agent.sandbox_id,
        "hostname": socket.gethostname(),
        "warm": agent.warm,
        "methods": sorted(METHODS),
    }


# -- byte streams -----------------------------------------------------------


async def serve_unix(agent: Agent, path: str) -> asyncio.AbstractServer:
    """Listen on a unix socket (mode 0600); each accepted client is one connection."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent.attach(StreamTransport(reader, writer), name=f"unix:{path}")

    # Listen under a temporary name and rename into place: whoever sees the
    # path can connect at once (no window between bind and listen).
    tmp = f"{path}.{os.getpid()}.tmp"
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(accepted, tmp, limit=StreamTransport.READ_SIZE)
    finally:
        os.umask(old)
    os.rename(tmp, path)
    return server


async def serve_fd(agent: Agent, fd: int, initial: bytes = b"") -> None:
    """Serve one connection on an inherited stream socket until it closes.
    ``initial``: bytes already read from it (see _lazy)."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    transport = await StreamTransport.from_socket(sock, initial=initial)
    conn = agent.attach(transport, name=f"fd:{fd}")
    await conn.wait_closed()


async def serve_device(agent: Agent, path: str, retry_delay: float = 0.05) -> None:
    """Serve a character device (virtio-serial port), reopening it after each hang-up:
    the host end may disconnect and reconnect many times over a sandbox's life."""
    loop = asyncio.get_running_loop()
    while not agent.stopping.is_set():
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("cannot open %s: %s", path, exc)
            await asyncio.sleep(retry_delay)
            continue
        rfile = os.fdopen(fd, "rb", buffering=0)
        wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
        reader = asyncio.StreamReader(limit=StreamTransport.READ_SIZE)
        await loop.connect_read_pipe(lambda r=reader: asyncio.StreamReaderProtocol(r), rfile)
        wtransport, wproto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
        writer = asyncio.StreamWriter(wtransport, wproto, reader, loop)
        conn = agent.attach(StreamTransport(reader, writer), name=f"device:{path}")
        await conn.wait_closed()
        await asyncio.sleep(retry_delay)
