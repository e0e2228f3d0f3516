"""The parent VM: booted from the kernel, warmed up and snapshotted once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from forkd._connection import Connection

from .._backend import Limits, Snapshot, SpawnError
from ._image import UPPER_MB, VmImage
from ._qemu import QemuError, command
from ._snapshot_meta import SHM, LoadedSnapshot, default_layers
from ._vm_process import VmProcess

__all__ = ["ParentBoot", "qemu_img"]

BOOT_TIMEOUT = 300.0  # a cold boot plus warm-up under TCG on a loaded host


class ParentBoot:
    """Mixed into ``VmBackend``: uses its ``machine``, ``snap_root``, ``run_root``
    and ``scope``, and starts QEMU through ``VmProcesses``."""

    async def _take_snapshot(self, sid: str, template: str, image: VmImage, current: dict) -> LoadedSnapshot:
        assert self.machine is not None
        final = self.snap_root / sid
        work = self.snap_root / f".{sid}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        mem = SHM / f"forkd-{self.scope}-{sid}.mem"
        with contextlib.suppress(FileNotFoundError):
            mem.unlink()
        parent_upper = work / "upper.qcow2"
        vm: VmProcess | None = None
        try:
            await qemu_img(
                "create", "-q", "-f", "qcow2", "-b", str(image.upper), "-F", "raw", str(parent_upper)
            )
            self.progress(f"vm: booting the parent of {template} ({self.machine.accel})")
            vm, conn, info, boot_s = await self._boot(image, mem, parent_upper, work / "console.log")
            # Run the identity refresh once here: the lazy initialisations it
            # triggers (RNG devices opened, hash and numpy seeding set up) are
            # then done in every child's memory, and a child only pays for the
            # translation of its own, shorter path.
            await conn.request(
                "identity.refresh",
                {
                    "time": time.time(),
                    "entropy": os.urandom(64),
                    "hostname": "forkd",
                    "sandbox_id": "forkd-parent",
                },
                timeout=120,
            )
            # A login shell for the default user, parked in every child (see forkd_agent._warm_shell).
            await conn.request("vm.shell.park", {}, timeout=120)
            await conn.request("ping", {}, timeout=60)
            t1 = time.monotonic()
            await vm.qmp.set_capability("x-ignore-shared")
            fd = os.open(work / "state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                await vm.qmp.add_fd(fd, "state")
            finally:
                os.close(fd)
            # Not stopped first: the destination starts the guest by itself only
            # when the source was running (a stopped source's state says "paused").
            await vm.qmp.execute("migrate", {"uri": "fd:state"})
            migration = await vm.qmp.wait_migration()
            snapshot_ms = (time.monotonic() - t1) * 1000
            # The guest is stopped now; closing its channel is never seen inside.
            await conn.close("snapshot taken")
            with contextlib.suppress(QemuError):
                await vm.qmp.execute("quit", timeout=5)
            await self._destroy(vm)
            vm = None
            await asyncio.to_thread(_fill_holes, mem)
            # Backed by where the parent's layer will be once renamed into place
            # (-u: not opened now, so the size is given).
            await qemu_img(
                "create", "-q", "-u", "-f", "qcow2", "-b", str(final / "upper.qcow2"), "-F", "qcow2",
                str(work / "child-upper.qcow2"), f"{UPPER_MB}M",
            )  # fmt: skip
            meta = {
                **current,
                "id": sid,
                "template": template,
                "memory_path": str(mem),
                "created_at": time.time(),
                "boot_s": round(boot_s, 3),
                "snapshot_ms": round(snapshot_ms, 2),
                "state_bytes": (work / "state").stat().st_size,
                "migration_total_ms": migration.get("total-time"),
                "warm": info.get("warm"),
                "versions": image.versions(),
                "layers": default_layers(image, final),
            }
            (work / "meta.json").write_text(json.dumps(meta, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
        except BaseException:
            if vm is not None:
                await self._destroy(vm)
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                mem.unlink()
            raise
        self.progress(f"vm: snapshot {sid} taken (boot {boot_s:.1f} s, snapshot {snapshot_ms:.0f} ms)")
        snapshot = Snapshot(id=sid, template=template, backend=self.name, meta=meta)
        return LoadedSnapshot(snapshot=snapshot, dir=final, image=image, meta=meta)

    async def _boot(
        self, image: VmImage, mem: Path, upper: Path, console: Path
    ) -> tuple[VmProcess, Connection, dict, float]:
        """Boot a VM from the kernel until its agent answers (after the warm-up)."""
        assert self.machine is not None
        machine = self.machine
        t0 = time.monotonic()

        def build(qmp_fd: int, agent_fd: int) -> list[str]:
            return command(
                machine,
                image,
                mem_path=mem,
                share=True,
                qmp_fd=qmp_fd,
                agent_fd=agent_fd,
                upper=upper,
                console=console,
                incoming=False,
                chroot=self.empty,
                layers=[(image.upper, "raw")],
            )

        limits = Limits(memory_mb=machine.memory_mb + 512, cpus=float(os.cpu_count() or 1), pids=4096)
        vm = await self._launch(f"boot-{uuid.uuid4().hex[:8]}", build, limits, incoming=False)
        try:
            conn = await self._connect_agent(vm)
            info = await self._boot_wait(vm, conn, console)
        except BaseException:
            await self._destroy(vm)
            raise
        return vm, conn, info, time.monotonic() - t0

    async def cold_boot(self, template: str, n: int = 1) -> list[float]:
        """Boot ``n`` throwaway VMs of ``template`` at once, each to an answering
        agent with its warm-up done (what a fork saves); seconds per boot."""
        await self.start()
        image = await self.image(template)

        async def one() -> float:
            tag = uuid.uuid4().hex[:8]
            mem = SHM / f"forkd-{self.scope}-cold-{tag}.mem"
            work = self.run_root / f"cold-{tag}"
            work.mkdir()
            try:
                upper = work / "upper.qcow2"
                await qemu_img("create", "-q", "-f", "qcow2", "-b", str(image.upper), "-F", "raw", str(upper))
                vm, conn, _info, boot_s = await self._boot(image, mem, upper, work / "console.log")
                await conn.close("cold boot measured")
                await self._destroy(vm)
                return boot_s
            finally:
                with contextlib.suppress(FileNotFoundError):
                    mem.unlink()
                shutil.rmtree(work, ignore_errors=True)

        return list(await asyncio.gather(*(one() for _ in range(n))))

    async def _boot_wait(self, vm: VmProcess, conn: Connection, console: Path) -> dict:
        ping = asyncio.ensure_future(conn.request("info", {}, timeout=BOOT_TIMEOUT))
        try:
            done, _ = await asyncio.wait({ping, vm.exited}, return_when=asyncio.FIRST_COMPLETED)
            if ping in done:
                return ping.result()
            raise SpawnError(f"the parent VM exited during boot (code {vm.proc.poll()})")
        except BaseException as exc:
            ping.cancel()
            tail = ""
            with contextlib.suppress(OSError):
                tail = console.read_text(errors="replace")[-3000:]
            with contextlib.suppress(OSError):
                tail += "\n" + (vm.run / "qemu.log").read_text(errors="replace")[-2000:]
            if isinstance(exc, SpawnError):
                raise SpawnError(f"{exc}\n{tail}") from None
            raise SpawnError(f"the parent VM did not come up: {exc!r}\n{tail}") from None


def _fill_holes(path: Path) -> None:
    """Allocate the RAM file's holes (guest pages the parent never touched).
    A child's write to a hole would otherwise add a zero page to the tmpfs file
    as well as its private copy, charged to the child's cgroup: its fresh
    memory would count twice against its limit."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


async def qemu_img(*args: str) -> None:
    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True)

    res = await asyncio.to_thread(run)
    if res.returncode != 0:
        raise SpawnError(f"qemu-img {args[0]} failed: {res.stderr.strip()}")
