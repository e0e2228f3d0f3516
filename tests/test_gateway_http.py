"""The gateway over a real uvicorn server on 127.0.0.1: websocket sessions with API keys, /health,
/metrics, frame limits, and refusing to serve a network without keys."""

import asyncio
import json

import httpx
import msgpack
import pytest
import pytest_asyncio
from gateway_harness import Client, make_config

from forkd import protocol as p
from forkd._exceptions import AuthenticationException
from forkd.protocol import ErrorCode, RpcError
from forkd_gateway._app import running_server
from forkd_gateway._auth import ApiKeys, AuthConfigError
from forkd_gateway._gateway import Gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-9876543210"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(template_store, tmp_path_factory):
    cfg = make_config(template_store, tmp_path_factory.mktemp("gw") / "state", keys=ApiKeys(KEYS))
    gateway = Gateway(cfg)
    await gateway.start()
    async with running_server(gateway, "127.0.0.1", 0) as url:
        yield gateway, url
    await gateway.close()


async def test_exec_and_files_over_the_websocket(server):
    gw, url = server
    c = await Client.websocket(url, KEYS["alice"])
    try:
        hello = await c.call("hello", version=1)
        assert hello["key_id"] == "alice"
        sid = await c.create()
        out, end = await c.run(sid, "head -c 3000000 /dev/zero | tr '\\0' a; echo done >&2")
        assert out[1] == b"a" * 3_000_000 and out[2] == b"done\n" and end["exit_code"] == 0
        await c.call("files.write", sandbox_id=sid, path="/tmp/x.txt", data="hello", user="root")
        rs = c.conn.open_inbound()
        await c.call("files.read", sandbox_id=sid, path="/tmp/x.txt", stream=rs.id)
        assert b"".join([d async for _, _, d in rs]) == b"hello"
        assert (await c.call("sandbox.eval", sandbox_id=sid, expr="3*3"))["value"] == 9
        bob = await Client.websocket(url, KEYS["bob"])
        with pytest.raises(RpcError) as exc:
            await bob.call("sandbox.info", sandbox_id=sid)
        assert exc.value.code is ErrorCode.SANDBOX_NOT_FOUND
        await bob.close()
        assert await c.call("sandbox.kill", sandbox_id=sid) is True
    finally:
        await c.close()
    lines = [json.loads(x) for x in gw.audit.path.read_text().splitlines()]
    assert {"create", "kill"} <= {r["event"] for r in lines if r["sandbox_id"] == sid}
    assert all(r["key_id"] == "alice" for r in lines if r["sandbox_id"] == sid)
    text = gw.audit.path.read_text()
    assert not any(key in text for key in KEYS.values())  # key ids only, never keys


async def test_wrong_or_missing_keys_are_refused_at_the_handshake(server):
    _, url = server
    for key in (None, "nope", KEYS["alice"] + "x"):
        with pytest.raises(AuthenticationException):
            await Client.websocket(url, key)


async def test_browser_style_key_in_the_subprotocol_and_x_api_key(server):
    from websockets.asyncio.client import connect

    _, url = server
    ws_url = url.replace("http://", "ws://") + "/v1/ws"
    async with connect(ws_url, subprotocols=[p.SUBPROTOCOL, "forkd.key." + KEYS["bob"]]) as ws:
        assert ws.subprotocol == p.SUBPROTOCOL  # the key is never echoed back
        await ws.send(p.encode(p.Request(1, "hello", {"version": 1})))
        reply = p.decode(await ws.recv())
        assert reply.result["key_id"] == "bob"
    async with connect(ws_url, additional_headers={"X-API-Key": KEYS["alice"]}) as ws:
        await ws.send(p.encode(p.Request(1, "hello", {"version": 1})))
        assert p.decode(await ws.recv()).result["key_id"] == "alice"


async def test_frame_limits_over_the_websocket(server):
    from websockets.asyncio.client import connect

    _, url = server
    ws_url = url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    async with connect(ws_url, additional_headers=headers, max_size=None) as ws:
        await ws.send(b"\x00" * (p.MAX_FRAME_SIZE + 10))  # over the frame limit: a typed error, then on
        note = p.decode(await ws.recv())
        assert note.method == "error" and note.params["error"][0] == "protocol_error"
        await ws.send("text is not a frame")
        assert p.decode(await ws.recv()).params["error"][0] == "protocol_error"
        await ws.send(msgpack.packb([0, 5, "ping", {}]))
        assert p.decode(await ws.recv()).result["pong"] is True
    async with connect(ws_url, additional_headers=headers, max_size=None) as ws:
        with pytest.raises(Exception) as exc:  # over what the server buffers at all: closed
            await ws.send(b"\x00" * (3 * p.MAX_FRAME_SIZE))
            await asyncio.wait_for(ws.recv(), 10)
        assert "1009" in str(exc.value)


async def test_health_and_metrics(server):
    _, url = server
    async with httpx.AsyncClient(base_url=url) as http:
        health = await http.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "ok" and body["backend"] == "process" and "base" in body["pools"]
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "forkd_sandboxes_active",
            "forkd_pool_ready",
            "forkd_create_seconds",
            "forkd_spawn_seconds",
        ):
            assert name in metrics.text


async def test_no_keys_means_loopback_only(template_store, tmp_path):
    gateway = Gateway(make_config(template_store, tmp_path / "state", pools={}))
    with pytest.raises(AuthConfigError):
        async with running_server(gateway, "0.0.0.0", 0):
            pass
    # Without keys, every loopback client is the local owner and anything else is refused.
    assert gateway.authenticate(None, "127.0.0.1") == "local"
    assert gateway.authenticate("whatever", "::1") == "local"
    assert gateway.authenticate(None, "10.1.2.3") is None
    assert gateway.authenticate(None, "::ffff:127.0.0.1") == "local"
    keyed = Gateway(make_config(template_store, tmp_path / "s2", pools={}, keys=ApiKeys({"a": "k-a"})))
    assert keyed.authenticate(None, "127.0.0.1") is None
    assert keyed.authenticate("k-a", "10.1.2.3") == "a"
