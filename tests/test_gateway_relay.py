"""Calls relayed into sandboxes: streamed exec output, envs, files both ways, code runs, watches, detach,
cancel, and what a client disconnect cleans up (its streams and watches, never its sandboxes)."""

import asyncio
import os

import pytest
import pytest_asyncio
from gateway_harness import Client, eventually, started_gateway

from forkd.protocol import ErrorCode, RpcError

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(template_store, tmp_path_factory):
    async with started_gateway(template_store, tmp_path_factory.mktemp("gw") / "state") as gateway:
        yield gateway


@pytest_asyncio.fixture(loop_scope="module")
async def client(gw):
    c = await Client.memory(gw, "relay")
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module")
async def sid(client):
    sandbox_id = await client.create(envs={"A": "1", "B": "2"})
    yield sandbox_id
    await client.call("sandbox.kill", sandbox_id=sandbox_id)


async def test_exec_output_is_streamed_with_exit_info(client, sid):
    stream = client.conn.open_inbound()
    started = await client.call(
        "exec.start",
        sandbox_id=sid,
        cmd="for i in 1 2 3; do echo line$i; sleep 0.1; done; echo oops >&2; exit 7",
        stream=stream.id,
    )
    assert started["pid"] > 0
    chunks = [c async for c in stream]
    stdout = [c for c in chunks if c[0] == 1]
    assert b"".join(d for _, _, d in stdout) == b"line1\nline2\nline3\n"
    assert len(stdout) >= 2  # relayed as produced, not collected at the end
    offsets = [o for _, o, _ in stdout]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert b"".join(d for fd, _, d in chunks if fd == 2) == b"oops\n"
    end = stream.end_info
    assert (end["exit_code"], end["reason"], end["pid"], end["stream"]) == (
        7,
        "exited",
        started["pid"],
        stream.id,
    )


async def test_sandbox_envs_are_defaults_for_commands_and_code(client, sid):
    out, _ = await client.run(sid, "echo $A $B", envs={"B": "3"})
    assert out[1] == b"1 3\n"
    ctx = await client.call("context.create", sandbox_id=sid)
    res = await client.call(
        "code.eval", sandbox_id=sid, expr="__import__('os').environ['A']", context=ctx["id"]
    )
    assert res["value"] == "1"
    stream = client.conn.open_inbound()
    await client.call(
        "code.run",
        sandbox_id=sid,
        code="import os; print(os.environ['B'])",
        stream=stream.id,
        envs={"B": "4"},
    )
    assert b"".join([d async for _, _, d in stream]) == b"4\n"


async def test_many_concurrent_calls_on_one_connection(client, sid):
    async def one(i):
        out, end = await client.run(sid, f"sleep 0.$((RANDOM % 3)); echo {i}")
        return out[1], end["exit_code"]

    results = await asyncio.gather(
        *(one(i) for i in range(20)), client.call("sandbox.eval", sandbox_id=sid, expr="6*7")
    )
    assert results[:20] == [(f"{i}\n".encode(), 0) for i in range(20)]
    assert results[20]["value"] == 42


async def test_files_round_trip_through_the_relay(client, sid):
    data = os.urandom(3 * 1024 * 1024 + 123)
    ws = client.conn.new_stream_id()
    opened = await client.call(
        "files.write_open", sandbox_id=sid, path="/tmp/big.bin", stream=ws, user="root"
    )
    client.conn.open_outbound(ws, opened["window"])
    for off in range(0, len(data), 1 << 20):
        await client.conn.send_stream(ws, 0, off, data[off : off + (1 << 20)])
    info = await client.call("files.write_close", sandbox_id=sid, stream=ws)
    assert info == {"name": "big.bin", "type": "file", "path": "/tmp/big.bin"}
    assert (await client.call("files.stat", sandbox_id=sid, path="/tmp/big.bin"))["size"] == len(data)

    rs = client.conn.open_inbound()
    res = await client.call("files.read", sandbox_id=sid, path="/tmp/big.bin", stream=rs.id)
    assert res["size"] == len(data)
    assert b"".join([d async for _, _, d in rs]) == data
    assert rs.error is None

    with pytest.raises(RpcError) as exc:  # a write that was never opened
        await client.call("files.write_close", sandbox_id=sid, stream=999)
    assert exc.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(RpcError) as exc:
        await client.call("files.read", sandbox_id=sid, path="/nope", stream=client.conn.new_stream_id())
    assert exc.value.code is ErrorCode.FILE_NOT_FOUND


async def test_aborted_write_leaves_the_target_alone(client, sid):
    await client.call("files.write", sandbox_id=sid, path="/tmp/keep.txt", data=b"old", user="root")
    ws = client.conn.new_stream_id()
    opened = await client.call(
        "files.write_open", sandbox_id=sid, path="/tmp/keep.txt", stream=ws, user="root"
    )
    client.conn.open_outbound(ws, opened["window"])
    await client.conn.send_stream(ws, 0, 0, b"new content")
    assert await client.call("files.write_abort", sandbox_id=sid, stream=ws) == {}
    rs = client.conn.open_inbound()
    await client.call("files.read", sandbox_id=sid, path="/tmp/keep.txt", stream=rs.id)
    assert b"".join([d async for _, _, d in rs]) == b"old"


async def test_code_run_results_come_back_on_the_clients_stream(client, sid):
    stream = client.conn.open_inbound()
    client.notes.clear()
    res = await client.call(
        "code.run",
        sandbox_id=sid,
        code="print('hi')\ndisplay({'a': 1}, raw=False)\n41 + 1",
        stream=stream.id,
    )
    assert b"".join([d async for _, _, d in stream]) == b"hi\n"
    assert res["error"] is None
    assert [r["text"] for r in res["results"]] == ["{'a': 1}", "42"]
    shown = [p for m, p in client.notes if m == "code.result"]
    assert [p["stream"] for p in shown] == [stream.id]
    assert shown[0]["result"]["text"] == "{'a': 1}"


async def test_watch_events_reach_only_the_watching_connection(gw, client, sid):
    other = await Client.memory(gw, "relay")
    try:
        await client.call("files.make_dir", sandbox_id=sid, path="/tmp/w", user="root")
        w = await client.call("files.watch", sandbox_id=sid, path="/tmp/w", user="root")
        await other.call("files.write", sandbox_id=sid, path="/tmp/w/new.txt", data="x", user="root")

        def events():
            return [p for m, p in client.notes if m == "files.event"]

        assert await eventually(lambda: any(e["name"] == "new.txt" for e in events()))
        assert all(e["watch"] == w["watch"] and e["sandbox_id"] == sid for e in events())
        with pytest.raises(RpcError) as exc:  # someone else's watch
            await other.call("files.unwatch", sandbox_id=sid, watch=w["watch"])
        assert exc.value.code is ErrorCode.NOT_FOUND
        assert not any(m == "files.event" for m, _ in other.notes)
        assert await client.call("files.unwatch", sandbox_id=sid, watch=w["watch"]) == {}
    finally:
        await other.close()


async def test_detach_stops_the_stream_and_attach_replays(client, sid):
    stream = client.conn.open_inbound()
    started = await client.call(
        "exec.start", sandbox_id=sid, cmd="echo one; sleep 0.3; echo two; sleep 30", stream=stream.id
    )
    assert (await anext(stream))[2] == b"one\n"
    assert await client.call("exec.detach", sandbox_id=sid, stream=stream.id) == {}
    await asyncio.sleep(0.5)
    assert stream.end_info is None and stream._queue.empty()  # nothing after the detach, no end either
    running = await client.call("exec.list", sandbox_id=sid)
    assert started["pid"] in [p["pid"] for p in running]
    again = client.conn.open_inbound()
    await client.call("exec.attach", sandbox_id=sid, pid=started["pid"], stream=again.id, offsets={"1": 0})
    assert (await anext(again))[2].startswith(b"one\ntwo\n"[:4])
    assert await client.call("exec.kill", sandbox_id=sid, pid=started["pid"]) == {"killed": True}
    [_ async for _ in again]
    assert again.end_info["reason"] == "killed"


async def test_cancel_is_relayed_to_the_agent(client, sid):
    ctx = await client.call("context.create", sandbox_id=sid)
    with pytest.raises(RpcError) as exc:  # the client gives up: Connection sends cancel
        await client.call(
            "code.run",
            _timeout=0.5,
            sandbox_id=sid,
            code="import time; time.sleep(60)",
            context=ctx["id"],
            stream=client.conn.new_stream_id(),
        )
    assert exc.value.code is ErrorCode.TIMEOUT
    # The agent interrupted the cell: the context answers again at once.
    res = await client.call("code.eval", _timeout=10, sandbox_id=sid, expr="2+2", context=ctx["id"])
    assert res["value"] == 4


async def test_a_client_disconnect_cleans_its_streams_and_watches_not_its_sandboxes(gw, sid):
    leaver = await Client.memory(gw, "relay")
    sandbox = gw.sandboxes[sid]
    stream = leaver.conn.open_inbound()
    await leaver.call(
        "exec.start", sandbox_id=sid, cmd="while :; do echo x; sleep 0.05; done", stream=stream.id
    )
    await leaver.call("exec.start", sandbox_id=sid, cmd="sleep 77", keep_on_disconnect=False)
    await leaver.call("files.make_dir", sandbox_id=sid, path="/tmp/w2", user="root")
    await leaver.call("files.watch", sandbox_id=sid, path="/tmp/w2", user="root")
    assert sandbox.streams and sandbox.watches
    await leaver.close()
    assert sandbox.streams == {} and sandbox.watches == {}
    stayer = await Client.memory(gw, "relay")
    try:
        assert sid in [s["sandbox_id"] for s in (await stayer.call("sandbox.list"))["items"]]
        for _ in range(100):  # killed with its connection (the agent reaps it a moment later)
            cmds = await stayer.call("exec.list", sandbox_id=sid)
            if not any(c["cmd"] == "sleep 77" for c in cmds):
                break
            await asyncio.sleep(0.05)
        assert not any(c["cmd"] == "sleep 77" for c in cmds)
        assert any("echo x" in c["cmd"] for c in cmds)  # outlives it (keep_on_disconnect default)
        for c in cmds:
            await stayer.call("exec.kill", sandbox_id=sid, pid=c["pid"])
    finally:
        await stayer.close()


async def test_sandbox_eval_extension(client, sid):
    assert (await client.call("sandbox.eval", sandbox_id=sid, expr="[1, 2.5, 'x']"))["value"] == [1, 2.5, "x"]
    res = await client.call("sandbox.eval", sandbox_id=sid, expr="1/0")
    assert res["error"]["name"] == "ZeroDivisionError"


async def test_stdin_and_pty_are_relayed(client, sid):
    stream = client.conn.open_inbound()
    started = await client.call("exec.start", sandbox_id=sid, cmd="cat", stdin=True, stream=stream.id)
    await client.call("exec.stdin", sandbox_id=sid, pid=started["pid"], data=b"through the gateway\n")
    await client.call("exec.close_stdin", sandbox_id=sid, pid=started["pid"])
    assert b"".join([d async for _, _, d in stream]) == b"through the gateway\n"

    tty = client.conn.open_inbound()
    started = await client.call(
        "exec.start",
        sandbox_id=sid,
        cmd="stty size; read x; stty size",
        pty={"rows": 30, "cols": 100},
        stream=tty.id,
    )
    chunks = [await anext(tty)]
    while b"30 100" not in b"".join(d for _, _, d in chunks):
        chunks.append(await anext(tty))
    await client.call("exec.resize", sandbox_id=sid, pid=started["pid"], rows=40, cols=120)
    await client.call("exec.stdin", sandbox_id=sid, pid=started["pid"], data=b"\n")
    chunks += [c async for c in tty]
    assert {fd for fd, _, _ in chunks} == {3}
    text = b"".join(d for _, _, d in chunks)
    assert b"30 100" in text and b"40 120" in text
