"""Typed access to request params: a wrong or missing field is the caller's
error (invalid_argument), never an agent crash."""

from __future__ import annotations

from typing import Any

from forkd.protocol import ErrorCode, RpcError

_MISSING = object()


def _type_name(t: type | tuple) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t)
    return t.__name__


def get(params: dict, name: str, kind: type | tuple, default: Any = _MISSING) -> Any:
    """``params[name]`` checked against ``kind``; ``default`` when absent or None."""
    value = params.get(name)
    if value is None:
        if default is _MISSING:
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"missing parameter '{name}'")
        return default
    # bool is an int subclass; never accept one for the other.
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind))
    if not ok:
        raise RpcError(
            ErrorCode.INVALID_ARGUMENT,
            f"parameter '{name}' must be {_type_name(kind)}, not {type(value).__name__}",
        )
    return value


def _as_tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def get_str_map(params: dict, name: str) -> dict[str, str]:
    value = get(params, name, dict, {})
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise RpcError(ErrorCode.INVALID_ARGUMENT, f"parameter '{name}' must map strings to strings")
    return value


def get_int(params: dict, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> Any:
    value = get(params, name, int, default)
    if value is not None and value is not default and minimum is not None and value < minimum:
        raise RpcError(ErrorCode.INVALID_ARGUMENT, f"parameter '{name}' must be >= {minimum}")
    return value


def get_number(params: dict, name: str, default: Any = _MISSING) -> Any:
    value = get(params, name, (int, float), default)
    return float(value) if value is not None and value is not default else value
