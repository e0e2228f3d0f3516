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
    return _registrar(METHODS, "method", name)


# Long-lived state holders (process table, contexts, watches...). The agent
# instantiates each with itself as the only argument. Optional hooks:
# ``async start()``, ``drop_connection(conn)`` (a client went away), ``async close()``.
COMPONENTS: dict[str, type] = {}


def component(name: str) -> Callable[[type], type]:
    return _registrar(COMPONENTS, "component", name)


def _registrar(table: dict[str, Any], kind: str, name: str) -> Callable[[Any], Any]:
    def register(obj: Any) -> Any:
        if name in table:
            raise RuntimeError(f"{kind} {name} registered twice")
        table[name] = obj
        return obj

    return register
