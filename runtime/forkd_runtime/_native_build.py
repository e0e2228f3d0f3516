"""Compile forkd's freestanding C helpers: the zygote's native fork path
(guest_agent/forkd_agent/_forkcore.c), the VM guest's early loop
(vm/_guest_early.c), the stand-in for QEMU's disassembler library
(vm/_capstone_stub.c) and the QEMU fork server (vm/_qemu_zygote.c).

Built with the host's C compiler (into forkd's per-zygote code copy, or into a
VM image); a host without one (or a non-x86_64 host) gets no library and the
Python version of the same path runs instead: slower, otherwise the same.
``FORKD_NATIVE_FORK=0`` turns both off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("forkd.runtime.native")

# Freestanding: the library runs inside templates whose C library is not the host's.
CFLAGS = [
    "-O2", "-fPIC", "-shared", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector",
    "-fno-tree-loop-distribute-patterns", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
]  # fmt: skip


# Linked against the host's C library: code that only ever runs in host processes.
HOSTED_CFLAGS = ["-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror"]


def build(source: Path, output: Path, extra: Sequence[str] = (), *, hosted: bool = False) -> bool:
    """Compile ``source`` to ``output`` (``extra``: more compiler arguments;
    ``hosted``: with the host's C library); False (and a warning) when it
    cannot be done here."""
    if os.environ.get("FORKD_NATIVE_FORK", "1") == "0":
        return False
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if platform.machine() != "x86_64" or cc is None:
        log.warning(
            "not building %s (%s, compiler %s): its Python path runs", source.name, platform.machine(), cc
        )
        return False
    try:
        subprocess.run(
            [cc, *(HOSTED_CFLAGS if hosted else CFLAGS), *extra, "-o", str(output), str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        log.warning("cannot build %s: %s %s", source.name, exc, err.decode(errors="replace")[-500:])
        return False
    return True


def build_cached(
    source: Path, into: Path, name: str, extra: Sequence[str] = (), *, hosted: bool = False
) -> Path | None:
    """``source`` built as ``into/<digest>/name`` once per source and arguments
    (the digest names the build), or None when it cannot be built here.
    Written aside and renamed, so concurrent runtimes never load half a file."""
    key = source.read_bytes() + "\0".join([name, *extra, str(hosted)]).encode()
    out = into / hashlib.sha256(key).hexdigest()[:12] / name
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}")
    if not build(source, tmp, extra, hosted=hosted):
        return None
    os.replace(tmp, out)
    return out
