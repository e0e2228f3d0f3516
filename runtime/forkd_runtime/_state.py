"""Where forkd keeps its state on the host (default /var/lib/forkd).

templates/<name>            -> symlink to builds/<name>-<digest>
templates/builds/<...>/{rootfs/, template.toml, build.json, versions.txt}
run/<child-id>/             per-child upper layers, sockets (reconciled at start)
audit.log
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

ENV_VAR = "FORKD_STATE_DIR"
DEFAULT = "/var/lib/forkd"


def state_dir(override: str | os.PathLike | None = None) -> Path:
    path = Path(override or os.environ.get(ENV_VAR) or DEFAULT)
    path.mkdir(parents=True, exist_ok=True)
    return path


def take_state_lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` for this process's lifetime (its fd), or
    None when another runtime holds it: one runtime per state directory, since
    each cleans up after its own crashed runs."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
