"""BRANCH on the microVM backend: snapshot a live child VM, which keeps running.

A child's RAM is a private copy-on-write mapping of its snapshot's RAM file,
and its disk a qcow2 overlay over read-only layers. ``capture`` makes a new
snapshot that looks exactly like one taken of a parent (a RAM file children
map ``share=off``, a device state, a disk layer), from the child as it is:

1. Before any pause: a helper process (``_migration_sink``) creates the new
   RAM file (allocated whole) and reads a pipe; a new empty qcow2 overlay for
   the source is opened inside QEMU (``blockdev-add`` from an fd set: QEMU is
   chrooted), not yet used.
2. A live (precopy) migration into the pipe, with ``pause-before-switchover``:
   QEMU copies the RAM while the guest runs, then stops the vCPU once what is
   left is small.
3. Stopped: the source's agent channel is held and must have delivered every
   byte the host wrote (else the capture starts over with the channel quiet
   first, see ``_migrate``); the disk is switched (``blockdev-snapshot`` puts
   the new overlay on top; the old one, now read-only, becomes a layer under
   both the source and the new snapshot's children); the migration finishes
   (the last dirty pages and the device state); ``cont`` resumes the source.
   That stop-to-resume is the pause (QEMU's own STOP/RESUME event times).
4. The sink has written every page of the guest-RAM block into the RAM file
   and everything else (device sections) into the state file; the old
   overlay is renamed into the snapshot's directory.

The guest's dirty page cache is in its RAM, captured at the same instant as
the disk: children see the files the source saw. Children of the result are
spawned like any snapshot's (pool, ``identity.refresh``); their channel is
resynchronised first (``_channel``, ``vm.branch.reset``). Chains: each BRANCH
adds one qcow2 layer; what a capture copies does not depend on the depth.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import termios
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from forkd import protocol as p
from forkd._transports import TransportClosed

from .._backend import BranchBusy, BranchError, Child, Snapshot, SnapshotInUse
from . import _migration_sink
from ._image import UPPER_MB
from ._parent import qemu_img
from ._qemu import QemuError
from ._snapshot_meta import SHM, LoadedSnapshot, read_json
from ._vm_process import VmProcess

__all__ = ["Branching", "INHERITED", "NOT_INHERITED"]

log = logging.getLogger("forkd.runtime.vm")
_libc = ctypes.CDLL(None, use_errno=True)

INHERITED = ["memory", "processes", "files", "contexts", "environment"]
NOT_INHERITED = [
    {
        "what": "network connections",
        "why": "a child gets its own network (none, or its own address): the source's TCP "
        "connections and its address do not carry over",
    },
    {
        "what": "agent requests in flight",
        "why": "requests and output streams open on the source's agent connection at the "
        "instant of the branch stay with the source; each child starts a new connection "
        "(processes keep running; those started with keep_on_disconnect=false end)",
    },
]
# How long the guest may take to read what the host sent before the pause.
QUIESCE_TIMEOUT = 10.0
# QEMU stops the vCPU once the RAM still to copy fits in this many ms of
# transfer; a guest that dirties memory faster gets more (x4 every
# ESCALATE_S that saw two passes over the dirty pages), up to MAX_DOWNTIME_MS.
DOWNTIME_MS = 2
MAX_DOWNTIME_MS = 2000
ESCALATE_S = 0.25
MIGRATION_TIMEOUT = 300.0
PIPE_SIZE = 1 << 20


@dataclass
class _Capture:
    """One BRANCH under way: what it made so far, for the clean-up."""

    sid: str
    dir: Path
    memory: Path
    new_top: Path
    node: str
    fdset: int | None = None
    node_added: bool = False
    migrating: bool = False
    switched: bool = False
    sink: subprocess.Popen | None = None
    times: dict[str, float] = field(default_factory=dict)
    migration: dict = field(default_factory=dict)


class Branching:
    """Mixed into ``VmBackend``: uses its ``_children``, ``_vms``, ``_snaps``,
    ``snap_root``, ``scope``, ``machine`` and ``branch_pool_size``."""

    async def capture(self, child: Child) -> Snapshot:
        """BRANCH ``child``: a snapshot of it as it is now; it keeps running.

        A second capture of the same child waits for the first. Raises
        BranchError (not running, not ours, or the capture failed: the child
        then still runs, on a disk that may have gained a layer), BranchBusy
        (its agent does not read its channel)."""
        vm = child.handle
        if not isinstance(vm, VmProcess) or self._children.get(child.id) is not child:
            raise BranchError(f"{child.id} is not a sandbox of this VM backend")
        async with vm.branch_lock:
            if vm.killed or not child.alive or (vm.exited is not None and vm.exited.done()):
                raise BranchError(f"{child.id} is not running")
            if not child.ready_at:
                raise BranchError(f"{child.id} has not started yet")
            s = self._snaps.get(child.snapshot.id)
            if s is None:
                raise BranchError(f"{child.id}: its snapshot {child.snapshot.id} is gone")
            return await self._capture(child, vm, s)

    async def _capture(self, child: Child, vm: VmProcess, s: LoadedSnapshot) -> Snapshot:
        t0 = time.monotonic()
        sid = f"{child.snapshot.template}-branch-{uuid.uuid4().hex[:12]}"
        n = vm.branches + 1
        cap = _Capture(
            sid=sid,
            dir=self.snap_root / sid,
            memory=SHM / f"forkd-{self.scope}-{sid}.mem",
            new_top=vm.run / f"upper-{n}.qcow2",
            node=f"upper-{n}",
        )
        cap.dir.mkdir()
        try:
            sink = self._start_sink(cap)  # it allocates the RAM file meanwhile
            try:
                await self._prepare(vm, cap)
            except BaseException:
                os.close(sink[0])
                raise
            try:
                await self._run_migration(child, vm, cap, early_hold=False, sink=sink)
            except _Unsettled:
                # The host was writing to the source at the stop: again, with
                # its channel quiet first.
                log.info("vm %s: its channel was busy at the stop; capturing again", vm.id)
                await self._stop_sink(cap)
                await self._run_migration(child, vm, cap, early_hold=True)
            stats = await asyncio.to_thread(_sink_result, cap.sink)
        except BaseException as exc:
            await self._abandon(vm, cap)
            if isinstance(exc, BranchError):
                raise
            if isinstance(exc, (QemuError, OSError, ValueError, TransportClosed, p.RpcError)):
                if not child.alive:
                    raise BranchError(f"{child.id} is not running") from None
                raise BranchError(f"{child.id}: the capture failed: {exc}") from None
            raise
        finally:
            if cap.sink is not None and cap.sink.poll() is None:
                cap.sink.kill()
                cap.sink.wait()
        self._took_layer(vm, cap, n)
        try:
            await qemu_img(
                "create", "-q", "-u", "-f", "qcow2", "-b", str(cap.dir / "upper.qcow2"), "-F", "qcow2",
                str(cap.dir / "child-upper.qcow2"), f"{UPPER_MB}M",
            )  # fmt: skip
        except BaseException as exc:
            # The source stands on the layer now: it stays, without a snapshot.
            self._keep_loose(cap)
            raise BranchError(f"{child.id}: the capture failed: {exc}") from None
        inherited = {k: v for k, v in s.meta.items() if k not in _NOT_COPIED}
        meta = {
            **inherited,
            "id": sid,
            "captured": True,
            "parent": child.snapshot.id,
            "source": child.id,
            "memory_path": str(cap.memory),
            "created_at": time.time(),
            "layers": [[str(path), fmt] for path, fmt in vm.layers],
            "depth": int(s.meta.get("depth", 0)) + 1,
            "pause_s": round(cap.times["pause_s"], 6),
            "pause_phases_ms": {
                k.removesuffix("_s"): round(v * 1000, 2)
                for k, v in cap.times.items()
                if k.startswith("stop_")
            },
            "migration": cap.migration,
            "capture_s": round(time.monotonic() - t0, 3),
            "live_s": round(cap.times.get("live_s", 0.0), 3),
            "sink": {k: stats.get(k) for k in ("alloc_s", "stream_s", "pages", "zero_pages")},
            "ram_bytes": stats.get("ram_bytes"),
            "stream_bytes": stats.get("stream_bytes"),
            "state_bytes": (cap.dir / "state").stat().st_size,
            "inherited": list(INHERITED),
            "not_inherited": [dict(x) for x in NOT_INHERITED],
        }
        (cap.dir / "meta.json").write_text(json.dumps(meta, indent=2))
        snapshot = Snapshot(
            id=sid, template=child.snapshot.template, backend=self.name, parent=child.snapshot, meta=meta
        )
        loaded = LoadedSnapshot(
            snapshot=snapshot, dir=cap.dir, image=s.image, meta=meta, pool_size=self.branch_pool_size
        )
        self._snaps[sid] = loaded
        if self.branch_pool_size:
            self._set_pool(loaded, self.branch_pool_size)
        return snapshot

    # -- the steps -----------------------------------------------------------------------

    async def _prepare(self, vm: VmProcess, cap: _Capture) -> None:
        """Before the migration, while the sink allocates the RAM file: the
        source's next overlay, opened in QEMU (not used yet), and the
        migration's settings."""
        await qemu_img(
            "create", "-q", "-u", "-f", "qcow2", "-b", str(cap.dir / "upper.qcow2"), "-F", "qcow2",
            str(cap.new_top), f"{UPPER_MB}M",
        )  # fmt: skip
        fds = [
            os.open(cap.new_top, os.O_RDWR | os.O_CLOEXEC),
            os.open(cap.new_top, os.O_RDONLY | os.O_CLOEXEC),
        ]
        try:
            cap.fdset = await vm.qmp.add_fdset(fds)
        finally:
            for fd in fds:
                os.close(fd)
        # Like the command line's writable node (``_qemu.disk_args``), plus no
        # image locking: the runtime is the only writer, and a lock on this
        # file would outlive its writer in the fd set (same open file) and
        # keep children from opening it once it is a layer.
        await vm.qmp.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": cap.node,
                "file": {
                    "driver": "file",
                    "filename": f"/dev/fdset/{cap.fdset}",
                    "locking": "off",
                    "drop-cache": False,
                    "cache": {"no-flush": True},
                },
                "cache": {"no-flush": True},
                "backing": None,
            },
        )
        cap.node_added = True
        await vm.qmp.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "pause-before-switchover", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )
        await vm.qmp.execute(
            "migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": DOWNTIME_MS}
        )

    def _start_sink(self, cap: _Capture) -> tuple[int, asyncio.Future]:
        """The sink process (it creates and allocates the RAM file, then reads
        the stream): the pipe's write end for QEMU, and its "ready"."""
        assert self.machine is not None
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            cap.sink = subprocess.Popen(
                [
                    sys.executable, "-I", "-S", _migration_sink.__file__,
                    "--memory", str(cap.memory), "--size", str(self.machine.ram_kib * 1024),
                    "--state", str(cap.dir / "state"), "--fd", str(r),
                ],
                pass_fds=(r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )  # fmt: skip
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return w, asyncio.ensure_future(asyncio.to_thread(cap.sink.stdout.readline))

    async def _stop_sink(self, cap: _Capture) -> None:
        if cap.sink is not None and cap.sink.poll() is None:
            cap.sink.kill()
            await asyncio.to_thread(cap.sink.wait)
        cap.sink = None
        for f in (cap.memory, cap.dir / "state"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()

    async def _run_migration(
        self,
        child: Child,
        vm: VmProcess,
        cap: _Capture,
        early_hold: bool,
        sink: tuple[int, asyncio.Future] | None = None,
    ) -> None:
        w, ready = sink or self._start_sink(cap)
        try:
            line = await ready
            if b'"ready"' not in line:
                raise BranchError(f"the RAM sink did not start: {line.decode(errors='replace').strip()}")
            await vm.qmp.add_fd(w, "forkd-branch")
        finally:
            os.close(w)
        await self._migrate(child, vm, cap, early_hold)

    async def _migrate(self, child: Child, vm: VmProcess, cap: _Capture, early_hold: bool) -> None:
        """Migrate into the sink, switch the disk while the vCPU is stopped,
        resume. Sets cap.times (``pause_s`` etc.).

        The source's agent channel must carry whole frames only into the
        snapshot. Normally it is held from the stop on (requests wait through
        the pause only): the stop is fine if every byte the host wrote had
        reached the guest by then (nothing left in our buffer nor in QEMU's
        socket), else _Unsettled and the caller retries with ``early_hold``:
        held from the start, until a control ping proves the guest has read
        all (requests then wait through the whole capture)."""
        qmp, channel = vm.qmp, vm.channel
        assert channel is not None
        events = qmp.listen("STOP", "RESUME", "MIGRATION")
        stamps: dict[str, float] = {}
        peer = -1 if early_hold else _peer_socket(vm)
        try:
            if peer < 0:
                channel.hold()
                try:
                    await channel.control("ping", {}, timeout=QUIESCE_TIMEOUT)
                except TimeoutError:
                    raise BranchBusy(
                        f"{child.id}: its agent did not read its channel within {QUIESCE_TIMEOUT:.0f} s"
                    ) from None
            t_live = time.monotonic()
            await qmp.execute("migrate", {"uri": "fd:forkd-branch"})
            cap.migrating = True
            await self._await_status(vm, events, "pre-switchover", stamps, escalate=True)
            cap.times["live_s"] = time.monotonic() - t_live
            if peer >= 0:
                channel.hold()
                if not await _settled(channel, peer):
                    raise _Unsettled
            # Stopped: the disk is switched at the same instant as the RAM.
            await qmp.execute("blockdev-snapshot", {"node": vm.top_node, "overlay": cap.node})
            cap.switched = True
            stamps["switched"] = time.time()
            await qmp.execute("migrate-continue", {"state": "pre-switchover"})
            await self._await_status(vm, events, "completed", stamps)
            cap.migrating = False
            stamps["completed_seen"] = time.time()
            tries = await _resume(vm)
            stamps["cont_done"] = time.time()
            while "RESUME" not in stamps:
                stamps.update(_stamp(await _next_event(vm, events, 30.0)))
            info = await qmp.execute("query-migrate")
            ram = info.get("ram") or {}
            cap.migration = {
                "downtime_ms": info.get("downtime"),
                "total_ms": info.get("total-time"),
                "setup_ms": info.get("setup-time"),
                "dirty_syncs": ram.get("dirty-sync-count"),
                "transferred": ram.get("transferred"),
                "cont_tries": tries,
                "channel_held": "capture" if peer < 0 else "pause",
            }
        finally:
            try:
                if cap.migrating:
                    await _cancel(vm)
                    cap.migrating = False
                await _ensure_running(vm)
            finally:
                channel.release()
                qmp.unlisten(events)
                if peer >= 0:
                    os.close(peer)
        stop = stamps["STOP"]
        cap.times.update(
            pause_s=stamps["RESUME"] - stop,
            stop_to_switchover_s=stamps["pre-switchover"] - stop,
            stop_to_switched_s=stamps["switched"] - stop,
            stop_to_completed_s=stamps["completed"] - stop,
            stop_to_completed_seen_s=stamps["completed_seen"] - stop,
            stop_to_cont_done_s=stamps["cont_done"] - stop,
        )

    async def _await_status(
        self, vm: VmProcess, events, status: str, stamps: dict, escalate: bool = False
    ) -> None:
        """Wait for the migration to reach ``status``; meanwhile, with
        ``escalate``, let QEMU stop the vCPU with more left to copy if the
        guest keeps dirtying memory faster than it can be copied."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATION_TIMEOUT
        limit, syncs = DOWNTIME_MS, 0
        while status not in stamps:
            if loop.time() > deadline:
                raise BranchError(
                    f"{vm.id}: the migration did not reach {status} in {MIGRATION_TIMEOUT:.0f} s"
                )
            try:
                ev = await _next_event(vm, events, ESCALATE_S if escalate else MIGRATION_TIMEOUT)
            except TimeoutError:
                if not escalate or limit >= MAX_DOWNTIME_MS:
                    continue
                # Not converging is passes over the dirty pages that never get
                # below the limit; the first pass over all of RAM is not that.
                ram = (await vm.qmp.execute("query-migrate")).get("ram") or {}
                now = int(ram.get("dirty-sync-count", 0))
                if now >= 3 and now - syncs >= 2:
                    limit = min(MAX_DOWNTIME_MS, limit * 4)
                    await vm.qmp.execute("migrate-set-parameters", {"downtime-limit": limit})
                    log.info("vm %s: BRANCH does not converge; downtime limit %d ms", vm.id, limit)
                syncs = now
                continue
            stamps.update(_stamp(ev))
            mig = (ev.get("data") or {}).get("status")
            if mig in ("failed", "cancelled"):
                info = await vm.qmp.execute("query-migrate")
                raise BranchError(f"{vm.id}: the migration {mig}: {info.get('error-desc', '')}")

    def _took_layer(self, vm: VmProcess, cap: _Capture, n: int) -> None:
        """The source's disk now stacks its new overlay over its old one:
        the old one moves into the snapshot's directory (QEMU keeps its open
        files; the paths matter only to whoever opens them next)."""
        assert vm.top_file is not None
        frozen = cap.dir / "upper.qcow2"
        os.rename(vm.top_file, frozen)
        os.rename(cap.new_top, vm.top_file)
        vm.layers.append((frozen, "qcow2"))
        vm.top_node = cap.node
        vm.branches = n

    async def _abandon(self, vm: VmProcess, cap: _Capture) -> None:
        """Undo a capture that failed. If the disk was switched, the old
        overlay is a layer of the source now: it stays, in the snapshot's
        directory (without meta.json), until nothing uses it."""
        if cap.sink is not None and cap.sink.poll() is None:
            cap.sink.kill()
            await asyncio.to_thread(cap.sink.wait)
        with contextlib.suppress(FileNotFoundError):
            cap.memory.unlink()
        if cap.switched and not vm.killed:
            try:
                self._took_layer(vm, cap, vm.branches + 1)
            except OSError as exc:
                log.error("vm %s: keeping its frozen layer failed: %s", vm.id, exc)
            self._keep_loose(cap)
            return
        if cap.node_added and not vm.killed:
            with contextlib.suppress(QemuError):
                await vm.qmp.execute("blockdev-del", {"node-name": cap.node})
        if cap.fdset is not None and not vm.killed:
            with contextlib.suppress(QemuError):
                await vm.qmp.execute("remove-fd", {"fdset-id": cap.fdset})
        with contextlib.suppress(FileNotFoundError):
            cap.new_top.unlink()
        await asyncio.to_thread(shutil.rmtree, cap.dir, True)

    def _keep_loose(self, cap: _Capture) -> None:
        """A failed capture's frozen layer, which its source stands on: only
        the layer stays, until nothing reads it (``_collect_loose_layers``)."""
        with contextlib.suppress(FileNotFoundError):
            cap.memory.unlink()
        for name in ("state", "child-upper.qcow2", "meta.json"):
            with contextlib.suppress(FileNotFoundError):
                (cap.dir / name).unlink()
        self._loose_layers.add(cap.dir)

    # -- deleting --------------------------------------------------------------------------

    def _layer_users(self, layer: Path, besides: LoadedSnapshot | None = None) -> list[str]:
        """Who still reads ``layer``: live QEMU processes (not ``besides``'s
        pool) and snapshots (other than ``besides``) whose disks stack on it."""
        pool = set(besides.pool) if besides is not None else set()
        users = [
            vm.id
            for vm in self._vms
            if vm not in pool and not vm.killed and any(path == layer for path, _ in vm.layers)
        ]
        users += [
            o.snapshot.id
            for o in self._snaps.values()
            if o is not besides and any(path == layer for path, _ in o.layers)
        ]
        return users

    async def _delete_captured(self, snapshot: Snapshot) -> None:
        s = self._snaps.get(snapshot.id)
        d = self.snap_root / snapshot.id
        standing: list[str] = []
        if s is not None:
            kids = [c.id for c in self._children.values() if c.snapshot.id == snapshot.id]
            if kids:
                raise SnapshotInUse(f"snapshot {snapshot.id} has live sandboxes: {', '.join(sorted(kids))}")
            users = self._layer_users(d / "upper.qcow2", besides=s)
            stacked = [u for u in users if u in self._snaps]
            if stacked:
                raise SnapshotInUse(
                    f"snapshot {snapshot.id} has snapshots stacked on it: {', '.join(sorted(stacked))}"
                )
            # Live VMs standing on its disk layer (its source, the source's later
            # branches) need that file only: the RAM file and the rest go now.
            standing = users
            self._snaps.pop(snapshot.id, None)
            s.pool_target = 0
            if s.filling is not None:
                s.filling.cancel()
            await asyncio.gather(*(self._destroy(vm) for vm in s.pool), return_exceptions=True)
            s.pool.clear()
        meta = read_json(d / "meta.json") or snapshot.meta
        if standing:
            for name in ("state", "child-upper.qcow2", "meta.json"):
                with contextlib.suppress(FileNotFoundError):
                    (d / name).unlink()
            self._loose_layers.add(d)
        else:
            await asyncio.to_thread(shutil.rmtree, d, True)
        if meta.get("memory_path"):
            with contextlib.suppress(FileNotFoundError):
                Path(meta["memory_path"]).unlink()
        if self._loose_layers:
            await self._collect_loose_layers()

    def _check_not_stacked(self, snapshot: Snapshot) -> None:
        """A template snapshot's layer under captured ones is still needed."""
        layer = self.snap_root / snapshot.id / "upper.qcow2"
        stacked = [
            o.snapshot.id
            for o in self._snaps.values()
            if o.captured and any(path == layer for path, _ in o.layers)
        ]
        if stacked:
            raise SnapshotInUse(
                f"snapshot {snapshot.id} has snapshots stacked on it: {', '.join(sorted(stacked))}"
            )

    async def _collect_loose_layers(self) -> None:
        """Layers left by failed captures that nothing reads any more."""
        for d in list(self._loose_layers):
            if not self._layer_users(d / "upper.qcow2"):
                self._loose_layers.discard(d)
                await asyncio.to_thread(shutil.rmtree, d, True)

    async def _drop_captures(self) -> None:
        """At close, every VM gone: remove every file a capture made."""
        for s in [s for s in self._snaps.values() if s.captured]:
            self._snaps.pop(s.snapshot.id, None)
            await asyncio.to_thread(shutil.rmtree, s.dir, True)
            with contextlib.suppress(FileNotFoundError):
                s.memory.unlink()
        for d in list(self._loose_layers):
            await asyncio.to_thread(shutil.rmtree, d, True)
        self._loose_layers.clear()


# -- helpers ----------------------------------------------------------------------------

# Parent-boot facts that do not describe a capture.
_NOT_COPIED = frozenset({"boot_s", "snapshot_ms", "migration_total_ms", "state_bytes", "warm_s"})


def _stamp(ev) -> dict[str, float]:
    """QEMU's own time of an event, keyed by its name (or a migration's status)."""
    t = ev.get("timestamp") or {}
    at = t.get("seconds", 0) + t.get("microseconds", 0) / 1e6
    if ev["event"] == "MIGRATION":
        return {(ev.get("data") or {}).get("status", "?"): at}
    return {ev["event"]: at}


async def _next_event(vm: VmProcess, events, timeout: float):
    """The next event, or QmpError if QEMU exits first; TimeoutError."""
    get = asyncio.ensure_future(events.get())
    try:
        waits = {get} | ({vm.exited} if vm.exited is not None else set())
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not get.done():
            get.cancel()
    if get in done:
        return get.result()
    if vm.exited is not None and vm.exited.done():
        raise QemuError(f"{vm.id}: QEMU exited")
    raise TimeoutError


async def _cancel(vm: VmProcess) -> None:
    """Stop a migration that failed half-way (QEMU resumes a guest it stopped)."""
    with contextlib.suppress(QemuError):
        await vm.qmp.execute("migrate_cancel")
    for _ in range(500):
        try:
            info = await vm.qmp.execute("query-migrate")
        except QemuError:
            return
        if info.get("status") not in ("active", "pre-switchover", "device", "cancelling", "setup"):
            return
        await asyncio.sleep(0.01)


class _Unsettled(Exception):
    """Host-to-guest bytes were still on their way when the vCPU stopped."""


SETTLE_S = 0.05
_PIDFD_GETFD = 438  # the same number on every architecture


def _peer_socket(vm: VmProcess) -> int:
    """A descriptor of QEMU's own end of the agent socketpair (to see what
    it has not read yet), or -1."""
    if vm.agent_fd < 0:
        return -1
    fd = _libc.syscall(_PIDFD_GETFD, vm.pidfd, vm.agent_fd, 0)
    return fd if fd >= 0 else -1


async def _settled(channel, peer: int) -> bool:
    """Every byte written to the channel has been read by QEMU, into the
    guest (QEMU reads only what the guest's buffers take, straight into
    them). Waits a little: QEMU may still be reading while the vCPU is stopped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    while True:
        if channel.unsent == 0 and struct.unpack("i", fcntl.ioctl(peer, termios.FIONREAD, b"\0" * 4))[0] == 0:
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.001)


async def _resume(vm: VmProcess) -> int:
    """``cont`` once QEMU has left the migration's final state (it announces
    "completed" a moment before it does)."""
    for tries in range(1, 2000):
        try:
            await vm.qmp.execute("cont")
            return tries
        except QemuError as exc:
            if "not finalized" not in str(exc):
                raise
        await asyncio.sleep(0.0005)
    raise BranchError(f"{vm.id}: the migration did not finish")


async def _ensure_running(vm: VmProcess) -> None:
    """A source left paused (a failure between stop and resume) is resumed."""
    if vm.killed or (vm.exited is not None and vm.exited.done()):
        return
    try:
        status = await vm.qmp.execute("query-status")
        if not status.get("running"):
            await _resume(vm)
    except QemuError as exc:
        log.error("vm %s: could not resume it after a failed capture: %s", vm.id, exc)


def _sink_result(sink: subprocess.Popen) -> dict:
    out, _ = sink.communicate(timeout=MIGRATION_TIMEOUT)
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        report = {"error": lines[-1]}
    if sink.returncode != 0 or "error" in report:
        raise BranchError(f"the RAM sink failed (exit {sink.returncode}): {report.get('error', out[-500:])}")
    return report
