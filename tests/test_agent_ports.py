"""port.connect / port.close against the real agent: a TCP server in this process (the agent subprocess
shares the host's loopback), bytes both ways, half close, backpressure, refused and bad ports, clean-up."""

from __future__ import annotations

import asyncio
import socket

import pytest

from forkd import protocol as p
from forkd.protocol import ErrorCode, RpcError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A TCP server on 127.0.0.1 whose per-connection behaviour is the test's ``handler``."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.done: asyncio.Queue = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader, writer):
            try:
                result = await self.handler(reader, writer)
            except Exception as exc:
                result = exc
            writer.close()
            self.done.put_nowait(result)

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def open_tunnel(conn, port: int, window: int = p.DEFAULT_WINDOW):
    down = conn.open_inbound(None, window)
    up = conn.new_stream_id()
    res = await conn.request(
        "port.connect", {"port": port, "stream": down.id, "up_stream": up, "window": window}
    )
    conn.open_outbound(up, res["up_window"])
    return down, up


async def read_all(down) -> bytes:
    return b"".join([data async for _fd, _offset, data in down])


async def test_bytes_both_ways_and_half_close(agent):
    async def answer_after_eof(reader, writer):
        data = await reader.read()  # until the client's half close
        writer.write(b"got " + str(len(data)).encode() + b"\n" + data[::-1])
        await writer.drain()
        return data

    payload = bytes(range(256)) * 12_000  # ~3 MB: several chunks and window acks
    async with Server(answer_after_eof) as srv:
        down, up = await open_tunnel(agent, srv.port)
        for i in range(0, len(payload), p.CHUNK_SIZE):
            await agent.send_stream(up, 0, i, payload[i : i + p.CHUNK_SIZE])
        await agent.end_stream(up)
        got = await read_all(down)
        assert await asyncio.wait_for(srv.done.get(), 10) == payload
    assert got == f"got {len(payload)}\n".encode() + payload[::-1]
    assert down.error is None


async def test_server_closing_first_ends_the_down_stream_and_up_still_flows(agent):
    async def greet_then_read(reader, writer):
        writer.write(b"hello\n")
        writer.write_eof()  # the server half-closes; the client's direction stays open
        return await reader.read()

    async with Server(greet_then_read) as srv:
        down, up = await open_tunnel(agent, srv.port)
        assert await read_all(down) == b"hello\n"
        await agent.send_stream(up, 0, 0, b"late bytes")
        await agent.end_stream(up)
        assert await asyncio.wait_for(srv.done.get(), 10) == b"late bytes"


async def test_nothing_listening_is_a_typed_error(agent):
    port = free_port()
    with pytest.raises(RpcError) as exc:
        await open_tunnel(agent, port)
    assert exc.value.code is ErrorCode.NOT_FOUND
    assert f"nothing listens on port {port}" in exc.value.message
    # The ids it claimed are free again.
    async with Server(lambda r, w: r.read()) as srv:
        down = agent.open_inbound(None)
        await agent.request("port.connect", {"port": srv.port, "stream": down.id, "up_stream": 1})
        await agent.request("port.close", {"stream": down.id})


async def test_bad_port_is_invalid_argument(agent):
    for port in (0, 65536, -1, "80", 80.0, True, None):
        with pytest.raises(RpcError) as exc:
            await agent.request("port.connect", {"port": port, "stream": 1, "up_stream": 1})
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT, port


async def test_stream_in_use_is_invalid_argument(agent):
    async with Server(lambda r, w: r.read()) as srv:
        down, up = await open_tunnel(agent, srv.port)
        with pytest.raises(RpcError) as exc:
            await agent.request("port.connect", {"port": srv.port, "stream": down.id, "up_stream": 999})
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT
        with pytest.raises(RpcError) as exc:
            await agent.request("port.connect", {"port": srv.port, "stream": 998, "up_stream": up})
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT


async def test_a_slow_client_holds_the_server_back(agent):
    total = 64 * 1024 * 1024
    written = 0

    async def firehose(reader, writer):
        nonlocal written
        block = b"x" * 65536
        try:
            while written < total:
                writer.write(block)
                await writer.drain()
                written += len(block)
        except ConnectionError:
            pass
        return written

    async with Server(firehose) as srv:
        down, _up = await open_tunnel(agent, srv.port, window=64 * 1024)
        await asyncio.sleep(0.5)  # the client reads nothing meanwhile
        # Socket buffers take a few MB; without credit the agent would have taken all 64 MB.
        assert written < total // 2
        await agent.request("port.close", {"stream": down.id})
        assert await asyncio.wait_for(srv.done.get(), 10) < total


async def test_port_close_and_an_error_end_abort_the_connection(agent):
    async def wait_for_eof(reader, writer):
        return await reader.read()

    async with Server(wait_for_eof) as srv:
        down, up = await open_tunnel(agent, srv.port)
        await agent.send_stream(up, 0, 0, b"partial")
        await agent.request("port.close", {"stream": down.id})
        assert await asyncio.wait_for(srv.done.get(), 10) == b"partial"
        assert await agent.request("port.close", {"stream": down.id}) == {}  # unknown now: still fine

        down, up = await open_tunnel(agent, srv.port)
        await agent.end_stream(up, error=[ErrorCode.CANCELLED.value, "client gave up"])
        assert await asyncio.wait_for(srv.done.get(), 10) == b""


async def test_a_dropped_connection_closes_its_tunnels(agent_proc, agent):
    async def wait_for_eof(reader, writer):
        return await reader.read()

    async with Server(wait_for_eof) as srv:
        other = await agent_proc.connect()
        await open_tunnel(other, srv.port)
        await other.close()
        assert await asyncio.wait_for(srv.done.get(), 10) == b""
    assert (await agent.request("ping"))["pong"] is True
