"""Bad input never crashes the gateway: each gets a typed error and the connection carries on."""

import asyncio

import msgpack
import pytest
import pytest_asyncio
from gateway_harness import Client, make_config, started_gateway

from forkd import protocol as p
from forkd._transports import memory_pair
from forkd.protocol import ErrorCode, RpcError
from forkd_gateway._gateway import Gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(template_store, tmp_path_factory):
    async with started_gateway(template_store, tmp_path_factory.mktemp("gw") / "state") as gateway:
        yield gateway


class Raw:
    """Frames by hand, to send what a well-behaved Connection never would."""

    def __init__(self, gw):
        self.t, theirs = memory_pair()
        self.served = asyncio.get_running_loop().create_task(gw.serve(theirs, "raw"))
        self.ids = iter(range(1, 10**6))

    async def send(self, body: bytes) -> None:
        await self.t.send(body)

    async def next(self) -> p.Message:
        while True:
            msg = p.decode(await asyncio.wait_for(self.t.recv(), 10))
            if not (isinstance(msg, p.Request) and msg.method == "ping"):
                return msg

    async def call(self, method, params) -> p.Response:
        rid = next(self.ids)
        await self.send(p.encode(p.Request(rid, method, params)))
        while True:
            msg = await self.next()
            if isinstance(msg, p.Response) and msg.id == rid:
                return msg

    async def close(self):
        await self.t.close()
        await asyncio.wait_for(self.served, 10)


async def expect_error(resp: p.Response, code: ErrorCode) -> str:
    assert resp.error is not None, resp
    assert resp.error.code is code, resp.error
    return resp.error.message


async def test_malformed_and_oversized_frames_get_error_notifications(gw):
    raw = Raw(gw)
    try:
        for body in (
            b"\xc1garbage",
            msgpack.packb({"not": "a frame"}),
            msgpack.packb([9, 1, 2]),
            b"\x00" * (p.MAX_FRAME_SIZE + 1),
        ):
            await raw.send(body)
            note = await raw.next()
            assert isinstance(note, p.Notification) and note.method == "error"
            assert note.params["error"][0] == "protocol_error"
        # A request with a bad params type is answered as that request.
        await raw.send(msgpack.packb([0, 77, "ping", [1, 2]]))
        resp = await raw.next()
        assert resp.id == 77 and resp.error.code is ErrorCode.PROTOCOL
        assert (await raw.call("ping", {})).result["pong"] is True  # still serving
    finally:
        await raw.close()


async def test_hello_is_required_and_versions_are_checked(gw):
    raw = Raw(gw)
    try:
        assert "hello" in await expect_error(await raw.call("sandbox.list", {}), ErrorCode.PROTOCOL)
        assert (await raw.call("ping", {})).error is None  # allowed before hello
        msg = await expect_error(await raw.call("hello", {"version": 99}), ErrorCode.PROTOCOL)
        assert "version 1" in msg
        await expect_error(await raw.call("hello", {"version": "1"}), ErrorCode.PROTOCOL)
        hello = await raw.call("hello", {"version": 1, "client": "raw"})
        assert hello.result["version"] == 1 and hello.result["key_id"] == "raw"
        assert (await raw.call("sandbox.list", {})).result == {"items": [], "next_token": None}
    finally:
        await raw.close()


async def test_unknown_methods_ids_and_missing_params(gw):
    c = await Client.memory(gw, "bad")
    sid = await c.create()
    cases = [
        ("no.such", {}, ErrorCode.UNKNOWN_METHOD),
        ("identity.refresh", {"sandbox_id": sid}, ErrorCode.UNKNOWN_METHOD),  # agent-private: not relayed
        ("exec.nope", {"sandbox_id": sid}, ErrorCode.UNKNOWN_METHOD),  # relayed; the agent says so
        ("exec.start", {"cmd": "true"}, ErrorCode.INVALID_ARGUMENT),  # no sandbox_id
        ("exec.start", {"sandbox_id": ["x"], "cmd": "true"}, ErrorCode.INVALID_ARGUMENT),
        ("exec.start", {"sandbox_id": "sbx-unknown", "cmd": "true"}, ErrorCode.SANDBOX_NOT_FOUND),
        ("exec.start", {"sandbox_id": sid}, ErrorCode.INVALID_ARGUMENT),  # no cmd: the agent's check
        ("exec.start", {"sandbox_id": sid, "cmd": "true", "stream": -1}, ErrorCode.INVALID_ARGUMENT),
        ("exec.start", {"sandbox_id": sid, "cmd": "true", "stream": "1"}, ErrorCode.INVALID_ARGUMENT),
        (
            "exec.start",
            {"sandbox_id": sid, "cmd": "true", "stream": 5, "window": 0},
            ErrorCode.INVALID_ARGUMENT,
        ),
        (
            "files.read",
            {"sandbox_id": sid, "path": "/etc/hostname", "stream": [1]},
            ErrorCode.INVALID_ARGUMENT,
        ),
        ("files.unwatch", {"sandbox_id": sid, "watch": "1"}, ErrorCode.INVALID_ARGUMENT),
        ("files.unwatch", {"sandbox_id": sid, "watch": 12345}, ErrorCode.NOT_FOUND),
        ("sandbox.kill", {}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.info", {"sandbox_id": 7}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"template": 5}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"template": "../etc"}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"template": "no-such-template"}, ErrorCode.TEMPLATE),
        ("sandbox.create", {"timeout": "soon"}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"metadata": {"k": 1}}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"envs": ["A=1"]}, ErrorCode.INVALID_ARGUMENT),
        ("sandbox.create", {"allow_internet_access": "yes"}, ErrorCode.INVALID_ARGUMENT),
    ]
    try:
        for method, params, code in cases:
            with pytest.raises(RpcError) as exc:
                await c.call(method, **params)
            assert exc.value.code is code, (method, params, exc.value)
        # A stream id already in use on this connection.
        stream = c.conn.open_inbound()
        await c.call("exec.start", sandbox_id=sid, cmd="sleep 5", stream=stream.id)
        with pytest.raises(RpcError) as exc:
            await c.call("exec.start", sandbox_id=sid, cmd="true", stream=stream.id)
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT and "in use" in exc.value.message
        # After all that, everything still works.
        out, end = await c.run(sid, "echo fine")
        assert out[1] == b"fine\n" and end["exit_code"] == 0
        assert "no-such-template" not in gw.pools
    finally:
        await c.call("sandbox.kill", sandbox_id=sid)
        await c.close()


async def test_a_client_that_ignores_its_window_cannot_flood_the_gateway(gw):
    c = await Client.memory(gw, "bad")
    sid = await c.create()
    try:
        ws = c.conn.new_stream_id()
        opened = await c.call("files.write_open", sandbox_id=sid, path="/tmp/flood", stream=ws, user="root")
        # Send far beyond the granted window without waiting for credit.
        chunk = b"x" * (1 << 20)
        for i in range(opened["window"] // len(chunk) + 8):
            await c.conn.send(p.StreamData(ws, 0, i * len(chunk), chunk))
        with pytest.raises(RpcError) as exc:
            await c.call("files.write_close", sandbox_id=sid, stream=ws)
        assert exc.value.code is ErrorCode.PROTOCOL, exc.value
        assert (await c.call("sandbox.eval", sandbox_id=sid, expr="1"))["value"] == 1
    finally:
        await c.call("sandbox.kill", sandbox_id=sid)
        await c.close()


async def test_idle_clients_are_pinged_and_dead_ones_dropped(template_store, tmp_path):
    gateway = Gateway(make_config(template_store, tmp_path / "state", pools={}, heartbeat=0.2))
    await gateway.start()
    try:
        live = await Client.memory(gateway, "hb")  # a Connection answers pings (unknown_method counts)
        deaf_end, theirs = memory_pair()
        deaf = asyncio.get_running_loop().create_task(gateway.serve(theirs, "hb"))
        ping = p.decode(await asyncio.wait_for(deaf_end.recv(), 5))
        assert isinstance(ping, p.Request) and ping.method == "ping"
        await asyncio.wait_for(deaf, 5)  # never answered: the gateway closed the session
        assert not live.conn.closed.is_set()
        assert (await live.call("ping"))["pong"] is True
        await live.close()
    finally:
        await gateway.close()
