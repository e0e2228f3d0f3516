"""The zygote's native fork path (``_forkcore.c``): loading it and feeding it;
and ``spawn``, its user-switching process start for the sandboxes' agents.

The runtime compiles ``_forkcore.c`` next to this file when it copies forkd's
code for a zygote (``forkd_runtime._native_build``); without a compiler there
is no ``_forkcore.so`` and the zygote forks from Python instead.

Everything a child's setup passes to the kernel is built here once, as C
structures whose byte strings this object keeps alive; per request only the
children's own strings are made.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path

LIBRARY = Path(__file__).with_name("_forkcore.so")
MAX_MOUNTS = 8
MAX_CHUNK = 64  # _forkcore.c MAX_CHUNK
MAX_ID = 64  # longest child id the native path reports (its notification buffer)
PENDING = 65536  # _forkcore.c BUF

i64 = ctypes.c_long
u64 = ctypes.c_ulong
cstr = ctypes.c_char_p


class Mount(ctypes.Structure):
    _fields_ = [("source", cstr), ("target", cstr), ("fstype", cstr), ("flags", u64), ("data", cstr)]


class Plan(ctypes.Structure):
    _fields_ = [
        ("ns_flags", u64),
        ("home_netns", i64),
        ("layer_fd", i64),
        ("state_fd", i64),
        ("private_root", Mount),
        ("layer", cstr),
        ("layer_flags", u64),
        ("subdirs", cstr * 3),
        ("root", cstr),
        ("n_mounts", i64),
        ("mounts", Mount * MAX_MOUNTS),
        ("seccomp", ctypes.c_void_p),
        ("pending", ctypes.c_void_p),
        ("pending_len", i64),
    ]


class Child(ctypes.Structure):
    _fields_ = [
        ("id", cstr),
        ("hostname", cstr),
        ("hostname_len", i64),
        ("tmpfs_opts", cstr),
        ("overlay_opts", cstr),
        ("state_path", cstr),
        ("resolv", cstr),
        ("resolv_len", i64),
        ("netns", i64),
        ("pid", i64),
        ("fd", i64),
        ("err", i64),
    ]


def load() -> ctypes.PyDLL | None:
    """The compiled fork path, or None (not built for this zygote: see
    ``forkd_runtime._native_build``)."""
    global _loaded
    if not LIBRARY.exists():
        return None
    # PyDLL: the GIL stays held, so a child returning into Python from inside
    # the call finds the interpreter exactly as the zygote left it.
    lib = ctypes.PyDLL(str(LIBRARY))
    lib.fk_fork.restype = i64
    lib.fk_fork.argtypes = [ctypes.POINTER(Plan), ctypes.POINTER(Child), i64, i64, i64]
    lib.fk_spawn.restype = i64
    lib.fk_spawn.argtypes = [ctypes.POINTER(SpawnRequest)]
    _loaded = lib
    return lib


def _mount(args: tuple) -> Mount:
    source, target, fstype, flags, data = args
    return Mount(source, target, fstype, flags.value, data)


class NativeForker:
    """``fork(children)`` through ``_forkcore.c``; see ``forkd_agent._zygote``."""

    def __init__(self, lib: ctypes.PyDLL, plan, ns_flags: int, home_netns: int, layer_fd: int, state_fd: int):
        self._lib = lib
        self._pending = ctypes.create_string_buffer(PENDING)
        c = Plan()
        c.ns_flags = ns_flags
        c.home_netns = home_netns
        c.layer_fd = layer_fd
        c.state_fd = state_fd
        c.private_root = _mount(plan.private)
        c.layer = plan.layer
        c.layer_flags = plan.layer_flags.value
        strings = [d.encode() for d in plan.subdirs] + [plan.root.encode()]
        c.subdirs = (cstr * 3)(*strings[:3])
        c.root = strings[3]
        if len(plan.mounts) > MAX_MOUNTS:
            raise ValueError("too many mounts for the native fork path")
        c.n_mounts = len(plan.mounts)
        for i, args in enumerate(plan.mounts):
            c.mounts[i] = _mount(args)
        c.seccomp = plan.seccomp.address if plan.seccomp is not None else None
        c.pending = ctypes.addressof(self._pending)
        self._plan = c
        self._keep = (plan, strings)  # the byte strings the structure points into

    def fork(self, children: ctypes.Array, n: int, chunk: int, control_fd: int) -> int:
        """Fork the first ``n`` of ``children``, reporting each ``chunk`` of them as a
        ``forked`` notification on ``control_fd`` (their channels attached). In the
        zygote: 0, or -errno if a report could not be sent; in a child handed
        over to Python: its index + 1."""
        if not 0 <= n <= len(children):
            raise ValueError("more children than entries")
        return self._lib.fk_fork(
            ctypes.byref(self._plan), children, n, min(max(chunk, 1), MAX_CHUNK), control_fd
        )

    def pending(self) -> bytes:
        """In a handed-over child: the bytes its ping loop did not answer."""
        return self._pending.raw[: self._plan.pending_len]


# ---- fk_spawn: a command started as another user without fork ----

STEP_CHDIR = 6  # _forkcore.c FK_STEP_*
STEP_EXEC = 10
_loaded: ctypes.PyDLL | None = None  # the library this process loaded (kept across the zygote's forks)


class SpawnRequest(ctypes.Structure):
    _fields_ = [
        ("path", cstr),
        ("argv", ctypes.POINTER(cstr)),
        ("envp", ctypes.POINTER(cstr)),
        ("cwd", cstr),
        ("fds", i64 * 3),
        ("keep", ctypes.POINTER(ctypes.c_int)),
        ("n_keep", i64),
        ("groups", ctypes.POINTER(ctypes.c_uint)),
        ("n_groups", i64),
        ("uid", i64),
        ("gid", i64),
        ("err", i64),
        ("step", i64),
    ]


class Spawned:
    """Where the agent would keep a Popen: the agent reaps its children itself
    and sets ``returncode`` once it has."""

    __slots__ = ("args", "pid", "returncode")

    def __init__(self, args: list[str], pid: int) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


def spawner() -> ctypes.PyDLL | None:
    """The library if this process loaded it (a process-backend sandbox's agent,
    inheriting its zygote's); None elsewhere."""
    return _loaded


def _strings(items: list[bytes]) -> ctypes.Array:
    return (cstr * (len(items) + 1))(*items, None)


def _executable(name: str, env: dict[str, str]) -> str:
    if "/" in name:
        return name  # exec reports what is wrong with it, as Popen's would
    path = shutil.which(name, path=os.pathsep.join(os.get_exec_path(env)))
    if path is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    return path


def spawn(
    lib: ctypes.PyDLL,
    argv: list[str],
    env: dict[str, str],
    cwd: str | None,
    stdio: tuple[int, int, int],
    pass_fds: tuple[int, ...],
    uid: int,
    gid: int,
    groups: list[int],
) -> Spawned:
    """What ``Popen(argv, env=, cwd=, stdin/stdout/stderr=, start_new_session=True,
    close_fds=True, pass_fds=, user=, group=, extra_groups=)`` does, without fork.
    A stdio fd < 0 is /dev/null. Raises OSError as Popen would."""
    path = _executable(argv[0], env)
    r = SpawnRequest()
    r.path = os.fsencode(path)
    c_argv = _strings([os.fsencode(a) for a in argv])
    c_envp = _strings([os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()])
    r.argv = ctypes.cast(c_argv, ctypes.POINTER(cstr))
    r.envp = ctypes.cast(c_envp, ctypes.POINTER(cstr))
    r.cwd = os.fsencode(cwd) if cwd else None
    r.fds[:] = [fd if fd >= 0 else -1 for fd in stdio]
    keep = sorted({fd for fd in pass_fds if fd > 2})
    c_keep = (ctypes.c_int * max(len(keep), 1))(*keep)
    r.keep = ctypes.cast(c_keep, ctypes.POINTER(ctypes.c_int))
    r.n_keep = len(keep)
    c_groups = (ctypes.c_uint * max(len(groups), 1))(*groups)
    r.groups = ctypes.cast(c_groups, ctypes.POINTER(ctypes.c_uint))
    r.n_groups = len(groups)
    r.uid = uid
    r.gid = gid
    pid = lib.fk_spawn(ctypes.byref(r))
    if pid < 0:
        err = -pid
        where = cwd if r.step == STEP_CHDIR else argv[0] if r.step == STEP_EXEC else None
        raise OSError(err, os.strerror(err), where)
    return Spawned(argv, pid)
