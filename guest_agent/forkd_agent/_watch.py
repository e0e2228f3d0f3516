"""Directory watches: inotify through ctypes, read from the event loop (no threads).

Each watch owns one inotify instance, so removing a watch is closing its fd and
two watches on one directory never share (and break) a kernel watch descriptor.
Events are mapped to E2B's FilesystemEventType the way E2B's daemon (fsnotify)
maps them:

    IN_CREATE, IN_MOVED_TO          -> create
    IN_MODIFY                       -> write
    IN_DELETE, IN_DELETE_SELF       -> remove
    IN_MOVED_FROM, IN_MOVE_SELF     -> rename   (a move is rename(old) + create(new))
    IN_ATTRIB                       -> chmod

A recursive watch adds the directories that appear under it and, as fsnotify
does, reports a ``create`` for everything already inside a new directory:
files made in it before its kernel watch existed would otherwise go unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import stat
import struct
from typing import Any

from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import TransportClosed

from . import _params
from ._files import os_error
from ._methods import component, method
from ._users import resolve_path, resolve_user

log = logging.getLogger("forkd.agent.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000

_MASK = (
    IN_CREATE
    | IN_MOVED_TO
    | IN_MODIFY
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVED_FROM
    | IN_MOVE_SELF
    | IN_ATTRIB
)
# In E2B's order: one kernel event may carry several kinds.
_KINDS = (
    (IN_CREATE | IN_MOVED_TO, "create"),
    (IN_MOVED_FROM | IN_MOVE_SELF, "rename"),
    (IN_ATTRIB, "chmod"),
    (IN_MODIFY, "write"),
    (IN_DELETE | IN_DELETE_SELF, "remove"),
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name
_READ_SIZE = 64 * 1024
# Events waiting to be sent to a slow client; beyond this they are dropped.
_MAX_QUEUED = 10_000

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        _libc = lib
    return _libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class _Watch:
    def __init__(self, wid: int, conn: Connection, root: str, recursive: bool) -> None:
        self.id = wid
        self.conn = conn
        self.root = root
        self.recursive = recursive
        self.fd = _check(_lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        self.dirs: dict[int, str] = {}  # kernel watch descriptor -> directory path
        self.root_wd = -1
        self.queue: asyncio.Queue = asyncio.Queue(_MAX_QUEUED)
        self.dropped = 0
        self.sender: asyncio.Task | None = None
        self.reading = False

    # -- setup / teardown --
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.root_wd = self._add(self.root, IN_ONLYDIR)
        if self.recursive:
            self._add_tree(self.root, announce=False)
        loop.add_reader(self.fd, self._readable)
        self.reading = True
        self.sender = loop.create_task(self._send_loop())

    def stop_reading(self) -> None:
        """Release the inotify instance; events already queued still go out."""
        if self.fd < 0:
            return
        if self.reading:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.fd)
            self.reading = False
        os.close(self.fd)
        self.fd = -1
        self.dirs.clear()

    def close(self) -> None:
        self.stop_reading()
        if self.sender is not None:
            self.sender.cancel()

    def _add(self, path: str, flags: int = IN_ONLYDIR | IN_DONT_FOLLOW) -> int:
        wd = _check(_lib().inotify_add_watch(self.fd, os.fsencode(path), _MASK | flags), path)
        self.dirs[wd] = path
        return wd

    def _add_tree(self, top: str, announce: bool) -> None:
        """Watch every directory below ``top`` (symlinks are not followed)."""
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return  # gone already, or unreadable
        for e in entries:
            if announce:
                self._emit(e.path, "create")
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if not is_dir:
                continue
            try:
                self._add(e.path)
            except OSError as exc:
                # Vanished meanwhile, or the kernel's watch limit: watch the rest.
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("cannot watch %s: %s", e.path, exc)
                continue
            self._add_tree(e.path, announce)

    def _forget_tree(self, top: str) -> None:
        prefix = top + "/"
        for wd, path in list(self.dirs.items()):
            if path == top or path.startswith(prefix):
                del self.dirs[wd]
                _lib().inotify_rm_watch(self.fd, wd)

    # -- events --
    def _readable(self) -> None:
        while self.fd >= 0:
            try:
                buf = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("watch %d: read failed: %s", self.id, exc)
                self.close()
                return
            pos = 0
            while pos + _EVENT.size <= len(buf):
                wd, mask, _cookie, n = _EVENT.unpack_from(buf, pos)
                name = buf[pos + _EVENT.size : pos + _EVENT.size + n].rstrip(b"\0")
                pos += _EVENT.size + n
                self._event(wd, mask, os.fsdecode(name))

    def _event(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            log.warning("watch %d: kernel event queue overflowed; events were lost", self.id)
            return
        base = self.dirs.get(wd)
        if base is None:
            return  # a descriptor we already dropped
        if mask & IN_IGNORED:
            del self.dirs[wd]
            if wd == self.root_wd:
                self.stop_reading()  # the watched directory is gone: nothing more can come
            return
        if wd != self.root_wd and not name:
            return  # about a subdirectory itself: its parent's watch reports that already
        path = os.path.join(base, name) if name else base
        for bits, kind in _KINDS:
            if mask & bits:
                self._emit(path, kind)
        if wd == self.root_wd and mask & IN_MOVE_SELF:
            # Paths under the old name mean nothing now; E2B's watcher stops here too.
            self.stop_reading()
            return
        if self.recursive and mask & IN_ISDIR and name:
            if mask & IN_MOVED_FROM:
                self._forget_tree(path)
            if mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    self._add(path)
                except OSError:
                    return
                self._add_tree(path, announce=True)

    def _emit(self, path: str, kind: str) -> None:
        event = {"watch": self.id, "name": os.path.relpath(path, self.root), "type": kind}
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("watch %d: client is slow; %d events dropped", self.id, self.dropped)

    async def _send_loop(self) -> None:
        try:
            while True:
                event = await self.queue.get()
                await self.conn.notify("files.event", event)
        except TransportClosed:
            pass


@component("watches")
class Watches:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.watches: dict[int, _Watch] = {}
        self._ids = itertools.count(1)

    def drop_connection(self, conn: Connection) -> None:
        for wid in [w.id for w in self.watches.values() if w.conn is conn]:
            self.watches.pop(wid).close()

    async def close(self) -> None:
        for w in self.watches.values():
            w.close()
        self.watches.clear()


@method("files.watch")
async def _watch(agent: Any, conn: Connection, params: dict) -> dict:
    user = resolve_user(_params.get(params, "user", str, None))
    path = resolve_path(_params.get(params, "path", str), user)
    recursive = _params.get(params, "recursive", bool, False)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, f"{path}: not a directory")
    watches: Watches = agent.watches
    try:
        w = _Watch(next(watches._ids), conn, path, recursive)
    except OSError as exc:
        raise p.RpcError(
            p.ErrorCode.SANDBOX, f"cannot create a watch (too many inotify instances?): {exc.strerror}"
        ) from None
    try:
        w.start(asyncio.get_running_loop())
    except OSError as exc:
        w.close()
        if exc.errno == errno.ENOSPC:
            raise p.RpcError(p.ErrorCode.SANDBOX, "the kernel's inotify watch limit is reached") from None
        raise os_error(exc, path) from None
    watches.watches[w.id] = w
    return {"watch": w.id}


@method("files.unwatch")
async def _unwatch(agent: Any, conn: Connection, params: dict) -> dict:
    wid = _params.get_int(params, "watch")
    watches: Watches = agent.watches
    w = watches.watches.get(wid)
    if w is None or w.conn is not conn:
        raise p.RpcError(p.ErrorCode.NOT_FOUND, f"no watch {wid} on this connection")
    del watches.watches[wid]
    w.close()
    return {}
