"""The cursor both list paginators share (``sandbox.list`` and ``snapshot.list``).

The gateway pages with an opaque ``next_token``; a page without one is the last.
Asking past the last page raises ``Exception("No more items to fetch")``, as E2B's
paginators do.
"""

from __future__ import annotations

from typing import Any

from ._client import gateway_call
from ._config import config_from
from ._portal import run

__all__ = ["AsyncPages", "SyncPages"]


class AsyncPages:
    def __init__(self, next_token: str | None, opts: dict) -> None:
        self._config = config_from(**opts)
        self._has_next = True
        self._next_token = next_token

    @property
    def has_next(self) -> bool:
        """True while there may be more pages."""
        return self._has_next

    @property
    def next_token(self) -> str | None:
        """The cursor of the next page (None after the last)."""
        return self._next_token

    async def _fetch(self, method: str, params: dict, opts: dict) -> list[dict]:
        """One page's raw items; moves the cursor."""
        if not self._has_next:
            raise Exception("No more items to fetch")
        if self._next_token:
            params["next_token"] = self._next_token
        config = self._config.with_options(**opts)
        res = await gateway_call(method, params, config, opts.get("request_timeout"))
        self._next_token = res.get("next_token") or None
        self._has_next = bool(self._next_token)
        return res.get("items") or []


class SyncPages:
    """The blocking face of an ``AsyncPages`` (``self._p``)."""

    _p: Any

    @property
    def has_next(self) -> bool:
        return self._p.has_next

    @property
    def next_token(self) -> str | None:
        return self._p.next_token

    @property
    def limit(self) -> int | None:
        return self._p.limit

    def next_items(self, **opts: Any) -> list:
        """The next page. Past the last page: ``Exception("No more items to fetch")``."""
        if not self._p.has_next:
            raise Exception("No more items to fetch")
        return run(self._p.next_items(**opts))
