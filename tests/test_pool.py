"""The warm pool against the real process backend: take() hands out ready children without forking,
refills in the background, honours max_total, never hands out a dead child, and close() kills everything."""

import asyncio
import os
import signal

import pytest

from forkd.protocol import ErrorCode, RpcError
from forkd_runtime._backend import SpawnError
from forkd_runtime._pool import PoolBusy, WarmPool


class CountingSpawn:
    """Wraps the backend's spawn to record every call (and optionally fail)."""

    def __init__(self, backend, pool_ref=None):
        self.inner = backend.spawn
        self.calls: list[int] = []
        self.fail: Exception | None = None
        self.max_seen_total = 0
        self.pool_ref = pool_ref
        # When set: after the backend returned children, signal `spawned` and hold them until `release` is set.
        self.spawned: asyncio.Event | None = None
        self.release = asyncio.Event()
        backend.spawn = self

    async def __call__(self, snapshot, n, options=None):
        self.calls.append(n)
        if self.pool_ref is not None and self.pool_ref():
            s = self.pool_ref().stats()
            self.max_seen_total = max(self.max_seen_total, s.ready + s.in_use + s.spawning)
        if self.fail is not None:
            raise self.fail
        children = await self.inner(snapshot, n, options)
        if self.spawned is not None:
            self.spawned.set()
            await self.release.wait()
        return children

    @property
    def children(self) -> int:
        return sum(self.calls)


async def _pool(backend, **kw) -> WarmPool:
    snap = await backend.prepare("base")
    return WarmPool(backend, snap, **kw)


async def _answers(child) -> str:
    info = await child.conn.request("info", timeout=10)
    return info["hostname"]


async def test_take_hands_out_a_ready_child_without_forking(process_backend):
    spawn = CountingSpawn(process_backend)
    pool = await _pool(process_backend, min_ready=2, max_total=4)
    async with pool:
        assert pool.stats().ready == 2
        ready_ids = {c.id for c in process_backend.children()}
        calls, spawned = len(spawn.calls), pool.stats().spawned_total

        child = await pool.take()

        assert len(spawn.calls) == calls  # no fork during take()
        assert pool.stats().spawned_total == spawned
        assert child.id in ready_ids
        assert child.alive
        assert await _answers(child) == child.id
        s = pool.stats()
        assert (s.in_use, s.taken_total) == (1, 1)


async def test_refills_to_min_ready_after_takes(process_backend):
    pool = await _pool(process_backend, min_ready=2, max_total=6, batch=2)
    async with pool:
        taken = [await pool.take(), await pool.take()]
        assert await pool.wait_ready(2, timeout=30)
        s = pool.stats()
        assert (s.ready, s.in_use, s.spawned_total, s.failures) == (2, 2, 4, 0)
        # The refilled ones are new children, not the ones handed out.
        assert {c.id for c in process_backend.children()} >= {c.id for c in taken}
        assert len(process_backend.children()) == 4
        # Releasing kills the child and frees its place; the ready set stays at min_ready.
        await pool.release(taken[0])
        assert not taken[0].alive
        assert taken[0] not in process_backend.children()
        assert pool.stats().in_use == 1
        assert await _answers(taken[1]) == taken[1].id


async def test_refills_wait_for_a_step_of_missing_children(process_backend):
    spawn = CountingSpawn(process_backend)
    pool = await _pool(process_backend, min_ready=8, max_total=16)
    assert pool.refill_step == 2  # a quarter of min_ready
    async with pool:
        assert spawn.calls == [8]
        await pool.take()
        await asyncio.sleep(0.3)
        assert spawn.calls == [8] and pool.stats().ready == 7  # one short: no fork yet
        await pool.take()
        assert await pool.wait_ready(8, timeout=30)
        assert spawn.calls == [8, 2]  # two short: both forked in one go
        # A ready child that dies is replaced at once: the step only batches what was taken.
        victim = next(iter(pool._ready.values()))
        await process_backend.kill(victim)
        assert await pool.wait_ready(8, timeout=30)
        assert spawn.calls == [8, 2, 1]
        # A pool that ran dry refills at once, whatever the step.
        dry = await _pool(process_backend, min_ready=1, max_total=4, refill_step=3)
        async with dry:
            await dry.take()
            assert await dry.wait_ready(1, timeout=30)


async def test_first_fill_reaches_min_ready_past_a_batch(process_backend):
    # 20 = a batch of 16 and 4 more: the step (5) must not hold back the first fill.
    spawn = CountingSpawn(process_backend)
    pool = await _pool(process_backend, min_ready=20, max_total=24)
    async with pool:
        assert pool.stats().ready == 20
        assert spawn.calls == [16, 4]


async def test_max_total_is_honoured(process_backend):
    pool = None
    spawn = CountingSpawn(process_backend, lambda: pool)
    pool = await _pool(process_backend, min_ready=1, max_total=2)
    async with pool:
        a = await pool.take()  # the ready one
        b = await pool.take()  # ready (refilled) or forked on demand: capacity remains
        assert a.id != b.id
        await asyncio.sleep(0.05)  # give the refill task a chance to (wrongly) fork a third
        s = pool.stats()
        assert s.ready + s.in_use + s.spawning <= 2
        assert spawn.children <= 2 and len(process_backend.children()) == 2

        with pytest.raises(PoolBusy) as err:
            await pool.take()
        assert err.value.code is ErrorCode.SERVICE_BUSY
        assert "in use" in err.value.message

        # A taker that waits gets the place freed by a release.
        waiter = asyncio.ensure_future(pool.take(timeout=30))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        await pool.release(a)
        c = await waiter
        assert c.id not in (a.id, b.id) and c.alive
        assert spawn.max_seen_total <= 2
        assert len(process_backend.children()) <= 2


async def test_dead_ready_child_is_not_handed_out(process_backend):
    pool = await _pool(process_backend, min_ready=2, max_total=4, refresh_identity=False)
    async with pool:
        victims = process_backend.children()
        assert len(victims) == 2
        for v in victims:
            os.kill(v.pid, signal.SIGKILL)
        for v in victims:
            await asyncio.wait_for(v.conn.wait_closed(), 10)
        child = await pool.take()
        assert child.id not in {v.id for v in victims}
        assert await _answers(child) == child.id
        assert pool.stats().failures == 2


async def test_handed_out_child_that_dies_frees_its_place(process_backend):
    pool = await _pool(process_backend, min_ready=1, max_total=1)
    async with pool:
        child = await pool.take()
        with pytest.raises(PoolBusy):
            await pool.take()
        os.kill(child.pid, signal.SIGKILL)
        await asyncio.wait_for(child.conn.wait_closed(), 10)
        assert pool.stats().in_use == 0
        other = await pool.take(timeout=30)
        assert other.id != child.id and await _answers(other) == other.id


async def test_concurrent_takes_get_distinct_children(process_backend):
    pool = await _pool(process_backend, min_ready=3, max_total=8)
    async with pool:
        kids = await asyncio.gather(*(pool.take() for _ in range(5)))  # 3 ready + 2 on demand
        assert len({k.id for k in kids}) == 5
        assert [await _answers(k) for k in kids] == [k.id for k in kids]
        assert pool.stats().in_use == 5


async def test_close_kills_everything(process_backend):
    pool = await _pool(process_backend, min_ready=2, max_total=5)
    await pool.start()
    taken = await pool.take()
    await pool.wait_ready(2, timeout=30)
    assert len(process_backend.children()) == 3
    await pool.close()
    assert process_backend.children() == []
    assert not taken.alive
    s = pool.stats()
    assert (s.ready, s.in_use, s.spawning) == (0, 0, 0)
    with pytest.raises(RpcError) as err:
        await pool.take()
    assert err.value.code is ErrorCode.SANDBOX and "closed" in err.value.message


async def test_close_while_refilling_leaves_nothing(process_backend):
    spawn = CountingSpawn(process_backend)
    spawn.spawned = asyncio.Event()
    pool = await _pool(process_backend, min_ready=4, max_total=4)
    await pool.start(wait=False)
    await asyncio.wait_for(spawn.spawned.wait(), 30)  # children exist; the pool has not got them yet
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0.01)
    assert not closing.done()  # close() waits for the spawn in flight...
    spawn.release.set()
    await closing
    assert process_backend.children() == []  # ...and kills what it returned


async def test_spawn_failures_are_reported_and_do_not_spin(process_backend):
    spawn = CountingSpawn(process_backend)
    spawn.fail = SpawnError("zygote exploded")
    pool = await _pool(process_backend, min_ready=1, max_total=2)
    with pytest.raises(RpcError) as err:
        await pool.start()
    assert "zygote exploded" in err.value.message
    try:
        with pytest.raises(RpcError) as err:
            await pool.take()  # nothing ready: on demand, which fails too
        assert err.value.code is ErrorCode.SANDBOX and "zygote exploded" in err.value.message
        await asyncio.sleep(0.3)
        assert len(spawn.calls) < 10  # backs off instead of looping
        assert pool.stats().failures >= 2

        spawn.fail = None  # the backend recovers: so does the pool
        assert await pool.wait_ready(1, timeout=30)
        assert await _answers(await pool.take())
    finally:
        await pool.close()
    assert process_backend.children() == []


async def test_bad_sizes_are_refused(process_backend):
    snap = await process_backend.prepare("base")
    for kw in (
        {"min_ready": 3, "max_total": 2},
        {"min_ready": -1, "max_total": 2},
        {"min_ready": 0, "max_total": 0},
    ):
        with pytest.raises(ValueError):
            WarmPool(process_backend, snap, **kw)


async def test_cancelled_take_leaves_no_orphan(process_backend):
    spawn = CountingSpawn(process_backend)
    spawn.spawned = asyncio.Event()
    pool = await _pool(process_backend, min_ready=0, max_total=2)
    async with pool:
        taker = asyncio.ensure_future(pool.take())  # nothing ready: forks on demand
        await asyncio.wait_for(spawn.spawned.wait(), 30)
        taker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taker
        spawn.release.set()
        for _ in range(500):  # the orphaned child is killed once its spawn returns
            if not process_backend.children() and pool.stats().spawning == 0:
                break
            await asyncio.sleep(0.01)
        assert process_backend.children() == []
        s = pool.stats()
        assert (s.spawning, s.in_use, s.spawned_total) == (0, 0, 1)


async def test_refills_run_at_idle_priority_and_handed_out_children_do_not(process_backend):
    pool = await _pool(process_backend, min_ready=1, max_total=3)
    async with pool:
        [ready] = pool._ready.values()
        # Forked and warmed for a refill: only ever runs on CPU time nobody else wants.
        assert os.sched_getscheduler(ready.pid) == os.SCHED_IDLE

        child = await pool.take()
        assert child is ready
        assert os.sched_getscheduler(child.pid) == os.SCHED_OTHER
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == 0
        # What the sandbox starts from now on inherits its normal priority.
        out = child.conn.open_inbound()
        await child.conn.request("exec.start", {"cmd": "ps -o cls=,ni= -p $$", "stream": out.id})
        printed = b"".join([data async for _fd, _off, data in out])
        assert printed.split() == [b"TS", b"0"]

        # A fork someone waits for (not a refill) is not idle either, even before any activate().
        [direct] = await process_backend.spawn(pool.snapshot, 1)
        try:
            assert os.sched_getscheduler(direct.pid) == os.SCHED_OTHER
        finally:
            await process_backend.kill(direct)
