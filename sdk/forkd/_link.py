"""What a sandbox's modules (commands, files, pty, code) share: its id and its config."""

from __future__ import annotations

import inspect
from typing import Any

from ._client import Client, get_client
from ._config import ConnectionConfig

__all__ = ["Link", "call_back"]


class Link:
    """Calls into one sandbox through the shared gateway connection."""

    __slots__ = ("sandbox_id", "config")

    def __init__(self, sandbox_id: str, config: ConnectionConfig) -> None:
        self.sandbox_id = sandbox_id
        self.config = config

    async def client(self) -> Client:
        return await get_client(self.config)

    def timeout(self, request_timeout: float | None) -> float | None:
        return self.config.get_request_timeout(request_timeout)

    async def call(self, method: str, params: dict, request_timeout: float | None = None) -> Any:
        client = await get_client(self.config)
        params["sandbox_id"] = self.sandbox_id
        return await client.call(method, params, self.config.get_request_timeout(request_timeout))


async def call_back(cb: Any, *args: Any) -> None:
    """Call a user callback; await it when it is a coroutine function (async API only)."""
    res = cb(*args)
    if inspect.isawaitable(res):
        await res
