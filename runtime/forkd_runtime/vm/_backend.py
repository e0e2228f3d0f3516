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

``VmBackend`` (here: lifecycle, spawn, restore, kill) is composed of mixins, one
module each: ``_snapshots`` (known snapshots, checked against this host),
``_parent`` (booting and snapshotting the parent), ``_pool`` (the warm pool),
``_vm_process`` (one QEMU process: start and cleanup), ``_vm_network``
(children with internet access) and ``_reconcile`` (a crashed run's leftovers);
``_snapshot_meta`` holds what a snapshot is and what a restore depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .._backend import Backend, Child, Limits, Snapshot, SpawnError, SpawnOptions
from .._cgroups import Cgroups, detect
from .._network import NetworkError, NetworkManager
from .._state import state_dir, take_state_lock
from .._templates import TemplateStore
from ._branch import Branching
from ._parent import ParentBoot
from ._pool import WarmPool
from ._qemu import Machine, qemu_binary
from ._qemu_libs import qemu_env
from ._qemu_zygote import QemuZygote, ZygoteError
from ._qemu_zygote import library as zygote_library
from ._reconcile import Reconcile
from ._snapshot_meta import SNAPSHOT_KEYS, LoadedSnapshot, SnapshotMismatch
from ._snapshots import SnapshotCatalog
from ._vm_limits import apply_limits, with_overhead
from ._vm_network import NET_CONFIGURE, ChildNetwork
from ._vm_process import VmProcess, VmProcesses

__all__ = ["VmBackend", "SnapshotMismatch", "SNAPSHOT_KEYS"]

log = logging.getLogger("forkd.runtime.vm")

RESTORE_TIMEOUT = 60.0


class VmBackend(
    SnapshotCatalog, ParentBoot, WarmPool, VmProcesses, ChildNetwork, Reconcile, Branching, Backend
):
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
        branch_pool_size: int = 0,
        ksm: bool | None = None,
    ) -> None:
        """``root``: this runtime's state directory; ``store``: where templates come
        from. ``memory_mb``: guest RAM of parents (and so of their children).
        ``pool_size``: QEMU processes kept started and waiting per snapshot.
        ``image_cache``: where kernels and initramfs images are cached (default:
        beside the templates). ``keep_snapshots``: leave snapshots (their RAM file
        on /dev/shm) for the next run on close; otherwise delete them.
        ``network``: a NetworkManager for children that ask for internet access
        (default: one of its own, set up on first use, torn down at close).
        ``branch_pool_size``: QEMU processes kept waiting per BRANCH snapshot
        (``capture``); none by default: a branch's children are usually all
        asked for at once, right after it. ``ksm``: mark every child's QEMU
        mergeable by the host's KSM (whole process, ``PR_SET_MEMORY_MERGE``);
        off (default) also keeps guest RAM unmergeable; None: ``FORKD_VM_KSM``
        (1/0). The host's ksmd is never started or tuned here (see docs/vm.md)."""
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
        self.branch_pool_size = branch_pool_size
        self.ksm = _env_flag("FORKD_VM_KSM") if ksm is None else ksm
        # Directories of failed captures' layers that a source still reads.
        self._loose_layers: set[Path] = set()
        self._accel = accel
        self.machine: Machine | None = None
        self.qemu_env: dict[str, str] | None = None  # at start(): see _qemu_libs
        # The QEMU fork server (see _qemu_zygote), started on first use; retired
        # ones live on until their last child is reaped.
        self.qemu_zygote: QemuZygote | None = None
        self._retired_zygotes: list[QemuZygote] = []
        self._zygote_wanted = True
        self._zygote_lock = asyncio.Lock()
        self.keep_snapshots = keep_snapshots
        self.progress = progress or (lambda m: log.info("%s", m))
        # Ours (created on the first internet child, torn down at close) unless given.
        self.network: NetworkManager | None = network
        self._own_network = network is None
        self._net_lock = asyncio.Lock()
        self.default_limits = Limits()
        self._snaps: dict[str, LoadedSnapshot] = {}
        self._children: dict[str, Child] = {}
        self._vms: set[VmProcess] = set()
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
        fd = take_state_lock(self.state / "vm-backend.lock")
        if fd is None:
            raise SpawnError(f"another forkd VM runtime is using {self.state}")
        self._lock_fd = fd
        self.machine = await asyncio.to_thread(Machine.detect, memory_mb=self.memory_mb, accel=self._accel)
        self.qemu_env = await asyncio.to_thread(qemu_env, qemu_binary(), self.vm_dir / "lib")
        await self.reconcile()
        self._zygote_wanted = _env_flag("FORKD_VM_QEMU_ZYGOTE", True)
        self._idle.set()
        self._started = True

    async def _fork_server(self) -> QemuZygote | None:
        """The QEMU fork server for the next QEMU process: a new one after
        ``FORKS_PER_SERVER`` forks or when the last one died; None (start QEMU
        directly) when it is turned off or cannot be built or started here."""
        z = self.qemu_zygote
        if z is not None and z.can_fork:
            return z
        if not self._zygote_wanted:
            return None
        async with self._zygote_lock:
            z = self.qemu_zygote
            if z is not None and z.can_fork:
                return z
            if z is not None:
                z.retire()
                self._retired_zygotes = [r for r in self._retired_zygotes if not r.closed] + [z]
                self.qemu_zygote = None
            lib = await asyncio.to_thread(zygote_library, self.vm_dir / "lib")
            if lib is None:
                self._zygote_wanted = False
                return None
            assert self.qemu_env is not None
            z = QemuZygote(qemu_binary(), self.qemu_env, lib, self.empty, self.vm_dir / "qemu-zygote.log")
            try:
                await z.start()
            except ZygoteError as exc:
                log.warning("%s: starting QEMU directly from now on", exc)
                self._zygote_wanted = False
                return None
            self.qemu_zygote = z
            return z

    async def close(self) -> None:
        for s in self._snaps.values():
            s.pool_target = 0
            if s.filling is not None:
                s.filling.cancel()
                with contextlib.suppress(BaseException):
                    await s.filling
        await asyncio.gather(*(self.kill(c) for c in list(self._children.values())), return_exceptions=True)
        await asyncio.gather(*(self._destroy(vm) for vm in list(self._vms)), return_exceptions=True)
        for z in [self.qemu_zygote, *self._retired_zygotes]:
            if z is not None:
                z.close()
        self.qemu_zygote, self._retired_zygotes = None, []
        if self._own_network and self.network is not None:
            await self.network.teardown()
            self.network = None
        # BRANCH snapshots never outlive the runtime (their sources are gone).
        await self._drop_captures()
        if not self.keep_snapshots:
            for s in list(self._snaps.values()):
                await self.delete_snapshot(s.snapshot)
        self._snaps.clear()
        self.cgroups.remove_scope()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._started = False

    # -- children ------------------------------------------------------------------------

    def children(self) -> list[Child]:
        return list(self._children.values())

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
            s.pool_target = self.pool_size if s.pool_size is None else s.pool_size
            self._kick(s)
        children = [c for c in outcomes if isinstance(c, Child)]
        errors = [str(e) for e in outcomes if isinstance(e, BaseException)]
        if errors:
            log.warning("%d of %d VM children failed: %s", len(errors), n, errors[:3])
        if not children and n:
            raise SpawnError(f"no VM child started: {errors[0] if errors else 'unknown error'}")
        return children

    async def _cold(self, s: LoadedSnapshot, options: SpawnOptions) -> Child:
        """A child without a pooled process: start QEMU now (as many at a time as cores)."""
        async with self._cold_starts:
            vm = await self._pool_vm(s)
        return await self._restore(s, vm, options)

    async def _restore(self, s: LoadedSnapshot, vm: VmProcess, options: SpawnOptions) -> Child:
        assert vm.conn is not None
        child = Child(id=vm.id, snapshot=s.snapshot, pid=vm.pid, conn=vm.conn, options=options, handle=vm)
        self._children[vm.id] = child
        try:
            if options.limits != vm.limits and vm.cgroup is not None:
                apply_limits(self.cgroups, vm.cgroup, with_overhead(options.limits))
                vm.limits = options.limits
            vm.conn.add_close_callback(lambda _c: self._on_channel_closed(child))
            async with self._admission:
                if s.captured:
                    # Ahead of everything: the guest drops the connection its
                    # source had, and we skip what it still sends of it.
                    assert vm.channel is not None
                    vm.channel.start_reset()
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
            if vm.exited is not None and not vm.exited.done() and vm.conn.closed.is_set():
                # Its channel closed: QEMU is probably on its way out; say why.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(vm.exited), 2.0)
            died = vm.exited is not None and vm.exited.done()
            tail = f" (QEMU exited, status {vm.proc.poll()}: {_log_tail(vm)})" if died else ""
            await self.kill(child)
            raise SpawnError(f"{vm.id}: did not come up: {exc}{tail}") from None
        return child

    def _on_channel_closed(self, child: Child) -> None:
        # The VM died (or was killed): release what it held.
        if not child.handle.killed:
            asyncio.ensure_future(self.kill(child))

    async def kill(self, child: Child) -> None:
        vm: VmProcess = child.handle
        self._children.pop(child.id, None)
        await self._destroy(vm)
        if self._loose_layers:
            await self._collect_loose_layers()


# -- helpers ------------------------------------------------------------------------------


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("0", "no", "off", "false"):
        return False
    if value in ("1", "yes", "on", "true"):
        return True
    raise ValueError(f"{name} must be 1 or 0, not {value!r}")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _log_tail(vm: VmProcess) -> str:
    try:
        return (vm.run / "qemu.log").read_text(errors="replace")[-1500:].strip()
    except OSError:
        return "(no log)"
