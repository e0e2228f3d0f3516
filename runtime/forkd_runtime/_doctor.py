"""What this host can do for forkd: ``report()`` backs ``forkd doctor``.

Every check is cheap, needs no template, and never fails the report: a check
that cannot run says why in its own entry.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

__all__ = ["report", "default_backend"]


def _kvm() -> dict:
    from .vm._qemu import kvm_status

    usable, why = kvm_status()
    info = {"usable": usable, "reason": why, "device": os.path.exists("/dev/kvm")}
    if os.path.isdir("/sys/module/kvm_pvm"):
        info["pvm"] = True
    return info


def _qemu() -> dict:
    from .vm._qemu import QemuError, qemu_binary, qemu_version
    from .vm._qemu_libs import capstone_plan

    try:
        binary = qemu_binary()
        return {
            "installed": True,
            "binary": binary,
            "version": qemu_version(binary),
            "capstone": capstone_plan(binary),
        }
    except (QemuError, OSError, subprocess.SubprocessError) as exc:
        return {"installed": False, "error": str(exc)}


def _ksm() -> dict:
    from .vm._ksm import host_status

    try:
        return host_status()
    except OSError as exc:
        return {"available": None, "error": str(exc)}


def _cgroups() -> dict:
    from ._cgroups import CgroupError, detect

    try:
        cg = detect()
    except CgroupError as exc:
        return {"version": None, "error": str(exc)}
    info: dict = {"version": cg.version}
    if cg.version == 2:
        try:
            info["controllers"] = (cg.root / "cgroup.controllers").read_text().split()
        except OSError:
            pass
    else:
        info["controllers"] = [c for c in cg.V1_CONTROLLERS if cg.controller_dir(c).is_dir()]
    return info


def _userns() -> dict:
    info: dict = {}
    for name, path in (
        ("max_user_namespaces", "/proc/sys/user/max_user_namespaces"),
        ("unprivileged_userns_clone", "/proc/sys/kernel/unprivileged_userns_clone"),
        ("apparmor_restrict_unprivileged_userns", "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
    ):
        try:
            info[name] = int(Path(path).read_text().strip())
        except (OSError, ValueError):
            pass
    info["available"] = info.get("max_user_namespaces", 0) > 0
    return info


def default_backend(kvm_usable: bool, qemu_installed: bool) -> dict:
    """The backend the gateway uses when none is configured, and why. The
    microVM backend is the default where it is fast (KVM on real VT-x/AMD-V);
    under TCG a VM child costs ~100x the CPU of a process child, so the process
    backend is the default there and the VM backend is opt-in."""
    if kvm_usable and qemu_installed:
        return {
            "name": "vm",
            "accel": "kvm",
            "reason": "KVM with hardware virtualization and QEMU are available",
        }
    why = "no usable KVM" if not kvm_usable else "QEMU is not installed"
    return {
        "name": "process",
        "accel": None,
        "reason": f"{why}; the vm backend still works with --backend vm (accel tcg, slow)"
        if qemu_installed
        else why,
    }


def report() -> dict:
    kvm = _kvm()
    qemu = _qemu()
    accel = "kvm" if kvm["usable"] else "tcg"
    forced = os.environ.get("FORKD_VM_ACCEL")
    return {
        "host": {
            "kernel": platform.release(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "root": os.geteuid() == 0,
        },
        "kvm": kvm,
        "qemu": qemu,
        "vm_accel": forced or accel,
        "ksm": _ksm(),
        "cgroups": _cgroups(),
        "user_namespaces": _userns(),
        "tools": {
            t: shutil.which(t) is not None for t in ("mmdebstrap", "mkfs.ext4", "qemu-img", "apt-get", "ip")
        },
        "default_backend": default_backend(kvm["usable"], qemu.get("installed", False)),
    }
