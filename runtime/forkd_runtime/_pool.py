"""A warm pool: children of one snapshot forked ahead of time, so creating a sandbox never waits for a fork.

Capacity is counted over everything the pool is responsible for::

    ready (forked, warmed, waiting) + in_use (handed out) + spawning (being forked or warmed) <= max_total

One background task keeps ``ready`` at ``min_ready``. It forks in batches and is woken when a child is taken,
released or dies; ``take()`` never waits for it. Children taken are replaced once ``refill_step`` of them
are (default a quarter of ``min_ready``) or none is ready; the first fill and children that died or failed
to start are replaced at once. A refill in progress slows the first command
of a sandbox created meanwhile (measured: p50 3.0-3.4 ms without, 4.9-6.3 ms with, p90 4.6 vs 14 ms), so
fewer, larger refills leave more creates untouched, and a batch costs less per child than single forks.

``take()``:
  1. a ready child, if there is one: no fork (then the identity refresh below);
  2. otherwise, if capacity remains, one child forked on demand;
  3. otherwise it waits up to ``timeout`` seconds (default 0: not at all) for a ready child or free capacity,
     then raises ``PoolBusy`` (an ``RpcError`` with ``ErrorCode.SERVICE_BUSY``): failing fast lets the caller
     answer "busy, retry" instead of holding a request open.

Children come from the backend "lazy": their agent answers only hello/ping until the first other request
starts the full agent. The pool sends that first request (``info``) before a child counts as ready, so a
user's first real request does not pay for starting the agent (measured: take() -> first ``exec.start``
answer p50 ~4 ms warmed vs 7-12 ms not, 2 loaded cores), then ``exec.prepare``: the agent starts and parks
the login shell a first command as the default user will run in (forkd_agent/_warm_shell.py), which makes
that command ~2.5 ms instead of ~5.

When ``refresh_identity`` is on (the default where the backend asks for it), ``take()`` sends ``identity.refresh`` with the host's clock and
fresh entropy to the child it hands out: a child may have waited in the pool for a long time (a VM child's
clock stands still meanwhile), and this makes each handed-out sandbox's randomness independent of when and
how it was forked. It costs one round trip in take() (p50 ~0.9 ms, vs ~0.02 ms without); the warm-up sends
one refresh too, because a first call pays ~1 ms more for faulting in its code path.

Handed-out children belong to the pool until ``release()`` (which kills them: a used sandbox is never
recycled) or until they die; ``close()`` kills them all, ready and handed out.

The pool uses only the ``Backend`` interface, so every backend gets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass

from forkd.protocol import ErrorCode, RpcError

from ._backend import Backend, Child, Snapshot, SpawnOptions, refilling

__all__ = ["WarmPool", "PoolStats", "PoolBusy"]

log = logging.getLogger("forkd.runtime.pool")

# A child that does not answer its warm-up or refresh in this time is discarded.
REQUEST_TIMEOUT = 10.0
# After a failed refill the next attempt waits this long, doubling up to the cap: a broken
# template must not turn the pool into a fork loop.
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
# close() lets an in-flight spawn finish (and then kills its children) rather than cancelling
# it halfway, which could leave children the pool never learns about.
CLOSE_GRACE = 30.0


class PoolBusy(RpcError):
    """No child ready and no capacity to fork one."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.SERVICE_BUSY, message)


@dataclass(frozen=True)
class PoolStats:
    ready: int
    in_use: int
    spawning: int
    spawned_total: int  # children the backend returned to this pool, ever
    taken_total: int
    failures: int  # children that failed to spawn, warm up or refresh, or died while ready

    def as_dict(self) -> dict:
        return asdict(self)


class WarmPool:
    def __init__(
        self,
        backend: Backend,
        snapshot: Snapshot,
        min_ready: int,
        max_total: int,
        options: SpawnOptions | None = None,
        batch: int = 16,
        *,
        warm_up: bool = True,
        refresh_identity: bool | None = None,
        refill_step: int | None = None,
    ) -> None:
        if min_ready < 0 or max_total < 1 or min_ready > max_total:
            raise ValueError(
                f"need 0 <= min_ready <= max_total and max_total >= 1 (got {min_ready}, {max_total})"
            )
        if batch < 1:
            raise ValueError(f"batch must be >= 1 (got {batch})")
        self.backend = backend
        self.snapshot = snapshot
        self.min_ready = min_ready
        self.max_total = max_total
        self.options = options or SpawnOptions()
        self.batch = batch
        # Replace taken children this many at a time (or when none is ready), not after every
        # take: a refill running under a just-created sandbox's first command costs that command
        # ~3 ms here (a refill child's start is ~1000 page faults, and on this host page-table
        # work on one vCPU slows the other), and forking several at once is cheaper per child.
        self.refill_step = max(1, min(batch, min_ready // 4)) if refill_step is None else refill_step
        self.warm_up = warm_up
        # Default: what the backend says its children need (a VM child's clock and
        # kernel RNG are frozen copies; a process child shares the host's).
        self.refresh_identity = backend.refresh_on_handout if refresh_identity is None else refresh_identity
        # Oldest first: the child that has waited longest is handed out first.
        self._ready: dict[str, Child] = {}
        self._in_use: dict[str, Child] = {}
        self._spawning_refill = 0
        self._spawning_demand = 0
        self._spawned_total = 0
        self._taken_total = 0
        self._taken_unrefilled = 0  # ready children handed out since the refills that replace them
        self._failures = 0
        self._wake = asyncio.Event()  # wakes the refill task
        self._changed = asyncio.Event()  # replaced on every change; takers waiting for capacity watch it
        self._refill_task: asyncio.Task | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self.last_error = ""  # the most recent spawn/warm-up/refresh failure, for operators

    # -- lifecycle --
    async def start(self, wait: bool = True) -> None:
        """Start refilling; with ``wait``, return once ``min_ready`` children are ready
        (or the first attempt failed: the pool keeps retrying in the background)."""
        if self._closing:
            raise RpcError(ErrorCode.SANDBOX, "pool is closed")
        if self._refill_task is None:
            self._refill_task = asyncio.get_running_loop().create_task(self._refill_loop())
            self._refill_task.add_done_callback(self._refill_done)
        if wait and not await self.wait_ready(stop_on_failure=True) and not self._ready:
            raise RpcError(
                ErrorCode.SANDBOX,
                f"pool of {self.snapshot.template} could not start a child: {self.last_error}",
            )

    async def wait_ready(
        self, n: int | None = None, timeout: float | None = None, *, stop_on_failure=False
    ) -> bool:
        """Wait until at least ``n`` (default ``min_ready``) children are ready; False on timeout
        (or, with ``stop_on_failure``, as soon as a spawn fails)."""
        n = self.min_ready if n is None else n
        failures = self._failures
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while len(self._ready) < n:
            if self._closing or (stop_on_failure and self._failures > failures):
                return False
            changed = self._changed
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        """Stop refilling and kill every child of the pool, ready or handed out."""
        if self._closing and self._refill_task is None:
            return
        self._closing = True
        self._closed.set()
        self._wake.set()
        self._notify()
        task, self._refill_task = self._refill_task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=CLOSE_GRACE)
            if not done:
                log.error("pool refill did not stop within %.0f s; cancelling it", CLOSE_GRACE)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # On-demand spawns in flight kill their own child when they see _closing; wait for them.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_GRACE
        while self._spawning_demand and loop.time() < deadline:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), deadline - loop.time())
        children = [*self._ready.values(), *self._in_use.values()]
        self._ready.clear()
        self._in_use.clear()
        await asyncio.gather(*(self.backend.kill(c) for c in children), return_exceptions=True)
        self._notify()

    async def __aenter__(self) -> WarmPool:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the hot path --
    async def take(self, timeout: float = 0.0) -> Child:
        """A child for exclusive use: a ready one at once, else one forked on demand while capacity
        remains, else wait up to ``timeout`` s for either. Raises ``PoolBusy`` (SERVICE_BUSY) when none
        could be had in time, ``RpcError`` (SANDBOX) when the pool is closed or forking failed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._closing:
                raise RpcError(ErrorCode.SANDBOX, f"pool of {self.snapshot.template} is closed")
            child = self._pop_ready()
            if child is not None:
                self._taken_unrefilled += 1
                self._in_use[child.id] = child
                self.backend.activate(child)
                if not self.refresh_identity or await self._refresh(child):
                    self._taken_total += 1
                    self._wake.set()  # refill after the hand-over, not in its way
                    return child
                continue
            if self._total() < self.max_total:
                child = await self._spawn_on_demand()
                self.backend.activate(child)
                self._taken_total += 1
                self._wake.set()
                return child
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PoolBusy(
                    f"no sandbox of {self.snapshot.template} available: all {self.max_total} are in use or starting"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def release(self, child: Child) -> None:
        """Kill a handed-out child and free its place (used sandboxes are never put back)."""
        self._in_use.pop(child.id, None)
        self._ready.pop(child.id, None)
        try:
            await self.backend.kill(child)
        finally:
            self._wake.set()
            self._notify()

    kill = release

    def stats(self) -> PoolStats:
        return PoolStats(
            ready=len(self._ready),
            in_use=len(self._in_use),
            spawning=self._spawning_refill + self._spawning_demand,
            spawned_total=self._spawned_total,
            taken_total=self._taken_total,
            failures=self._failures,
        )

    # -- internals --
    def _total(self) -> int:
        return len(self._ready) + len(self._in_use) + self._spawning_refill + self._spawning_demand

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _pop_ready(self) -> Child | None:
        while self._ready:
            cid = next(iter(self._ready))
            child = self._ready.pop(cid)
            if child.alive:
                return child
            # Its close callback has not run yet; it will find nothing to do.
            self._failures += 1
            self._discard(child)
        return None

    def _discard(self, child: Child) -> None:
        asyncio.ensure_future(self._kill_quietly(child))

    async def _kill_quietly(self, child: Child) -> None:
        try:
            await self.backend.kill(child)
        except Exception:
            log.exception("killing %s failed", child.id)

    def _adopt(self, child: Child) -> None:
        """Learn when the child dies, wherever it is."""
        child.conn.add_close_callback(lambda _conn, c=child: self._on_closed(c))

    def _on_closed(self, child: Child) -> None:
        if self._ready.pop(child.id, None) is not None:
            self._failures += 1
            log.warning("pool child %s died while ready", child.id)
            self._discard(child)
        elif self._in_use.pop(child.id, None) is None:
            return
        self._wake.set()
        self._notify()

    @staticmethod
    def _identity() -> dict:
        return {"time": time.time(), "entropy": os.urandom(32)}

    async def _refresh(self, child: Child) -> bool:
        """identity.refresh on a child being handed out; on failure the child is discarded."""
        try:
            await child.conn.request("identity.refresh", self._identity(), timeout=REQUEST_TIMEOUT)
            return True
        except asyncio.CancelledError:
            self._in_use.pop(child.id, None)
            self._discard(child)
            self._wake.set()
            raise
        except Exception as exc:
            self.last_error = f"identity refresh of {child.id} failed: {exc}"
            log.warning("%s", self.last_error)
            self._in_use.pop(child.id, None)
            self._failures += 1
            self._discard(child)
            self._notify()
            return False

    async def _warm(self, child: Child) -> bool:
        if self.warm_up:
            try:
                # Any request but hello/ping starts the child's full agent (see forkd_agent._lazy).
                await child.conn.request("info", timeout=REQUEST_TIMEOUT)
                if self.refresh_identity:
                    # A first call pays for faulting in its code path (~1 ms); pay it here, not in take().
                    await child.conn.request("identity.refresh", self._identity(), timeout=REQUEST_TIMEOUT)
                # The same for a user's first command: its login shell started and
                # parked here, at the pool's low priority (a command as the default
                # user runs in it; see forkd_agent._warm_shell).
                await child.conn.request("exec.prepare", {}, timeout=REQUEST_TIMEOUT)
            except Exception as exc:
                self.last_error = f"warm-up of {child.id} failed: {exc}"
                log.warning("%s", self.last_error)
                await self._kill_quietly(child)
                return False
        if not child.alive:
            await self._kill_quietly(child)
            return False
        return True

    async def _spawn_on_demand(self) -> Child:
        self._spawning_demand += 1
        spawn = asyncio.ensure_future(self.backend.spawn(self.snapshot, 1, self.options))
        try:
            # A taker that gives up must not leave a child the pool never learns about:
            # the spawn runs to its end, and its children are killed if nobody wants them.
            children = await asyncio.shield(spawn)
        except asyncio.CancelledError:
            spawn.add_done_callback(self._orphaned_spawn)
            raise
        except Exception as exc:
            self._failures += 1
            self.last_error = f"spawning on demand failed: {exc}"
            self._spawn_demand_done()
            raise RpcError(
                ErrorCode.SANDBOX, f"could not start a sandbox of {self.snapshot.template}: {exc}"
            ) from exc
        self._spawned_total += len(children)
        if self._closing or not children:
            await asyncio.gather(*(self._kill_quietly(c) for c in children))
            self._spawn_demand_done()
            raise RpcError(ErrorCode.SANDBOX, f"pool of {self.snapshot.template} is closed")
        child = children[0]
        self._adopt(child)
        self._in_use[child.id] = child
        self._spawn_demand_done()
        # No separate warm-up: the refresh (or the user's first request) starts the agent anyway.
        if self.refresh_identity and not await self._refresh(child):
            raise RpcError(
                ErrorCode.SANDBOX, f"sandbox {child.id} of {self.snapshot.template} failed to start"
            )
        return child

    def _spawn_demand_done(self) -> None:
        self._spawning_demand -= 1
        self._notify()

    def _orphaned_spawn(self, spawn: asyncio.Future) -> None:
        if not spawn.cancelled() and spawn.exception() is None:
            self._spawned_total += len(spawn.result())
            for child in spawn.result():
                self._discard(child)
        self._spawn_demand_done()
        self._wake.set()

    def _deficit(self) -> int:
        want = self.min_ready - len(self._ready) - self._spawning_refill
        if want <= self._taken_unrefilled < self.refill_step and self._ready:
            # Short only of what was taken, and not a step's worth yet: wait for a batch worth
            # forking (see refill_step). Anything else (the first fill, children that died or
            # failed to start) is forked at once.
            return 0
        room = self.max_total - self._total()
        return max(0, min(want, room, self.batch))

    async def _refill_loop(self) -> None:
        backoff = 0.0
        while not self._closing:
            self._wake.clear()
            k = self._deficit()
            if k == 0:
                await self._wake.wait()
                continue
            if backoff:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), backoff)
                if self._closing:
                    break
                k = self._deficit()
                if k == 0:
                    continue
            ok = await self._refill_batch(k)
            backoff = 0.0 if ok else min(BACKOFF_MAX, max(BACKOFF_MIN, backoff * 2))

    async def _refill_batch(self, k: int) -> bool:
        """Fork and warm ``k`` children into the ready set; False if any failed."""
        self._taken_unrefilled = max(0, self._taken_unrefilled - k)
        self._spawning_refill += k
        token = refilling.set(True)
        try:
            try:
                children = await self.backend.spawn(self.snapshot, k, self.options)
            except Exception as exc:
                self.last_error = f"spawning {k} failed: {exc}"
                log.warning("pool of %s: %s", self.snapshot.template, self.last_error)
                self._failures += k
                return False
            self._spawned_total += len(children)
            for child in children:
                self._adopt(child)
            warmed = await asyncio.gather(*(self._warm(c) for c in children))
            good = [c for c, ok in zip(children, warmed, strict=True) if ok]
            lost = k - len(good)
            self._failures += lost
            if self._closing:
                await asyncio.gather(*(self._kill_quietly(c) for c in good))
                return True
            for child in good:
                self._ready[child.id] = child
            return lost == 0
        finally:
            refilling.reset(token)
            self._spawning_refill -= k
            self._notify()

    def _refill_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("pool refill of %s stopped", self.snapshot.template, exc_info=task.exception())
