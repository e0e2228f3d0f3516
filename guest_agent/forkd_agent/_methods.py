"""The method table: each feature module registers its handlers here.

A handler is ``async def handler(agent, conn, params) -> result``. It raises
``RpcError`` with a precise code for anything the caller did wrong; any other
exception becomes a generic ``sandbox_error`` and is logged.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[Any, Any, dict], Awaitable[Any]]

METHODS: dict[str, Handler] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        if name in METHODS:
            raise RuntimeError(f"method {name} registered twice")
        METHODS[name] = fn
        return fn

    return register


# Long-lived state holders (process table, contexts, watches...). The agent
# instantiates each with itself as the only argument. Optional hooks:
# ``async start()``, ``drop_connection(conn)`` (a client went away), ``async close()``.
COMPONENTS: dict[str, type] = {}


def component(name: str) -> Callable[[type], type]:
    def register(cls: type) -> type:
        if name in COMPONENTS:
            raise RuntimeError(f"component {name} registered twice")
        COMPONENTS[name] = cls
        return cls

    return register
