"""The sandbox filesystem: ``sbx.files`` (async), streamed reads and writes, directory watches.

Reads stream the file in chunks over a credit-windowed stream (``files.read``);
writes of up to one chunk go in one request (``files.write``), bigger data,
file objects and iterables are streamed (``files.write_open`` + stream frames +
``files.write_close``), so neither side ever holds more than a window of a file.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import io
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import IO, Any, Literal, TypedDict

from . import protocol as p
from ._client import Client, map_error, request_timeout_error
from ._exceptions import InvalidArgumentException, SandboxException
from ._link import Link, call_back
from ._models import EntryInfo, FilesystemEvent, FilesystemEventType, WriteInfo

__all__ = [
    "AsyncFilesystem",
    "AsyncFileStreamReader",
    "AsyncWatchHandle",
    "Upload",
    "WriteEntry",
    "WriteData",
    "AsyncWriteData",
]

# The agent writes `.<name>.<random>.forkd-tmp` beside the target, then renames it over the target.
_TEMP_FILE = re.compile(r"(^|/)\.[^/]+\.[0-9a-z]+\.forkd-tmp$")

WriteData = str | bytes | IO | Iterable[bytes]
AsyncWriteData = str | bytes | IO | AsyncIterable[bytes]


class WriteEntry(TypedDict):
    """One file of ``files.write_files``."""

    path: str
    data: WriteData


def _user(params: dict, user: str | None) -> dict:
    if user:
        params["user"] = user
    return params


def _is_file_like(data: Any) -> bool:
    if isinstance(data, io.IOBase):
        return True
    if isinstance(data, str | bytes | bytearray | memoryview):
        return False
    read = getattr(data, "read", None)
    return callable(read) and not inspect.iscoroutinefunction(read)


def _as_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    raise InvalidArgumentException(
        f"Iterable upload data must yield bytes chunks, got {type(chunk).__name__}"
    )


def _split(data: bytes) -> Iterable[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), p.CHUNK_SIZE):
        yield bytes(view[start : start + p.CHUNK_SIZE])


class AsyncFileStreamReader(AsyncIterator[bytes]):
    """A file being read, as an async iterator of byte chunks. Close it if you stop early."""

    def __init__(self, link: Link, client: Client, stream: Any) -> None:
        self._link = link
        self._client = client
        self._stream = stream
        self._closed = False

    def __aiter__(self) -> AsyncFileStreamReader:
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        try:
            _fd, _offset, data = await self._stream.__anext__()
            return data
        except StopAsyncIteration:
            self._closed = True
            err = self._stream.error
            if err is not None:
                raise map_error(err) from None
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Stop reading (tells the sandbox to stop sending)."""
        if self._closed:
            return
        self._closed = True
        await self._stream.close()
        if not self._client.closed:
            with contextlib.suppress(Exception):
                await self._link.call("files.read_abort", {"stream": self._stream.id}, 5)

    async def __aenter__(self) -> AsyncFileStreamReader:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class Upload:
    """A streamed write in progress: ``send()`` chunks, then ``close()`` (or ``abort()``)."""

    def __init__(self, link: Link, client: Client, stream_id: int, request_timeout: float | None) -> None:
        self._link = link
        self._client = client
        self._id = stream_id
        self._offset = 0
        self._request_timeout = request_timeout

    async def send(self, chunk: Any) -> None:
        data = _as_bytes(chunk)
        conn = self._client.conn
        for part in _split(data) if len(data) > p.CHUNK_SIZE else (data,):
            if not part:
                continue
            try:
                await conn.send_stream(self._id, 0, self._offset, part)
            except p.RpcError as exc:
                raise map_error(exc) from None
            self._offset += len(part)

    async def close(self) -> WriteInfo:
        res = await self._link.call("files.write_close", {"stream": self._id}, self._request_timeout)
        self._client.conn.close_outbound(self._id)
        return WriteInfo._from_wire(res)

    async def abort(self) -> None:
        self._client.conn.close_outbound(self._id)
        if not self._client.closed:
            with contextlib.suppress(Exception):
                await self._link.call("files.write_abort", {"stream": self._id}, 5)


class AsyncWatchHandle:
    """A directory watch delivering events to ``on_event``; ``stop()`` ends it."""

    def __init__(
        self,
        link: Link,
        client: Client,
        watch_id: int,
        on_event: Any,
        on_exit: Any = None,
        timeout: float | None = None,
    ) -> None:
        self._link = link
        self._client = client
        self._watch_id = watch_id
        self._on_event = on_event
        self._on_exit = on_exit
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stopped = False
        self._key = (link.sandbox_id, watch_id)
        # The client calls this with each event's params, and with None when the connection is lost.
        client.watches[self._key] = self._queue.put_nowait
        self._timeout = timeout
        self._task = asyncio.get_running_loop().create_task(self._deliver())

    async def _deliver(self) -> None:
        error: BaseException | None = None
        try:
            async with asyncio.timeout(self._timeout or None):
                while True:
                    params = await self._queue.get()
                    if params is None:
                        if not self._stopped:
                            error = map_error(p.RpcError(p.ErrorCode.SANDBOX_UNREACHABLE, "connection lost"))
                        break
                    name = params.get("name", "")
                    try:
                        kind = FilesystemEventType(params.get("type"))
                    except ValueError:
                        continue
                    if _TEMP_FILE.search(name):
                        continue  # the agent's atomic-write temporary: an implementation detail
                    await call_back(self._on_event, FilesystemEvent(name=name, type=kind))
        except TimeoutError:
            from ._commands import command_timeout_error

            error = command_timeout_error("the directory watch timed out")
            await self._unwatch()
        except asyncio.CancelledError:
            await self._call_on_exit(None)
            raise
        except Exception as exc:  # on_event raised: the watch ends with that error
            error = exc
            await self._unwatch()
        await self._call_on_exit(error)

    async def _call_on_exit(self, error: BaseException | None) -> None:
        if self._on_exit is not None:
            with contextlib.suppress(Exception):
                await call_back(self._on_exit, error)

    async def _unwatch(self) -> None:
        self._client.watches.pop(self._key, None)
        if not self._client.closed:
            with contextlib.suppress(Exception):
                await self._link.call("files.unwatch", {"watch": self._watch_id}, 5)

    async def stop(self) -> None:
        """Stop watching."""
        if self._stopped:
            return
        self._stopped = True
        self._client.watches.pop(self._key, None)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if not self._client.closed:
            with contextlib.suppress(SandboxException):
                await self._link.call("files.unwatch", {"watch": self._watch_id})


class AsyncFilesystem:
    """``sbx.files``. Relative paths resolve against the user's home (``/home/user``)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    # -- reading -------------------------------------------------------------
    async def _open_read(
        self, path: str, user: str | None, request_timeout: float | None
    ) -> AsyncFileStreamReader:
        client = await self._link.client()
        stream = client.open_stream(p.DEFAULT_WINDOW)
        params = _user({"path": path, "stream": stream.id, "window": p.DEFAULT_WINDOW}, user)
        params["sandbox_id"] = self._link.sandbox_id
        try:
            await client.call("files.read", params, self._link.timeout(request_timeout))
        except BaseException:
            await stream.close()
            raise
        return AsyncFileStreamReader(self._link, client, stream)

    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        stream_idle_timeout: float | None = None,
    ) -> Any:
        """Read a file: ``format="text"`` → str, ``"bytes"`` → bytearray, ``"stream"`` → async iterator of bytes.

        Missing file: FileNotFoundException. For text and bytes ``request_timeout``
        bounds the whole transfer; a stream is bounded only if it is given explicitly.
        """
        if format not in ("text", "bytes", "stream"):
            raise InvalidArgumentException(f"unknown format {format!r}: use 'text', 'bytes' or 'stream'")
        if format == "stream":
            return await self._open_read(path, user, request_timeout)
        timeout = self._link.timeout(request_timeout)
        try:
            async with asyncio.timeout(timeout):
                reader = await self._open_read(path, user, 0 if timeout is None else timeout)
                buf = bytearray()
                async for chunk in reader:
                    buf += chunk
        except TimeoutError:
            raise request_timeout_error() from None
        if format == "bytes":
            return buf
        return codecs.decode(buf, "utf-8", errors="replace")

    # -- writing -------------------------------------------------------------
    async def _open_write(self, path: str, user: str | None, request_timeout: float | None) -> Upload:
        client = await self._link.client()
        sid = client.conn.new_stream_id()
        params = _user({"path": path, "stream": sid, "window": p.DEFAULT_WINDOW}, user)
        params["sandbox_id"] = self._link.sandbox_id
        res = await client.call("files.write_open", params, self._link.timeout(request_timeout))
        client.conn.open_outbound(sid, res.get("window") or p.DEFAULT_WINDOW)
        return Upload(self._link, client, sid, request_timeout)

    async def _write_one(
        self, path: str, data: Any, user: str | None, request_timeout: float | None
    ) -> WriteInfo:
        if isinstance(data, str):
            data = data.encode("utf-8")
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if isinstance(data, bytes) and len(data) <= p.CHUNK_SIZE:
            res = await self._link.call(
                "files.write", _user({"path": path, "data": data}, user), request_timeout
            )
            return WriteInfo._from_wire(res)
        if not isinstance(data, bytes) and not _is_file_like(data):
            if not isinstance(data, AsyncIterable | Iterable):
                raise InvalidArgumentException(f"Unsupported data type for file {path}: {type(data)}")
        upload = await self._open_write(path, user, request_timeout)
        try:
            if isinstance(data, bytes):
                await upload.send(data)
            elif _is_file_like(data):
                while True:
                    chunk = data.read(p.CHUNK_SIZE)
                    if inspect.isawaitable(chunk):
                        chunk = await chunk
                    if not chunk:
                        break
                    await upload.send(chunk)
            elif isinstance(data, AsyncIterable):
                async for chunk in data:
                    await upload.send(chunk)
            else:
                for chunk in data:
                    await upload.send(chunk)
            return await upload.close()
        except BaseException:
            await upload.abort()
            raise

    async def write(
        self,
        path: str,
        data: AsyncWriteData | WriteData,
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        use_octet_stream: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> WriteInfo:
        """Write ``data`` (str, bytes, a file object or an (async) iterable of bytes) to ``path``.

        Creates missing parent directories and replaces an existing file atomically.
        """
        if metadata:
            raise InvalidArgumentException("forkd does not store file metadata")
        return await self._write_one(path, data, user, request_timeout)

    async def write_files(
        self,
        files: list[Any],
        user: str | None = None,
        request_timeout: float | None = None,
        gzip: bool = False,
        use_octet_stream: bool | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[WriteInfo]:
        """Write several files (``[{"path": ..., "data": ...}, ...]``); returns one WriteInfo each."""
        if metadata:
            raise InvalidArgumentException("forkd does not store file metadata")
        if not files:
            return []
        return list(
            await asyncio.gather(
                *(self._write_one(f["path"], f["data"], user, request_timeout) for f in files)
            )
        )

    # -- metadata ------------------------------------------------------------
    async def list(
        self,
        path: str,
        depth: int | None = 1,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> list[EntryInfo]:
        """Entries of a directory, ``depth`` levels deep (entries of unknown type are skipped)."""
        if depth is not None and depth < 1:
            raise InvalidArgumentException("depth should be at least 1")
        res = await self._link.call(
            "files.list", _user({"path": path, "depth": depth or 1}, user), request_timeout
        )
        return [EntryInfo._from_wire(d) for d in res if d.get("type")]

    async def exists(self, path: str, user: str | None = None, request_timeout: float | None = None) -> bool:
        """Whether anything exists at ``path``."""
        return bool(await self._link.call("files.exists", _user({"path": path}, user), request_timeout))

    async def get_info(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """Information about a file, directory or symlink (the link itself). Missing: FileNotFoundException."""
        return EntryInfo._from_wire(
            await self._link.call("files.stat", _user({"path": path}, user), request_timeout)
        )

    async def remove(self, path: str, user: str | None = None, request_timeout: float | None = None) -> None:
        """Remove a file or a directory (recursively)."""
        await self._link.call("files.remove", _user({"path": path}, user), request_timeout)

    async def rename(
        self, old_path: str, new_path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """Move ``old_path`` to ``new_path``; returns the new entry."""
        params = _user({"old_path": old_path, "new_path": new_path}, user)
        return EntryInfo._from_wire(await self._link.call("files.rename", params, request_timeout))

    async def make_dir(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Create a directory and its parents; False if it already existed."""
        return bool(await self._link.call("files.make_dir", _user({"path": path}, user), request_timeout))

    # -- watching ------------------------------------------------------------
    async def watch_dir(
        self,
        path: str,
        on_event: Any,
        on_exit: Any = None,
        user: str | None = None,
        request_timeout: float | None = None,
        timeout: float | None = 60,
        recursive: bool = False,
        include_entry: bool = False,
        allow_network_mounts: bool = False,
    ) -> AsyncWatchHandle:
        """Watch a directory: ``on_event(FilesystemEvent)`` for every change, ``on_exit(error|None)`` at the end.

        ``timeout`` bounds the watch (0 = no limit).
        """
        client = await self._link.client()
        params = _user({"path": path, "recursive": recursive}, user)
        params["sandbox_id"] = self._link.sandbox_id
        res = await client.call("files.watch", params, self._link.timeout(request_timeout))
        # Registered before any await: events that follow the answer find their handler.
        return AsyncWatchHandle(self._link, client, res["watch"], on_event, on_exit, timeout)
