"""Per-sandbox resource limits through cgroups, v2 where mounted, else v1.

Every forkd cgroup lives under ``forkd/<scope>``, the scope naming one state
directory, so a runtime finds and removes what its own crashed run left behind
and never touches another runtime's sandboxes on the same host. v1 mounts each controller separately
(memory, cpu, pids, freezer); v2 has one tree with controllers enabled per level.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

from ._backend import Limits

__all__ = ["Cgroups", "Cgroup", "CgroupError", "detect"]

ROOT = Path("/sys/fs/cgroup")
PARENT = "forkd"
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    pass


def _write(path: Path, value: str) -> None:
    # Raw system calls, not a buffered text file: a v1 sandbox is four writes per
    # move and per limit, ~0.2 ms of CPU per child through open()/write().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Cgroup:
    def __init__(self, owner: Cgroups, name: str, dirs: list[Path]) -> None:
        self.owner = owner
        self.name = name
        self.dirs = dirs

    def add(self, pid: int) -> None:
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return sorted(out)

    def kill(self) -> None:
        """SIGKILL everything inside now (cgroup.kill on v2; each task on v1, where
        a task forking meanwhile escapes this pass: ``kill_and_remove`` repeats it)."""
        if self.owner.version == 2:
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the cgroup once empty; False if something is still inside."""
        ok = True
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok

    async def freeze(self, timeout: float = 5.0) -> None:
        """Stop every task inside (cgroup v2 cgroup.freeze, v1 freezer) and wait until it is done."""
        await self._set_frozen(True, timeout)

    async def thaw(self, timeout: float = 5.0) -> None:
        await self._set_frozen(False, timeout)

    async def _set_frozen(self, frozen: bool, timeout: float) -> None:
        if self.owner.version == 2:
            control, value = self.dirs[0] / "cgroup.freeze", "1" if frozen else "0"

            def done() -> bool:
                return f"frozen {value}" in (self.dirs[0] / "cgroup.events").read_text()
        else:
            freezer = next((d for d in self.dirs if (d / "freezer.state").exists()), None)
            if freezer is None:
                raise CgroupError(
                    f"cgroup {self.name} has no freezer (is the v1 freezer controller mounted?)"
                )
            control, value = freezer / "freezer.state", "FROZEN" if frozen else "THAWED"

            def done() -> bool:
                return (freezer / "freezer.state").read_text().strip() == value

        _write(control, value)
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name} did not become {value} within {timeout} s")
            await asyncio.sleep(0.0005)

    async def kill_and_remove(self, timeout: float = 1.0, interval: float = 0.002) -> bool:
        """Kill what is inside and remove the cgroup, retrying while the kernel is
        still tearing its tasks down. False if it is still there after ``timeout``.
        In a thread: a v1 rmdir costs ~0.2 ms per hierarchy and is retried until the
        last task is gone, and the gateway's relays run on the calling loop."""
        return await asyncio.to_thread(self._kill_and_remove, timeout, interval)

    def _kill_and_remove(self, timeout: float, interval: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self.kill()
            if self.remove():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def memory_events(self) -> dict[str, int]:
        """OOM kills etc., for telling a caller that a sandbox died of memory."""
        if self.owner.version == 2:
            try:
                lines = (self.dirs[0] / "memory.events").read_text().split("\n")
                return {k: int(v) for k, v in (ln.split() for ln in lines if ln)}
            except OSError:
                return {}
        mem = self.owner.controller_dir("memory") / PARENT / self.owner.scope / self.name
        try:
            text = (mem / "memory.oom_control").read_text()
            return {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln)}
        except OSError:
            return {}


class Cgroups:
    """The host's cgroup hierarchy, as forkd uses it."""

    V1_CONTROLLERS = ("memory", "cpu", "pids", "freezer")

    def __init__(self, version: int, root: Path = ROOT, scope: str = "default") -> None:
        self.version = version
        self.root = root
        self.scope = scope
        self._prepared = False

    def controller_dir(self, controller: str) -> Path:
        if self.version == 2:
            return self.root
        d = self.root / controller
        if not d.is_dir():
            # Some hosts co-mount cpu,cpuacct.
            for cand in self.root.iterdir():
                if controller in cand.name.split(","):
                    return cand
        return d

    def _parents(self) -> list[Path]:
        if self.version == 2:
            return [self.root / PARENT / self.scope]
        return [self.controller_dir(c) / PARENT / self.scope for c in self.V1_CONTROLLERS]

    def prepare(self) -> None:
        if self._prepared:
            return
        for parent in self._parents():
            parent.mkdir(parents=True, exist_ok=True)
        if self.version == 2:
            enable = " ".join(f"+{c}" for c in ("memory", "cpu", "pids"))
            try:
                _write(self.root / "cgroup.subtree_control", enable)
                _write(self.root / PARENT / "cgroup.subtree_control", enable)
                _write(self.root / PARENT / self.scope / "cgroup.subtree_control", enable)
            except OSError as exc:
                raise CgroupError(f"cannot enable cgroup v2 controllers: {exc}") from None
        self._prepared = True

    def create(self, name: str, limits: Limits) -> Cgroup:
        self.prepare()
        if self.version == 2:
            d = self.root / PARENT / self.scope / name
            d.mkdir()
            _write(d / "memory.max", str(limits.memory_mb * 1024 * 1024))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "cpu.max", f"{int(limits.cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            _write(d / "pids.max", str(limits.pids))
            return Cgroup(self, name, [d])
        dirs = []
        try:
            for c in self.V1_CONTROLLERS:
                d = self.controller_dir(c) / PARENT / self.scope / name
                d.mkdir()
                dirs.append(d)
            mem, cpu, pids = dirs[0], dirs[1], dirs[2]
            _write(mem / "memory.limit_in_bytes", str(limits.memory_mb * 1024 * 1024))
            with contextlib.suppress(OSError):  # absent without swap accounting
                _write(mem / "memory.memsw.limit_in_bytes", str(limits.memory_mb * 1024 * 1024))
            _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(cpu / "cpu.cfs_quota_us", str(int(limits.cpus * CPU_PERIOD_US)))
            _write(pids / "pids.max", str(limits.pids))
        except OSError as exc:
            for d in dirs:
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise CgroupError(f"cannot create cgroup {name}: {exc}") from None
        return Cgroup(self, name, dirs)

    def remove_scope(self) -> bool:
        """Remove this scope's own directories once no sandbox cgroup is left in
        them, so that a closed runtime leaves nothing in the host's hierarchy.
        False if one is still busy; the next ``prepare()`` recreates them."""
        ok = True
        for parent in self._parents():
            try:
                parent.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        self._prepared = False
        return ok

    def existing(self) -> list[Cgroup]:
        """forkd cgroups present now (after a crash: leftovers)."""
        names: set[str] = set()
        for parent in self._parents():
            if parent.is_dir():
                names.update(e.name for e in parent.iterdir() if e.is_dir())
        out = []
        for name in sorted(names):
            dirs = [p / name for p in self._parents() if (p / name).is_dir()]
            out.append(Cgroup(self, name, dirs))
        return out


def detect(scope: str = "default", root: Path = ROOT) -> Cgroups:
    if (root / "cgroup.controllers").exists():
        return Cgroups(2, root, scope)
    if (root / "memory").is_dir() or (root / "pids").is_dir():
        return Cgroups(1, root, scope)
    raise CgroupError(f"no usable cgroup hierarchy at {root}")
