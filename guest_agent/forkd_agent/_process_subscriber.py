"""Subscribers: client streams following one process's output.

Every subscriber sends from the process's rings at its own offsets through its
own credit window, so a slow client slows only its stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from forkd._connection import Connection
from forkd._transports import TransportClosed
from forkd.protocol import RpcError

from ._process_io import Proc

if TYPE_CHECKING:
    from ._process_table import Processes

log = logging.getLogger("forkd.agent.exec")


class Subscriber:
    """One stream of one connection following one process's output."""

    def __init__(self, table: Processes, proc: Proc, conn: Connection, stream: int, offsets: dict[int, int]):
        self.table = table
        self.proc = proc
        self.conn = conn
        self.stream = stream
        self.offsets = offsets
        self.task: asyncio.Task | None = None
        self.stopped = False

    async def run(self) -> None:
        proc, conn, sid = self.proc, self.conn, self.stream
        try:
            while not self.stopped:
                item = proc.next_chunk(self.offsets)
                if item is not None:
                    fd, off, data = item
                    await conn.send_stream(sid, fd, off, data)
                    self.offsets[fd] = off + len(data)
                    proc.progressed()
                elif proc.finished:
                    await conn.end_stream(sid, **proc.end_info())
                    break
                else:
                    await proc.changed()
        except (TransportClosed, RpcError, asyncio.CancelledError):
            pass  # the connection went away or the stream was detached
        except Exception:
            log.exception("stream %d of process %d failed", sid, proc.pid)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.table.forget(self)
        self.conn.close_outbound(self.stream)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
