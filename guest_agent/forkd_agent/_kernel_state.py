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
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgpack

__all__ = ["export", "restore", "KERNEL_NAMES"]

# Names every kernel's namespace starts with; a restore must not replace them.
KERNEL_NAMES = frozenset(
    ("__builtins__", "__name__", "__doc__", "__loader__", "__spec__", "__package__", "display")
)
_WHY_LIMIT = 300


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
                dill.dump(items, out, protocol=5)
            except Exception:
                # Something does not pickle: find what, leave it out, try again.
                out.seek(0)
                out.truncate()
                for name in list(items):
                    try:
                        dill.dump(items[name], _Discard(), protocol=5)
                    except Exception as exc:
                        why = f"{type(items.pop(name)).__name__}: {exc}"
                        status["skipped"].append({"name": name, "why": why[:_WHY_LIMIT]})
                dill.dump(items, out, protocol=5)
            status["bytes"] = out.tell()
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
            items = dill.load(f)
        if not isinstance(items, dict):
            raise TypeError(f"a namespace file holds a dict, not {type(items).__name__}")
        for name in KERNEL_NAMES:
            items.pop(name, None)
        session.ns.update(items)
        return {"names": sorted(items), "error": None}
    except Exception as exc:
        return {"names": [], "error": session._describe(exc)}
