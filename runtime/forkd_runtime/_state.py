"""Where forkd keeps its state on the host (default /var/lib/forkd).

templates/<name>            -> symlink to builds/<name>-<digest>
templates/builds/<...>/{rootfs/, template.toml, build.json, versions.txt}
run/<child-id>/             per-child upper layers, sockets (reconciled at start)
audit.log
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "FORKD_STATE_DIR"
DEFAULT = "/var/lib/forkd"


def state_dir(override: str | os.PathLike | None = None) -> Path:
    path = Path(override or os.environ.get(ENV_VAR) or DEFAULT)
    path.mkdir(parents=True, exist_ok=True)
    return path
