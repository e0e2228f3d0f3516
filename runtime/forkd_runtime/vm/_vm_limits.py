"""A VM's cgroup limits: the guest's plus QEMU's own memory."""

from __future__ import annotations

import contextlib

from .._backend import Limits
from .._cgroups import CPU_PERIOD_US, Cgroup, Cgroups

__all__ = ["QEMU_OVERHEAD_MB", "with_overhead", "apply_limits"]

# QEMU's own memory (TCG cache, heap, device state) on top of the guest memory a child may dirty.
QEMU_OVERHEAD_MB = 96


def with_overhead(limits: Limits) -> Limits:
    return Limits(
        memory_mb=limits.memory_mb + QEMU_OVERHEAD_MB,
        cpus=limits.cpus,
        pids=limits.pids,
        disk_mb=limits.disk_mb,
    )


def apply_limits(cgroups: Cgroups, cg: Cgroup, limits: Limits) -> None:
    mem = str(limits.memory_mb * 1024 * 1024)
    quota = f"{int(limits.cpus * CPU_PERIOD_US)}"
    if cgroups.version == 2:
        d = cg.dirs[0]
        (d / "memory.max").write_text(mem)
        (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        (d / "pids.max").write_text(str(limits.pids))
        return
    memd, cpud, pidsd = cg.dirs[0], cg.dirs[1], cg.dirs[2]
    # v1 wants memsw >= memory at every step: order the two writes by direction.
    order = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    try:
        current = int((memd / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError):
        current = 0
    if int(mem) < current:
        order.reverse()
    for name in order:
        with contextlib.suppress(FileNotFoundError):
            (memd / name).write_text(mem)
    (cpud / "cpu.cfs_quota_us").write_text(quota)
    (pidsd / "pids.max").write_text(str(limits.pids))
