"""sandbox.branch and snapshot.* through a real gateway (uvicorn, websockets, process backend, two API keys):
inheritance, divergence, the source going on, chains, concurrency, snapshot lifetimes, errors, metrics."""

import asyncio
import contextlib
import json

import httpx
import pytest
import pytest_asyncio
from gateway_harness import Client, eventually, make_config

from forkd.protocol import ErrorCode, RpcError
from forkd_gateway._app import running_server
from forkd_gateway._auth import ApiKeys
from forkd_gateway._gateway import Gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE, BOB = "branch-key-alice", "branch-key-bob"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(template_store, tmp_path_factory):
    state = tmp_path_factory.mktemp("gw-branch") / "state"
    config = make_config(template_store, state, keys=ApiKeys({"alice": ALICE, "bob": BOB}))
    gateway = Gateway(config)
    await gateway.start()
    try:
        async with running_server(gateway) as url:
            yield gateway, url
    finally:
        await gateway.close()


@pytest.fixture
def gw(served):
    return served[0]


@pytest_asyncio.fixture(loop_scope="module")
async def alice(served):
    c = await Client.websocket(served[1] + "/v1/ws", ALICE)
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module")
async def bob(served):
    c = await Client.websocket(served[1] + "/v1/ws", BOB)
    yield c
    await c.close()


async def sh(client: Client, sandbox_id: str, cmd: str) -> str:
    out, end = await client.run(sandbox_id, cmd)
    assert end["exit_code"] == 0, (cmd, out, end)
    return out.get(1, b"").decode()


async def branch(client: Client, sandbox_id: str, **params) -> tuple[list[str], dict]:
    res = await client.call("sandbox.branch", sandbox_id=sandbox_id, **params)
    ids = [e["sandbox_id"] for e in res["sandboxes"]]
    assert len(ids) == params.get("count", 1), res
    return ids, res


async def expect(code: ErrorCode, call) -> str:
    with pytest.raises(RpcError) as info:
        await call
    assert info.value.code is code, info.value
    return info.value.message


async def metric(served, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(served[1] + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def audit(gw) -> list[dict]:
    return [json.loads(line) for line in gw.audit.path.read_text().splitlines()]


async def test_children_inherit_files_envs_metadata_then_diverge(gw, alice):
    src = await alice.create(metadata={"job": "j1"}, envs={"MODE": "fast"})
    await sh(alice, src, "echo before > /root/note")

    ids, res = await branch(alice, src, count=2, timeout=120)
    assert src not in ids and len(set(ids)) == 2
    for info in res["sandboxes"]:
        assert info["template_id"] == "base" and info["metadata"] == {"job": "j1"}
        assert info["envs"] == {"MODE": "fast"} and 119 < info["end_at"] - info["started_at"] <= 121
    assert res["pause_ms"] >= 0 and "files" in res["inherited"]
    assert all(set(x) == {"what", "why"} for x in res["not_inherited"])
    for cid in ids:
        assert await sh(alice, cid, "cat /root/note; echo $MODE") == "before\nfast\n"

    a, b = ids
    await sh(alice, a, "echo mine > /root/mine")
    await sh(alice, src, "echo after > /root/note")  # the source keeps working, on its own
    assert await sh(alice, b, "test -e /root/mine && echo yes || echo no") == "no\n"
    assert await sh(alice, src, "test -e /root/mine && echo yes || echo no") == "no\n"
    assert await sh(alice, a, "cat /root/note") == "before\n"
    assert await sh(alice, src, "cat /root/note") == "after\n"

    listed = await alice.call("sandbox.list", metadata={"job": "j1"})
    assert {s["sandbox_id"] for s in listed["items"]} == {src, *ids}
    created = [e for e in audit(gw) if e["event"] == "create" and e["sandbox_id"] in ids]
    assert [e.get("branched_from") for e in created] == [src, src]
    for sid in (src, *ids):
        assert await alice.call("sandbox.kill", sandbox_id=sid) is True


async def run_code(client: Client, sandbox_id: str, code: str) -> dict:
    stream = client.conn.open_inbound()
    result = await client.call("code.run", sandbox_id=sandbox_id, code=code, stream=stream.id)
    async for _ in stream:
        pass
    return result


async def test_children_inherit_code_context_variables(alice):
    src = await alice.create()
    try:
        await run_code(alice, src, "x = 41")
        ids, _ = await branch(alice, src, count=2)
        for cid in ids:
            assert (await alice.call("sandbox.eval", sandbox_id=cid, expr="x + 1"))["value"] == 42
        await run_code(alice, ids[0], "x = 0")  # diverge
        assert (await alice.call("sandbox.eval", sandbox_id=ids[1], expr="x"))["value"] == 41
        assert (await alice.call("sandbox.eval", sandbox_id=src, expr="x"))["value"] == 41
    finally:
        await alice.call("sandbox.kill", sandbox_id=src)


async def test_a_chain_five_deep_keeps_every_step_and_cleans_up_after_itself(served, alice):
    before = await metric(served, "forkd_snapshots_active")
    chain = [await alice.create()]
    for depth in range(1, 6):
        await sh(alice, chain[-1], f"echo {depth} > /tmp/step{depth}")
        (child,), _ = await branch(alice, chain[-1])
        chain.append(child)
    out = await sh(alice, chain[-1], "cat /tmp/step1 /tmp/step2 /tmp/step3 /tmp/step4 /tmp/step5")
    assert out.split() == ["1", "2", "3", "4", "5"]
    assert await metric(served, "forkd_snapshots_active") == before + 5

    # A capture stays while anything stands on it: here, killing the middle of the chain first.
    await alice.call("sandbox.kill", sandbox_id=chain[3])
    assert await metric(served, "forkd_snapshots_active") == before + 5
    for sid in chain:
        await alice.call("sandbox.kill", sandbox_id=sid)
    assert await metric(served, "forkd_snapshots_active") == before


async def test_concurrent_branches(alice):
    sources = await asyncio.gather(*(alice.create() for _ in range(3)))
    await asyncio.gather(*(sh(alice, s, f"echo {s} > /tmp/who") for s in sources))
    results = await asyncio.gather(
        *(branch(alice, s, count=2) for s in sources),
        branch(alice, sources[0], count=1),  # the same source twice at once: they take turns
    )
    for source, (ids, _) in zip([*sources, sources[0]], results, strict=True):
        for cid in ids:
            assert await sh(alice, cid, "cat /tmp/who") == f"{source}\n"
    everything = [*sources, *(cid for ids, _ in results for cid in ids)]
    await asyncio.gather(*(alice.call("sandbox.kill", sandbox_id=s) for s in everything))


async def test_a_busy_source_gets_conflict(alice):
    src = await alice.create()
    stream = alice.conn.open_inbound()
    cell = asyncio.ensure_future(
        alice.call(
            "code.run", sandbox_id=src, code="print('started', flush=True)\nimport time\ntime.sleep(30)",
            stream=stream.id,
        )
    )  # fmt: skip
    try:
        async for _fd, _off, data in stream:
            if b"started" in data:
                break
        message = await expect(ErrorCode.CONFLICT, alice.call("sandbox.branch", sandbox_id=src))
        assert src in message and "busy" in message
    finally:
        await alice.call("sandbox.kill", sandbox_id=src)
        with contextlib.suppress(RpcError):
            await cell


async def test_branch_errors(alice, bob):
    await expect(ErrorCode.SANDBOX_NOT_FOUND, alice.call("sandbox.branch", sandbox_id="sbx-nope"))
    mine = await alice.create()
    await expect(ErrorCode.SANDBOX_NOT_FOUND, bob.call("sandbox.branch", sandbox_id=mine))
    for count in (0, 65, "2", 1.5):
        await expect(ErrorCode.INVALID_ARGUMENT, alice.call("sandbox.branch", sandbox_id=mine, count=count))
    await expect(ErrorCode.INVALID_ARGUMENT, alice.call("sandbox.branch", sandbox_id=mine, timeout=-1))
    await alice.call("sandbox.kill", sandbox_id=mine)
    message = await expect(ErrorCode.SANDBOX_NOT_RUNNING, alice.call("sandbox.branch", sandbox_id=mine))
    assert "killed" in message
    await expect(ErrorCode.SANDBOX_NOT_RUNNING, alice.call("snapshot.create", sandbox_id=mine))


async def test_snapshots_start_sandboxes_and_are_deleted_only_when_unused(gw, alice, bob):
    src = await alice.create(envs={"FROM": "snap"})
    await sh(alice, src, "echo saved > /root/saved")
    snap = await alice.call("snapshot.create", sandbox_id=src, name="my-work")
    sid = snap["snapshot_id"]
    assert sid.startswith("snap-") and snap["names"] == ["my-work"]
    assert snap["sandbox_id"] == src and snap["template_id"] == "base" and snap["pause_ms"] >= 0
    await sh(alice, src, "echo later > /root/saved")  # after the snapshot: not in it

    by_id = (await alice.call("sandbox.create", template=sid))["sandbox_id"]
    by_name = (await alice.call("sandbox.create", template="my-work", envs={"MORE": "1"}))["sandbox_id"]
    for child in (by_id, by_name):
        assert await sh(alice, child, "cat /root/saved; echo $FROM") == "saved\nsnap\n"
    assert await sh(alice, by_name, "echo $MORE") == "1\n"

    # Listing: mine only, filtered, paginated.
    other = await alice.call("snapshot.create", sandbox_id=by_id)
    assert other["names"] == [] and other["sandbox_id"] == by_id
    page = await alice.call("snapshot.list", limit=1)
    assert [s["snapshot_id"] for s in page["items"]] == [sid] and page["next_token"]
    rest = await alice.call("snapshot.list", limit=1, next_token=page["next_token"])
    assert [s["snapshot_id"] for s in rest["items"]] == [other["snapshot_id"]] and rest["next_token"] is None
    assert [s["snapshot_id"] for s in (await alice.call("snapshot.list", sandbox_id=src))["items"]] == [sid]
    assert [s["snapshot_id"] for s in (await alice.call("snapshot.list", name="my-work"))["items"]] == [sid]
    assert (await bob.call("snapshot.list"))["items"] == []

    # Another key: not found, whatever it tries.
    assert await bob.call("snapshot.delete", snapshot_id=sid) is False
    await expect(ErrorCode.TEMPLATE, bob.call("sandbox.create", template=sid))
    await expect(ErrorCode.TEMPLATE, alice.call("sandbox.create", template="snap-0000000000000000"))

    # In use: refused, naming what uses it.
    message = await expect(ErrorCode.CONFLICT, alice.call("snapshot.delete", snapshot_id=sid))
    assert by_id in message and by_name in message
    await alice.call("sandbox.kill", sandbox_id=by_name)
    message = await expect(ErrorCode.CONFLICT, alice.call("snapshot.delete", snapshot_id=sid))
    assert by_id in message and other["snapshot_id"] in message  # a snapshot of its child stands on it
    assert await alice.call("snapshot.delete", snapshot_id=other["snapshot_id"]) is True
    await alice.call("sandbox.kill", sandbox_id=by_id)
    assert await alice.call("snapshot.delete", snapshot_id=sid) is True
    assert await alice.call("snapshot.delete", snapshot_id=sid) is False
    await expect(ErrorCode.TEMPLATE, alice.call("sandbox.create", template=sid))
    await alice.call("sandbox.kill", sandbox_id=src)


async def test_snapshot_names(alice):
    src = await alice.create()
    try:
        for bad in ("base", "code-interpreter", "snap-mine", "no spaces", "", "x" * 65):
            await expect(ErrorCode.INVALID_ARGUMENT, alice.call("snapshot.create", sandbox_id=src, name=bad))
        first = await alice.call("snapshot.create", sandbox_id=src, name="again")
        second = await alice.call("snapshot.create", sandbox_id=src, name="again")
        listed = {s["snapshot_id"]: s["names"] for s in (await alice.call("snapshot.list"))["items"]}
        assert listed[first["snapshot_id"]] == [] and listed[second["snapshot_id"]] == ["again"]
        for s in (first, second):
            assert await alice.call("snapshot.delete", snapshot_id=s["snapshot_id"]) is True
    finally:
        await alice.call("sandbox.kill", sandbox_id=src)


async def test_branch_metrics(served, alice):
    before = await metric(served, "forkd_branches_total")
    src = await alice.create()
    ids, _ = await branch(alice, src, count=1)
    assert await metric(served, "forkd_branches_total") == before + 1
    assert await metric(served, "forkd_branch_seconds_count") >= 1
    assert await metric(served, "forkd_capture_pause_seconds_count") >= 1
    for sid in (src, *ids):
        await alice.call("sandbox.kill", sandbox_id=sid)


async def test_closing_the_gateway_deletes_its_snapshots(template_store, tmp_path):
    gateway = Gateway(make_config(template_store, tmp_path / "state", pools={}))
    await gateway.start()
    try:
        c = await Client.memory(gateway, "k1")
        src = await c.create()
        await c.call("snapshot.create", sandbox_id=src, name="keep")
        await branch(c, src)
        assert len(gateway.snapshots) == 2
        await c.close()
    finally:
        await gateway.close()
    assert len(gateway.snapshots) == 0
    assert await eventually(lambda: not gateway.sandboxes)
