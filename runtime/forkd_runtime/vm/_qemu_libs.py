"""The environment forkd's QEMU processes start with: libcapstone swapped for a
stand-in that never disassembles (``_capstone_stub.c`` says why: ~1.3 MiB of
private memory per QEMU process).

The stand-in is used only when it provably serves this QEMU binary: built
with the soname the binary asks for, and ``qemu -version`` then starts with
every symbol bound at once (``LD_BIND_NOW``), so no missing entry point can
surface later. Otherwise, or with ``FORKD_VM_CAPSTONE=real``, QEMU loads the
real library. Snapshots do not depend on it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from .._native_build import build_cached

__all__ = ["qemu_env", "capstone_plan", "capstone_stub"]

log = logging.getLogger("forkd.runtime.vm")

STUB_SOURCE = Path(__file__).with_name("_capstone_stub.c")
_NEEDED = re.compile(rb"\0(libcapstone\.so\.\d+)\0")


def _needed_capstone(binary: str) -> str | None:
    """The capstone soname among the binary's strings (its DT_NEEDED entry), if any."""
    try:
        with open(binary, "rb") as f:
            m = _NEEDED.search(f.read())
    except OSError:
        return None
    return m.group(1).decode() if m else None


def _real_wanted() -> bool:
    return os.environ.get("FORKD_VM_CAPSTONE", "stub") == "real"


def capstone_plan(binary: str) -> str:
    """What the VM backend does about ``binary``'s libcapstone (for ``forkd doctor``)."""
    soname = _needed_capstone(binary)
    if soname is None:
        return "not linked"
    if _real_wanted():
        return f"{soname}: the real one (FORKD_VM_CAPSTONE=real)"
    return f"{soname}: a stand-in that never disassembles, if it builds here (FORKD_VM_CAPSTONE=real: the real one)"


def capstone_stub(binary: str, into: Path) -> Path | None:
    """A directory holding the stand-in for ``binary``'s libcapstone (built once
    into ``into``), or None: QEMU then loads the real one."""
    if _real_wanted():
        return None
    soname = _needed_capstone(binary)
    if soname is None:
        return None
    lib = build_cached(STUB_SOURCE, into, soname, [f"-Wl,-soname,{soname}"])
    if lib is None:
        return None
    d = lib.parent
    env = {**os.environ, "LD_LIBRARY_PATH": str(d), "LD_BIND_NOW": "1"}
    try:
        out = subprocess.run([binary, "-version"], env=env, capture_output=True, text=True, timeout=30)
        why = "" if out.returncode == 0 and "QEMU emulator version" in out.stdout else out.stderr[-300:]
    except (OSError, subprocess.SubprocessError) as exc:
        why = str(exc)
    if why:
        log.warning("QEMU keeps the real %s: the stand-in does not serve it (%s)", soname, why.strip())
        return None
    return d


def qemu_env(binary: str, into: Path) -> dict[str, str]:
    """The environment to start ``binary`` with."""
    env = dict(os.environ)
    stub = capstone_stub(binary, into)
    if stub is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stub), env.get("LD_LIBRARY_PATH")]))
    return env
