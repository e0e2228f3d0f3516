"""The process backend's happy path: a warm zygote forks children that answer."""

import asyncio

import pytest

from agent_harness import collect
from forkd.protocol import ErrorCode, RpcError


async def run(conn, cmd: str, **params) -> tuple[str, str, dict, int]:
    stream = conn.open_inbound()
    res = await conn.request("exec.start", {"cmd": cmd, "stream": stream.id, **params})
    out, err, end = await asyncio.wait_for(collect(stream), 20)
    return out.decode(), err.decode(), end, res["pid"]


async def test_spawn_exec_kill(process_backend):
    snap = await process_backend.prepare("base")
    assert snap.meta["warm"]["marker"]  # the template's warm-up ran in the zygote
    kids = await process_backend.spawn(snap, 3)
    assert len(kids) == 3
    infos = [await k.conn.request("info") for k in kids]
    assert [i["pid"] for i in infos] == [1, 1, 1]  # each agent is PID 1 of its own namespace
    assert len({i["hostname"] for i in infos}) == 3
    for k in kids:
        await process_backend.kill(k)
    assert process_backend.children() == []


async def test_a_user_added_after_a_first_lookup_is_found(process_backend):
    # The agent keeps user lookups until /etc/passwd changes.
    snap = await process_backend.prepare("base")
    [child] = await process_backend.spawn(snap, 1)
    out, _, end, _ = await run(child.conn, "id -un")
    assert out == "user\n"
    with pytest.raises(RpcError) as err:
        await run(child.conn, "id -un", user="bob")
    assert err.value.code == ErrorCode.INVALID_ARGUMENT
    _, err_out, end, _ = await run(child.conn, "useradd -m bob", user="root")
    assert end["exit_code"] == 0, err_out
    out, _, end, _ = await run(child.conn, "id -un; echo $HOME", user="bob")
    assert (out, end["exit_code"]) == ("bob\n/home/bob\n", 0)
