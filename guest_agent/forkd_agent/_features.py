"""Imports every feature module so that its methods and components register."""


def load_features() -> None:
    from . import (  # noqa: F401
        _branch,
        _contexts,
        _files,
        _identity,
        _ports,
        _process_methods,
        _process_table,
        _server,
        _watch,
    )
