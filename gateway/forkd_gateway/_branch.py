"""BRANCH and snapshots, the gateway's half: capture a live sandbox, start sandboxes from the capture.

Mixed into ``Gateway`` (it uses the gateway's backend, registry, leases, metrics and audit log).

- ``branch``: one capture of the source (the source keeps running), then ``count`` children of it
  in one backend spawn. Each child becomes a sandbox of the source's owner with the source's
  template name, metadata, envs and limits. The capture is internal: it goes away by itself once
  nothing depends on it (see ``_snapshots``).
- ``create_snapshot``: the same capture, kept as a user snapshot until ``delete_snapshot``;
  ``sandbox.create(template=<its id or name>)`` starts children of it on demand (no warm pool).

Errors: a source that is unknown or another key's → ``sandbox_not_found``; one that ended →
``sandbox_not_running``; one busy (code running in it) → ``conflict``; a backend that cannot capture
it → ``sandbox_error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any

from forkd import protocol as p
from forkd_runtime._backend import Backend, BranchBusy, Child, SpawnError, SpawnOptions

from ._params import bad
from ._snapshots import SNAPSHOT_PREFIX, SnapshotRecord, conflict

if TYPE_CHECKING:
    from ._sandbox import Sandbox

__all__ = ["Branching", "Unpooled", "MAX_BRANCH_COUNT"]

log = logging.getLogger("forkd.gateway.branch")

MAX_BRANCH_COUNT = 64
# A child that does not answer its identity refresh in this time is discarded (as in the pools).
_HANDOVER_TIMEOUT = 10.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Unpooled:
    """Where children of branches and snapshots go back to: nowhere, ``release`` kills them."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def release(self, child: Child) -> None:
        await self.backend.kill(child)


class Branching:
    """The branch and snapshot methods of ``Gateway`` (see the module docstring)."""

    # -- sandbox.branch --
    async def branch(
        self, key_id: str, sandbox_id: Any, count: Any = None, timeout: float | None = None
    ) -> dict[str, Any]:
        self._check_running()
        count = 1 if count is None else count
        if type(count) is not int or not 1 <= count <= MAX_BRANCH_COUNT:
            raise bad(f"count must be an integer from 1 to {MAX_BRANCH_COUNT}")
        seconds = self._lease_seconds(timeout)
        source = self.sandbox_for_call(key_id, sandbox_id)
        t0 = time.perf_counter()
        record = await self._capture(source, internal=True)
        try:
            started = await self._start_children(
                record,
                count,
                owner=source.owner,
                template=source.template,
                metadata=source.metadata,
                envs=source.envs,
                options=source.child.options,
                seconds=seconds,
                audit={"branched_from": source.id},
            )
        finally:
            await self.snapshots.collect(record)  # at once if no child started
        self.metrics.branches.inc()
        self.metrics.branch_seconds.observe(time.perf_counter() - t0)
        entries = [{"error": s.to_wire()} if isinstance(s, p.RpcError) else s.info() for s in started]
        return {"sandboxes": entries, **record.report()}

    # -- snapshots --
    async def create_snapshot(self, key_id: str, sandbox_id: Any, name: str | None = None) -> SnapshotRecord:
        self._check_running()
        if name is not None:
            self._check_snapshot_name(name)
        source = self.sandbox_for_call(key_id, sandbox_id)
        record = await self._capture(source, internal=False)
        if name is not None:
            self.snapshots.name(record, name)
        self.audit.write(
            "snapshot", key_id=key_id, sandbox_id=source.id, template=source.template, snapshot_id=record.id
        )
        return record

    async def delete_snapshot(self, key_id: str, snapshot_id: Any) -> bool:
        record = self.snapshots.resolve(key_id, snapshot_id)
        if record is None:
            return False
        await self.snapshots.delete(record)
        self.audit.write(
            "snapshot_delete",
            key_id=key_id,
            sandbox_id=record.source_id,
            template=record.template,
            snapshot_id=record.id,
        )
        return True

    def _check_snapshot_name(self, name: str) -> None:
        if not _NAME.match(name) or name.startswith(SNAPSHOT_PREFIX):
            raise bad(
                f"bad snapshot name {name!r}: 1 to 64 letters, digits, '_', '.', '-', "
                f"not starting with '{SNAPSHOT_PREFIX}'"
            )
        # A snapshot named like a template would change what `create(template=...)` means.
        templates_dir = self.config.resolved_templates_dir() / "templates"
        if (
            name in self.pools
            or name in self.template_aliases
            or name in self.template_aliases.values()
            or name == self.config.default_template
            or os.path.lexists(templates_dir / name)
        ):
            raise bad(f"{name!r} is the name of a template; choose another snapshot name")

    def _snapshot_for_create(self, key_id: str, template: str) -> SnapshotRecord | None:
        """The caller's snapshot that ``sandbox.create(template=...)`` names, if it names one."""
        record = self.snapshots.resolve(key_id, template)
        if record is None and template.startswith(SNAPSHOT_PREFIX):
            # Unknown, deleted, or another key's: all the same to the caller.
            raise p.RpcError(p.ErrorCode.TEMPLATE, f"no snapshot {template!r}")
        return record

    async def _create_from_snapshot(
        self,
        key_id: str,
        record: SnapshotRecord,
        *,
        seconds: float,
        metadata: dict[str, str],
        envs: dict[str, str],
        internet: bool,
    ) -> Sandbox:
        if len(record.children) + record.spawning >= self.config.default_max_total:
            raise p.RpcError(
                p.ErrorCode.SERVICE_BUSY,
                f"snapshot {record.id} already has {len(record.children)} sandboxes running; retry later",
            )
        (started,) = await self._start_children(
            record,
            1,
            owner=key_id,
            template=record.id,
            metadata=metadata,
            envs={**record.envs, **envs},
            options=SpawnOptions(limits=self.config.limits, internet=internet),
            seconds=seconds,
            audit={"snapshot_id": record.id},
        )
        if isinstance(started, p.RpcError):
            raise started
        return started

    # -- the two halves --
    async def _capture(self, source: Sandbox, *, internal: bool) -> SnapshotRecord:
        if type(self.backend).capture is Backend.capture:
            raise p.RpcError(
                p.ErrorCode.SANDBOX, f"the {self.backend.name} backend cannot capture a live sandbox"
            )
        async with source.capture_lock:  # concurrent branches of one source take turns
            if not source.running:
                raise source.ended_error()
            capture = asyncio.ensure_future(self._spawner.capture(source.child))
            try:
                # A caller that gives up must not leave a capture nobody knows about.
                snapshot = await asyncio.shield(capture)
            except asyncio.CancelledError:
                capture.add_done_callback(self._orphaned_capture)
                raise
            except BranchBusy as exc:  # code running in it, say: the caller may retry
                raise conflict(f"sandbox {source.id} is busy, it cannot be captured now: {exc}") from None
            except SpawnError as exc:  # BranchError: it died meanwhile, or the backend cannot
                if not source.running:
                    raise source.ended_error() from None
                raise p.RpcError(p.ErrorCode.SANDBOX, f"cannot capture sandbox {source.id}: {exc}") from None
            except Exception as exc:
                log.exception("capturing sandbox %s failed", source.id)
                raise p.RpcError(
                    p.ErrorCode.SANDBOX, f"capturing sandbox {source.id} failed: {exc}"
                ) from None
        self.metrics.capture_pause_seconds.observe(float(snapshot.meta.get("pause_s", 0.0)))
        return self.snapshots.add(
            owner=source.owner,
            snapshot=snapshot,
            source_id=source.id,
            template=source.template,
            envs=source.envs,
            metadata=source.metadata,
            internal=internal,
            parent=source.origin,
        )

    def _orphaned_capture(self, capture: asyncio.Future) -> None:
        if capture.cancelled() or capture.exception() is not None:
            return
        task = asyncio.ensure_future(self._spawner.delete_snapshot(capture.result()))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _start_children(
        self,
        record: SnapshotRecord,
        count: int,
        *,
        owner: str,
        template: str,
        metadata: dict[str, str],
        envs: dict[str, str],
        options: SpawnOptions,
        seconds: float,
        audit: dict[str, Any],
    ) -> list[Sandbox | p.RpcError]:
        """``count`` sandboxes started from ``record``: each running, or the error that stopped it."""
        record.spawning += 1
        failure = "see the gateway log"
        try:
            spawn = asyncio.ensure_future(self._spawner.spawn(record.snapshot, count, options))
            try:
                children = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                spawn.add_done_callback(self._orphaned_spawn)
                raise
            except Exception as exc:  # SpawnError: none started
                log.warning("starting sandboxes from %s failed: %s", record.id, exc)
                children, failure = [], str(exc)
        finally:
            record.spawning -= 1
        if self.state != "running":
            await asyncio.gather(*(self._spawner.kill(c) for c in children), return_exceptions=True)
            self._check_running()
        releaser = Unpooled(self._spawner)
        sandboxes = [
            self._admit(
                child,
                owner,
                template=template,
                pool=releaser,
                metadata=metadata,
                envs=envs,
                seconds=seconds,
                origin=record,
                label=record.snapshot.template,
                audit=audit,
            )
            for child in children
        ]
        try:
            problems = await asyncio.gather(*(self._hand_over(sb) for sb in sandboxes))
        except BaseException:
            await asyncio.gather(*(self._end(sb, "killed") for sb in sandboxes), return_exceptions=True)
            raise
        started: list[Sandbox | p.RpcError] = []
        for sb, problem in zip(sandboxes, problems, strict=True):
            if problem is None and sb.running:
                started.append(sb)
            else:
                await self._end(sb, "killed")
                started.append(
                    p.RpcError(p.ErrorCode.SANDBOX, problem or f"sandbox {sb.id} died as it started")
                )
        started.extend(
            p.RpcError(p.ErrorCode.SANDBOX, f"a sandbox did not start: {failure}")
            for _ in range(count - len(children))
        )
        return started

    def _orphaned_spawn(self, spawn: asyncio.Future) -> None:
        if spawn.cancelled() or spawn.exception() is not None:
            return
        for child in spawn.result():
            task = asyncio.ensure_future(self._spawner.kill(child))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _hand_over(self, sandbox: Sandbox) -> str | None:
        """Full priority, and (where the backend's children are frozen copies) a fresh clock and
        entropy, as a pool's take() gives: children of one capture must not share random state."""
        child = sandbox.child
        with contextlib.suppress(Exception):
            self.backend.activate(child)
        if not self.backend.refresh_on_handout:
            return None
        try:
            await child.conn.request(
                "identity.refresh",
                {"time": time.time(), "entropy": os.urandom(32)},
                timeout=_HANDOVER_TIMEOUT,
            )
        except Exception as exc:
            return f"sandbox {sandbox.id} did not start: {exc}"
        return None
