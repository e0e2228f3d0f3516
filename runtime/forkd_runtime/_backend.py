"""The interface every fork engine implements, and the objects it hands out.

The gateway sees only this: a Backend prepares a warm Snapshot of a template,
spawns Children from it, and kills them. The process backend (zygote + Linux
namespaces) and the microVM backend (QEMU restore) both fit behind it.
"""

from __future__ import annotations

import abc
import contextvars
import time
from dataclasses import dataclass, field
from typing import Any

from forkd._connection import Connection

__all__ = [
    "Limits",
    "SpawnOptions",
    "Snapshot",
    "Child",
    "Backend",
    "SpawnError",
    "BranchError",
    "BranchBusy",
    "SnapshotInUse",
    "refilling",
]

# True inside a warm pool's refill (its spawn and the tasks that spawn starts): nobody
# waits for these children, so a backend may make them at the lowest CPU priority.
refilling: contextvars.ContextVar[bool] = contextvars.ContextVar("forkd_pool_refilling", default=False)


class SpawnError(Exception):
    pass


class BranchError(SpawnError):
    """A live sandbox cannot be captured now (dead, busy, or the backend cannot)."""


class BranchBusy(BranchError):
    """The sandbox is in the middle of something a branch must not cut: code
    running in a context, or another branch of it."""


class SnapshotInUse(Exception):
    """A snapshot cannot be deleted: children or other snapshots depend on it."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 512
    cpus: float = 1.0
    pids: int = 512
    disk_mb: int = 1024  # the sandbox's writable layer

    def __post_init__(self) -> None:
        if self.memory_mb < 16 or self.cpus <= 0 or self.pids < 8 or self.disk_mb < 1:
            raise ValueError(f"limits too small: {self}")


@dataclass(frozen=True)
class SpawnOptions:
    limits: Limits = field(default_factory=Limits)
    internet: bool = False


@dataclass
class Snapshot:
    """A warm parent that children are forked from."""

    id: str
    template: str
    backend: str
    parent: Snapshot | None = None
    created_at: float = field(default_factory=time.time)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class Child:
    """One running sandbox."""

    id: str
    snapshot: Snapshot
    pid: int
    conn: Connection
    options: SpawnOptions
    created_at: float = field(default_factory=time.time)
    # time.monotonic() when the child first answered its agent (set by the backend)
    ready_at: float = 0.0
    # Backend-private handle (cgroup, pidfd...).
    handle: Any = None

    @property
    def alive(self) -> bool:
        return not self.conn.closed.is_set()


class Backend(abc.ABC):
    name: str
    # Whether a child handed out of a warm pool needs identity.refresh (clock,
    # kernel RNG, PRNGs): true where children are frozen copies (VM snapshots).
    refresh_on_handout: bool = True

    @abc.abstractmethod
    async def prepare(self, template: str) -> Snapshot:
        """Start (or reuse) the warm parent of ``template``."""

    @abc.abstractmethod
    async def spawn(self, snapshot: Snapshot, n: int, options: SpawnOptions | None = None) -> list[Child]:
        """Fork ``n`` children; each has answered a ping when this returns."""

    @abc.abstractmethod
    async def kill(self, child: Child) -> None:
        """Kill a child and release everything it held. Idempotent."""

    @abc.abstractmethod
    def children(self) -> list[Child]: ...

    def activate(self, child: Child) -> None:  # noqa: B027 (an optional hook, not abstract)
        """A child leaves the warm pool for a user. Backends that prepare
        children at low priority (so refills never slow down requests in
        flight) give it full priority here."""

    async def capture(self, child: Child) -> Snapshot:
        """BRANCH: snapshot a live child; it keeps running. ``spawn`` starts
        children of the result that inherit the child's state at this instant.

        The result's ``parent`` is ``child.snapshot``; its ``meta`` holds at
        least ``pause_s`` (how long the child was stopped), ``inherited``
        (what carries over, as short strings) and ``not_inherited`` (a list of
        ``{"what": ..., "why": ...}``). Raises BranchError."""
        raise BranchError(f"the {self.name} backend cannot branch a live sandbox")

    async def delete_snapshot(self, snapshot: Snapshot) -> None:  # noqa: B027 (optional)
        """Delete a snapshot made by ``capture`` and its files. Raises
        SnapshotInUse while a live child or another snapshot depends on it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill every child and parent this backend started."""
