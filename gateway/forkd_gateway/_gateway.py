"""The Gateway: backend, warm pools, the sandbox registry, leases, sessions, metrics and audit.

In-process API (the websocket app, the CLI and tests all use it)::

    gw = Gateway(config)            # or Gateway(config, backend=some_started_backend)
    await gw.start()                # backend, pools filled to min_ready, lease timer
    await gw.serve(transport, key_id)   # one client session over any forkd._transports Transport
    await gw.close()                # graceful: ends sessions, kills every sandbox, closes pools and backend

Ownership: every sandbox (and snapshot) belongs to the key id that created it; any other key id gets
exactly what an unknown id gets. Sandboxes that ended are remembered for a while (``_ENDED_MEMORY``) so
that a call into one says *why* it is gone (``sandbox_not_running``: killed, expired...), but only to its
owner. BRANCH and snapshots: ``_branch`` (mixed in here) and ``_snapshots``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from typing import Any

from forkd import protocol as p
from forkd._transports import Transport
from forkd_runtime._backend import Backend, SpawnOptions
from forkd_runtime._pool import WarmPool

from ._audit import AuditLog
from ._auth import LOCAL_KEY_ID, is_loopback_client
from ._backends import MeteredBackend, make_backend
from ._branch import Branching
from ._config import GatewayConfig
from ._leases import Leases
from ._metrics import Metrics
from ._params import bad, paginate
from ._sandbox import RUNNING, Sandbox, ended_error
from ._session import Session
from ._snapshots import SnapshotRecord, Snapshots

__all__ = ["Gateway"]

log = logging.getLogger("forkd.gateway")

_ENDED_MEMORY = 10_000
_AUDIT_EVENT = {"killed": "kill", "expired": "expire", "exited": "exit", "shutdown": "kill"}
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# E2B's template names, so that code written for E2B that names one explicitly runs unchanged.
TEMPLATE_ALIASES = {"code-interpreter-v1": "code-interpreter"}
_STATES = ("running", "paused")


def _not_found(sandbox_id: Any) -> p.RpcError:
    return p.RpcError(p.ErrorCode.SANDBOX_NOT_FOUND, f"sandbox {sandbox_id} not found")


class Gateway(Branching):
    template_aliases = TEMPLATE_ALIASES

    def __init__(self, config: GatewayConfig | None = None, *, backend: Backend | None = None) -> None:
        self.config = (config or GatewayConfig()).validate()
        self.backend: Backend | None = backend
        self._own_backend = backend is None
        self.metrics = Metrics()
        self.audit = AuditLog(None)
        self.pools: dict[str, WarmPool] = {}
        # Sandboxes asked for internet access come from pools of their own: their
        # network is set up per child at fork, so they are forked on demand.
        self.internet_pools: dict[str, WarmPool] = {}
        self.sandboxes: dict[str, Sandbox] = {}
        self.snapshots = Snapshots(lambda: self._spawner, self.metrics)
        self.sessions: set[Session] = set()
        self.leases = Leases(self._expire)
        self.state = "new"  # new -> running -> closing -> closed
        self._spawner: MeteredBackend | None = None
        # Ended sandboxes: id -> (owner, why), oldest first.
        self._ended: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()
        self._pool_lock = asyncio.Lock()
        self._ending: set[asyncio.Task] = set()

    # -- lifecycle of the gateway --
    async def start(self) -> None:
        if self.state != "new":
            raise RuntimeError(f"gateway is {self.state}")
        self.state = "starting"
        try:
            self.config.resolved_state_dir().mkdir(parents=True, exist_ok=True)
            self.audit = AuditLog(self.config.resolved_audit_log())
            if self.backend is None:
                self.backend = await make_backend(self.config)
            self._spawner = MeteredBackend(self.backend, self.metrics)
            self.leases.start()
            for name, pool in self.config.pools.items():
                await self._start_pool(
                    name, pool.min_ready, self.config.pool_max(pool), self.config.wait_for_pools
                )
        except BaseException:
            await self.close()
            raise
        self.state = "running"
        log.info(
            "gateway running: backend %s, pools %s",
            self.backend.name,
            {n: (pl.min_ready, pl.max_total) for n, pl in self.pools.items()},
        )

    async def close(self) -> None:
        """Graceful stop: end every session, kill every sandbox this gateway owns, close pools and backend."""
        if self.state in ("closing", "closed"):
            return
        self.state = "closing"
        await asyncio.gather(
            *(s.close("gateway shutting down") for s in list(self.sessions)), return_exceptions=True
        )
        await asyncio.gather(
            *(self._end(sb, "shutdown") for sb in list(self.sandboxes.values())), return_exceptions=True
        )
        if self._ending:
            await asyncio.gather(*list(self._ending), return_exceptions=True)
        if self._spawner is not None:
            await self.snapshots.close()
        await self.leases.close()
        pools = [*self.pools.values(), *self.internet_pools.values()]
        await asyncio.gather(*(pool.close() for pool in pools), return_exceptions=True)
        if self.backend is not None and self._own_backend:
            with contextlib.suppress(Exception):
                await self.backend.close()
        self.audit.close()
        self.state = "closed"

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def accepting(self) -> bool:
        return self.state == "running"

    def authenticate(self, presented_key: str | None, client_host: str | None) -> str | None:
        """The key id a connecting client acts as, or None to refuse it."""
        if self.config.keys:
            return self.config.keys.lookup(presented_key)
        return LOCAL_KEY_ID if is_loopback_client(client_host) else None

    async def serve(self, transport: Transport, key_id: str) -> None:
        """Run one client session over ``transport`` until it closes."""
        if not self.accepting:
            with contextlib.suppress(Exception):
                await transport.close()
            return
        session = Session(self, transport, key_id)
        self.sessions.add(session)
        self.metrics.sessions_active.set(len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.sessions_active.set(len(self.sessions))

    # -- pools --
    async def _start_pool(
        self, template: str, min_ready: int, max_total: int, wait: bool, internet: bool = False
    ) -> WarmPool:
        snapshot = await self._spawner.prepare(template)
        options = SpawnOptions(limits=self.config.limits, internet=internet)
        pool = WarmPool(self._spawner, snapshot, min_ready=min_ready, max_total=max_total, options=options)
        if internet:
            self.internet_pools[template] = pool
            return pool
        self.pools[template] = pool
        self.metrics.pool_ready.labels(template).set_function(lambda: pool.stats().ready)
        await pool.start(wait=wait)
        return pool

    async def _pool(self, template: str, internet: bool = False) -> WarmPool:
        pools = self.internet_pools if internet else self.pools
        pool = pools.get(template)
        if pool is not None:
            return pool
        if not _TEMPLATE_NAME.match(template):
            raise bad(f"bad template name {template!r}")
        async with self._pool_lock:
            pool = pools.get(template)
            if pool is None:
                # A template nobody configured gets a pool on first use: none kept ready, forks on demand.
                pool = await self._start_pool(
                    template, 0, self.config.default_max_total, wait=False, internet=internet
                )
            return pool

    def pool_stats(self) -> dict[str, dict]:
        stats = {name: pool.stats().as_dict() for name, pool in self.pools.items()}
        stats.update(
            {f"{name}+internet": pool.stats().as_dict() for name, pool in self.internet_pools.items()}
        )
        return stats

    # -- sandbox lifecycle --
    def _check_running(self) -> None:
        if self.state != "running":
            raise p.RpcError(p.ErrorCode.SERVICE_BUSY, f"the gateway is {self.state}")

    def _lease_seconds(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.default_timeout
        if not 0 < timeout <= self.config.max_timeout:
            raise bad(f"timeout must be > 0 and at most {self.config.max_timeout:g} s (got {timeout:g})")
        return timeout

    async def create(
        self,
        key_id: str,
        *,
        template: str | None = None,
        timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        internet: bool | None = None,
    ) -> Sandbox:
        self._check_running()
        t0 = time.perf_counter()
        template = template or self.config.default_template
        seconds = self._lease_seconds(timeout)
        snapshot = self._snapshot_for_create(key_id, template)
        if snapshot is not None:
            sandbox = await self._create_from_snapshot(
                key_id,
                snapshot,
                seconds=seconds,
                metadata=dict(metadata or {}),
                envs=dict(envs or {}),
                internet=bool(internet),
            )
            self.metrics.create_seconds.labels(snapshot.snapshot.template).observe(time.perf_counter() - t0)
            return sandbox
        template = TEMPLATE_ALIASES.get(template, template)
        pool = await self._pool(template, internet=bool(internet))
        try:
            child = await pool.take()
        except p.RpcError:
            raise
        except Exception as exc:  # e.g. the host cannot set up the network (no nftables, a clashing subnet)
            raise p.RpcError(p.ErrorCode.SANDBOX, f"cannot create a sandbox of {template}: {exc}") from None
        if self.state != "running":
            await pool.release(child)
            self._check_running()
        sandbox = self._admit(
            child,
            key_id,
            template=template,
            pool=pool,
            metadata=dict(metadata or {}),
            envs=dict(envs or {}),
            seconds=seconds,
        )
        self.metrics.create_seconds.labels(template).observe(time.perf_counter() - t0)
        return sandbox

    def _admit(
        self,
        child,
        key_id: str,
        *,
        template: str,
        pool,
        metadata: dict[str, str],
        envs: dict[str, str],
        seconds: float,
        origin: SnapshotRecord | None = None,
        label: str | None = None,
        audit: dict | None = None,
    ) -> Sandbox:
        """Make a started child a sandbox of ``key_id``: registry, lease, notifications, metrics, audit.
        No await: a child is either fully registered or not at all."""
        sandbox = Sandbox(
            id=child.id,
            owner=key_id,
            template=template,
            child=child,
            pool=pool,
            metadata=dict(metadata),
            envs=dict(envs),
            started_at=time.time(),
            end_at=0.0,
            origin=origin,
        )
        self.sandboxes[sandbox.id] = sandbox
        if origin is not None:
            self.snapshots.child_started(origin, sandbox.id)
        sandbox.end_at = self.leases.set(sandbox.id, seconds)
        child.conn.on_notification = self._agent_notification(sandbox)
        child.conn.add_close_callback(lambda _conn, sb=sandbox: self._child_closed(sb))
        self.metrics.sandboxes_active.set(len(self.sandboxes))
        self.metrics.sandboxes_created.labels(label or template).inc()
        self.audit.write(
            "create",
            key_id=key_id,
            sandbox_id=sandbox.id,
            template=template,
            timeout=seconds,
            **(audit or {}),
        )
        if not child.alive:  # died between the spawn and here: its close callback has already run
            self._child_closed(sandbox)
        return sandbox

    def _owned(self, key_id: str, sandbox_id: Any) -> Sandbox | None:
        sandbox = self.sandboxes.get(sandbox_id) if isinstance(sandbox_id, str) else None
        return sandbox if sandbox is not None and sandbox.owner == key_id else None

    def info(self, key_id: str, sandbox_id: str) -> Sandbox:
        sandbox = self._owned(key_id, sandbox_id)
        if sandbox is None:
            raise _not_found(sandbox_id)
        return sandbox

    def connect(self, key_id: str, sandbox_id: str, timeout: float | None = None) -> Sandbox:
        sandbox = self.info(key_id, sandbox_id)
        if timeout is not None:
            seconds = self._lease_seconds(timeout)
            remaining = self.leases.remaining(sandbox.id)
            if remaining is None or seconds > remaining:  # connect only ever extends
                sandbox.end_at = self.leases.set(sandbox.id, seconds)
        self.audit.write("connect", key_id=key_id, sandbox_id=sandbox.id, template=sandbox.template)
        return sandbox

    def set_timeout(self, key_id: str, sandbox_id: str, timeout: float) -> Sandbox:
        seconds = self._lease_seconds(timeout)
        sandbox = self.info(key_id, sandbox_id)
        sandbox.end_at = self.leases.set(sandbox.id, seconds)
        return sandbox

    async def kill(self, key_id: str, sandbox_id: str) -> bool:
        sandbox = self._owned(key_id, sandbox_id)
        if sandbox is None:
            return False
        await self._end(sandbox, "killed")
        return True

    def list(
        self,
        key_id: str,
        *,
        metadata: dict[str, str] | None = None,
        states: list[str] | None = None,
        limit: int | None = 100,
        next_token: str | None = None,
    ) -> tuple[list[Sandbox], str | None]:
        states = ["running"] if states is None else states
        unknown = set(states) - set(_STATES)
        if unknown:
            raise bad(f"unknown sandbox state(s) {sorted(unknown)}; known: {list(_STATES)}")
        metadata = metadata or {}
        # forkd does not pause sandboxes: none is in any state but running.
        listed = self.sandboxes.values() if "running" in states else ()
        return paginate(
            (
                sb
                for sb in listed
                if sb.owner == key_id
                and sb.state == RUNNING
                and all(sb.metadata.get(k) == v for k, v in metadata.items())
            ),
            lambda sb: (sb.started_at, sb.id),
            limit,
            next_token,
        )

    def sandbox_for_call(self, key_id: str, sandbox_id: Any) -> Sandbox:
        """The caller's running sandbox ``sandbox_id``, or the error a call into it gets."""
        if not isinstance(sandbox_id, str) or not sandbox_id:
            raise bad("'sandbox_id' is required and must be a string")
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            owner, why = self._ended.get(sandbox_id, (None, ""))
            if owner != key_id:
                raise _not_found(sandbox_id)
            raise ended_error(sandbox_id, why)
        if sandbox.owner != key_id:
            raise _not_found(sandbox_id)
        if not sandbox.running:
            raise sandbox.ended_error()
        return sandbox

    async def _expire(self, sandbox_id: str) -> None:
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is not None:
            await self._end(sandbox, "expired")

    def _child_closed(self, sandbox: Sandbox) -> None:
        if sandbox.state == RUNNING:
            log.warning("sandbox %s stopped unexpectedly: %s", sandbox.id, sandbox.conn.close_reason)
            task = asyncio.get_running_loop().create_task(self._end(sandbox, "exited"))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _end(self, sandbox: Sandbox, why: str) -> None:
        if sandbox.state != RUNNING:
            return
        sandbox.state = why  # before anything awaits: streams ending now see why
        self.sandboxes.pop(sandbox.id, None)
        self.leases.discard(sandbox.id)
        self._ended[sandbox.id] = (sandbox.owner, why)
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)
        sandbox.watches.clear()
        self.metrics.sandboxes_active.set(len(self.sandboxes))
        self.metrics.sandboxes_ended.labels(why).inc()
        details = {"reason": why} if why in ("shutdown",) else {}
        self.audit.write(
            _AUDIT_EVENT[why],
            key_id=sandbox.owner,
            sandbox_id=sandbox.id,
            template=sandbox.template,
            **details,
        )
        try:
            await sandbox.pool.release(sandbox.child)
        except Exception:
            log.exception("killing sandbox %s failed", sandbox.id)
        if sandbox.origin is not None:
            # After the kill: the backend refuses to delete a snapshot while a child of it lives.
            await self.snapshots.child_ended(sandbox.origin, sandbox.id)

    # -- what agents send on their own --
    def _agent_notification(self, sandbox: Sandbox):
        async def on_notification(_conn, method: str, params: dict) -> None:
            if method == "files.event":
                wid = params.get("watch")
                session = sandbox.watches.get(wid) if type(wid) is int else None
                if session is not None:
                    await session.notify("files.event", {**params, "sandbox_id": sandbox.id})
            elif method == "code.result":
                sid = params.get("stream")
                relay = sandbox.streams.get(sid) if type(sid) is int else None
                if relay is not None and relay.kind == "code" and not relay.stopped:
                    await relay.session.notify("code.result", {**params, "stream": relay.client_id})
            else:
                log.debug("sandbox %s: notification %s %r", sandbox.id, method, params)

        return on_notification
