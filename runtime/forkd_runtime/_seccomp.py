"""The seccomp filter every process-backend sandbox runs under.

A deny list on top of the namespaces: calls a sandbox never needs and that are
the usual ways out of a container (module loading, kexec, bpf, keyrings,
mounting after setup, new namespaces, file handles, perf, userfaultfd,
io_uring). Denied calls fail with EPERM rather than killing the process, so
programs that probe for features keep working.

The program is compiled once on the host with libseccomp (pyseccomp) and handed
to the zygote as raw BPF, which each child installs with prctl after its setup.
"""

from __future__ import annotations

import errno
import hashlib
import tempfile
from pathlib import Path

DENIED = (
    # kernel and module manipulation
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "iopl", "ioperm",
    "lookup_dcookie", "vhangup",
    # mounting and namespaces after setup
    "mount", "umount2", "pivot_root", "fsopen", "fsconfig", "fsmount", "fspick",
    "move_mount", "open_tree", "mount_setattr", "setns", "unshare",
    # classic escapes and large attack surface
    "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # clock
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
)  # fmt: skip

# clone/clone3 creating namespaces: refused; plain fork-style clone stays allowed.
NS_CLONE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def compile_filter() -> bytes:
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except Exception:  # a call this kernel/arch does not have
            continue
    for bit in range(32):
        flag = 1 << bit
        if NS_CLONE_FLAGS & flag:
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes flags in a struct seccomp cannot read: make it fall back to clone.
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # libseccomp writes to a file descriptor, not a Python buffer.
    with tempfile.TemporaryFile() as tmp:
        f.export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def filter_file(directory: Path) -> Path:
    """Write the compiled filter into ``directory`` (once per content) and return its path."""
    bpf = compile_filter()
    path = directory / f"seccomp-{hashlib.sha256(bpf).hexdigest()[:12]}.bpf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bpf)
        tmp.rename(path)
    return path
