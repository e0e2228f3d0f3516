"""How the process backend takes a spawn's children in: the first ping written
and read back with raw calls, the child's Connection made on first use, exits
noticed without one (runtime/forkd_runtime/_process_backend.py, _admit)."""

import asyncio
import dataclasses
import os
import signal

import pytest

from forkd_runtime._backend import SpawnError
from process_helpers import check


async def _until(predicate, timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def test_children_answer_before_anyone_opens_their_connection(process_backend):
    snap = await process_backend.prepare("base")
    kids = await process_backend.spawn(snap, 3)
    assert all(k.ready_at > 0 and k.alive for k in kids)
    # Counted ready on their own answer to a ping: no Connection was needed for that.
    assert all(k._conn is None for k in kids)
    # The first use makes one, and it carries the full agent: a command runs.
    out = await check(kids[0], "echo $((6 * 7)); cat /proc/sys/kernel/hostname")
    assert out.split() == ["42", kids[0].id]
    assert kids[0]._conn is not None and kids[1]._conn is None
    # Requests before the hand-over and after it, on one lazily made connection.
    pongs = await asyncio.gather(*(kids[1].conn.request("ping") for _ in range(5)))
    assert all(p["pong"] is True for p in pongs)
    assert (await kids[1].conn.request("info"))["hostname"] == kids[1].id


async def test_a_child_that_exits_unconnected_is_released(process_backend):
    snap = await process_backend.prepare("base")
    kid, other = await process_backend.spawn(snap, 2)
    cgroup_dirs = list(kid.handle.cgroup.dirs)
    os.kill(kid.pid, signal.SIGKILL)  # from outside: nobody holds its connection
    assert await _until(lambda: kid not in process_backend.children())
    assert not kid.alive
    assert await _until(lambda: not any(d.exists() for d in cgroup_dirs))
    # Its connection, asked for afterwards, is a closed one rather than an error.
    assert kid.conn.closed.is_set()
    # The other child is untouched.
    assert other.alive and (await other.conn.request("ping"))["pong"] is True


async def test_a_connected_child_that_exits_closes_its_connection(process_backend):
    snap = await process_backend.prepare("base")
    (kid,) = await process_backend.spawn(snap, 1)
    closed = asyncio.Event()
    kid.conn.add_close_callback(lambda _c: closed.set())
    os.kill(kid.pid, signal.SIGKILL)
    await asyncio.wait_for(closed.wait(), 5)
    assert not kid.alive
    assert await _until(lambda: kid not in process_backend.children())


async def test_a_child_dying_before_its_first_answer_is_named_and_cleaned_up(process_backend):
    snap = await process_backend.prepare("base")
    broken = dataclasses.replace(snap, meta={**snap.meta, "state": "no-such-state"})
    with pytest.raises(SpawnError, match=r"sbx-[0-9a-f]+: did not come up: exited during set-up"):
        await process_backend.spawn(broken, 2)
    assert process_backend.children() == []

    # Nothing of theirs stays in the scope (the stock of spare cgroups aside).
    def unstocked() -> set[str]:
        stocked = {cg.name for stock in process_backend._cg_stock.values() for cg in stock}
        return {cg.name for cg in process_backend.cgroups.existing()} - stocked

    assert await _until(lambda: not unstocked()), unstocked()


async def test_kill_before_first_use_leaves_a_closed_connection(process_backend):
    snap = await process_backend.prepare("base")
    (kid,) = await process_backend.spawn(snap, 1)
    await process_backend.kill(kid)
    assert not kid.alive
    assert kid.conn.closed.is_set() and kid.conn.close_reason == "killed"
    with pytest.raises(Exception, match="killed"):
        await kid.conn.request("ping")
