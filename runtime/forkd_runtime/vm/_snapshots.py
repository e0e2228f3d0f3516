"""The snapshots a VM backend knows: found, checked against this host, attached, deleted."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

from .._backend import Snapshot, SpawnError
from ._image import VmImage, build_image
from ._qemu import device_digest
from ._snapshot_meta import SNAPSHOT_KEYS, LoadedSnapshot, SnapshotMismatch, read_json

__all__ = ["SnapshotCatalog"]

log = logging.getLogger("forkd.runtime.vm")


class SnapshotCatalog:
    """Mixed into ``VmBackend``: uses its ``store``, ``machine``, ``snap_root`` and
    ``_snaps``; a new snapshot is taken by ``ParentBoot``, its pool filled by ``WarmPool``."""

    def _current(self, image: VmImage) -> dict:
        assert self.machine is not None
        m = self.machine.meta()
        return {
            "qemu_version": m["qemu_version"],
            "devices": device_digest(self.machine, image),
            "accel": m["accel"],
            "cpu": m["cpu"],
            "memory_mb": m["memory_mb"],
            "host_cpu": m.get("host_cpu"),
            "kernel": image.kernel_version,
            "image_digest": image.digest,
            "template_digest": image.template_digest,
        }

    async def image(self, template: str) -> VmImage:
        """The template's VM image (built on first use)."""
        tpl = self.store.get(template)
        return await asyncio.to_thread(build_image, tpl, self.image_cache, self.progress)

    async def prepare(self, template: str) -> Snapshot:
        await self.start()
        lock = self._prepare_locks.setdefault(template, asyncio.Lock())
        async with lock:
            image = await self.image(template)
            current = self._current(image)
            sid = (
                f"{template}-" + hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
            )
            snap = self._snaps.get(sid)
            if snap is None:
                snap = self._load(sid, image, current)
            if snap is None:
                snap = await self._take_snapshot(sid, template, image, current)
                await self._drop_stale(template, keep=sid)
            self._snaps[sid] = snap
            self._set_pool(snap, self.pool_size)
            return snap.snapshot

    async def _drop_stale(self, template: str, keep: str) -> None:
        """Older snapshots of a template (another image, QEMU or RAM size) that
        nothing here uses: each holds a RAM file on /dev/shm."""
        for entry in list(self.snap_root.iterdir()):
            if entry.name == keep or entry.name in self._snaps or not entry.name.startswith(f"{template}-"):
                continue
            meta = read_json(entry / "meta.json")
            if meta is None or meta.get("template") != template or meta.get("captured"):
                continue
            log.info("vm: removing stale snapshot %s", entry.name)
            await self.delete_snapshot(
                Snapshot(id=entry.name, template=template, backend=self.name, meta=meta)
            )

    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        """A snapshot from disk, unchecked: ``spawn`` refuses it if it does not
        fit this host."""
        s = self._snaps.get(snapshot_id)
        if s is not None:
            return s.snapshot
        d = self.snap_root / snapshot_id
        meta = read_json(d / "meta.json")
        if meta is None:
            raise SpawnError(f"no snapshot {snapshot_id!r} in {self.snap_root}")
        return Snapshot(id=snapshot_id, template=meta["template"], backend=self.name, meta=meta)

    def _load(self, sid: str, image: VmImage, current: dict) -> LoadedSnapshot | None:
        d = self.snap_root / sid
        meta = read_json(d / "meta.json")
        if meta is None:
            return None
        if (
            any(meta.get(k) != current.get(k) for k in SNAPSHOT_KEYS)
            or not Path(meta["memory_path"]).exists()
        ):
            log.warning("snapshot %s on disk does not fit this host any more; taking a new one", sid)
            shutil.rmtree(d, ignore_errors=True)
            return None
        snapshot = Snapshot(id=sid, template=meta["template"], backend=self.name, meta=meta)
        return LoadedSnapshot(snapshot=snapshot, dir=d, image=image, meta=meta)

    async def delete_snapshot(self, snapshot: Snapshot) -> None:
        """Delete a snapshot and its RAM file (its pool first; children restored
        from it keep running: they hold the files open).

        A BRANCH snapshot (``capture``) is refused with SnapshotInUse while a
        live child was restored from it, another snapshot stacks on its disk
        layer, or a live VM's disk does (its source, after the branch); a
        template snapshot while BRANCH snapshots stack on it."""
        meta = read_json(self.snap_root / snapshot.id / "meta.json") or snapshot.meta
        if meta.get("captured"):
            await self._delete_captured(snapshot)
            return
        self._check_not_stacked(snapshot)
        s = self._snaps.pop(snapshot.id, None)
        if s is not None:
            s.pool_target = 0
            if s.filling is not None:
                s.filling.cancel()
            await asyncio.gather(*(self._destroy(vm) for vm in s.pool), return_exceptions=True)
            s.pool.clear()
        meta = read_json(self.snap_root / snapshot.id / "meta.json") or snapshot.meta
        await asyncio.to_thread(shutil.rmtree, self.snap_root / snapshot.id, True)
        if meta.get("memory_path"):
            with contextlib.suppress(FileNotFoundError):
                Path(meta["memory_path"]).unlink()

    def check_snapshot(self, snapshot: Snapshot) -> LoadedSnapshot:
        """The snapshot's record, if this host can restore it; else SnapshotMismatch."""
        s = self._snaps.get(snapshot.id)
        meta = read_json(self.snap_root / snapshot.id / "meta.json")
        if meta is None:
            raise SpawnError(f"snapshot {snapshot.id} is gone from {self.snap_root}")
        image = s.image if s is not None else None
        if image is None:
            raise SpawnError(
                f"snapshot {snapshot.id} is not loaded here (prepare({snapshot.template!r}) first)"
            )
        current = self._current(image)
        diffs = [
            f"{k}: snapshot {meta.get(k)!r}, here {current.get(k)!r}"
            for k in SNAPSHOT_KEYS
            if meta.get(k) != current.get(k)
        ]
        if diffs:
            raise SnapshotMismatch(
                f"snapshot {snapshot.id} cannot be restored on this host ({'; '.join(diffs)}); "
                f"take a new one with prepare({meta.get('template')!r})"
            )
        if not Path(meta["memory_path"]).exists():
            raise SpawnError(f"snapshot {snapshot.id} lost its memory file {meta['memory_path']}")
        return s

    async def attach_snapshot(self, snapshot: Snapshot) -> None:
        """Make a snapshot from disk (``load_snapshot``) spawnable here, after
        checking it fits this host (SnapshotMismatch otherwise)."""
        await self.start()
        if snapshot.id in self._snaps:
            return
        d = self.snap_root / snapshot.id
        meta = read_json(d / "meta.json")
        if meta is None:
            raise SpawnError(f"no snapshot {snapshot.id!r} in {self.snap_root}")
        image = await self.image(meta["template"])
        self._snaps[snapshot.id] = LoadedSnapshot(snapshot=snapshot, dir=d, image=image, meta=meta)
        try:
            self.check_snapshot(snapshot)
        except SpawnError:
            del self._snaps[snapshot.id]
            raise
