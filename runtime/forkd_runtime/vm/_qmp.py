"""The runtime's QMP session with one QEMU process, on top of ``qemu.qmp``.

``qemu.qmp`` (the QEMU project's own asyncio client) does the protocol; this
wrapper adds what every caller here needs: a timeout on each command, one
exception type, file-descriptor passing, and a quiet close after QEMU is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

from ._qemu import QemuError

__all__ = ["Qmp", "QmpError"]

# qemu.qmp logs every disconnect at warning level; QEMU exiting is routine here.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QmpError(QemuError):
    pass


class Qmp:
    def __init__(self, name: str) -> None:
        self.name = name
        self._client = QMPClient(name)

    async def connect(self, sock: socket.socket, timeout: float = 30.0) -> None:
        """Negotiate over an already connected socket (QEMU's end is inherited)."""
        try:
            await asyncio.wait_for(self._client.connect(sock), timeout)
        except Exception as exc:
            raise QmpError(f"{self.name}: QMP handshake failed: {exc!r}") from None

    async def execute(self, command: str, arguments: dict | None = None, timeout: float = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QmpError(f"{self.name}: {command}: {exc.error.error.desc}") from None
        except TimeoutError:
            raise QmpError(f"{self.name}: {command}: no answer within {timeout} s") from None
        except Exception as exc:
            raise QmpError(f"{self.name}: {command}: {exc!r}") from None

    async def add_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a file descriptor it can then use as ``fd:<name>``."""
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def add_fdset(self, fds: list[int]) -> int:
        """Put ``fds`` (e.g. one read-write and one read-only descriptor of a
        file) into a new fd set: QEMU then opens ``/dev/fdset/<id>`` with
        whichever matches the access it wants, even chrooted."""
        fdset = None
        for fd in fds:
            self._client.send_fd_scm(fd)
            res = await self.execute("add-fd", {} if fdset is None else {"fdset-id": fdset})
            fdset = res["fdset-id"]
        assert fdset is not None
        return fdset

    def listen(self, *names: str) -> EventListener:
        """Start collecting these events (``await listener.get()``); ``unlisten`` after."""
        listener = EventListener(names)
        self._client.register_listener(listener)
        return listener

    def unlisten(self, listener: EventListener) -> None:
        with contextlib.suppress(Exception):
            self._client.remove_listener(listener)

    async def set_capability(self, name: str, state: bool = True) -> None:
        await self.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state}]}
        )

    async def wait_migration(self, timeout: float = 60.0, poll: float = 0.002) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QmpError(f"{self.name}: migration {status}: {info.get('error-desc', '')}")
            if loop.time() > deadline:
                raise QmpError(f"{self.name}: migration still {status} after {timeout} s")
            await asyncio.sleep(poll)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.disconnect(), 5)
