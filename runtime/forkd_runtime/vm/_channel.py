"""The host end of a VM's agent channel, with what BRANCH needs of it.

A transport (``forkd._transports.Transport``) for the ``Connection`` to a VM's
agent, over its virtio-serial socketpair: length-prefixed frames, as
``StreamTransport``, plus

- control requests (``control``): frames the runtime itself sends on the
  channel, with ids no ``Connection`` uses (``CONTROL_ID`` and up, encoded as
  msgpack uint64), whose answers it takes out of the stream before the
  connection sees them;
- a gate (``hold``/``release``): while held, the connection's frames wait.
  BRANCH holds the source's channel, then sends a control ``ping``: once it is
  answered, the guest has read every byte the host sent, so the instant the
  VM is stopped no frame is half-way through QEMU into the guest;
- a resync for a child restored from a BRANCH (``resync``): the guest's side
  of the channel was cut at an arbitrary instant, and the child may still
  emit the tail of a frame the source was writing, and the source's stale
  frames. The host first sends ``vm.branch.reset {nonce}`` (the guest answers
  it with the nonce and drops its old connection, see ``_guest.GuestPort``)
  and throws away everything before that exact answer.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket

from forkd import protocol as p
from forkd._transports import TransportClosed

__all__ = ["AgentChannel", "CONTROL_ID", "RESET"]

CONTROL_ID = 1 << 62
RESET = "vm.branch.reset"
READ_SIZE = 256 * 1024
_CONTROL_RESPONSE = b"\x94\x01\xcf"  # [1, <uint64 id>, ...]


class AgentChannel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = p.FrameReader(p.MAX_FRAME_SIZE)
        self._ready: list[bytes] = []
        self._closed = False
        self._open = asyncio.Event()
        self._open.set()
        self._ids = itertools.count(CONTROL_ID)
        self._waiting: dict[int, asyncio.Future] = {}
        # Resync: bytes the guest sent that are not yet known to follow the
        # marker (the exact frame answering our reset), and that marker.
        self._resyncing = False
        self._marker: bytes | None = None
        self._junk = bytearray()
        self.discarded = 0

    @classmethod
    async def from_socket(cls, sock: socket.socket, *, resync: bool = False) -> AgentChannel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        ch = cls(reader, writer)
        ch._resyncing = resync
        return ch

    # -- Transport ------------------------------------------------------------------

    async def send(self, body: bytes) -> None:
        while not self._open.is_set():
            await self._open.wait()
        self._write(body)
        await self._drain()

    async def recv(self) -> bytes:
        while not self._ready:
            for body in self._frames.frames():
                if body[:3] == _CONTROL_RESPONSE and self._answer(body):
                    continue
                self._ready.append(body)
            if self._ready:
                break
            try:
                data = await self._reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise TransportClosed(str(exc)) from None
            if not data:
                self._fail_waiting()
                raise TransportClosed()
            if self._resyncing:
                data = self._skip_to_marker(data)
            self._frames.feed(data)
        return self._ready.pop(0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._open.set()
        self._fail_waiting()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError, RuntimeError):
            pass

    # -- BRANCH ------------------------------------------------------------------------

    def hold(self) -> None:
        """The connection's frames wait from now on (control frames pass)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    @property
    def unsent(self) -> int:
        """Bytes written to the channel that are still in our buffer, not yet in the socket."""
        transport = self._writer.transport
        return 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()

    async def control(self, method: str, params: dict, timeout: float) -> object:
        """Send a request of the runtime's own and wait for its answer (which
        the connection never sees). Raises RpcError, TransportClosed, TimeoutError."""
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            self._write(p.encode(p.Request(rid, method, params)))
            await self._drain()
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(rid, None)

    def start_reset(self) -> None:
        """A child restored from a BRANCH: write ``vm.branch.reset`` now, ahead of
        anything the connection sends, and take nothing from the guest before
        its answer."""
        rid = next(self._ids)
        nonce = os.urandom(16)
        self._marker = p.frame(p.encode(p.Response(rid, None, nonce)))
        self._resyncing = True
        self._write(p.encode(p.Request(rid, RESET, {"nonce": nonce})))

    # -- internals -----------------------------------------------------------------------

    def _write(self, body: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise TransportClosed()
        self._writer.write(p.frame(body))

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise TransportClosed(str(exc)) from None

    def _answer(self, body: bytes) -> bool:
        try:
            msg = p.decode(body)
        except p.ProtocolError:
            return False
        if type(msg) is not p.Response or msg.id < CONTROL_ID:
            return False
        fut = self._waiting.get(msg.id)
        if fut is not None and not fut.done():
            if msg.error is not None:
                fut.set_exception(msg.error)
            else:
                fut.set_result(msg.result)
        return True

    def _skip_to_marker(self, data: bytes) -> bytes:
        marker = self._marker
        self._junk += data
        if marker is None:
            # Nothing sent yet (a pooled child before its restore): keep little.
            keep = 1 << 16
        else:
            i = self._junk.find(marker)
            if i >= 0:
                rest = bytes(self._junk[i + len(marker) :])
                self.discarded += i
                self._junk.clear()
                self._resyncing = False
                self._marker = None
                return rest
            keep = len(marker) - 1
        if len(self._junk) > keep:
            drop = len(self._junk) - keep
            self.discarded += drop
            del self._junk[:drop]
        return b""

    def _fail_waiting(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(TransportClosed())
