"""Kernel Samepage Merging: marking QEMU processes mergeable, and reading what ksmd does.

The runtime only *marks* its QEMU processes (``PR_SET_MEMORY_MERGE`` before
exec, when asked to: ``VmBackend(ksm=True)``); whether and how fast anything is
merged is decided by the host's ksmd (``/sys/kernel/mm/ksm``), which is
host-wide and belongs to the operator: the runtime never changes its settings.
``configure`` exists for the benchmark, which says so in its output.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from pathlib import Path

__all__ = [
    "KSM_SYSFS",
    "PR_SET_MEMORY_MERGE",
    "mark_mergeable",
    "process_stat",
    "host_status",
    "ksmd_cpu_s",
    "configure",
]

KSM_SYSFS = Path("/sys/kernel/mm/ksm")
PR_SET_MEMORY_MERGE = 67
PR_GET_MEMORY_MERGE = 68
# The ksmd knobs the benchmark sets (and restores).
SETTINGS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages", "advisor_mode")

_libc = ctypes.CDLL(None, use_errno=True)


def mark_mergeable() -> bool:
    """Mark the calling process's whole address space mergeable (Linux ≥ 6.4;
    kept across fork and, since 6.7, across execve). False when the kernel
    refuses (no KSM, too old)."""
    return _libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0


def process_stat(pid: int) -> dict[str, int | bool]:
    """``/proc/PID/ksm_stat``: ``merge_any`` (the whole process is mergeable),
    ``merging_pages`` (its pages that are KSM pages now), ``zero_pages`` (its
    pages replaced by the zero page). Empty if the kernel has none."""
    out: dict[str, int | bool] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                key, _, value = line.replace(":", " ").partition(" ")
                key, value = key.removeprefix("ksm_"), value.strip()
                out[key] = value == "yes" if value in ("yes", "no") else int(value)
    except (OSError, ValueError):
        pass
    return out


def _read(name: str) -> str | None:
    try:
        return (KSM_SYSFS / name).read_text().strip()
    except OSError:
        return None


def _selected(value: str) -> str:
    # sysfs choice files mark the current one: "none [scan-time]" -> "scan-time".
    return value.split("[", 1)[-1].split("]", 1)[0]


def _exec_inherits() -> bool | None:
    """Whether the mark survives execve here: a child marked before exec reads
    its own ksm_stat."""
    try:
        out = subprocess.run(
            ["cat", "/proc/self/ksm_stat"],
            preexec_fn=mark_mergeable,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "ksm_merge_any: yes" in out


def host_status() -> dict:
    """What ``forkd doctor`` says about KSM on this host."""
    if not KSM_SYSFS.is_dir():
        return {"available": False, "reason": "the kernel has no KSM (CONFIG_KSM)"}
    info: dict = {"available": True}
    run = _read("run")
    info["ksmd_running"] = run == "1"
    for name in ("pages_to_scan", "sleep_millisecs", "use_zero_pages"):
        value = _read(name)
        if value is not None and value.lstrip("-").isdigit():
            info[name] = int(value)
    advisor = _read("advisor_mode")
    if advisor:
        info["advisor_mode"] = _selected(advisor)
    info["process_merge"] = _libc.prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0) >= 0
    info["process_merge_across_exec"] = _exec_inherits() if info["process_merge"] else False
    if not info["ksmd_running"]:
        info["hint"] = (
            "ksmd is off: VmBackend(ksm=True) / FORKD_VM_KSM=1 marks VMs mergeable but nothing merges "
            "until the operator runs e.g. `echo 1000 > /sys/kernel/mm/ksm/pages_to_scan; "
            "echo 1 > /sys/kernel/mm/ksm/run` (see docs/vm.md, PSS)"
        )
    return info


def ksmd_cpu_s() -> float | None:
    """CPU seconds ksmd has used since boot (None if there is no ksmd)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat.split(" ", 2)[1] == "(ksmd)":
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def configure(**settings: int | str) -> dict[str, str]:
    """Set ksmd knobs (``run``, ``pages_to_scan``, ...); returns their previous
    values, to give back to ``configure`` later. For the benchmark only: ksmd is
    host-wide and the runtime leaves it to the operator."""
    previous: dict[str, str] = {}
    for name in settings:
        value = _read(name)
        if value is None:
            continue
        if name == "advisor_mode":
            value = _selected(value)
        previous[name] = value
    # ksmd stops before its settings change, and starts after they are set.
    names = [n for n in settings if n != "run"]
    if "run" in settings:
        names.insert(len(names) if str(settings["run"]) != "0" else 0, "run")
    for name in names:
        (KSM_SYSFS / name).write_text(str(settings[name]))
    return previous
