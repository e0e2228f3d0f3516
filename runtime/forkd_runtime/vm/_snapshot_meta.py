"""What a snapshot is on disk and what a restore of it depends on."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from .._backend import Snapshot, SpawnError
from ._image import VmImage
from ._vm_process import VmProcess

__all__ = ["SNAPSHOT_KEYS", "SHM", "SnapshotMismatch", "LoadedSnapshot", "read_json", "default_layers"]

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
    # QEMU processes kept waiting after a spawn (None: the backend's pool_size).
    pool_size: int | None = None

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

    @property
    def captured(self) -> bool:
        """Made by BRANCH from a live child (``_branch``), not booted from a template."""
        return bool(self.meta.get("captured"))

    @property
    def layers(self) -> list[tuple[Path, str]]:
        """The read-only disk layers under a child's writable one, bottom first:
        the image's empty base, the parent's layer, then one per BRANCH."""
        return [
            (Path(path), fmt) for path, fmt in self.meta.get("layers") or default_layers(self.image, self.dir)
        ]


def default_layers(image: VmImage, snap_dir: Path) -> list[list[str]]:
    """A template snapshot's: the empty base image under the parent's layer."""
    return [[str(image.upper), "raw"], [str(snap_dir / "upper.qcow2"), "qcow2"]]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
