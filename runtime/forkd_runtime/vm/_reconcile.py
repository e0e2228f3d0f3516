"""Recovery at start: what a crashed run left behind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path

from ._snapshot_meta import SHM, read_json
from ._vm_process import start_time

__all__ = ["Reconcile"]

log = logging.getLogger("forkd.runtime.vm")


class Reconcile:
    """Mixed into ``VmBackend``: uses its ``cgroups``, ``run_root``, ``snap_root``,
    ``scope`` and its network (``ChildNetwork``)."""

    async def reconcile(self) -> dict:
        """Remove what a crashed run left: QEMU processes (by cgroup, and by the
        pid recorded in each run directory), run directories, half-made
        snapshots, snapshots whose RAM file is gone (a reboot clears /dev/shm)
        and RAM files no snapshot owns. Only safe while we hold the lock."""
        removed = {"cgroups": 0, "processes": 0, "runs": 0, "snapshots": 0, "memory_files": 0}
        for cg in self.cgroups.existing():
            if await cg.kill_and_remove(timeout=2.0):
                removed["cgroups"] += 1
        for entry in list(self.run_root.iterdir()):
            if _kill_recorded(entry):
                removed["processes"] += 1
            await asyncio.to_thread(shutil.rmtree, entry, True)
            removed["runs"] += 1
        owned = set()
        for entry in list(self.snap_root.iterdir()):
            meta = read_json(entry / "meta.json")
            mem = Path(meta["memory_path"]) if meta and "memory_path" in meta else None
            # BRANCH snapshots (and failed captures' layers, which have no
            # meta) die with the run that made them: their sources are gone.
            captured = bool(meta and meta.get("captured"))
            if ".tmp-" in entry.name or meta is None or mem is None or not mem.exists() or captured:
                await asyncio.to_thread(shutil.rmtree, entry, True)
                removed["snapshots"] += 1
                if mem is not None and (".tmp-" in entry.name or captured):
                    with contextlib.suppress(FileNotFoundError):
                        mem.unlink()
                continue
            owned.add(mem)
        for mem in SHM.glob(f"forkd-{self.scope}-*.mem"):
            if mem not in owned:
                with contextlib.suppress(FileNotFoundError):
                    mem.unlink()
                removed["memory_files"] += 1
        if self._own_network and self.network is None and (self.vm_dir / "network.json").exists():
            # A crashed run's bridge, taps and rules (and the sysctls it changed).
            await self._network_manager().teardown()
            removed["network"] = 1
        if any(removed.values()):
            log.warning("vm reconcile removed leftovers of a previous run: %s", removed)
        return removed


def _kill_recorded(run: Path) -> bool:
    """SIGKILL the QEMU recorded in a run directory if it is still that process."""
    try:
        pid_s, start = (run / "pid").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    if start_time(pid) != start:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if str(run).encode() not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False
