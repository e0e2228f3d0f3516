import asyncio
import os

import pytest

from forkd import protocol as p
from forkd._transports import StreamTransport


async def test_hello_ping_info(agent, agent_proc):
    info = await agent.request("info")
    assert info["pid"] == agent_proc.proc.pid
    assert info["protocol"] == p.PROTOCOL_VERSION
    assert info["uptime"] >= 0
    assert "exec.start" in info["methods"] or "ping" in info["methods"]
    assert (await agent.request("ping"))["pong"] is True


async def test_wrong_version_is_refused(agent):
    with pytest.raises(p.RpcError) as ei:
        await agent.request("hello", {"version": 999})
    assert ei.value.code == p.ErrorCode.PROTOCOL


async def test_unknown_method_gets_typed_error_and_agent_survives(agent):
    with pytest.raises(p.RpcError) as ei:
        await agent.request("no.such.method", {})
    assert ei.value.code == p.ErrorCode.UNKNOWN_METHOD
    assert (await agent.request("ping"))["pong"]


async def test_garbage_and_oversized_frames_do_not_kill_the_agent(agent_proc):
    reader, writer = await asyncio.open_unix_connection(agent_proc.sock)
    t = StreamTransport(reader, writer)
    # Not msgpack at all.
    writer.write(p.frame(b"\xc1\xc1\xc1"))
    # A request with params of the wrong type: answered with an error to its id.
    import msgpack

    writer.write(p.frame(msgpack.packb([0, 7, "ping", "not-a-map"])))
    # An oversized frame: header says 64 MiB, we send a little of it, then close.
    writer.write((64 * 1024 * 1024).to_bytes(4, "big") + b"x" * 1000)
    await writer.drain()
    seen = []
    for _ in range(3):
        seen.append(p.decode(await asyncio.wait_for(t.recv(), 5)))
    kinds = sorted(type(m).__name__ for m in seen)
    assert kinds == ["Notification", "Notification", "Response"], seen
    resp = next(m for m in seen if isinstance(m, p.Response))
    assert resp.id == 7 and resp.error.code == p.ErrorCode.PROTOCOL
    await t.close()
    # A fresh connection still works: the agent did not die.
    conn = await agent_proc.connect()
    assert (await conn.request("ping"))["pong"]
    await conn.close()
    assert agent_proc.proc.poll() is None


async def test_cancel_and_request_timeout(agent):
    with pytest.raises(p.RpcError) as ei:
        await agent.request("ping", {}, timeout=0)
    assert ei.value.code == p.ErrorCode.TIMEOUT
    assert (await agent.request("ping"))["pong"]


async def test_socket_is_private(agent_proc):
    assert os.stat(agent_proc.sock).st_mode & 0o077 == 0
