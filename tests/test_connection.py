"""The Connection engine over an in-memory transport pair: requests, cancellation,
shutdown and credit-windowed streams, observed from both sides."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_harness import wait_for
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import TransportClosed, memory_pair


class Server:
    """A scriptable peer: its handlers record what happened to them."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self.gates: dict[int, asyncio.Event] = {}
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.sent = 0  # stream bytes the producer got through send_stream
        self.producer_error: BaseException | None = None

    async def handle(self, conn: Connection, method: str, params: dict):
        fn = getattr(self, "do_" + method.replace(".", "_"), None)
        if fn is None:
            raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"unknown method '{method}'")
        return await fn(conn, params)

    async def do_ping(self, conn, params):
        return {"pong": True}

    async def do_gate(self, conn, params):
        i = params["i"]
        self.gates.setdefault(i, asyncio.Event())
        self.started.append(i)
        await self.gates[i].wait()
        return i

    async def do_hang(self, conn, params):
        self.started.append(params["tag"])
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled.append(params["tag"])
            raise

    async def do_fail(self, conn, params):
        if params["kind"] == "rpc":
            raise p.RpcError(params["code"], params["message"])
        if params["kind"] == "unencodable":
            return {"value": object()}
        if params["kind"] == "huge":
            return b"x" * (p.MAX_FRAME_SIZE + 1)
        raise ValueError("boom")

    async def do_produce(self, conn, params):
        sid, chunk, total = params["stream"], params["chunk"], params["total"]
        conn.open_outbound(sid, params["window"])
        try:
            offset = 0
            while offset < total:
                data = bytes([offset // chunk % 251]) * min(chunk, total - offset)
                await conn.send_stream(sid, p.FD_STDOUT, offset, data)
                offset += len(data)
                self.sent = offset
        except BaseException as exc:
            self.producer_error = exc
            raise
        await conn.end_stream(sid, exit_code=0, reason="exited")
        return {"sent": offset}

    async def do_flood(self, conn, params):
        # A broken peer: ignores its credit entirely.
        offset = 0
        for _ in range(params["chunks"]):
            await conn.send(p.StreamData(params["stream"], p.FD_STDOUT, offset, b"f" * p.CHUNK_SIZE))
            offset += p.CHUNK_SIZE
        return {"sent": offset}

    async def do_end(self, conn, params):
        sid = params.pop("stream")
        conn.open_outbound(sid, p.DEFAULT_WINDOW)
        await conn.send_stream(sid, p.FD_STDERR, 0, b"last words")
        await conn.end_stream(sid, **params)
        return None


@pytest.fixture
async def pair():
    a, b = memory_pair()
    server = Server()
    server.conn = Connection(b, server.handle, name="server").start()
    client = Connection(a, name="client").start()
    yield client, server
    await client.close()
    await server.conn.close()


async def settle(rounds: int = 50) -> None:
    """Let every runnable task run until nothing changes (no wall-clock waits)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


# -- requests ---------------------------------------------------------------


async def test_concurrent_requests_are_answered_out_of_order(pair):
    client, server = pair
    done: list[int] = []

    async def call(i: int) -> None:
        assert await client.request("gate", {"i": i}) == i
        done.append(i)

    tasks = [asyncio.create_task(call(i)) for i in range(5)]
    await wait_for(lambda: len(server.started) == 5)
    # Handlers started in request order, all at once.
    assert server.started == [0, 1, 2, 3, 4]
    for i in reversed(range(5)):
        server.gates[i].set()
        await wait_for(lambda i=i: i in done)
    await asyncio.gather(*tasks)
    assert done == [4, 3, 2, 1, 0]


@pytest.mark.parametrize("code", [c for c in p.ErrorCode if c is not p.ErrorCode.CANCELLED])
async def test_handler_rpc_errors_keep_their_code(pair, code):
    client, _ = pair
    with pytest.raises(p.RpcError) as ei:
        await client.request("fail", {"kind": "rpc", "code": code.value, "message": f"why: {code}"})
    assert ei.value.code == code and ei.value.message == f"why: {code}"
    assert await client.request("ping") == {"pong": True}


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("crash", "ValueError: boom"),
        ("unencodable", "unencodable result"),
        ("huge", "exceeds the frame limit"),
    ],
)
async def test_failed_handler_is_a_sandbox_error_and_connection_survives(pair, kind, fragment):
    client, _ = pair
    with pytest.raises(p.RpcError) as ei:
        await client.request("fail", {"kind": kind}, timeout=10)
    assert ei.value.code == p.ErrorCode.SANDBOX
    assert fragment in ei.value.message
    assert await client.request("ping") == {"pong": True}


async def test_unknown_method_and_missing_handler(pair):
    client, server = pair
    with pytest.raises(p.RpcError) as ei:
        await client.request("no.such.thing")
    assert ei.value.code == p.ErrorCode.UNKNOWN_METHOD
    # The client side has no handler at all: a request to it is refused, not dropped.
    with pytest.raises(p.RpcError) as ei:
        await server.conn.request("anything", timeout=10)
    assert ei.value.code == p.ErrorCode.UNKNOWN_METHOD
    assert await client.request("ping") == {"pong": True}


async def test_oversized_request_is_refused_locally(pair):
    client, _ = pair
    with pytest.raises(p.FrameTooLarge):
        await client.request("ping", {"blob": b"x" * (p.MAX_FRAME_SIZE + 1)})
    assert await client.request("ping") == {"pong": True}


# -- cancellation -----------------------------------------------------------


async def test_timeout_sends_cancel_and_the_handler_is_cancelled(pair):
    client, server = pair
    with pytest.raises(p.RpcError) as ei:
        await client.request("hang", {"tag": "t1"}, timeout=0.2)
    assert ei.value.code == p.ErrorCode.TIMEOUT
    await wait_for(lambda: server.cancelled == ["t1"])
    assert not server.conn._handlers
    # The late "cancelled" answer to the abandoned id confuses nothing.
    assert await client.request("ping") == {"pong": True}


async def test_cancelling_the_caller_cancels_the_handler(pair):
    client, server = pair
    task = asyncio.create_task(client.request("hang", {"tag": "t2"}))
    await wait_for(lambda: server.started == ["t2"])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: server.cancelled == ["t2"])
    assert not client._pending


async def test_explicit_cancel_answers_cancelled(pair):
    client, server = pair
    # Drive the wire by hand to see the response the handler's cancellation produces.
    fut = asyncio.get_running_loop().create_future()
    client._pending[4242] = fut
    await client.send(p.Request(4242, "hang", {"tag": "t3"}))
    await wait_for(lambda: server.started == ["t3"])
    await client.notify("cancel", {"id": 4242})
    with pytest.raises(p.RpcError) as ei:
        await asyncio.wait_for(fut, 5)
    assert ei.value.code == p.ErrorCode.CANCELLED
    assert server.cancelled == ["t3"]


@pytest.mark.parametrize("closing", ["server", "client"])
async def test_close_fails_pending_requests_and_cancels_handlers(pair, closing):
    client, server = pair
    calls = [asyncio.create_task(client.request("hang", {"tag": i})) for i in range(3)]
    await wait_for(lambda: len(server.started) == 3)
    await (server.conn if closing == "server" else client).close()
    for call in calls:
        with pytest.raises(TransportClosed) as ei:
            await asyncio.wait_for(call, 5)
        assert ei.value.code == p.ErrorCode.SANDBOX_UNREACHABLE
    await wait_for(lambda: sorted(server.cancelled) == [0, 1, 2])
    await wait_for(lambda: client.closed.is_set() and server.conn.closed.is_set())
    with pytest.raises(TransportClosed):
        await client.request("ping")


# -- streams ----------------------------------------------------------------


async def test_sender_stops_at_its_window_and_resumes_as_the_receiver_consumes(pair):
    client, server = pair
    window, chunk, total = 64 * 1024, 8 * 1024, 512 * 1024
    stream = client.open_inbound(window=window)
    call = asyncio.create_task(
        client.request("produce", {"stream": stream.id, "window": window, "chunk": chunk, "total": total})
    )
    consumed = 0
    worst = 0

    async def stalled() -> int:
        # The producer has stopped: nothing changes however long the loop spins.
        await wait_for(lambda: server.sent - consumed >= window)
        before = server.sent
        await settle()
        assert server.sent == before, "sender kept going past its credit"
        return before

    # Consumer paused from the start: the sender must stop after one window (plus one chunk).
    sent = await stalled()
    assert window <= sent <= window + chunk
    got = bytearray()
    expect_offset = 0
    async for fd, offset, data in stream:
        assert fd == p.FD_STDOUT and offset == expect_offset
        expect_offset += len(data)
        got += data
        consumed += len(data)
        # Bytes sent and not yet consumed: bounded by what the sender may have unacknowledged.
        worst = max(worst, server.sent - consumed)
        if consumed == total // 2:
            # Pause again mid-way: the sender runs one window ahead of the consumer, no more.
            sent = await stalled()
            assert sent - consumed <= window + chunk
    assert worst <= window + chunk
    assert consumed == total
    assert got == b"".join(bytes([i % 251]) * chunk for i in range(total // chunk))
    assert stream.end_info == {"stream": stream.id, "exit_code": 0, "reason": "exited"}
    assert stream.error is None
    assert await call == {"sent": total}


async def test_stream_end_info_reaches_the_receiver(pair):
    client, _ = pair
    stream = client.open_inbound()
    await client.request(
        "end", {"stream": stream.id, "exit_code": None, "signal": 9, "error": ["timeout", "killed after 1 s"]}
    )
    items = [item async for item in stream]
    assert items == [(p.FD_STDERR, 0, b"last words")]
    assert stream.end_info == {
        "stream": stream.id,
        "exit_code": None,
        "signal": 9,
        "error": ["timeout", "killed after 1 s"],
    }
    assert stream.error.code == p.ErrorCode.TIMEOUT and stream.error.message == "killed after 1 s"
    # A finished stream is forgotten, so a late frame for its id goes nowhere.
    assert stream.id not in client._inbound


async def test_peer_that_ignores_its_window_gets_its_stream_ended(pair):
    client, _ = pair
    window = 64 * 1024
    stream = client.open_inbound(window=window)
    chunks = (window + p.MAX_FRAME_SIZE) // p.CHUNK_SIZE + 2
    assert await client.request("flood", {"stream": stream.id, "chunks": chunks}) == {
        "sent": chunks * p.CHUNK_SIZE
    }
    received = 0
    async for _fd, _offset, data in stream:
        received += len(data)
    assert received <= window + p.MAX_FRAME_SIZE
    assert stream.error is not None and stream.error.code == p.ErrorCode.PROTOCOL
    # Only that stream is affected.
    assert await client.request("ping") == {"pong": True}


async def test_blocked_sender_fails_when_the_connection_closes(pair):
    client, server = pair
    window = 16 * 1024
    stream = client.open_inbound(window=window)
    call = asyncio.create_task(
        client.request(
            "produce", {"stream": stream.id, "window": window, "chunk": 4096, "total": 10 * window}
        )
    )
    await wait_for(lambda: server.sent >= window)
    await client.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(call, 5)
    await wait_for(lambda: server.producer_error is not None)
    assert isinstance(server.producer_error, TransportClosed | asyncio.CancelledError)
    assert stream.error is not None and stream.error.code == p.ErrorCode.SANDBOX_UNREACHABLE


async def test_send_stream_without_credit_after_close_does_not_hang(pair):
    client, server = pair
    server.conn.open_outbound(99, 10)
    await server.conn.send_stream(99, p.FD_STDOUT, 0, b"x" * 10)  # credit now spent
    await server.conn.close()
    with pytest.raises(TransportClosed):
        await asyncio.wait_for(server.conn.send_stream(99, p.FD_STDOUT, 10, b"y"), 5)


async def test_send_stream_on_a_closed_stream_is_cancelled(pair):
    client, server = pair
    server.conn.open_outbound(7, 10)
    server.conn.close_outbound(7)
    with pytest.raises(p.RpcError) as ei:
        await server.conn.send_stream(7, p.FD_STDOUT, 0, b"x")
    assert ei.value.code == p.ErrorCode.CANCELLED


# -- hostile control messages -----------------------------------------------

NASTY = [
    ("stream.ack", {"stream": [1], "bytes": 10}),
    ("stream.ack", {"stream": {"a": 1}, "bytes": 10}),
    ("stream.ack", {"stream": 1, "bytes": "lots"}),
    ("stream.ack", {"stream": 1, "bytes": -(2**40)}),
    ("stream.end", {"stream": [1]}),
    ("stream.end", {"stream": 1, "error": 5}),
    ("stream.end", {"stream": 1, "error": "boom"}),
    ("stream.end", {"stream": 1, "error": [None]}),
    ("cancel", {"id": [1]}),
    ("cancel", {"id": {}}),
    ("cancel", {}),
]


@pytest.mark.parametrize(("method", "params"), NASTY)
async def test_malformed_control_messages_leave_the_connection_up(pair, method, params):
    client, server = pair
    stream = client.open_inbound(1)
    server.conn.open_outbound(1, 1024)
    # Each side sends it to the other.
    await server.conn.notify(method, params)
    await client.notify(method, params)
    assert await client.request("ping", timeout=10) == {"pong": True}
    with pytest.raises(p.RpcError) as ei:  # the client has no handler: refused, but answered
        await server.conn.request("x", timeout=10)
    assert ei.value.code == p.ErrorCode.UNKNOWN_METHOD
    # A stream error, whatever the peer put in it, reads as an RpcError.
    err = stream.error
    assert err is None or isinstance(err, p.RpcError)
    assert not client.closed.is_set() and not server.conn.closed.is_set()


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["stream.ack", "stream.end", "cancel"]),
    st.fixed_dictionaries(
        {}, optional={"stream": json_like, "id": json_like, "bytes": json_like, "error": json_like}
    ),
)
def test_fuzzed_control_messages_leave_the_connection_up(method, params):
    async def run() -> None:
        a, b = memory_pair()
        server = Server()
        server.conn = Connection(b, server.handle, name="server").start()
        client = Connection(a, name="client").start()
        try:
            stream = client.open_inbound(1)
            await server.conn.notify(method, params)
            await client.notify(method, params)
            assert await client.request("ping", timeout=10) == {"pong": True}
            with pytest.raises(p.RpcError) as ei:
                await server.conn.request("x", timeout=10)
            assert ei.value.code == p.ErrorCode.UNKNOWN_METHOD
            err = stream.error
            assert err is None or isinstance(err, p.RpcError)
        finally:
            await client.close()
            await server.conn.close()

    asyncio.run(run())
