"""A kernel's namespace, written to a file and read back: how code contexts
survive a BRANCH on the process backend (docs/branch-design.md, option D).

Export must stop the kernel as briefly as possible, so the kernel only forks:
the copy (which shares every page with it) double-forks a writer that pickles
the namespace at leisure, while the kernel goes back to serving jobs. The
writer reports on a pipe the agent holds; end of file there means it is done
(or died). The agent passes both descriptors with the ``export`` message.

dill, not pickle: functions and classes defined in cells live in ``__main__``
and must travel by value, with their globals bound to the restoring kernel's
``__main__`` (dill does exactly that). What does not pickle (generators,
sockets, locks held...) is left out by name and reported, never fatal.

Large buffers (numpy arrays, and so pandas frames) go out of band (pickle
protocol 5), page-aligned after the pickle stream. A restoring kernel maps the
file copy-on-write and the arrays are views of that mapping: nothing is copied,
and every branch child of a snapshot shares those pages until it writes them.

File layout: a header (magic, stream length, index offset, index length), the
pickle stream, the buffers (each at a page boundary), the index (msgpack list
of [offset, length], one per out-of-band buffer, in pickling order).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any

import msgpack

__all__ = ["export", "restore", "KERNEL_NAMES"]

# Names every kernel's namespace starts with; a restore must not replace them.
KERNEL_NAMES = frozenset(
    ("__builtins__", "__name__", "__doc__", "__loader__", "__spec__", "__package__", "display")
)
_WHY_LIMIT = 300
_MAGIC = b"forkdns1"
_HEADER = struct.Struct("<8sQQQ")
_PAGE = mmap.PAGESIZE
# Smaller buffers stay in the stream: a page of padding each would outweigh them.
_OUT_OF_BAND = 64 * 1024


class _Discard:
    """A file that keeps nothing: trial pickling without holding the bytes."""

    def write(self, data: Any) -> int:
        return len(data)


def export(session: Any, fds: list[int]) -> dict:
    """Runs in the kernel. Returns once the writer is on its way."""
    if len(fds) != 2:
        for fd in fds:
            os.close(fd)
        return {"error": "export needs a data and a status descriptor"}
    data_fd, status_fd = fds
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the intermediate: detach the writer, leave at once
        code = 0
        try:
            if os.fork() == 0:
                code = _writer(session, data_fd, status_fd)
        finally:
            os._exit(code)
    forked = time.monotonic() - started
    os.close(data_fd)
    os.close(status_fd)
    os.waitpid(pid, 0)
    return {"count": session.count, "fork_s": forked}


def _writer(session: Any, data_fd: int, status_fd: int) -> int:  # pragma: no cover - forked
    status: dict[str, Any] = {"ok": False, "names": [], "skipped": [], "error": None}
    try:
        os.setpgid(0, 0)  # a kill of the kernel's group after this point spares the writer
    except OSError:
        pass
    try:
        import dill

        items = {k: v for k, v in session.ns.items() if k not in KERNEL_NAMES}
        with open(data_fd, "wb", closefd=True) as out:
            try:
                buffers = _dump(dill, items, out)
            except Exception:
                # Something does not pickle: find what, leave it out, try again.
                for name in list(items):
                    try:
                        _pickler(dill, _Discard(), None).dump(items[name])
                    except Exception as exc:
                        why = f"{type(items.pop(name)).__name__}: {exc}"
                        status["skipped"].append({"name": name, "why": why[:_WHY_LIMIT]})
                buffers = _dump(dill, items, out)
            status["bytes"] = out.tell()
            status["buffers"] = buffers
        status["names"] = sorted(items)
        status["ok"] = True
    except BaseException as exc:
        status["error"] = f"{type(exc).__name__}: {exc}"[:_WHY_LIMIT]
    try:
        with open(status_fd, "wb", closefd=True) as s:
            s.write(msgpack.packb(status))
    except OSError:
        return 1
    return 0 if status["ok"] else 1


def _pickler(dill: Any, out: Any, buffers: list | None) -> Any:
    class Pickler(dill.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            # dill saves arrays with their protocol-2 reduction (bytes in the
            # stream); numpy's own protocol-5 one hands out a PickleBuffer.
            t = type(obj)
            if t.__name__ == "ndarray" and t.__module__ == "numpy":
                return obj.__reduce_ex__(5)
            return NotImplemented

    def keep(buf: Any) -> bool:
        if buffers is None or buf.raw().nbytes < _OUT_OF_BAND:
            return True  # in band
        buffers.append(buf)
        return False

    return Pickler(out, protocol=5, buffer_callback=keep)


def _dump(dill: Any, items: dict, out: Any) -> int:
    """Write ``items`` in the layout above; returns the number of out-of-band buffers."""
    out.seek(0)
    out.truncate()
    out.write(bytes(_HEADER.size))
    buffers: list = []
    _pickler(dill, out, buffers).dump(items)
    stream_len = out.tell() - _HEADER.size
    index = []
    for buf in buffers:
        with buf.raw() as view:
            offset = -(-out.tell() // _PAGE) * _PAGE
            out.seek(offset)
            out.write(view)
            index.append((offset, view.nbytes))
    packed = msgpack.packb(index)
    index_offset = out.tell()
    out.write(packed)
    out.seek(0)
    out.write(_HEADER.pack(_MAGIC, stream_len, index_offset, len(packed)))
    out.seek(0, os.SEEK_END)
    return len(buffers)


def restore(session: Any, fds: list[int]) -> dict:
    """Runs in a fresh kernel: load a namespace written by ``export``."""
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return {"error": {"name": "RestoreError", "value": "no namespace file was passed", "traceback": ""}}
    try:
        f = open(fds[0], "rb", closefd=True)  # noqa: SIM115 (closed below, whatever happens)
    except OSError as exc:
        os.close(fds[0])
        return {"names": [], "error": session._describe(exc)}
    try:
        import dill

        with f:
            items = _load(dill, f)
        if not isinstance(items, dict):
            raise TypeError(f"a namespace file holds a dict, not {type(items).__name__}")
        for name in KERNEL_NAMES:
            items.pop(name, None)
        session.ns.update(items)
        return {"names": sorted(items), "error": None}
    except Exception as exc:
        return {"names": [], "error": session._describe(exc)}


def _load(dill: Any, f: Any) -> Any:
    magic, stream_len, index_offset, index_len = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _MAGIC:
        raise ValueError("not a saved namespace")
    stream = f.read(stream_len)
    f.seek(index_offset)
    index = msgpack.unpackb(f.read(index_len))
    buffers = []
    if index:
        # Private and writable: the arrays are the child's own from its first write.
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        view = memoryview(mapping)
        buffers = [view[offset : offset + length] for offset, length in index]
    return dill.loads(stream, buffers=buffers)
