"""BRANCH and snapshots on the client side: ``sandbox.branch`` / ``snapshot.*`` calls and their results.

``AsyncSandbox.fork`` / ``branch`` / ``create_snapshot`` / ``list_snapshots`` / ``delete_snapshot``
(``_sandbox``) are thin; the request building, result decoding and the snapshot paginator are here.
"""

from __future__ import annotations

from typing import Any

from . import protocol as p
from ._client import gateway_call
from ._config import ConnectionConfig
from ._exceptions import InvalidArgumentException, from_rpc_error
from ._models import BranchReport, SandboxInfo, SnapshotInfo
from ._paging import AsyncPages

__all__ = [
    "AsyncSnapshotPaginator",
    "MAX_BRANCH_COUNT",
    "branch_call",
    "create_snapshot_call",
    "delete_snapshot_call",
    "check_count",
    "check_mode",
]

# The gateway's limit (E2B's own API allows 20 per fork).
MAX_BRANCH_COUNT = 64


def check_count(count: Any) -> int:
    if count is None:
        return 1
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_BRANCH_COUNT:
        raise InvalidArgumentException(f"count must be an integer between 1 and {MAX_BRANCH_COUNT}")
    return count


def check_mode(mode: Any) -> None:
    if mode not in (None, "full"):
        raise InvalidArgumentException(
            f"forkd snapshots keep everything the backend can carry; mode={mode!r} is not supported "
            "(use mode='full' or leave it out)"
        )


async def branch_call(
    sandbox_id: str, count: Any, timeout: int | None, config: ConnectionConfig
) -> tuple[list[SandboxInfo | Exception], BranchReport]:
    """One ``sandbox.branch``: per requested child its SandboxInfo or the exception that stopped it."""
    params: dict[str, Any] = {"sandbox_id": sandbox_id, "count": check_count(count)}
    if timeout is not None:
        params["timeout"] = timeout
    res = await gateway_call("sandbox.branch", params, config)
    out: list[SandboxInfo | Exception] = []
    for entry in res.get("sandboxes") or []:
        error = entry.get("error") if isinstance(entry, dict) else None
        if error:
            out.append(from_rpc_error(p.RpcError(*error[:2])))
        else:
            out.append(SandboxInfo._from_wire(entry))
    return out, BranchReport._from_wire(res)


async def create_snapshot_call(sandbox_id: str, name: str | None, config: ConnectionConfig) -> SnapshotInfo:
    params: dict[str, Any] = {"sandbox_id": sandbox_id}
    if name:
        params["name"] = name
    return SnapshotInfo._from_wire(await gateway_call("snapshot.create", params, config))


async def delete_snapshot_call(snapshot_id: str, config: ConnectionConfig) -> bool:
    return bool(await gateway_call("snapshot.delete", {"snapshot_id": snapshot_id}, config))


class AsyncSnapshotPaginator(AsyncPages):
    """Pages of ``list_snapshots()``: ``while p.has_next: items = await p.next_items()``.

    Only your own snapshots, oldest first; ``sandbox_id`` keeps those taken from that
    sandbox, ``name`` the one with that name or id.
    """

    def __init__(
        self,
        sandbox_id: str | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> None:
        super().__init__(next_token, opts)
        self.sandbox_id = sandbox_id
        self.limit = limit
        self.name = name

    async def next_items(self, **opts: Any) -> list[SnapshotInfo]:
        """The next page. Past the last page: ``Exception("No more items to fetch")``."""
        params: dict[str, Any] = {}
        if self.sandbox_id:
            params["sandbox_id"] = self.sandbox_id
        if self.name:
            params["name"] = self.name
        if self.limit:
            params["limit"] = self.limit
        return [SnapshotInfo._from_wire(d) for d in await self._fetch("snapshot.list", params, opts)]
