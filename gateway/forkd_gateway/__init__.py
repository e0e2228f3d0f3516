"""The forkd gateway: the server users talk to, and the ``forkd`` command."""

__all__: list[str] = []
