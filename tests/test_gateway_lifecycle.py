"""Sandbox lifecycle through the gateway with the real process backend: warm-pool creates, kill, list,
leases, ownership between keys, the audit log and metrics."""

import asyncio
import json
import os
import signal
import time

import pytest
import pytest_asyncio
from gateway_harness import Client, eventually, make_config, started_gateway

from forkd.protocol import ErrorCode, RpcError
from forkd_gateway._config import PoolConfig
from forkd_gateway._gateway import Gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(template_store, tmp_path_factory):
    async with started_gateway(template_store, tmp_path_factory.mktemp("gw") / "state") as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def client(gw):
    c = await Client.memory(gw, "k1")
    yield c
    await c.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def audit(gw) -> list[dict]:
    return [json.loads(line) for line in gw.audit.path.read_text().splitlines()]


class SpawnSpy:
    """Records which task called the backend's spawn: the pool's background refill, or another (a request)."""

    def __init__(self, backend):
        self.backend = backend
        self.inner = backend.spawn
        self.callers: list[str] = []
        backend.spawn = self

    async def __call__(self, snapshot, n, options=None):
        self.callers.append(asyncio.current_task().get_coro().__qualname__)
        return await self.inner(snapshot, n, options)

    def restore(self):
        self.backend.spawn = self.inner

    @property
    def from_requests(self) -> int:
        return sum(c != "WarmPool._refill_loop" for c in self.callers)


async def test_create_takes_a_ready_child_without_forking(gw, client):
    pool = gw.pools["base"]
    assert await pool.wait_ready(2, timeout=30)
    ready = set(pool._ready)
    spy = SpawnSpy(gw.backend)
    try:
        t0 = time.perf_counter()
        info = await client.call("sandbox.create", template="base", metadata={"who": "t1"})
        elapsed = time.perf_counter() - t0
    finally:
        spy.restore()
    assert info["sandbox_id"] in ready  # one of the children that were waiting
    assert spy.from_requests == 0  # the request itself never forked (a refill afterwards may)
    assert elapsed < 1.0  # a fork-free create; generous for a loaded machine
    assert info["template_id"] == "base" and info["state"] == "running"
    assert info["metadata"] == {"who": "t1"}
    assert 299 < info["end_at"] - info["started_at"] <= 300.5


async def test_create_forks_on_demand_when_the_pool_is_empty(template_store, tmp_path):
    cfg = make_config(
        template_store, tmp_path / "state", pools={"base": PoolConfig(min_ready=0, max_total=2)}
    )
    async with Gateway(cfg) as gateway:
        spy = SpawnSpy(gateway.backend)
        c = await Client.memory(gateway)
        sid = await c.create()
        out, end = await c.run(sid, "echo forked")
        assert out[1] == b"forked\n" and end["exit_code"] == 0
        assert spy.from_requests == 1
        await c.create()
        with pytest.raises(RpcError) as exc:  # max_total reached: busy, not a hang
            await c.create()
        assert exc.value.code is ErrorCode.SERVICE_BUSY
        await c.close()


async def test_kill_ends_the_sandbox_and_its_process(gw, client):
    sid = await client.create()
    pid = gw.sandboxes[sid].child.pid
    assert (await client.call("sandbox.info", sandbox_id=sid))["sandbox_id"] == sid
    assert await client.call("sandbox.kill", sandbox_id=sid) is True
    assert await client.call("sandbox.kill", sandbox_id=sid) is False
    assert await eventually(lambda: not alive(pid))
    with pytest.raises(RpcError) as exc:
        await client.call("sandbox.info", sandbox_id=sid)
    assert exc.value.code is ErrorCode.SANDBOX_NOT_FOUND
    with pytest.raises(RpcError) as exc:
        await client.run(sid, "true")
    assert exc.value.code is ErrorCode.SANDBOX_NOT_RUNNING
    assert "killed" in exc.value.message
    assert sid not in [s["sandbox_id"] for s in (await client.call("sandbox.list"))["items"]]


async def test_list_filters_by_metadata_and_paginates(gw):
    c = await Client.memory(gw, "lister")
    try:
        ids = [await c.create(metadata={"i": str(i), "group": "a" if i < 3 else "b"}) for i in range(5)]
        seen, token, pages = [], None, 0
        while True:
            page = await c.call("sandbox.list", limit=2, next_token=token)
            pages += 1
            seen += [s["sandbox_id"] for s in page["items"]]
            token = page["next_token"]
            if token is None:
                break
        assert seen == ids and pages == 3  # creation order, nothing twice, nothing missed
        b = await c.call("sandbox.list", metadata={"group": "b"})
        assert [s["sandbox_id"] for s in b["items"]] == ids[3:]
        assert (await c.call("sandbox.list", metadata={"group": "b", "i": "4"}))["items"][0][
            "sandbox_id"
        ] == ids[4]
        assert (await c.call("sandbox.list", state=["paused"]))["items"] == []
        for bad in ({"limit": 0}, {"next_token": "%%%"}, {"state": ["zombie"]}, {"metadata": {"a": 1}}):
            with pytest.raises(RpcError) as exc:
                await c.call("sandbox.list", **bad)
            assert exc.value.code is ErrorCode.INVALID_ARGUMENT, bad
        for sid in ids:
            await c.call("sandbox.kill", sandbox_id=sid)
    finally:
        await c.close()


async def test_keys_see_and_touch_only_their_own_sandboxes(gw, client):
    sid = await client.create()
    other = await Client.memory(gw, "k2")
    try:
        for method, params in [
            ("sandbox.info", {}),
            ("sandbox.connect", {}),
            ("sandbox.set_timeout", {"timeout": 5}),
            ("exec.start", {"cmd": "true"}),
            ("files.read", {"path": "/etc/hostname", "stream": 1}),
            ("sandbox.eval", {"expr": "1"}),
        ]:
            with pytest.raises(RpcError) as exc:
                await other.call(method, sandbox_id=sid, **params)
            assert exc.value.code is ErrorCode.SANDBOX_NOT_FOUND, method
        assert await other.call("sandbox.kill", sandbox_id=sid) is False
        assert sid not in [s["sandbox_id"] for s in (await other.call("sandbox.list"))["items"]]
        # ... and an ended sandbox of another key is just as unknown (no "was killed" leak).
        await client.call("sandbox.kill", sandbox_id=sid)
        with pytest.raises(RpcError) as exc:
            await other.call("exec.start", sandbox_id=sid, cmd="true")
        assert exc.value.code is ErrorCode.SANDBOX_NOT_FOUND
    finally:
        await other.close()


async def test_set_timeout_shortens_and_connect_only_extends(gw, client):
    sid = await client.create(timeout=100)
    info = await client.call("sandbox.info", sandbox_id=sid)
    assert 99 < info["end_at"] - time.time() <= 100
    await client.call("sandbox.set_timeout", sandbox_id=sid, timeout=10)
    assert (await client.call("sandbox.info", sandbox_id=sid))["end_at"] - time.time() <= 10
    info = await client.call("sandbox.connect", sandbox_id=sid, timeout=5)
    assert 5 < info["end_at"] - time.time() <= 10  # not shortened
    info = await client.call("sandbox.connect", sandbox_id=sid, timeout=50)
    assert 49 < info["end_at"] - time.time() <= 50
    for bad in (0, -1, "10", 10**9, None):
        with pytest.raises(RpcError) as exc:
            await client.call("sandbox.set_timeout", sandbox_id=sid, timeout=bad)
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT, bad
    with pytest.raises(RpcError) as exc:
        await client.call("sandbox.connect", sandbox_id="sbx-nope")
    assert exc.value.code is ErrorCode.SANDBOX_NOT_FOUND
    await client.call("sandbox.kill", sandbox_id=sid)


async def test_lease_expiry_kills_the_sandbox_and_ends_its_streams(gw, client):
    sid = await client.create(timeout=1)
    pid = gw.sandboxes[sid].child.pid
    t0 = time.monotonic()
    out, end = await client.run(sid, "while :; do echo tick; sleep 0.1; done")
    assert time.monotonic() - t0 < 15
    assert out[1].startswith(b"tick\n")
    assert end["error"][0] == "sandbox_not_running" and "expired" in end["error"][1]
    assert await eventually(lambda: not alive(pid))
    with pytest.raises(RpcError) as exc:
        await client.call("sandbox.eval", sandbox_id=sid, expr="1")
    assert exc.value.code is ErrorCode.SANDBOX_NOT_RUNNING
    assert any(r["event"] == "expire" and r["sandbox_id"] == sid for r in audit(gw))


async def test_kill_mid_command_ends_streams_and_pending_calls(gw, client):
    sid = await client.create()
    stream = client.conn.open_inbound()
    await client.call(
        "exec.start", sandbox_id=sid, cmd="while :; do echo tick; sleep 0.05; done", stream=stream.id
    )
    first = await anext(stream)
    assert first[2].startswith(b"tick")
    cell = asyncio.ensure_future(
        client.call(
            "code.run", sandbox_id=sid, code="import time; time.sleep(60)", stream=client.conn.new_stream_id()
        )
    )
    await asyncio.sleep(0.2)
    killer = await Client.memory(gw, "k1")
    assert await killer.call("sandbox.kill", sandbox_id=sid) is True
    await killer.close()
    rest = [d async for d in stream]
    assert stream.end_info["error"][0] == "sandbox_not_running", stream.end_info
    assert len(rest) < 200
    with pytest.raises(RpcError) as exc:
        await asyncio.wait_for(cell, 10)
    assert exc.value.code is ErrorCode.SANDBOX_NOT_RUNNING


async def test_a_sandbox_that_dies_ends_its_streams_and_is_forgotten(gw, client):
    sid = await client.create()
    pid = gw.sandboxes[sid].child.pid
    stream = client.conn.open_inbound()
    await client.call("exec.start", sandbox_id=sid, cmd="sleep 60", stream=stream.id)
    os.kill(pid, signal.SIGKILL)  # the sandbox's init dies under the gateway
    assert [d async for d in stream] == []
    assert stream.end_info["error"][0] == "sandbox_not_running"
    assert "unexpectedly" in stream.end_info["error"][1]
    assert await eventually(lambda: sid not in gw.sandboxes)
    assert any(r["event"] == "exit" and r["sandbox_id"] == sid for r in audit(gw))


async def test_audit_log_has_one_line_per_lifecycle_event(gw, client):
    sid = await client.create(timeout=60)
    await client.call("sandbox.connect", sandbox_id=sid)
    await client.call("sandbox.kill", sandbox_id=sid)
    mine = [r for r in audit(gw) if r["sandbox_id"] == sid]
    assert [r["event"] for r in mine] == ["create", "connect", "kill"]
    for r in mine:
        assert r["key_id"] == "k1" and r["template"] == "base"
        assert r["time"].endswith("+00:00") and abs(r["ts"] - time.time()) < 60
    assert mine[0]["timeout"] == 60


async def test_metrics_count_what_happened(gw, client):
    sid = await client.create()
    await client.run(sid, "true")
    with pytest.raises(RpcError):
        await client.call("sandbox.info", sandbox_id="sbx-missing")
    text = gw.metrics.render().decode()
    assert f"forkd_sandboxes_active {float(len(gw.sandboxes))}" in text
    assert 'forkd_pool_ready{template="base"}' in text
    assert 'forkd_create_seconds_count{template="base"}' in text
    assert 'forkd_spawn_seconds_count{template="base"}' in text
    assert 'forkd_errors_total{code="sandbox_not_found"}' in text
    execs = [line for line in text.splitlines() if line.startswith("forkd_execs_total ")]
    assert execs and float(execs[0].split()[1]) >= 1
    await client.call("sandbox.kill", sandbox_id=sid)


async def test_close_kills_every_sandbox(template_store, tmp_path):
    cfg = make_config(
        template_store, tmp_path / "state", pools={"base": PoolConfig(min_ready=1, max_total=4)}
    )
    gateway = Gateway(cfg)
    await gateway.start()
    c = await Client.memory(gateway)
    ids = [await c.create(), await c.create()]
    pids = [gateway.sandboxes[i].child.pid for i in ids]
    stream = c.conn.open_inbound()
    await c.call("exec.start", sandbox_id=ids[0], cmd="sleep 60", stream=stream.id)
    await gateway.close()
    assert not any(alive(pid) for pid in pids)
    assert gateway.backend.children() == []
    assert c.conn.closed.is_set()  # sessions were ended too
    assert {r["sandbox_id"] for r in audit(gateway) if r.get("reason") == "shutdown"} >= set(ids)


async def test_internet_access_on_request_and_e2b_template_names(gw, client):
    # Default: loopback only. allow_internet_access=True: an eth0 behind the isolating NAT bridge.
    offline = await client.call("sandbox.create")
    online = await client.call("sandbox.create", allow_internet_access=True)
    try:
        out, end = await client.run(online["sandbox_id"], "cat /proc/net/dev; cat /etc/resolv.conf")
        assert end["exit_code"] == 0 and b"eth0" in out[1]
        out, _ = await client.run(offline["sandbox_id"], "cat /proc/net/dev")
        assert b"eth0" not in out[1]
        assert "base+internet" in gw.pool_stats()
    finally:
        for sb in (offline, online):
            await client.call("sandbox.kill", sandbox_id=sb["sandbox_id"])
    # E2B's name for the code-interpreter template resolves to forkd's (built or not, depending on the run).
    try:
        sb = await client.call("sandbox.create", template="code-interpreter-v1")
    except RpcError as exc:
        assert exc.code is ErrorCode.TEMPLATE and "'code-interpreter'" in exc.message
    else:
        assert sb["template_id"] == "code-interpreter"
        await client.call("sandbox.kill", sandbox_id=sb["sandbox_id"])
