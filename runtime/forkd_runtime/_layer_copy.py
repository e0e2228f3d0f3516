"""Copying a live sandbox's writable layer out of it, safely and with a short pause.

The layer belongs to a hostile sandbox and is read here by host root, so no
path is ever resolved through it: every entry is opened relative to its
parent's descriptor with O_NOFOLLOW, and a symlink is copied as a symlink.
(A sandbox that swaps a directory for a symlink to ``/`` mid-copy gets its
symlink copied, not the host's files.)

The copy is made in two passes so that the sandbox is frozen only for the
second: ``precopy`` copies everything while the sandbox runs and remembers each
entry's (inode, change time, size); ``sync``, run while it is frozen, copies
again only entries whose record changed and deletes what disappeared. An
entry changed within a clock tick of its record could keep the same change
time, so records younger than ``_RACY_NS`` are never trusted.

Copied as-is: owners, modes, times, extended attributes (overlayfs keeps its
opaque/redirect markers there), whiteouts (0:0 character devices), fifos,
symlinks and hard links (within one pass).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from dataclasses import dataclass, field

__all__ = ["Manifest", "precopy", "sync", "copy_files"]

_RACY_NS = 50_000_000
_CHUNK = 1 << 20


@dataclass
class Manifest:
    """What the last pass saw: relative path -> (inode, ctime_ns, size, fmt)."""

    entries: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    taken_ns: int = 0
    copied_bytes: int = 0


def precopy(src_dir_fd: int, dest: str) -> Manifest:
    """Copy the directory open at ``src_dir_fd`` into the new directory ``dest``."""
    m = Manifest(taken_ns=time.time_ns())
    os.mkdir(dest, 0o700)
    _walk(src_dir_fd, dest, "", m, None)
    return m


def sync(src_dir_fd: int, dest: str, m: Manifest) -> Manifest:
    """Bring ``dest`` (made by ``precopy``) up to date with the source."""
    new = Manifest(taken_ns=time.time_ns())
    _walk(src_dir_fd, dest, "", new, m)
    for rel in m.entries.keys() - new.entries.keys():
        _remove(os.path.join(dest, rel))  # a path under a directory removed first is gone already
    return new


def copy_files(src_dir_fd: int, dest: str) -> list[str]:
    """Copy the regular files directly in a directory (no recursion); others are ignored."""
    os.makedirs(dest, 0o755, exist_ok=True)
    names = []
    with os.scandir(src_dir_fd) as it:
        for entry in it:
            fd = _open(entry.name, src_dir_fd, os.O_RDONLY)
            if fd is None:
                continue
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    _copy_data(fd, os.path.join(dest, entry.name), 0o644)
                    names.append(entry.name)
            finally:
                os.close(fd)
    return names


def _open(name: str, dir_fd: int, flags: int) -> int | None:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None  # gone since the listing
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a symlink since the listing
            return None
        raise


def _walk(dir_fd: int, dest_root: str, rel: str, m: Manifest, old: Manifest | None) -> None:
    links: dict[tuple[int, int], str] = {}
    with os.scandir(dir_fd) as it:
        entries = list(it)
    for entry in entries:
        child_rel = f"{rel}/{entry.name}" if rel else entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        fmt = stat.S_IFMT(st.st_mode)
        record = (st.st_ino, st.st_ctime_ns, st.st_size, fmt)
        m.entries[child_rel] = record
        dest = os.path.join(dest_root, child_rel)
        if old is not None and fmt != stat.S_IFDIR:
            if old.entries.get(child_rel) == record and st.st_ctime_ns < old.taken_ns - _RACY_NS:
                continue  # unchanged since the last pass
            _remove(dest)
        elif old is not None and old.entries.get(child_rel, (0, 0, 0, stat.S_IFDIR))[3] != stat.S_IFDIR:
            _remove(dest)
        if fmt == stat.S_IFDIR:
            sub = _open(entry.name, dir_fd, os.O_RDONLY | os.O_DIRECTORY)
            if sub is None:
                continue
            try:
                if not os.path.isdir(dest):
                    os.mkdir(dest, 0o700)
                _walk(sub, dest_root, child_rel, m, old)
                _metadata(sub, dest, st)
            finally:
                os.close(sub)
        elif fmt == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], dest)
                continue
            fd = _open(entry.name, dir_fd, os.O_RDONLY)
            if fd is None:
                continue
            try:
                m.copied_bytes += _copy_data(fd, dest, 0o600)
                _metadata(fd, dest, os.fstat(fd))
            finally:
                os.close(fd)
            if st.st_nlink > 1:
                links[key] = dest
        elif fmt == stat.S_IFLNK:
            try:
                target = os.readlink(entry.name, dir_fd=dir_fd)
            except OSError:
                continue
            os.symlink(target, dest)
            os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
            os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif fmt in (stat.S_IFCHR, stat.S_IFIFO):
            # Inside a user namespace the only devices a sandbox makes are whiteouts (0:0).
            if fmt == stat.S_IFCHR and st.st_rdev != 0:
                continue
            os.mknod(dest, fmt | 0o600, st.st_rdev)
            fd = _open(entry.name, dir_fd, os.O_PATH)
            if fd is not None:
                try:
                    _metadata(fd, dest, st, xattrs_from_path=True)
                finally:
                    os.close(fd)
        # sockets and anything else: not part of a filesystem's content


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def _copy_data(fd: int, dest: str, mode: int) -> int:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    total = 0
    try:
        # In the kernel, page cache to page cache: copy_file_range within one
        # filesystem, sendfile across two (tmpfs to tmpfs is the usual case).
        copy = os.copy_file_range
        while True:
            try:
                n = (
                    copy(fd, out, _CHUNK * 64)
                    if copy is os.copy_file_range
                    else copy(out, fd, None, _CHUNK * 64)
                )
            except OSError as exc:
                if copy is os.copy_file_range and exc.errno in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
                    copy = os.sendfile
                    continue
                raise
            if n == 0:
                break
            total += n
    finally:
        os.close(out)
    return total


def _metadata(src_fd: int, dest: str, st: os.stat_result, xattrs_from_path: bool = False) -> None:
    os.chown(dest, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dest, stat.S_IMODE(st.st_mode))
    # An O_PATH descriptor cannot read xattrs; its /proc/self/fd link can.
    src = f"/proc/self/fd/{src_fd}" if xattrs_from_path else src_fd
    try:
        names = os.listxattr(src)
    except OSError:
        names = []
    for name in names:
        try:
            os.setxattr(dest, name, os.getxattr(src, name), follow_symlinks=False)
        except OSError:
            pass  # e.g. security.* the host refuses: not a sandbox's content
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
