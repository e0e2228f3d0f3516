"""Typed access to a client's request params: anything wrong is ``invalid_argument``, never a crash."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from forkd.protocol import ErrorCode, RpcError

__all__ = [
    "bad",
    "opt_str",
    "req_str",
    "opt_number",
    "opt_int",
    "str_map",
    "str_list",
    "encode_token",
    "decode_token",
    "paginate",
    "MAX_LIST_LIMIT",
]

MAX_LIST_LIMIT = 1000
T = TypeVar("T")

_MISSING = object()


def bad(message: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_ARGUMENT, message)


def req_str(params: dict, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value:
        raise bad(f"{name!r} is required and must be a non-empty string")
    return value


def opt_str(params: dict, name: str, default: str | None = None) -> str | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(f"{name!r} must be a string")
    return value


def opt_number(params: dict, name: str, default: float | None = None) -> float | None:
    value = params.get(name)
    if value is None:
        return default
    # bool is an int subclass; True seconds is never what a caller meant.
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bad(f"{name!r} must be a finite number")
    return float(value)


def opt_int(params: dict, name: str, default: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    if type(value) is not int:
        raise bad(f"{name!r} must be an integer")
    return value


def str_map(params: dict, name: str) -> dict[str, str]:
    value = params.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise bad(f"{name!r} must be a map of strings to strings")
    return value


def str_list(params: dict, name: str, default: list[str]) -> list[str]:
    value = params.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(f"{name!r} must be a list of strings")
    return value


def is_stream_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def encode_token(started: float, item_id: str) -> str:
    """The opaque ``next_token`` of a listing ordered by (time, id): the last item of a page."""
    raw = f"{started!r}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        started, _, item_id = raw.partition("|")
        return float(started), item_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad("bad next_token") from None


def paginate(
    items: Iterable[T], key: Callable[[T], tuple[float, str]], limit: int | None, next_token: str | None
) -> tuple[list[T], str | None]:
    """One page of a listing ordered by ``key`` (time, id): the items after
    ``next_token``, at most ``limit`` (default 100), and the next page's token
    (None on the last page)."""
    limit = 100 if limit is None else limit
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad(f"limit must be between 1 and {MAX_LIST_LIMIT}")
    after = decode_token(next_token) if next_token else None
    matches = sorted((i for i in items if after is None or key(i) > after), key=key)
    page = matches[:limit]
    token = encode_token(*key(page[-1])) if len(matches) > limit else None
    return page, token
