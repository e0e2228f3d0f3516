"""The microVM backend: one warm parent VM per template, snapshotted once; every
child is a QEMU process restored copy-on-write from that snapshot.

Parent: QEMU ``microvm`` boots the template's image with its RAM in a file on
/dev/shm mapped ``share=on``; the guest agent answers on a virtio-serial port,
runs the warm-up, and is put through one identity refresh (so its lazy
initialisations are done once, in the parent). Then a migration with
``x-ignore-shared`` writes only the device state (~70 KB) to a file; the RAM
file itself is the memory image. The parent then quits and never runs again:
children still read the pages they have not copied.

Child: the same command line with ``share=off`` (a private copy-on-write mapping
of the RAM file: pages stay shared with every sibling until written) and
``-incoming defer``. A warm pool keeps such processes started, connected and
waiting, so a spawn is: ``migrate-incoming`` from the state file (QEMU starts the
guest when it is loaded) and, pipelined behind it on the agent channel, an
``identity.refresh`` with fresh clock, entropy, hostname and sandbox id. The
answer to that is the child's first sign of life.

Each VM runs in its own cgroup (limits), its own empty network namespace (no
network; a child that asks for internet access gets its NIC on a tap of the
NetworkManager's bridge instead, see ``_cold_net``), under seccomp
(``-sandbox``), chrooted into an empty directory and as an unprivileged uid
(``-runas``) once started. Its writable disk is a qcow2 overlay of the
parent's, in its run directory. The agent and QMP channels are socketpairs
inherited by QEMU: no socket files, and both are connected before the guest
runs, so the agent's connection carries over from the parent unbroken.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd._connection import Connection
from forkd._transports import StreamTransport

from .._backend import Backend, Child, Limits, Snapshot, SpawnError, SpawnOptions
from .._cgroups import CPU_PERIOD_US, Cgroup, Cgroups, detect
from .._network import NetHandle, NetworkError, NetworkManager
from .._state import state_dir
from .._templates import TemplateStore
from ._image import UPPER_MB, VmImage, build_image
from ._qemu import Machine, QemuError, command, device_digest, qemu_binary
from ._qmp import Qmp

__all__ = ["VmBackend", "SnapshotMismatch", "SNAPSHOT_KEYS"]

log = logging.getLogger("forkd.runtime.vm")

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
# QEMU's own memory (TCG cache, heap, device state) on top of the guest memory a child may dirty.
QEMU_OVERHEAD_MB = 96
BOOT_TIMEOUT = 300.0  # a cold boot plus warm-up under TCG on a loaded host
RESTORE_TIMEOUT = 60.0
# A pipe that holds a whole device state (~70 KB) without blocking the writer.
PIPE_SIZE = 1 << 20
SHM = Path("/dev/shm")

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_PR_SET_THP_DISABLE = 41
# The guest's method that configures eth0 (``forkd_vm_guest.NET_CONFIGURE``;
# that module runs in the guest only, so it is not imported here).
NET_CONFIGURE = "vm.net.configure"
# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


def _qemu_preexec() -> None:
    # Runs in the forked child before exec. An empty network namespace: the VM
    # has no network unless one is plugged in for it. No transparent huge
    # pages: QEMU asks for them on its translation cache, and each 2 MiB page
    # touched would count whole against a child that uses a few KiB of it.
    if _libc.unshare(_CLONE_NEWNET) != 0:
        os._exit(126)
    _libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


class SnapshotMismatch(SpawnError):
    """The snapshot was taken with another QEMU, accelerator, CPU, kernel, image or RAM size."""


@dataclass(eq=False)
class _Vm:
    """One QEMU process and what the runtime holds of it."""

    id: str
    run: Path
    proc: subprocess.Popen
    pidfd: int
    qmp: Qmp
    agent_sock: socket.socket
    # Write end of the pipe QEMU reads its device state from (pool processes).
    state_w: int = -1
    state_r: int = -1
    cgroup: Cgroup | None = None
    limits: Limits | None = None
    conn: Connection | None = None
    killed: bool = False
    # Its tap on the bridge (a child with internet access).
    net: NetHandle | None = None
    exited: asyncio.Future | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(eq=False)
class _Snap:
    snapshot: Snapshot
    dir: Path
    image: VmImage
    meta: dict
    pool: list[_Vm] = field(default_factory=list)
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


class VmBackend(Backend):
    name = "vm"

    def __init__(
        self,
        store: TemplateStore | None = None,
        root: str | os.PathLike | None = None,
        *,
        memory_mb: int = 512,
        pool_size: int = 4,
        accel: str | None = None,
        image_cache: str | os.PathLike | None = None,
        keep_snapshots: bool = True,
        progress: Callable[[str], None] | None = None,
        network: NetworkManager | None = None,
        restore_parallel: int | None = None,
    ) -> None:
        """``root``: this runtime's state directory; ``store``: where templates come
        from. ``memory_mb``: guest RAM of parents (and so of their children).
        ``pool_size``: QEMU processes kept started and waiting per snapshot.
        ``image_cache``: where kernels and initramfs images are cached (default:
        beside the templates). ``keep_snapshots``: leave snapshots (their RAM file
        on /dev/shm) for the next run on close; otherwise delete them.
        ``network``: a NetworkManager for children that ask for internet access
        (default: one of its own, set up on first use, torn down at close)."""
        self.state = state_dir(root)
        self.store = store or TemplateStore(self.state)
        self.image_cache = Path(image_cache) if image_cache else self.store.root / "vm"
        self.vm_dir = self.state / "vm"
        self.snap_root = self.vm_dir / "snapshots"
        self.run_root = self.vm_dir / "run"
        self.empty = self.vm_dir / "empty"
        self.scope = hashlib.sha256(str(self.state.resolve()).encode()).hexdigest()[:12]
        # Its own cgroup scope: a process backend on the same state dir reconciles its own.
        self.cgroups: Cgroups = detect(f"vm-{self.scope}")
        self.memory_mb = memory_mb
        self.pool_size = pool_size
        self._accel = accel
        self.machine: Machine | None = None
        self.keep_snapshots = keep_snapshots
        self.progress = progress or (lambda m: log.info("%s", m))
        # Ours (created on the first internet child, torn down at close) unless given.
        self.network: NetworkManager | None = network
        self._own_network = network is None
        self._net_lock = asyncio.Lock()
        self.default_limits = Limits()
        self._snaps: dict[str, _Snap] = {}
        self._children: dict[str, Child] = {}
        self._vms: set[_Vm] = set()
        self._prepare_locks: dict[str, asyncio.Lock] = {}
        self._lock_fd: int | None = None
        self._started = False
        self._spawning = 0
        self._idle = asyncio.Event()
        # Restores run a few at a time: each is CPU-bound (under TCG, mostly
        # translating the guest code it runs), and more at once than the host
        # has cores only makes every one of them late.
        self._admission = asyncio.Semaphore(restore_parallel or 2 * (os.cpu_count() or 1))
        self._cold_starts = asyncio.Semaphore(max(1, os.cpu_count() or 1))

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Take the state directory and clean up after a previous crashed run."""
        if self._started:
            return
        qemu_binary()
        for d in (self.snap_root, self.run_root, self.empty):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.empty, 0o555)
        fd = os.open(self.state / "vm-backend.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpawnError(f"another forkd VM runtime is using {self.state}") from None
        self._lock_fd = fd
        self.machine = await asyncio.to_thread(Machine.detect, memory_mb=self.memory_mb, accel=self._accel)
        await self.reconcile()
        self._idle.set()
        self._started = True

    async def reconcile(self) -> dict:
        """Remove what a crashed run left: QEMU processes (by cgroup, and by the
        pid recorded in each run directory), run directories, half-made
        snapshots, snapshots whose RAM file is gone (a reboot clears /dev/shm)
        and RAM files no snapshot owns. Only safe while we hold the lock."""
        removed = {"cgroups": 0, "processes": 0, "runs": 0, "snapshots": 0, "memory_files": 0}
        for cg in self.cgroups.existing():
            cg.kill()
            for _ in range(200):
                if cg.remove():
                    removed["cgroups"] += 1
                    break
                await asyncio.sleep(0.01)
        for entry in list(self.run_root.iterdir()):
            if _kill_recorded(entry):
                removed["processes"] += 1
            await asyncio.to_thread(shutil.rmtree, entry, True)
            removed["runs"] += 1
        owned = set()
        for entry in list(self.snap_root.iterdir()):
            meta = _read_json(entry / "meta.json")
            mem = Path(meta["memory_path"]) if meta and "memory_path" in meta else None
            if ".tmp-" in entry.name or meta is None or mem is None or not mem.exists():
                await asyncio.to_thread(shutil.rmtree, entry, True)
                removed["snapshots"] += 1
                if mem is not None and ".tmp-" in entry.name:
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

    async def close(self) -> None:
        for s in self._snaps.values():
            s.pool_target = 0
            if s.filling is not None:
                s.filling.cancel()
                with contextlib.suppress(BaseException):
                    await s.filling
        await asyncio.gather(*(self.kill(c) for c in list(self._children.values())), return_exceptions=True)
        await asyncio.gather(*(self._destroy(vm) for vm in list(self._vms)), return_exceptions=True)
        if self._own_network and self.network is not None:
            await self.network.teardown()
            self.network = None
        if not self.keep_snapshots:
            for s in list(self._snaps.values()):
                await self.delete_snapshot(s.snapshot)
        self._snaps.clear()
        self.cgroups.remove_scope()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._started = False

    # -- snapshots ---------------------------------------------------------------

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
            meta = _read_json(entry / "meta.json")
            if meta is None or meta.get("template") != template:
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
        meta = _read_json(d / "meta.json")
        if meta is None:
            raise SpawnError(f"no snapshot {snapshot_id!r} in {self.snap_root}")
        return Snapshot(id=snapshot_id, template=meta["template"], backend=self.name, meta=meta)

    def _load(self, sid: str, image: VmImage, current: dict) -> _Snap | None:
        d = self.snap_root / sid
        meta = _read_json(d / "meta.json")
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
        return _Snap(snapshot=snapshot, dir=d, image=image, meta=meta)

    async def _take_snapshot(self, sid: str, template: str, image: VmImage, current: dict) -> _Snap:
        assert self.machine is not None
        final = self.snap_root / sid
        work = self.snap_root / f".{sid}.tmp-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        mem = SHM / f"forkd-{self.scope}-{sid}.mem"
        with contextlib.suppress(FileNotFoundError):
            mem.unlink()
        parent_upper = work / "upper.qcow2"
        vm: _Vm | None = None
        try:
            await _qemu_img(
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
            await _qemu_img(
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
        return _Snap(snapshot=snapshot, dir=final, image=image, meta=meta)

    async def _boot(
        self, image: VmImage, mem: Path, upper: Path, console: Path
    ) -> tuple[_Vm, Connection, dict, float]:
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
                await _qemu_img(
                    "create", "-q", "-f", "qcow2", "-b", str(image.upper), "-F", "raw", str(upper)
                )
                vm, conn, _info, boot_s = await self._boot(image, mem, upper, work / "console.log")
                await conn.close("cold boot measured")
                await self._destroy(vm)
                return boot_s
            finally:
                with contextlib.suppress(FileNotFoundError):
                    mem.unlink()
                shutil.rmtree(work, ignore_errors=True)

        return list(await asyncio.gather(*(one() for _ in range(n))))

    async def _boot_wait(self, vm: _Vm, conn: Connection, console: Path) -> dict:
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

    async def delete_snapshot(self, snapshot: Snapshot) -> None:
        """Delete a snapshot and its RAM file (its pool first; children restored
        from it must be gone: they map the RAM file)."""
        s = self._snaps.pop(snapshot.id, None)
        if s is not None:
            s.pool_target = 0
            if s.filling is not None:
                s.filling.cancel()
            await asyncio.gather(*(self._destroy(vm) for vm in s.pool), return_exceptions=True)
            s.pool.clear()
        meta = _read_json(self.snap_root / snapshot.id / "meta.json") or snapshot.meta
        await asyncio.to_thread(shutil.rmtree, self.snap_root / snapshot.id, True)
        if meta.get("memory_path"):
            with contextlib.suppress(FileNotFoundError):
                Path(meta["memory_path"]).unlink()

    def check_snapshot(self, snapshot: Snapshot) -> _Snap:
        """The snapshot's record, if this host can restore it; else SnapshotMismatch."""
        s = self._snaps.get(snapshot.id)
        meta = _read_json(self.snap_root / snapshot.id / "meta.json")
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
        meta = _read_json(d / "meta.json")
        if meta is None:
            raise SpawnError(f"no snapshot {snapshot.id!r} in {self.snap_root}")
        image = await self.image(meta["template"])
        self._snaps[snapshot.id] = _Snap(snapshot=snapshot, dir=d, image=image, meta=meta)
        try:
            self.check_snapshot(snapshot)
        except SpawnError:
            del self._snaps[snapshot.id]
            raise

    # -- QEMU processes ------------------------------------------------------------

    async def _launch(
        self,
        vid: str,
        build: Callable[[int, int], list[str]],
        limits: Limits,
        incoming: bool,
        run: Path | None = None,
        extra_fds: tuple[int, ...] = (),
    ) -> _Vm:
        """Start QEMU with its channels as inherited socketpairs (``build(qmp_fd,
        agent_fd)`` makes the command line); into its cgroup at once; QMP
        negotiated before this returns. ``incoming``: also hand it the read end
        of a pipe to load its device state from (``vm.state_r``)."""
        if run is None:
            run = self.run_root / vid
            run.mkdir(mode=0o700)
        q_ours, q_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a_ours, a_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        state_r = state_w = -1
        fds = [q_theirs.fileno(), a_theirs.fileno(), *extra_fds]
        try:
            if incoming:
                state_r, state_w = os.pipe2(os.O_CLOEXEC)
                # Room for the whole device state: the restore is then one write.
                fcntl.fcntl(state_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                os.set_blocking(state_w, False)
                fds.append(state_r)
            with open(run / "qemu.log", "wb") as logf:
                proc = subprocess.Popen(
                    build(q_theirs.fileno(), a_theirs.fileno()),
                    pass_fds=fds,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    preexec_fn=_qemu_preexec,
                    cwd=self.empty,
                )
        except BaseException:
            for sk in (q_ours, q_theirs, a_ours, a_theirs):
                sk.close()
            for fd in (state_r, state_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(run, ignore_errors=True)
            raise
        q_theirs.close()
        a_theirs.close()
        (run / "pid").write_text(f"{proc.pid} {_start_time(proc.pid)}\n")
        pidfd = os.pidfd_open(proc.pid)
        loop = asyncio.get_running_loop()
        vm = _Vm(id=vid, run=run, proc=proc, pidfd=pidfd, qmp=Qmp(vid), agent_sock=a_ours, state_w=state_w)
        vm.state_r = state_r
        vm.exited = loop.create_future()
        loop.add_reader(pidfd, self._on_exit, vm)
        self._vms.add(vm)
        try:
            vm.cgroup = self.cgroups.create(vid, _with_overhead(limits))
            vm.limits = limits
            vm.cgroup.add(proc.pid)
            q_ours.setblocking(False)
            await vm.qmp.connect(q_ours)
        except BaseException:
            await self._destroy(vm)
            raise
        return vm

    def _on_exit(self, vm: _Vm) -> None:
        asyncio.get_running_loop().remove_reader(vm.pidfd)
        if vm.exited is not None and not vm.exited.done():
            vm.exited.set_result(vm.proc.poll())

    async def _connect_agent(self, vm: _Vm) -> Connection:
        vm.agent_sock.setblocking(False)
        transport = await StreamTransport.from_socket(vm.agent_sock)
        vm.conn = Connection(transport, name=vm.id)
        vm.conn.start()
        return vm.conn

    async def _destroy(self, vm: _Vm) -> None:
        """Kill a QEMU process and remove everything it held. Idempotent."""
        if vm.killed:
            return
        vm.killed = True
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(vm.pidfd, signal.SIGKILL)
        if vm.conn is not None:
            await vm.conn.close("killed")
        with contextlib.suppress(OSError):
            vm.agent_sock.close()
        await vm.qmp.close()
        if vm.exited is not None:
            try:
                await asyncio.wait_for(asyncio.shield(vm.exited), 10)
            except TimeoutError:
                log.error("QEMU %s (pid %d) did not exit within 10 s of SIGKILL", vm.id, vm.pid)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(vm.pidfd)
        vm.proc.poll()
        if vm.net is not None and self.network is not None:
            # After QEMU is gone: its address is never reused while it could still send.
            try:
                await self.network.detach(vm.net)
            except Exception as exc:
                log.error("vm %s: removing its tap %s failed: %s", vm.id, vm.net.ifname, exc)
            vm.net = None
        with contextlib.suppress(OSError):
            os.close(vm.pidfd)
        for fd in (vm.state_r, vm.state_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        vm.state_r = vm.state_w = -1
        if vm.cgroup is not None:
            for _ in range(200):
                vm.cgroup.kill()
                if vm.cgroup.remove():
                    break
                await asyncio.sleep(0.005)
        await asyncio.to_thread(shutil.rmtree, vm.run, True)
        self._vms.discard(vm)

    # -- pool -------------------------------------------------------------------------

    def _set_pool(self, s: _Snap, target: int) -> None:
        s.pool_target = target
        self._kick(s)

    def _kick(self, s: _Snap) -> None:
        if s.filling is None or s.filling.done():
            s.filling = asyncio.ensure_future(self._fill(s))

    async def warm(self, snapshot: Snapshot, n: int) -> None:
        """Grow the pool of ``snapshot`` to ``n`` waiting processes and wait until
        it is full: for a burst known ahead (or a benchmark). After the next
        spawn the pool is refilled to its usual size only."""
        s = self._snaps[snapshot.id]
        s.pool_target = max(s.pool_target, n)
        self._kick(s)
        while len(s.pool) < n:
            if s.filling is None or s.filling.done():
                if s.filling is not None and s.filling.exception():
                    raise SpawnError(f"pool: {s.filling.exception()}")
                self._kick(s)
            await asyncio.sleep(0.05)

    async def _fill(self, s: _Snap) -> None:
        parallel = max(1, os.cpu_count() or 1)
        failures = 0
        while len(s.pool) + s.launching < s.pool_target:
            # A spawn burst has the CPU first: refilling waits until it is over.
            await self._idle.wait()
            k = min(parallel, s.pool_target - len(s.pool) - s.launching)
            s.launching += k
            try:
                results = await asyncio.gather(*(self._pool_vm(s) for _ in range(k)), return_exceptions=True)
            finally:
                s.launching -= k
            for r in results:
                if isinstance(r, _Vm):
                    if s.pool_target > len(s.pool):
                        s.pool.append(r)
                    else:
                        await self._destroy(r)
                else:
                    failures += 1
                    log.error("vm pool: starting a QEMU for %s failed: %s", s.snapshot.id, r)
            if failures >= 3 * parallel:
                raise SpawnError(f"pool of {s.snapshot.id}: QEMU keeps failing to start")

    async def _pool_vm(self, s: _Snap, tap_fd: int | None = None) -> _Vm:
        """A QEMU waiting in ``-incoming defer`` for this snapshot, channels open
        (its NIC on ``tap_fd`` if given, else on a tap in its own empty namespace)."""
        assert self.machine is not None
        machine = self.machine
        vid = f"sbx-{uuid.uuid4().hex[:16]}"
        run = self.run_root / vid
        # The overlay must exist before QEMU opens it: a copy of the snapshot's
        # empty one (it names the parent's layer as its backing file).
        run.mkdir(mode=0o700)
        try:
            await asyncio.to_thread(shutil.copyfile, s.upper_template, run / "upper.qcow2")
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise

        def build(qmp_fd: int, agent_fd: int) -> list[str]:
            return command(
                machine,
                s.image,
                mem_path=s.memory,
                share=False,
                qmp_fd=qmp_fd,
                agent_fd=agent_fd,
                upper=run / "upper.qcow2",
                console=None,
                incoming=True,
                chroot=self.empty,
                tap_fd=tap_fd,
            )

        extra = () if tap_fd is None else (tap_fd,)
        vm = await self._launch(vid, build, self.default_limits, incoming=True, run=run, extra_fds=extra)
        try:
            await vm.qmp.set_capability("x-ignore-shared")
            # QEMU starts reading the pipe now and waits for the bytes: the
            # restore itself is then a write, no QMP round trip.
            await vm.qmp.execute("migrate-incoming", {"uri": f"fd:{vm.state_r}"})
            os.close(vm.state_r)
            vm.state_r = -1
            await self._connect_agent(vm)
        except BaseException:
            await self._destroy(vm)
            raise
        return vm

    # -- children ------------------------------------------------------------------------

    def children(self) -> list[Child]:
        return list(self._children.values())

    def _network_manager(self) -> NetworkManager:
        # Names of its own (never the process backend's fk<scope>/forkd_<scope>:
        # setting up a manager removes every port of its bridge left by others).
        return NetworkManager(
            bridge=f"fv{self.scope[:7]}",
            table=f"forkd_vm_{self.scope}",
            state_file=self.vm_dir / "network.json",
        )

    async def _network(self) -> NetworkManager:
        """The bridge, NAT and firewall for children with internet access (set
        up on first use; the same rules as the process backend's)."""
        async with self._net_lock:
            if self.network is None:
                net = self._network_manager()
                await net.setup()
                self.network = net
            else:
                await self.network.setup()  # a no-op once set up
            return self.network

    async def spawn(self, snapshot: Snapshot, n: int, options: SpawnOptions | None = None) -> list[Child]:
        options = options or SpawnOptions()
        await self.start()
        if snapshot.id not in self._snaps:
            await self.attach_snapshot(snapshot)
        s = self.check_snapshot(snapshot)
        try:
            net = await self._network() if options.internet else None
        except NetworkError as exc:
            raise SpawnError(f"internet access cannot be set up: {exc}") from exc
        self._spawning += 1
        self._idle.clear()
        try:
            # A pooled QEMU that died while waiting is dropped, not handed out.
            for vm in [vm for vm in s.pool if vm.exited is not None and vm.exited.done()]:
                s.pool.remove(vm)
                await self._destroy(vm)
            # Pooled processes have no way out (their NIC's tap is in their own
            # namespace): a child with internet access gets a QEMU of its own.
            take = min(n, len(s.pool)) if net is None else 0
            vms = [s.pool.pop() for _ in range(take)]
            tasks = [asyncio.ensure_future(self._restore(s, vm, options)) for vm in vms]
            if net is not None:
                tasks += [asyncio.ensure_future(self._cold_net(s, options, net)) for _ in range(n)]
            elif n > take:
                tasks += [asyncio.ensure_future(self._cold(s, options)) for _ in range(n - take)]
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._spawning -= 1
            if self._spawning == 0:
                self._idle.set()
            # A larger pool asked for by warm() served one burst; refill to the usual size.
            s.pool_target = self.pool_size
            self._kick(s)
        children = [c for c in outcomes if isinstance(c, Child)]
        errors = [str(e) for e in outcomes if isinstance(e, BaseException)]
        if errors:
            log.warning("%d of %d VM children failed: %s", len(errors), n, errors[:3])
        if not children and n:
            raise SpawnError(f"no VM child started: {errors[0] if errors else 'unknown error'}")
        return children

    async def _cold(self, s: _Snap, options: SpawnOptions) -> Child:
        """A child without a pooled process: start QEMU now (as many at a time as cores)."""
        async with self._cold_starts:
            vm = await self._pool_vm(s)
        return await self._restore(s, vm, options)

    async def _cold_net(self, s: _Snap, options: SpawnOptions, net: NetworkManager) -> Child:
        """A child with internet access: a tap on the bridge (host namespace,
        owned by root: only the runtime can attach to it), one queue of it
        opened here and inherited by QEMU as ``-netdev tap,fd=N``. QEMU itself
        still runs in its own empty network namespace; the guest configures its
        side after the restore (``_restore``)."""
        handle = await net.attach_tap()
        try:
            fd = _open_tap(handle.ifname)
            try:
                async with self._cold_starts:
                    vm = await self._pool_vm(s, tap_fd=fd)
            finally:
                os.close(fd)  # QEMU holds its own copy
        except BaseException:
            await net.detach(handle)
            raise
        vm.net = handle
        return await self._restore(s, vm, options)

    async def _restore(self, s: _Snap, vm: _Vm, options: SpawnOptions) -> Child:
        assert vm.conn is not None
        child = Child(id=vm.id, snapshot=s.snapshot, pid=vm.pid, conn=vm.conn, options=options, handle=vm)
        self._children[vm.id] = child
        try:
            if options.limits != vm.limits and vm.cgroup is not None:
                _apply_limits(self.cgroups, vm.cgroup, _with_overhead(options.limits))
                vm.limits = options.limits
            vm.conn.add_close_callback(lambda _c: self._on_channel_closed(child))
            async with self._admission:
                # The refresh is queued on the agent channel first: QEMU delivers
                # it as soon as the guest runs, which it does by itself once its
                # state is loaded.
                refresh = asyncio.ensure_future(
                    vm.conn.request(
                        "identity.refresh",
                        {
                            "time": time.time(),
                            "entropy": os.urandom(32),
                            "hostname": vm.id,
                            "sandbox_id": vm.id,
                        },
                        timeout=RESTORE_TIMEOUT,
                    )
                )
                # Pipelined behind it: the guest's eth0 gets this child's MAC,
                # address, route and resolvers (the snapshot's are the parent's).
                netconf = None
                if vm.net is not None:
                    h = vm.net
                    netconf = asyncio.ensure_future(
                        vm.conn.request(
                            NET_CONFIGURE,
                            {
                                "ifname": "eth0",
                                "mac": h.mac,
                                "ip": h.ip,
                                "prefixlen": h.prefixlen,
                                "gateway": h.gateway,
                                "mtu": h.mtu,
                                "dns": list(h.dns),
                            },
                            timeout=RESTORE_TIMEOUT,
                        )
                    )
                try:
                    _write_all(vm.state_w, s.state)
                    os.close(vm.state_w)
                    vm.state_w = -1
                    assert vm.exited is not None
                    await asyncio.wait({refresh, vm.exited}, return_when=asyncio.FIRST_COMPLETED)
                    if not refresh.done():
                        raise SpawnError(f"QEMU exited during the restore: {_log_tail(vm)}")
                    report = refresh.result()
                    if netconf is not None:
                        await netconf
                finally:
                    refresh.cancel()
                    if netconf is not None:
                        netconf.cancel()
            child.ready_at = time.monotonic()
            bad = [k for k in ("clock", "kernel_rng", "hostname") if not report.get(k, {}).get("ok")]
            if bad:
                raise SpawnError(f"identity refresh failed for {', '.join(bad)}: {report}")
        except BaseException as exc:
            await self.kill(child)
            raise SpawnError(f"{vm.id}: did not come up: {exc}") from None
        return child

    def _on_channel_closed(self, child: Child) -> None:
        # The VM died (or was killed): release what it held.
        if not child.handle.killed:
            asyncio.ensure_future(self.kill(child))

    async def kill(self, child: Child) -> None:
        vm: _Vm = child.handle
        self._children.pop(child.id, None)
        await self._destroy(vm)


# -- helpers ------------------------------------------------------------------------------


def _with_overhead(limits: Limits) -> Limits:
    return Limits(
        memory_mb=limits.memory_mb + QEMU_OVERHEAD_MB,
        cpus=limits.cpus,
        pids=limits.pids,
        disk_mb=limits.disk_mb,
    )


def _apply_limits(cgroups: Cgroups, cg: Cgroup, limits: Limits) -> None:
    mem = str(limits.memory_mb * 1024 * 1024)
    quota = f"{int(limits.cpus * CPU_PERIOD_US)}"
    if cgroups.version == 2:
        d = cg.dirs[0]
        (d / "memory.max").write_text(mem)
        (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        (d / "pids.max").write_text(str(limits.pids))
        return
    memd, cpud, pidsd = cg.dirs[0], cg.dirs[1], cg.dirs[2]
    # v1 wants memsw >= memory at every step: order the two writes by direction.
    order = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    try:
        current = int((memd / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError):
        current = 0
    if int(mem) < current:
        order.reverse()
    for name in order:
        with contextlib.suppress(FileNotFoundError):
            (memd / name).write_text(mem)
    (cpud / "cpu.cfs_quota_us").write_text(quota)
    (pidsd / "pids.max").write_text(str(limits.pids))


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


def _open_tap(ifname: str) -> int:
    """A queue of the existing tap ``ifname`` in this (the host's) namespace,
    with the virtio-net header: QEMU opens its own taps that way, and the
    snapshot's negotiated NIC features (offloads) depend on it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _log_tail(vm: _Vm) -> str:
    try:
        return (vm.run / "qemu.log").read_text(errors="replace")[-1500:].strip()
    except OSError:
        return "(no log)"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _kill_recorded(run: Path) -> bool:
    """SIGKILL the QEMU recorded in a run directory if it is still that process."""
    try:
        pid_s, start = (run / "pid").read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    if _start_time(pid) != start:
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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


async def _qemu_img(*args: str) -> None:
    def run() -> subprocess.CompletedProcess:
        return subprocess.run(["qemu-img", *args], capture_output=True, text=True)

    res = await asyncio.to_thread(run)
    if res.returncode != 0:
        raise SpawnError(f"qemu-img {args[0]} failed: {res.stderr.strip()}")
