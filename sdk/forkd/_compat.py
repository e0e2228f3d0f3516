"""E2B's module paths under ``forkd``: ``forkd.sandbox.commands.command_handle`` and the like.

E2B programs import some names from submodules (``from e2b.sandbox.commands.
command_handle import CommandExitException``). After ``s/e2b/forkd/`` such an
import finds a module here whose attributes are forkd's public names, whatever
the rest of the dotted path says. Only these top-level names are aliased; the
finder costs nothing until one of them is imported.
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["install", "ALIASED"]

ALIASED = frozenset({"sandbox", "sandbox_sync", "sandbox_async", "connection_config", "envd"})


class _AliasFinder:
    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        parts = fullname.split(".")
        if len(parts) < 2 or parts[0] != self.root or parts[1] not in ALIASED:
            return None
        # Module names are lower case; `from x import Missing` must stay an ImportError, not a module.
        if not all(part.islower() and part.isidentifier() for part in parts[2:]):
            return None
        return ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        root = self.root

        def __getattr__(name: str) -> object:
            if name.startswith("__"):
                raise AttributeError(name)
            try:
                return getattr(sys.modules[root], name)
            except AttributeError:
                raise AttributeError(f"module {module.__name__!r} has no attribute {name!r}") from None

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        module.__path__ = []
        module.__doc__ = f"Alias of E2B's module path: every public name of {root}."


def install(root: str) -> None:
    if not any(isinstance(f, _AliasFinder) and f.root == root for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder(root))
