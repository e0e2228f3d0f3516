"""What a snapshot is on disk and what a restore of it depends on."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from .._backend import Snapshot, SpawnError
from ._image import VmImage
from ._vm_process import VmProcess

__all__ = ["SNAPSHOT_KEYS", "SHM", "SnapshotMismatch", "LoadedSnapshot", "read_json"]

# What a restore depends on: a snapshot whose values differ is refused.
SNAPSHOT_KEYS = (
    "qemu_version",
    "devices",
    "accel",
    "cpu",
    "memory_mb",
    "kernel",
    "image_digest",
    "template_digest",
    "host_cpu",
)
SHM = Path("/dev/shm")


class SnapshotMismatch(SpawnError):
    """The snapshot was taken with another QEMU, accelerator, CPU, kernel, image or RAM size."""


@dataclass(eq=False)
class LoadedSnapshot:
    snapshot: Snapshot
    dir: Path
    image: VmImage
    meta: dict
    pool: list[VmProcess] = field(default_factory=list)
    pool_target: int = 0
    filling: asyncio.Task | None = None
    launching: int = 0

    state: bytes = b""

    def __post_init__(self) -> None:
        # Every child reads the same device state: keep it in memory.
        self.state = (self.dir / "state").read_bytes()

    @property
    def memory(self) -> Path:
        return Path(self.meta["memory_path"])

    @property
    def upper_template(self) -> Path:
        return self.dir / "child-upper.qcow2"


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
