"""The audit log: one JSON object per line for every sandbox lifecycle event.

Events: ``create``, ``connect``, ``kill``, ``expire`` (its lease ran out), ``exit`` (it died on its own),
each with ``time`` (ISO 8601, UTC), ``ts`` (epoch seconds), ``key_id`` (never the key), ``sandbox_id`` and
``template``, plus event details (``timeout``, ``reason``...). Each line is one ``write()`` on an
``O_APPEND`` descriptor, so lines from concurrent writers never interleave and a crash loses at most
the line being written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["AuditLog"]

log = logging.getLogger("forkd.gateway.audit")


class AuditLog:
    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, event: str, *, key_id: str, sandbox_id: str, template: str, **details) -> None:
        if self._fd is None:
            return
        now = time.time()
        record = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "ts": round(now, 6),
            "event": event,
            "key_id": key_id,
            "sandbox_id": sandbox_id,
            "template": template,
            **details,
        }
        line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
        try:
            os.write(self._fd, line)
        except OSError as exc:
            # The audit log must not take sandboxes down with it (a full disk); say so loudly.
            log.error("cannot write the audit log %s: %s", self.path, exc)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
