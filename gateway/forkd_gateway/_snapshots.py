"""The snapshots a gateway keeps, what depends on each, and when each may go.

Two kinds, one record type:

- **user snapshots** (``snapshot.create``): owned by a key, listed, named, started from with
  ``sandbox.create(template=<id or name>)``, deleted only by ``snapshot.delete``;
- **branch captures** (``sandbox.branch``): internal; deleted automatically as soon as nothing
  depends on them any more.

What depends on a record: the live sandboxes started from it (``children``), the records captured
from those sandboxes (``dependents``: a capture's parent is the record its source came from), and
spawns in flight. The gateway's own counts decide when to try a deletion; the backend has the last
word (``SnapshotInUse`` = not yet: a child's kill may still be settling), so an internal record that
the backend refuses is retried a few times with a growing delay, and again whenever something that
depended on it goes away.

Records live as long as the gateway: ``close()`` deletes every one (after the gateway has killed
every sandbox), leaves first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkd.protocol import ErrorCode, RpcError
from forkd_runtime._backend import Snapshot, SnapshotInUse

from ._params import paginate

if TYPE_CHECKING:
    from ._metrics import Metrics

__all__ = ["SnapshotRecord", "Snapshots", "SNAPSHOT_PREFIX", "conflict"]

log = logging.getLogger("forkd.gateway.snapshots")

SNAPSHOT_PREFIX = "snap-"
_CAPTURE_PREFIX = "capture-"
# Retries of an internal capture the backend still calls in use while the gateway counts nothing
# on it: a child's kill settling, at most a few seconds.
_RETRY_DELAYS = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0)


def conflict(message: str) -> RpcError:
    return RpcError(ErrorCode.CONFLICT, message)


@dataclass(eq=False)
class SnapshotRecord:
    id: str
    owner: str  # key id
    snapshot: Snapshot  # the backend's
    source_id: str  # the sandbox it was captured from
    template: str  # the template name the source had (what children are named after)
    envs: dict[str, str]
    metadata: dict[str, str]
    internal: bool  # a branch's capture, not a user snapshot
    parent: SnapshotRecord | None = None  # the record the source itself was started from
    names: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    children: set[str] = field(default_factory=set)  # live sandbox ids
    dependents: set[SnapshotRecord] = field(default_factory=set)
    spawning: int = 0
    retries: int = 0

    @property
    def pause_ms(self) -> float:
        return round(float(self.snapshot.meta.get("pause_s", 0.0)) * 1000.0, 3)

    def report(self) -> dict[str, Any]:
        """What the capture cost the source and what its children get (the backend's account)."""
        meta = self.snapshot.meta
        return {
            "pause_ms": self.pause_ms,
            "inherited": [str(x) for x in meta.get("inherited") or []],
            "not_inherited": [
                {"what": str(x.get("what", "")), "why": str(x.get("why", ""))}
                for x in meta.get("not_inherited") or []
                if isinstance(x, dict)
            ],
        }

    def info(self) -> dict[str, Any]:
        return {
            "snapshot_id": self.id,
            "names": list(self.names),
            "sandbox_id": self.source_id,
            "template_id": self.template,
            "created_at": self.created_at,
            **self.report(),
        }

    def in_use(self) -> bool:
        return bool(self.children or self.dependents or self.spawning)

    def users(self) -> str:
        """Who depends on it, in words (for the conflict error)."""
        parts = []
        if self.children:
            parts.append("sandboxes " + ", ".join(sorted(self.children)))
        for dep in sorted(self.dependents, key=lambda d: d.created_at):
            if dep.internal:
                parts.append(f"a branch of sandbox {dep.source_id}")
            else:
                parts.append(f"snapshot {dep.id}")
        if self.spawning:
            parts.append(f"{self.spawning} sandbox(es) starting")
        return "; ".join(parts)


class Snapshots:
    """Every record of one gateway, by id. ``backend_of()`` is the backend that deletes a record's
    snapshot (a callable: the gateway starts its backend after building this)."""

    def __init__(self, backend_of: Any, metrics: Metrics) -> None:
        self._backend_of = backend_of
        self._metrics = metrics
        self._records: dict[str, SnapshotRecord] = {}
        self._retries: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(list(self._records.values()))

    # -- adding and finding --
    def add(
        self,
        *,
        owner: str,
        snapshot: Snapshot,
        source_id: str,
        template: str,
        envs: dict[str, str],
        metadata: dict[str, str],
        internal: bool,
        parent: SnapshotRecord | None,
    ) -> SnapshotRecord:
        prefix = _CAPTURE_PREFIX if internal else SNAPSHOT_PREFIX
        record = SnapshotRecord(
            id=f"{prefix}{uuid.uuid4().hex[:16]}",
            owner=owner,
            snapshot=snapshot,
            source_id=source_id,
            template=template,
            envs=dict(envs),
            metadata=dict(metadata),
            internal=internal,
            parent=parent,
        )
        if parent is not None:
            parent.dependents.add(record)
        self._records[record.id] = record
        self._metrics.snapshots_active.set(len(self._records))
        return record

    def name(self, record: SnapshotRecord, name: str) -> None:
        """Give ``record`` the name; another of the owner's snapshots that had it loses it
        (as in E2B, where naming a new snapshot like an old one points the name at the new one)."""
        for other in self._records.values():
            if other.owner == record.owner and name in other.names:
                other.names.remove(name)
        record.names.append(name)

    def resolve(self, key_id: str, ref: Any) -> SnapshotRecord | None:
        """The caller's user snapshot with this id or name (another key's is not found)."""
        if not isinstance(ref, str) or not ref:
            return None
        record = self._records.get(ref)
        if record is not None:
            return record if record.owner == key_id and not record.internal else None
        for record in self._records.values():
            if record.owner == key_id and not record.internal and ref in record.names:
                return record
        return None

    def list(
        self,
        key_id: str,
        *,
        sandbox_id: str | None = None,
        name: str | None = None,
        limit: int | None = 100,
        next_token: str | None = None,
    ) -> tuple[list[SnapshotRecord], str | None]:
        return paginate(
            (
                r
                for r in self._records.values()
                if r.owner == key_id
                and not r.internal
                and (sandbox_id is None or r.source_id == sandbox_id)
                and (name is None or name == r.id or name in r.names)
            ),
            lambda r: (r.created_at, r.id),
            limit,
            next_token,
        )

    # -- what depends on a record --
    def child_started(self, record: SnapshotRecord, sandbox_id: str) -> None:
        record.children.add(sandbox_id)

    async def child_ended(self, record: SnapshotRecord, sandbox_id: str) -> None:
        record.children.discard(sandbox_id)
        await self.collect(record)

    # -- deleting --
    async def delete(self, record: SnapshotRecord) -> None:
        """A user's delete: refused (``conflict``) while anything depends on the snapshot."""
        if record.in_use():
            raise conflict(f"snapshot {record.id} is in use by {record.users()}; end those first")
        if self._records.get(record.id) is not record:
            return  # deleted meanwhile
        try:
            await self._delete(record)
        except SnapshotInUse as exc:
            raise conflict(f"snapshot {record.id} is in use: {exc}") from None
        except Exception as exc:
            log.exception("deleting snapshot %s failed", record.id)
            raise RpcError(ErrorCode.SANDBOX, f"deleting snapshot {record.id} failed: {exc}") from None

    async def collect(self, record: SnapshotRecord) -> None:
        """Delete an internal capture if nothing depends on it any more (else later)."""
        if (
            not record.internal
            or record.in_use()
            or self._records.get(record.id) is not record
            or self._closed
        ):
            return
        try:
            await self._delete(record)
        except SnapshotInUse:
            self._retry_later(record)
        except Exception:
            log.exception("deleting branch capture %s failed; forgetting it", record.id)
            self._forget(record)

    async def _delete(self, record: SnapshotRecord) -> None:
        # Gone from the registry before the await: a second delete or collect sees nothing to do,
        # and nobody starts a sandbox from a snapshot being deleted.
        del self._records[record.id]
        try:
            await self._backend_of().delete_snapshot(record.snapshot)
        except BaseException:
            self._records[record.id] = record
            raise
        self._forget(record)
        parent = record.parent
        if parent is not None:
            await self.collect(parent)

    def _forget(self, record: SnapshotRecord) -> None:
        self._records.pop(record.id, None)
        if record.parent is not None:
            record.parent.dependents.discard(record)
        self._metrics.snapshots_active.set(len(self._records))

    def _retry_later(self, record: SnapshotRecord) -> None:
        if record.retries >= len(_RETRY_DELAYS):
            log.warning("branch capture %s: the backend still calls it in use; keeping it", record.id)
            return
        delay = _RETRY_DELAYS[record.retries]
        record.retries += 1
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retries.discard(handle)
            task = loop.create_task(self.collect(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        handle = loop.call_later(delay, fire)
        self._retries.add(handle)

    async def close(self) -> None:
        """Delete every record (the gateway has killed every sandbox by now), leaves first."""
        self._closed = True
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        while self._records:
            leaves = [r for r in self._records.values() if not r.dependents]
            if not leaves:  # cannot happen (dependents point to younger records), but never spin
                break
            for record in leaves:
                self._records.pop(record.id, None)
                with contextlib.suppress(Exception):
                    await self._backend_of().delete_snapshot(record.snapshot)
                if record.parent is not None:
                    record.parent.dependents.discard(record)
        self._records.clear()
        self._metrics.snapshots_active.set(0)
