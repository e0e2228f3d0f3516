"""Directory watches of the guest agent (inotify), through the protocol on a real agent."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent_harness import wait_for
from forkd import protocol as p


class Events:
    """Collects ``files.event`` notifications arriving on one connection."""

    def __init__(self, conn) -> None:
        self.items: list[dict] = []
        conn.on_notification = self._on

    def _on(self, conn, method, params) -> None:
        if method == "files.event":
            self.items.append(params)

    def of(self, watch: int) -> list[tuple[str, str]]:
        return [(e["type"], e["name"]) for e in self.items if e["watch"] == watch]

    async def wait(self, watch: int, *expected: tuple[str, str]) -> None:
        await wait_for(lambda: all(x in self.of(watch) for x in expected))


async def quiet(conn) -> None:
    """Let the agent read pending inotify events and deliver them."""
    for _ in range(3):
        await conn.request("ping")
        await asyncio.sleep(0.05)


@pytest.fixture
def tree(tmp_path):
    d = tmp_path / "watched"
    d.mkdir()
    return d


async def test_event_kinds(agent, tree):
    events = Events(agent)
    wid = (await agent.request("files.watch", {"path": str(tree)}))["watch"]
    f = tree / "a.txt"
    f.write_text("hello")
    await events.wait(wid, ("create", "a.txt"), ("write", "a.txt"))
    os.chmod(f, 0o600)
    await events.wait(wid, ("chmod", "a.txt"))
    os.rename(f, tree / "b.txt")
    await events.wait(wid, ("rename", "a.txt"), ("create", "b.txt"))
    os.unlink(tree / "b.txt")
    await events.wait(wid, ("remove", "b.txt"))
    os.mkdir(tree / "sub")
    await events.wait(wid, ("create", "sub"))
    seen = events.of(wid)
    assert seen.index(("create", "a.txt")) < seen.index(("write", "a.txt")) < seen.index(("chmod", "a.txt"))
    assert seen.index(("rename", "a.txt")) < seen.index(("remove", "b.txt"))


async def test_recursive_sees_new_subdirectories_non_recursive_does_not(agent, tree):
    events = Events(agent)
    (tree / "old").mkdir()
    flat = (await agent.request("files.watch", {"path": str(tree)}))["watch"]
    deep = (await agent.request("files.watch", {"path": str(tree), "recursive": True}))["watch"]
    (tree / "old" / "x.txt").write_text("1")
    os.makedirs(tree / "new" / "inner")
    (tree / "new" / "inner" / "y.txt").write_text("2")
    await events.wait(deep, ("create", "old/x.txt"), ("create", "new"), ("create", "new/inner/y.txt"))
    (tree / "new" / "inner" / "y.txt").write_text("3")
    await events.wait(deep, ("write", "new/inner/y.txt"))
    # A subdirectory moved within the tree is watched under its new name.
    os.rename(tree / "new", tree / "moved")
    await events.wait(deep, ("rename", "new"), ("create", "moved"))
    (tree / "moved" / "inner" / "z.txt").write_text("4")
    await events.wait(deep, ("create", "moved/inner/z.txt"))
    await quiet(agent)
    assert ("create", "new/inner/z.txt") not in events.of(deep)
    flat_names = {name for _, name in events.of(flat)}
    assert "new" in flat_names and "moved" in flat_names
    assert not any("/" in name for name in flat_names), flat_names


async def test_unwatch_stops_events(agent, tree):
    events = Events(agent)
    wid = (await agent.request("files.watch", {"path": str(tree)}))["watch"]
    (tree / "one").write_text("x")
    await events.wait(wid, ("create", "one"))
    assert await agent.request("files.unwatch", {"watch": wid}) == {}
    (tree / "two").write_text("x")
    await quiet(agent)
    assert ("create", "two") not in events.of(wid)
    with pytest.raises(p.RpcError) as ei:
        await agent.request("files.unwatch", {"watch": wid})
    assert ei.value.code == p.ErrorCode.NOT_FOUND


async def test_watches_belong_to_their_connection(agent_proc, tree):
    observer = await agent_proc.connect()
    other = await agent_proc.connect()
    mine, theirs = Events(observer), Events(other)
    wid = (await observer.request("files.watch", {"path": str(tree)}))["watch"]
    (tree / "one").write_text("x")
    await mine.wait(wid, ("create", "one"))
    assert theirs.items == []
    with pytest.raises(p.RpcError) as ei:  # another connection cannot remove it
        await other.request("files.unwatch", {"watch": wid})
    assert ei.value.code == p.ErrorCode.NOT_FOUND
    await observer.close()
    await other.request("ping")
    # The agent dropped the watch with its connection: its inotify fd is closed.
    pid = agent_proc.proc.pid

    def inotify_fds():
        return sum(
            1 for fd in os.listdir(f"/proc/{pid}/fd") if "inotify" in os.readlink(f"/proc/{pid}/fd/{fd}")
        )

    await wait_for(lambda: inotify_fds() == 0)
    (tree / "two").write_text("x")
    await quiet(other)
    assert theirs.items == [] and ("create", "two") not in mine.of(wid)
    await other.close()


async def test_removing_the_watched_directory(agent, tree):
    events = Events(agent)
    wid = (await agent.request("files.watch", {"path": str(tree)}))["watch"]
    (tree / "f").write_text("x")
    os.unlink(tree / "f")
    os.rmdir(tree)
    await events.wait(wid, ("remove", "f"), ("remove", "."))
    assert await agent.request("files.unwatch", {"watch": wid}) == {}


async def test_watch_errors(agent, tree):
    (tree / "file").write_text("x")
    cases = [
        ({"path": str(tree / "missing")}, p.ErrorCode.FILE_NOT_FOUND),
        ({"path": str(tree / "file")}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": str(tree), "recursive": "yes"}, p.ErrorCode.INVALID_ARGUMENT),
        ({}, p.ErrorCode.INVALID_ARGUMENT),
    ]
    for params, code in cases:
        with pytest.raises(p.RpcError) as ei:
            await agent.request("files.watch", params)
        assert ei.value.code == code, params
