"""Thin ctypes wrappers for the Linux calls the zygote and sandbox setup need.

Python 3.11 has no os.unshare/setns/mount; these are the raw system calls.
Every failure raises OSError with the call named, so setup errors are legible.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
_papi = ctypes.pythonapi

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

SYS_clone = 56
SYS_pivot_root = 155
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
PR_SET_PDEATHSIG = 1
SECCOMP_MODE_FILTER = 2


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


last_error = _fail


def _b(s: str | bytes | None) -> bytes | None:
    return s.encode() if isinstance(s, str) else s


_clone_args: dict[int, tuple] = {}


def clone(flags: int, python_hooks: bool = True) -> int:
    """fork() into new namespaces in one step: with CLONE_NEWPID the child is PID 1
    of its namespace without a second fork.

    With ``python_hooks`` Python's own fork hooks run around it (PyOS_BeforeFork /
    AfterFork), exactly as os.fork() would. Without them the child skips the
    interpreter's re-initialisation and the at-fork callbacks of threading,
    logging and random — which in a child that only waits costs ~700 KiB of
    copied pages. That is only sound in a process with a single thread holding
    no locks (the zygote), and the caller must reseed PRNGs itself."""
    # The argument objects are made once: every object the zygote creates or
    # touches per fork is a page copied (and then owned by one child).
    args = _clone_args.get(flags)
    if args is None:
        null = ctypes.c_void_p(0)
        args = (
            ctypes.c_long(SYS_clone),
            ctypes.c_ulong(flags | signal.SIGCHLD),
            null,
            null,
            null,
            ctypes.c_ulong(0),
        )
        _clone_args[flags] = args
    if not python_hooks:
        pid = libc.syscall(*args)
        if pid < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"clone: {os.strerror(err)}")
        return pid
    _papi.PyOS_BeforeFork()
    pid = libc.syscall(*args)
    if pid == 0:
        _papi.PyOS_AfterFork_Child()
    else:
        err = ctypes.get_errno()
        _papi.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone: {os.strerror(err)}")
    return pid


def unshare(flags: int) -> None:
    if libc.unshare(ctypes.c_int(flags)) != 0:
        raise _fail("unshare")


def setns(fd: int, nstype: int = 0) -> None:
    if libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)) != 0:
        raise _fail("setns")


def mount(
    source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None
) -> None:
    if libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)) != 0:
        raise _fail(f"mount {fstype or source} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    if libc.umount2(_b(target), ctypes.c_int(flags)) != 0:
        raise _fail(f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    if libc.syscall(ctypes.c_long(SYS_pivot_root), _b(new_root), _b(put_old)) != 0:
        raise _fail("pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int | ctypes.c_void_p = 0) -> None:
    if (
        libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), arg3, ctypes.c_ulong(0), ctypes.c_ulong(0))
        != 0
    ):
        raise _fail(f"prctl({option})")


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompProgram:
    """A classic-BPF seccomp filter (raw ``struct sock_filter`` array), ready to
    install: built once, installed by many processes."""

    def __init__(self, bpf: bytes) -> None:
        if len(bpf) % 8:
            raise ValueError("seccomp program must be a whole number of 8-byte instructions")
        self._buf = ctypes.create_string_buffer(bpf, len(bpf))
        self._prog = _SockFprog(len(bpf) // 8, ctypes.cast(self._buf, ctypes.c_void_p))
        self._ptr = ctypes.cast(ctypes.pointer(self._prog), ctypes.c_void_p)

    @property
    def address(self) -> int:
        """Of its ``struct sock_fprog``: for code that installs it without ctypes."""
        return self._ptr.value

    def install(self) -> None:
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._ptr)


def install_seccomp(bpf: bytes) -> None:
    SeccompProgram(bpf).install()


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def idmapped_bind(source: str, target: str, userns_fd: int, readonly: bool = True) -> None:
    """Bind ``source`` at ``target`` with ownership shifted through ``userns_fd``'s
    mapping: files owned by host root appear owned by the mapped range."""
    fd = libc.syscall(
        ctypes.c_long(SYS_open_tree),
        ctypes.c_int(-100),  # AT_FDCWD
        _b(source),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    if fd < 0:
        raise _fail(f"open_tree {source}")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if readonly else 0), 0, 0, userns_fd)
        rc = libc.syscall(
            ctypes.c_long(SYS_mount_setattr),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        if rc != 0:
            raise _fail(f"mount_setattr idmap {source}")
        rc = libc.syscall(
            ctypes.c_long(SYS_move_mount),
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(-100),
            _b(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
        if rc != 0:
            raise _fail(f"move_mount {target}")
    finally:
        os.close(fd)


def write_id_maps(pid: int | str, uid_map: str, gid_map: str) -> None:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def set_loopback_up() -> None:
    """A new network namespace's ``lo`` starts down; bring it up without iproute2."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1
HUGE = 1 << 21


def collapse_anonymous_memory() -> int:
    """Back this process's private anonymous memory with 2 MiB pages where it can
    (MADV_COLLAPSE, Linux ≥ 6.1); returns the bytes asked for.

    A fork copies one entry per 2 MiB page instead of 512: for a zygote whose
    warm heap is tens of MiB that is most of the cost of each fork. A page the
    zygote or a child later writes is split back into small ones, so this pays
    only in a process that writes little between forks."""
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        if not fields[1].startswith("rw") or fields[1][3] != "p":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":
            continue  # file mappings and stacks stay as they are
        start, end = (int(x, 16) for x in fields[0].split("-"))
        lo, hi = (start + HUGE - 1) & ~(HUGE - 1), end & ~(HUGE - 1)
        if hi <= lo:
            continue
        # The flag on the whole mapping: on part of it the kernel would split it in
        # up to three, and every mapping costs each fork its own copying.
        if madvise(start, end - start, MADV_HUGEPAGE) == 0 and madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            total += hi - lo
    return total
