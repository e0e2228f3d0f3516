"""Byte carriers for protocol frames.

A transport moves whole frame bodies. It knows nothing of what is inside them.
- StreamTransport: asyncio streams (unix socket, socketpair, pipe, virtio-serial
  port), length-prefixed frames.
- MemoryTransport: an in-process pair, for tests and for wiring layers together
  without sockets.
Third-party imports stay inside functions: the guest agent imports this module
in images that have only the standard library and msgpack.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from .protocol import MAX_FRAME_SIZE, ErrorCode, FrameReader, RpcError, frame

__all__ = ["Transport", "TransportClosed", "StreamTransport", "MemoryTransport", "memory_pair"]


class TransportClosed(RpcError):
    """The other side went away (or we closed)."""

    def __init__(self, message: str = "connection closed") -> None:
        super().__init__(ErrorCode.SANDBOX_UNREACHABLE, message)


class Transport(Protocol):
    async def send(self, body: bytes) -> None: ...

    async def recv(self) -> bytes:
        """Next frame body; raises TransportClosed at the end, ProtocolError on a bad frame."""
        ...

    async def close(self) -> None: ...


class StreamTransport:
    READ_SIZE = 256 * 1024

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_frame_size: int = MAX_FRAME_SIZE,
        initial: bytes = b"",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader(max_frame_size)
        # Bytes someone already read off this stream (a hand-over from another reader).
        self._frames.feed(initial)
        self._ready: collections.deque[bytes] = collections.deque()
        self._closed = False

    @classmethod
    async def connect_unix(cls, path: str, **kw) -> StreamTransport:
        reader, writer = await asyncio.open_unix_connection(path, limit=cls.READ_SIZE)
        return cls(reader, writer, **kw)

    @classmethod
    async def from_socket(cls, sock, **kw) -> StreamTransport:
        reader, writer = await asyncio.open_connection(sock=sock, limit=cls.READ_SIZE)
        return cls(reader, writer, **kw)

    async def send(self, body: bytes) -> None:
        if self._closed or self._writer.is_closing():
            raise TransportClosed()
        self._writer.write(frame(body))
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise TransportClosed(str(exc)) from None

    async def recv(self) -> bytes:
        while not self._ready:
            # frames() raises FrameTooLarge mid-way; frames before it are kept.
            for body in self._frames.frames():
                self._ready.append(body)
            if self._ready:
                break
            try:
                data = await self._reader.read(self.READ_SIZE)
            except (ConnectionError, OSError) as exc:
                raise TransportClosed(str(exc)) from None
            if not data:
                raise TransportClosed()
            self._frames.feed(data)
        return self._ready.popleft()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError, RuntimeError):
            pass


class MemoryTransport:
    """One end of an in-memory pair. Bounded, so backpressure behaves as on a socket."""

    _EOF = object()

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self.peer: MemoryTransport | None = None

    async def send(self, body: bytes) -> None:
        if self._closed:
            raise TransportClosed()
        await self._outbox.put(bytes(body))

    async def recv(self) -> bytes:
        if self._closed:
            raise TransportClosed()
        item = await self._inbox.get()
        if item is self._EOF:
            self._closed = True
            raise TransportClosed()
        return item

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake both readers: ours and the peer's.
        for q in (self._inbox, self._outbox):
            try:
                q.put_nowait(self._EOF)
            except asyncio.QueueFull:
                q.get_nowait()
                q.put_nowait(self._EOF)


def memory_pair(maxsize: int = 64) -> tuple[MemoryTransport, MemoryTransport]:
    a_to_b: asyncio.Queue = asyncio.Queue(maxsize)
    b_to_a: asyncio.Queue = asyncio.Queue(maxsize)
    a = MemoryTransport(b_to_a, a_to_b)
    b = MemoryTransport(a_to_b, b_to_a)
    a.peer, b.peer = b, a
    return a, b
