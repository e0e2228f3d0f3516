"""Methods that work on an instance and on the class (E2B's ``kill``, ``get_info``, ...).

``sbx.kill()`` calls the instance method; ``Sandbox.kill(sandbox_id)`` calls the
classmethod named ``cls_method``. ``Sandbox.kill(sbx)`` (an instance passed
explicitly) is an instance call too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["dual"]


class _Dual(Generic[F]):
    def __init__(self, method: F, cls_method: str) -> None:
        self._method = method
        self._cls_method = cls_method
        functools.update_wrapper(self, method)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> F:
        method = self._method
        if obj is not None:
            return functools.partial(method, obj)  # type: ignore[return-value]
        cls_method = getattr(objtype, self._cls_method)

        @functools.wraps(method)
        def either(*args: Any, **kwargs: Any) -> Any:
            if args and objtype is not None and isinstance(args[0], objtype):
                return method(*args, **kwargs)
            return cls_method(*args, **kwargs)

        return either  # type: ignore[return-value]


def dual(cls_method: str) -> Callable[[F], F]:
    """Decorate an instance method whose class-level twin is the classmethod ``cls_method``."""

    def wrap(method: F) -> F:
        return _Dual(method, cls_method)  # type: ignore[return-value]

    return wrap
