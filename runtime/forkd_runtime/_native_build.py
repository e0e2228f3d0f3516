"""Compile the zygote's native fork path (guest_agent/forkd_agent/_forkcore.c).

Built with the host's C compiler into forkd's per-zygote code copy; a host
without one (or a non-x86_64 host) gets no library and its zygotes fork from
Python: slower, otherwise the same.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("forkd.runtime.native")

# Freestanding: the library runs inside templates whose C library is not the host's.
CFLAGS = [
    "-O2", "-fPIC", "-shared", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
    "-fno-tree-loop-distribute-patterns", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
]  # fmt: skip


def build(source: Path, output: Path) -> bool:
    """Compile ``source`` to ``output``; False (and a warning) when it cannot be done here."""
    if os.environ.get("FORKD_NATIVE_FORK", "1") == "0":
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if platform.machine() != "x86_64" or cc is None:
        log.warning("no native fork path (%s, compiler %s): zygotes fork from Python", platform.machine(), cc)
        return False
    try:
        subprocess.run(
            [cc, *CFLAGS, "-o", str(output), str(source)], check=True, capture_output=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        log.warning("cannot build the native fork path: %s %s", exc, err.decode(errors="replace")[-500:])
        return False
    return True
