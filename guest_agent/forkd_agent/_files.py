"""Filesystem methods: read, write (streamed or small), list, stat, make_dir, remove, rename.

Paths resolve against the requesting user's home. The agent usually runs as
root, so whatever it creates for another user is chowned to that user, with
modes set explicitly (0644 files, 0755 directories) whatever the umask says.

Writes never expose a half-written file: data goes to a temporary file beside
the target, which is renamed over the target only once every byte is on disk.
Any failure, abort or client disconnect removes the temporary file and leaves
the old target untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import secrets
import shutil
import stat
from typing import Any

import msgpack

from forkd import protocol as p
from forkd._connection import Connection, InboundStream
from forkd._transports import TransportClosed

from . import _params
from ._methods import component, method
from ._users import User, resolve_path, resolve_user

log = logging.getLogger("forkd.agent.files")

FILE_MODE = 0o644
DIR_MODE = 0o755
# A client may ask for any inbound window; this caps what one upload can make
# the agent buffer. The granted window is returned by files.write_open.
MAX_WINDOW = 64 * 1024 * 1024
# A list result must fit in one frame, with room for the envelope.
_MAX_RESULT = p.MAX_FRAME_SIZE - 64 * 1024


# -- errors ------------------------------------------------------------------

_INVALID = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory is not empty",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EXDEV: "cannot move across file systems",
    errno.EBUSY: "resource busy (a mount point?)",
    errno.EINVAL: "invalid argument",
}


def os_error(exc: OSError, path: str) -> p.RpcError:
    """The wire error for a failed filesystem call on ``path``."""
    code = exc.errno
    if code == errno.ENOENT:
        return p.RpcError(p.ErrorCode.FILE_NOT_FOUND, f"{path}: no such file or directory")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return p.RpcError(p.ErrorCode.NOT_ENOUGH_SPACE, f"{path}: not enough space left on the disk")
    if code in _INVALID:
        return p.RpcError(p.ErrorCode.INVALID_ARGUMENT, f"{path}: {_INVALID[code]}")
    return p.RpcError(p.ErrorCode.SANDBOX, f"{path}: {exc.strerror or exc}")


def _invalid(message: str) -> p.RpcError:
    return p.RpcError(p.ErrorCode.INVALID_ARGUMENT, message)


def _target(params: dict, key: str = "path") -> tuple[str, User]:
    user = resolve_user(_params.get(params, "user", str, None))
    return resolve_path(_params.get(params, key, str), user), user


# -- entry info ----------------------------------------------------------------

# Go's FileMode.String() letters, which E2B's permissions field shows
# ("-rw-r--r--", "drwxr-xr-x", "Lrwxrwxrwx", "dtrwxrwxrwx").
_RWX = "rwxrwxrwx"


def permissions_string(mode: int) -> str:
    kind = ""
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFDIR:
        kind += "d"
    elif fmt == stat.S_IFLNK:
        kind += "L"
    elif fmt in (stat.S_IFBLK, stat.S_IFCHR):
        kind += "D"
    elif fmt == stat.S_IFIFO:
        kind += "p"
    elif fmt == stat.S_IFSOCK:
        kind += "S"
    if mode & stat.S_ISUID:
        kind += "u"
    if mode & stat.S_ISGID:
        kind += "g"
    if fmt == stat.S_IFCHR:
        kind += "c"
    if mode & stat.S_ISVTX:
        kind += "t"
    bits = "".join(ch if mode & (1 << (8 - i)) else "-" for i, ch in enumerate(_RWX))
    return (kind or "-") + bits


def _type_of(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return None  # fifo, socket, device: E2B reports no type for these either


class _Names:
    """uid/gid -> name, cached for one call (a listing repeats the same few)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}
        self._groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self._users:
            try:
                self._users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self._users[uid] = str(uid)
        return self._users[uid]

    def group(self, gid: int) -> str:
        if gid not in self._groups:
            try:
                self._groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self._groups[gid] = str(gid)
        return self._groups[gid]


def entry_info(path: str, st: os.stat_result | None = None, names: _Names | None = None) -> dict:
    """EntryInfo of ``path`` itself (a symlink is described, not followed)."""
    if st is None:
        st = os.lstat(path)
    names = names or _Names()
    mode = stat.S_IMODE(st.st_mode)
    target = None
    if stat.S_ISLNK(st.st_mode):
        # Like E2B: the resolved target, and the target's permission bits.
        try:
            target_st = os.stat(path)
            target = os.path.realpath(path)
            mode = stat.S_IMODE(target_st.st_mode)
        except OSError:  # dangling or looping: say where it points
            with contextlib.suppress(OSError):
                target = os.readlink(path)
    return {
        "name": os.path.basename(path) or "/",
        "type": _type_of(st.st_mode),
        "path": path,
        "size": st.st_size,
        "mode": mode,
        "permissions": permissions_string(st.st_mode),
        "owner": names.user(st.st_uid),
        "group": names.group(st.st_gid),
        "modified_time": st.st_mtime_ns / 1e9,
        "symlink_target": target,
    }


def _write_info(path: str) -> dict:
    return {"name": os.path.basename(path) or "/", "type": "file", "path": path}


# -- creating things on behalf of a user -----------------------------------------


def _give(path_or_fd: str | int, user: User) -> None:
    if user.is_self:
        return
    if isinstance(path_or_fd, int):
        os.fchown(path_or_fd, user.uid, user.gid)
    else:
        os.lchown(path_or_fd, user.uid, user.gid)


def ensure_dirs(path: str, user: User) -> bool:
    """Create ``path`` and its missing parents (0755, owned by ``user``).

    True when ``path`` was created; False when it already was a directory.
    """
    missing = []
    cur = path
    while not os.path.isdir(cur):
        if os.path.lexists(cur):
            raise _invalid(f"{cur}: exists and is not a directory")
        missing.append(cur)
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            if os.path.isdir(d):
                continue  # created concurrently: fine
            raise _invalid(f"{d}: exists and is not a directory") from None
        except OSError as exc:
            raise os_error(exc, d) from None
        try:
            os.chmod(d, DIR_MODE)
            _give(d, user)
        except OSError as exc:
            raise os_error(exc, d) from None
    return bool(missing)


def _real_target(path: str) -> str:
    """Where a write to ``path`` lands: writing through a symlink updates its target,
    as opening the path would."""
    target = os.path.realpath(path) if os.path.islink(path) else path
    if os.path.isdir(target):
        raise _invalid(f"{path}: is a directory")
    return target


def _open_temp(target: str, user: User) -> tuple[str, int]:
    """A new private file beside ``target``; renaming it over ``target`` is atomic."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # keep an existing file's mode
    except OSError:
        mode = FILE_MODE
    base = os.path.basename(target)[:200]
    tmp = os.path.join(os.path.dirname(target), f".{base}.{secrets.token_hex(4)}.forkd-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise os_error(exc, target) from None
    try:
        os.fchmod(fd, mode)
        _give(fd, user)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        raise os_error(exc, target) from None
    return tmp, fd


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _prepare_write(path: str, user: User) -> tuple[str, str, int]:
    """(target, temp path, temp fd) with parent directories in place."""
    ensure_dirs(os.path.dirname(path), user)
    target = _real_target(path)
    tmp, fd = _open_temp(target, user)
    return target, tmp, fd


def _commit(fd: int, tmp: str, target: str) -> None:
    try:
        os.close(fd)
        os.rename(tmp, target)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise os_error(exc, target) from None


# -- streamed transfers ------------------------------------------------------------


class _Upload:
    """One streamed write: frames of ``stream`` go to ``tmp``; close renames it to ``target``."""

    def __init__(self, conn: Connection, sid: int, path: str, target: str, tmp: str, fd: int) -> None:
        self.conn = conn
        self.sid = sid
        self.path = path
        self.target = target
        self.tmp = tmp
        self.fd: int | None = fd
        self.written = 0
        self.error: p.RpcError | None = None
        self.stream: InboundStream | None = None
        self.task: asyncio.Task | None = None

    def discard(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
            _unlink_quietly(self.tmp)

    def fail(self, err: p.RpcError) -> None:
        if self.error is None:
            self.error = err
        self.discard()

    async def consume(self) -> None:
        try:
            async for _fd, offset, data in self.stream:
                if self.fd is None:
                    continue  # failed already: keep draining so the sender is not stuck on credit
                if offset != self.written:
                    self.fail(_invalid(f"{self.path}: chunk at offset {offset}, expected {self.written}"))
                    continue
                try:
                    _write_all(self.fd, data)
                except OSError as exc:
                    self.fail(os_error(exc, self.path))
                    continue
                self.written += len(data)
            err = self.stream.error
            if err is not None:  # the sender gave up, or the connection dropped
                self.fail(err)
        except BaseException:
            self.fail(p.RpcError(p.ErrorCode.CANCELLED, f"write of {self.path} aborted"))
            raise


@component("files")
class Files:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.uploads: dict[tuple[Connection, int], _Upload] = {}
        self.downloads: dict[tuple[Connection, int], asyncio.Task] = {}

    def drop_connection(self, conn: Connection) -> None:
        for key in [k for k in self.uploads if k[0] is conn]:
            self._abort_upload(self.uploads.pop(key))
        for key in [k for k in self.downloads if k[0] is conn]:
            self.downloads.pop(key).cancel()

    async def close(self) -> None:
        for up in list(self.uploads.values()):
            self._abort_upload(up)
        self.uploads.clear()
        for task in self.downloads.values():
            task.cancel()
        self.downloads.clear()

    @staticmethod
    def _abort_upload(up: _Upload) -> None:
        if up.task is not None:
            up.task.cancel()
        up.fail(p.RpcError(p.ErrorCode.CANCELLED, f"write of {up.path} aborted"))

    async def push(self, conn: Connection, sid: int, path: str, fd: int, offset: int, length: int | None):
        try:
            pos, left = offset, length
            while left is None or left > 0:
                n = p.CHUNK_SIZE if left is None else min(p.CHUNK_SIZE, left)
                try:
                    data = os.pread(fd, n, pos)
                except OSError as exc:
                    await conn.end_stream(sid, error=os_error(exc, path).to_wire())
                    return
                if not data:
                    break
                await conn.send_stream(sid, 0, pos, data)
                pos += len(data)
                if left is not None:
                    left -= len(data)
            await conn.end_stream(sid)
        except (TransportClosed, p.RpcError):
            pass  # client gone, or it aborted the stream
        finally:
            conn.close_outbound(sid)
            os.close(fd)
            if self.downloads.get((conn, sid)) is asyncio.current_task():
                del self.downloads[(conn, sid)]


def _files(agent: Any) -> Files:
    return agent.files


def _stream_id(params: dict) -> int:
    return _params.get_int(params, "stream", minimum=0)


def _window(params: dict) -> int:
    return min(_params.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1), MAX_WINDOW)


@method("files.read")
async def _read(agent: Any, conn: Connection, params: dict) -> dict:
    path, _user = _target(params)
    sid = _stream_id(params)
    window = _params.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1)
    offset = _params.get_int(params, "offset", 0, minimum=0)
    length = _params.get_int(params, "length", None, minimum=0)
    files = _files(agent)
    if (conn, sid) in files.downloads:
        raise _invalid(f"stream {sid} is already in use")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise _invalid(f"{path}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        # A fifo or device could block the agent or never end.
        raise _invalid(f"{path}: not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise os_error(exc, path) from None
    conn.open_outbound(sid, window)
    # The pusher's first frame goes out after this response: the response is
    # written when this handler returns, before the new task first runs.
    task = asyncio.get_running_loop().create_task(files.push(conn, sid, path, fd, offset, length))
    files.downloads[(conn, sid)] = task
    return {"path": path, "size": st.st_size}


@method("files.read_abort")
async def _read_abort(agent: Any, conn: Connection, params: dict) -> dict:
    task = _files(agent).downloads.pop((conn, _stream_id(params)), None)
    if task is not None:
        task.cancel()
    return {}


@method("files.write_open")
async def _write_open(agent: Any, conn: Connection, params: dict) -> dict:
    path, user = _target(params)
    sid = _stream_id(params)
    window = _window(params)
    files = _files(agent)
    if (conn, sid) in files.uploads or sid in conn._inbound:
        raise _invalid(f"stream {sid} is already in use")
    target, tmp, fd = _prepare_write(path, user)
    up = _Upload(conn, sid, path, target, tmp, fd)
    # Opened before this handler answers, so no frame the client sends after
    # the answer can arrive unclaimed.
    up.stream = conn.open_inbound(sid, window)
    up.task = asyncio.get_running_loop().create_task(up.consume())
    files.uploads[(conn, sid)] = up
    return {"window": window}


@method("files.write_close")
async def _write_close(agent: Any, conn: Connection, params: dict) -> dict:
    sid = _stream_id(params)
    up = _files(agent).uploads.get((conn, sid))
    if up is None:
        raise _invalid(f"no write is open on stream {sid}")
    # Ends the stream behind every frame that arrived before this request (the
    # reader queued them before it dispatched us); the consumer writes those,
    # then stops. Frames sent after write_close are dropped.
    await up.stream.close()
    try:
        await asyncio.shield(up.task)
    finally:
        _files(agent).uploads.pop((conn, sid), None)
    if up.error is not None:
        raise up.error
    if up.fd is None:
        raise p.RpcError(p.ErrorCode.CANCELLED, f"write of {up.path} aborted")
    fd, up.fd = up.fd, None
    _commit(fd, up.tmp, up.target)
    agent.notify("files_changed")
    return _write_info(up.path)


@method("files.write_abort")
async def _write_abort(agent: Any, conn: Connection, params: dict) -> dict:
    up = _files(agent).uploads.pop((conn, _stream_id(params)), None)
    if up is not None:
        await up.stream.close()
        Files._abort_upload(up)
    return {}


@method("files.write")
async def _write(agent: Any, conn: Connection, params: dict) -> dict:
    path, user = _target(params)
    data = _params.get(params, "data", (bytes, str))
    if isinstance(data, str):
        data = data.encode()
    if len(data) > p.CHUNK_SIZE:
        raise _invalid(
            f"data of {len(data)} bytes is larger than {p.CHUNK_SIZE}; use files.write_open for big files"
        )
    target, tmp, fd = _prepare_write(path, user)
    try:
        _write_all(fd, data)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(tmp)
        raise os_error(exc, path) from None
    _commit(fd, tmp, target)
    agent.notify("files_changed")
    return _write_info(path)


# -- metadata and tree operations ---------------------------------------------------


def _walk(root: str, shown: str, depth: int, names: _Names, out: list[dict], size: list[int]) -> None:
    """Entries under ``root`` (reported under ``shown``), sorted, parents before children.
    Symlinked directories are listed, not entered."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = os.path.join(shown, e.name)
        try:
            info = entry_info(path, e.stat(follow_symlinks=False), names)
        except OSError:
            continue
        size[0] += len(msgpack.packb(info))
        if size[0] > _MAX_RESULT:
            raise _invalid(f"{shown}: too many entries for one answer; list with a smaller depth")
        out.append(info)
        if depth > 1 and info["type"] == "dir":
            try:
                _walk(e.path, path, depth - 1, names, out, size)
            except OSError:
                pass  # an unreadable or vanished subdirectory: list the rest


@method("files.list")
async def _list(agent: Any, conn: Connection, params: dict) -> list[dict]:
    path, _user = _target(params)
    depth = _params.get_int(params, "depth", 1)
    if depth < 1:
        raise _invalid("depth must be at least 1")
    try:
        st = os.stat(path)  # the listed directory itself may be a symlink to one
    except OSError as exc:
        raise os_error(exc, path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise _invalid(f"{path}: not a directory")
    out: list[dict] = []
    try:
        _walk(path, path, depth, _Names(), out, [0])
    except OSError as exc:
        raise os_error(exc, path) from None
    return out


@method("files.stat")
async def _stat(agent: Any, conn: Connection, params: dict) -> dict:
    path, _user = _target(params)
    try:
        return entry_info(path)
    except NotADirectoryError:
        raise p.RpcError(p.ErrorCode.FILE_NOT_FOUND, f"{path}: no such file or directory") from None
    except OSError as exc:
        raise os_error(exc, path) from None


@method("files.exists")
async def _exists(agent: Any, conn: Connection, params: dict) -> bool:
    path, _user = _target(params)
    return os.path.lexists(path)


@method("files.make_dir")
async def _make_dir(agent: Any, conn: Connection, params: dict) -> bool:
    path, user = _target(params)
    return ensure_dirs(path, user)


@method("files.remove")
async def _remove(agent: Any, conn: Connection, params: dict) -> None:
    path, _user = _target(params)
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except NotADirectoryError:
        raise p.RpcError(p.ErrorCode.FILE_NOT_FOUND, f"{path}: no such file or directory") from None
    except OSError as exc:
        raise os_error(exc, getattr(exc, "filename", None) or path) from None
    agent.notify("files_changed")
    return None


def _move_across(old: str, new: str) -> None:
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.copytree(old, new, symlinks=True)
        shutil.rmtree(old)
    else:
        shutil.copy2(old, new, follow_symlinks=False)
        os.unlink(old)


@method("files.rename")
async def _rename(agent: Any, conn: Connection, params: dict) -> dict:
    old, user = _target(params, "old_path")
    new = resolve_path(_params.get(params, "new_path", str), user)
    if not os.path.lexists(old):
        raise p.RpcError(p.ErrorCode.FILE_NOT_FOUND, f"{old}: no such file or directory")
    ensure_dirs(os.path.dirname(new), user)
    try:
        try:
            os.rename(old, new)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _move_across(old, new)
        agent.notify("files_changed")
        return entry_info(new)
    except OSError as exc:
        raise os_error(exc, old if exc.errno == errno.ENOENT else new) from None
