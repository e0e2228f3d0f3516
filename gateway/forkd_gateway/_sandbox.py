"""One sandbox as the gateway knows it: its child, owner, lease, defaults, and what clients have open in it."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from forkd.protocol import ErrorCode, RpcError
from forkd_runtime._backend import Child

if TYPE_CHECKING:
    from forkd_runtime._pool import WarmPool

    from ._snapshots import SnapshotRecord

__all__ = ["Sandbox", "RUNNING", "ENDED_PHRASES", "ended_error"]

RUNNING = "running"
# Why a sandbox stopped running -> how errors about it say so.
ENDED_PHRASES = {
    "killed": "was killed",
    "expired": "expired (its timeout ran out)",
    "exited": "stopped unexpectedly",
    "shutdown": "was stopped because the gateway shut down",
}


def ended_error(sandbox_id: str, why: str) -> RpcError:
    phrase = ENDED_PHRASES.get(why, "is not running")
    return RpcError(ErrorCode.SANDBOX_NOT_RUNNING, f"sandbox {sandbox_id} {phrase}")


@dataclass(eq=False)
class Sandbox:
    id: str
    owner: str  # key id
    template: str
    child: Child
    # Where the child goes back to (``release`` kills it): its template's pool, or an
    # ``Unpooled`` for children of branches and snapshots.
    pool: WarmPool | Any
    metadata: dict[str, str]
    envs: dict[str, str]
    started_at: float
    end_at: float
    state: str = RUNNING
    # Relays open into this sandbox, by the stream id on the agent connection.
    streams: dict[int, Any] = field(default_factory=dict)
    # Watches by agent watch id -> the session that created it (files.event goes there only).
    watches: dict[int, Any] = field(default_factory=dict)
    # The snapshot this sandbox was started from (a branch's capture or a user snapshot), if any.
    origin: SnapshotRecord | None = None
    # One capture of this sandbox at a time: concurrent branches of it queue here.
    capture_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def conn(self):
        return self.child.conn

    @property
    def running(self) -> bool:
        return self.state == RUNNING and not self.child.conn.closed.is_set()

    def ended_error(self) -> RpcError:
        # Still "running" here means its channel closed before the gateway learned why: it died.
        return ended_error(self.id, self.state if self.state != RUNNING else "exited")

    def info(self) -> dict:
        limits = self.child.options.limits
        return {
            "sandbox_id": self.id,
            "template_id": self.template,
            "name": self.template,
            "metadata": dict(self.metadata),
            "started_at": self.started_at,
            "end_at": self.end_at,
            "state": RUNNING if self.state == RUNNING else "killed",
            "cpu_count": max(1, math.ceil(limits.cpus)),
            "memory_mb": limits.memory_mb,
            "envs": dict(self.envs),
        }
