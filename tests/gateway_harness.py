"""Helpers for the gateway tests: a config on the test templates, and protocol clients (in memory or websocket)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from forkd._connection import Connection
from forkd._transports import memory_pair
from forkd_gateway._config import GatewayConfig, PoolConfig
from forkd_gateway._gateway import Gateway


def make_config(template_store, state_dir, **kw) -> GatewayConfig:
    kw.setdefault("pools", {"base": PoolConfig(min_ready=2, max_total=32)})
    kw.setdefault("heartbeat", 0)
    return GatewayConfig(
        backend="process",
        state_dir=Path(state_dir),
        templates_dir=template_store.root.parent,
        **kw,
    )


@contextlib.asynccontextmanager
async def started_gateway(template_store, state_dir, **kw):
    """A started Gateway on ``make_config(...)``, closed (sandboxes killed) on exit."""
    gateway = Gateway(make_config(template_store, state_dir, **kw))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()


class Client:
    """A protocol client of the gateway (what the SDK does underneath)."""

    def __init__(self, conn: Connection, served: asyncio.Task | None = None) -> None:
        self.conn = conn
        self.served = served
        self.notes: list[tuple[str, dict]] = []
        conn.on_notification = self._note

    def _note(self, _conn, method: str, params: dict) -> None:
        self.notes.append((method, params))

    @classmethod
    async def memory(cls, gateway, key_id: str = "k1", hello: bool = True) -> Client:
        ours, theirs = memory_pair()
        served = asyncio.get_running_loop().create_task(gateway.serve(theirs, key_id))
        client = cls(Connection(ours, name="test-client").start(), served)
        if hello:
            await client.call("hello", version=1, client="tests")
        return client

    @classmethod
    async def websocket(cls, url: str, key: str | None = None, hello: bool = True) -> Client:
        from forkd._websocket import WebSocketTransport

        transport = await WebSocketTransport.connect(url, api_key=key)
        client = cls(Connection(transport, name="test-ws-client").start())
        if hello:
            await client.call("hello", version=1, client="tests")
        return client

    async def call(self, method: str, _timeout: float | None = 30, **params):
        return await self.conn.request(method, params, timeout=_timeout)

    async def create(self, **params) -> str:
        return (await self.call("sandbox.create", **params))["sandbox_id"]

    async def run(self, sandbox_id: str, cmd: str, **params) -> tuple[dict[int, bytes], dict]:
        """exec.start with a stream; returns ({fd: output}, stream.end info)."""
        stream = self.conn.open_inbound()
        await self.call("exec.start", sandbox_id=sandbox_id, cmd=cmd, stream=stream.id, user="root", **params)
        out: dict[int, bytearray] = {}
        async for fd, _offset, data in stream:
            out.setdefault(fd, bytearray()).extend(data)
        return {fd: bytes(b) for fd, b in out.items()}, stream.end_info

    async def close(self) -> None:
        await self.conn.close()
        if self.served is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.served, 10)


async def eventually(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return predicate()
