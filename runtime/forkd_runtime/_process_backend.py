"""The process backend: a warm zygote per template forks namespaced children.

Spawning N children is pipelined: the zygote forks them in chunks and sends
back each child's channel; while it forks the next chunk, the runtime puts the
previous ones into their cgroups and pings them. The zygote does only what
needs host privilege; each child builds its own root in parallel (see
forkd_agent._zygote).

Children are tied to the runtime by their channel: if the runtime dies, every
channel closes and every child exits (its agent is PID 1 of its namespace), and
the zygote exits when its control socket closes. What stays behind on disk
(layer directories, empty cgroups) is removed by ``reconcile()`` at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import forkd
import forkd_agent
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport, TransportClosed
from forkd_agent import _linux as L

from ._backend import (
    Backend,
    BranchBusy,
    BranchError,
    Child,
    Limits,
    Snapshot,
    SnapshotInUse,
    SpawnError,
    SpawnOptions,
    refilling,
)
from ._cgroups import Cgroup, Cgroups, detect
from ._layer_copy import copy_files, precopy, sync
from ._native_build import build as native_build
from ._network import NetHandle, NetworkManager
from ._seccomp import filter_file
from ._state import state_dir, take_state_lock
from ._templates import Template, TemplateStore

__all__ = ["ProcessBackend", "UID_BASE"]

log = logging.getLogger("forkd.runtime.process")

LAYER_FD = 4  # where each child keeps its writable layer open (forkd_agent._zygote)


def _unmount(path: Path) -> None:
    """Detach the tmpfs on a zygote's run directory, if there is one."""
    if os.path.ismount(path):
        with contextlib.suppress(OSError):
            L.umount2(str(path), L.MNT_DETACH)


# Sandbox root is this host uid (systemd reserves 524288+ for container ranges).
UID_BASE = 524288
CHUNK = 16
MAX_PACKET = 1 << 20
CGROUP_STOCK = 128  # covers a burst the size of the spawn benchmark
# A spawn's first ping, written to each channel the moment it arrives: it waits in the
# socket until the child is set up, so the child finds it without sleeping.
PING_ID = 1
PING = p.frame(p.encode(p.Request(PING_ID, "ping", {})))
ADMIT_TIMEOUT = 30.0


def _copy_lib(dest_root: Path) -> Path:
    """A private, content-addressed copy of forkd's guest-side code for zygotes:
    editing the source tree never changes what a running zygote imports. The
    native fork path is compiled into it (without, zygotes fork from Python)."""
    files = []
    for pkg in (forkd, forkd_agent):
        base = Path(pkg.__file__).parent
        for f in sorted([*base.rglob("*.py"), *base.rglob("*.c")]):
            files.append((pkg.__name__, f.relative_to(base), f.read_bytes()))
    digest = hashlib.sha256()
    for name, rel, data in files:
        digest.update(f"{name}/{rel}\0".encode() + data)
    digest.update(os.environ.get("FORKD_NATIVE_FORK", "1").encode())
    dest = dest_root / digest.hexdigest()[:16]
    if not dest.is_dir():
        tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
        for name, rel, data in files:
            target = tmp / name / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        core = tmp / "forkd_agent" / "_forkcore.c"
        native_build(core, core.with_suffix(".so"))
        os.rename(tmp, dest)
    return dest


def _remove_made_cgroup(made: asyncio.Future) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().remove()


NoticeHandler = Callable[[dict, list[int]], None]


def _place(moves: list[tuple[Cgroup, int]]) -> dict[int, str]:
    """Move each pid into its cgroup; what failed, by pid."""
    failed = {}
    for cgroup, pid in moves:
        try:
            cgroup.add(pid)
        except OSError as exc:
            failed[pid] = str(exc)
    return failed


class Zygote:
    """The runtime's handle on one zygote process."""

    def __init__(
        self, template: Template, proc: subprocess.Popen, sock: socket.socket, stage: Path, run_dir: Path
    ) -> None:
        self.template = template
        self.run_dir = run_dir
        self.proc = proc
        self.sock = sock
        self.stage = stage
        self.lock = asyncio.Lock()
        self.ids = iter(range(1, 1 << 62))
        self.info: dict = {}
        # The zygote itself (the launcher's child), once it has answered.
        self.pidfd: int | None = None
        self.background = False  # at SCHED_IDLE (see set_background)
        self._waited_for = 0  # fork requests someone waits for, queued or running

    def set_background(self, background: bool) -> None:
        """SCHED_IDLE (runs only on otherwise idle CPUs) or normal priority at nice 0.

        The zygote waits at SCHED_IDLE and forks a pool's refill that way: its
        children inherit the policy at clone, so their whole start (root, agent,
        warm-up) yields to sandboxes serving requests; ``activate`` lifts a child
        when it is handed out. A fork someone waits for runs at normal priority.
        SCHED_IDLE still gets the CPU whenever nothing else wants it, and a
        little (its weight is 3 to a nice-0 task's 1024) when something always does."""
        if self.pidfd is None or background == self.background:
            return
        pid = self.info["pid"]
        policy = os.SCHED_IDLE if background else os.SCHED_OTHER
        try:
            os.sched_setscheduler(pid, policy, os.sched_param(0))
            if not background:
                os.setpriority(os.PRIO_PROCESS, pid, 0)
        except OSError as exc:  # no CAP_SYS_NICE: the zygote keeps its nice 10 (_zygote_launch)
            log.debug("cannot change the priority of zygote %s: %s", pid, exc)
            return
        self.background = background

    async def request(
        self, method: str, params: dict, timeout: float = 30, on_notice: NoticeHandler | None = None
    ) -> tuple[dict, list[int]]:
        """One request; ``on_notice(params, fds)`` takes the notifications the
        zygote sends before its answer (a fork's children, chunk by chunk)."""
        if method != "fork" or refilling.get():
            async with self.lock:
                return await self._exchange(method, params, timeout, on_notice)
        # Raised before queueing for the lock: a refill's fork holding it then finishes at
        # normal priority too, instead of keeping the waiting caller behind SCHED_IDLE.
        self._waited_for += 1
        self.set_background(False)
        try:
            async with self.lock:
                return await self._exchange(method, params, timeout, on_notice)
        finally:
            self._waited_for -= 1
            if not self._waited_for:
                self.set_background(True)

    async def _exchange(
        self, method: str, params: dict, timeout: float, on_notice: NoticeHandler | None
    ) -> tuple[dict, list[int]]:
        rid = next(self.ids)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, p.encode(p.Request(rid, method, params)))
        while True:
            data, fds = await asyncio.wait_for(self._recv(), timeout)
            if not data:
                raise SpawnError(f"zygote of {self.template.name} exited (code {self.proc.poll()})")
            msg = p.decode(data)
            if isinstance(msg, p.Response) and msg.id == rid:
                if msg.error is not None:
                    for fd in fds:
                        os.close(fd)
                    raise SpawnError(f"zygote: {msg.error.message}")
                return msg.result, fds
            if isinstance(msg, p.Notification) and on_notice is not None:
                on_notice(msg.params, fds)  # owns the fds now
                continue
            for fd in fds:
                os.close(fd)

    async def _recv(self) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_PACKET, 253)
                return data, fds
            except BlockingIOError:
                pass
            ready = loop.create_future()
            loop.add_reader(fd, lambda r=ready: r.done() or r.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(fd)

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            os.close(self.pidfd)
            self.pidfd = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await asyncio.get_running_loop().run_in_executor(None, self.proc.wait)
        with contextlib.suppress(OSError):
            self.stage.rmdir()
        _unmount(self.run_dir)
        await asyncio.to_thread(shutil.rmtree, self.run_dir, True)


@dataclass
class _Handle:
    cgroup: Cgroup | None
    pidfd: int
    net: NetHandle | None = None
    killed: bool = False
    capturing: bool = False
    # The runtime's end of the agent channel until a Connection takes it (-1 after),
    # and what arrived on it after the first ping's answer (handed to that Connection).
    fd: int = -1
    initial: bytes = b""
    exited: bool = False  # the pidfd said so; kill() is under way
    # Set when the child has answered its first ping (spawn waits on it).
    answered: asyncio.Future | None = None


class _LazyChannel:
    """A child's agent channel as a Transport whose asyncio stream is opened on
    first use: a spawn's children answer their first ping without one (see
    ``_ChildProcess``). Owns ``fd``."""

    def __init__(self, fd: int, initial: bytes) -> None:
        self._fd = fd
        self._initial = initial
        self._inner: StreamTransport | None = None
        self._opening: asyncio.Future | None = None
        self._closed = fd < 0

    async def _stream(self) -> StreamTransport:
        if self._inner is None:
            if self._closed:
                raise TransportClosed()
            if self._opening is None:
                self._opening = asyncio.ensure_future(self._open())
            await asyncio.shield(self._opening)
        return self._inner

    async def _open(self) -> None:
        sock = socket.socket(fileno=self._fd)
        self._fd = -1  # the socket object owns it now
        try:
            self._inner = await StreamTransport.from_socket(sock, initial=self._initial)
        except BaseException:
            sock.close()
            raise

    async def send(self, body: bytes) -> None:
        await (await self._stream()).send(body)

    async def recv(self) -> bytes:
        return await (await self._stream()).recv()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._opening is not None:
            with contextlib.suppress(BaseException):
                await self._opening
        if self._inner is not None:
            await self._inner.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _ChildProcess(Child):
    """A process sandbox whose ``conn`` is made on first use.

    A spawn admits its children with raw reads and writes on their channels
    (``ProcessBackend._admit_chunk``): an asyncio stream, a Connection and its
    reader task per child cost more CPU than the rest of the runtime's share of a
    fork, and most pooled children wait a while before anyone talks to them.
    Callers see no difference: the first ``child.conn`` builds and starts the
    Connection (the bytes already read go to it), inside the event loop."""

    _conn: Connection | None = None
    _connect: Callable[[_ChildProcess], Connection] | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = self._connect(self)
        return self._conn

    @conn.setter
    def conn(self, value: Connection | None) -> None:
        self._conn = value

    @property
    def alive(self) -> bool:
        if self._conn is None:
            h: _Handle = self.handle
            return not (h.killed or h.exited)
        return not self._conn.closed.is_set()

    def __repr__(self) -> str:  # the dataclass one would build the connection
        return f"<Child {self.id} pid={self.pid}>"


class ProcessBackend(Backend):
    name = "process"
    # Children share the host's clock and kernel RNG; each gets its own entropy
    # at fork and reseeds its PRNGs when its agent starts.
    refresh_on_handout = False

    def __init__(self, store: TemplateStore | None = None, root: str | os.PathLike | None = None) -> None:
        """``root``: this runtime's state directory; ``store``: where templates
        come from (default: the same directory)."""
        self.state = state_dir(root)
        self.store = store or TemplateStore(self.state)
        self.run_dir = self.state / "run"
        # One cgroup scope per state directory: reconcile() must only ever
        # clean up after this runtime, never another one on the same host.
        scope = hashlib.sha256(str(self.state.resolve()).encode()).hexdigest()[:12]
        self.cgroups: Cgroups = detect(scope)
        self._zygotes: dict[str, Zygote] = {}
        self._snapshots: dict[str, Snapshot] = {}
        self._captured: dict[str, Snapshot] = {}  # made by capture(), by id
        self._children: dict[str, Child] = {}
        self._lock_fd: int | None = None
        self._started = False
        # Cgroups made ahead of time, per limits: creating one costs ~10 system
        # calls, so bursts of spawns take them from here and a background task
        # tops the stock up while the host is idle.
        self._cg_stock: dict[Limits, list[Cgroup]] = {}
        self._cg_refill: asyncio.Task | None = None
        # The stock's cgroupfs work in flight (a thread each): close() waits for it.
        self._cg_making: set[asyncio.Future] = set()
        # Internet access is opt-in per sandbox; the bridge and rules are set up
        # on first use. Names carry the scope so runtimes on one host never collide.
        self._scope = scope
        self.net: NetworkManager | None = None
        self._net_lock = asyncio.Lock()

    # -- lifecycle --
    async def start(self) -> None:
        """Take the state directory and clean up after any previous crashed run."""
        if self._started:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = take_state_lock(self.state / "process-backend.lock")
        if fd is None:
            raise SpawnError(f"another forkd runtime is using {self.state}")
        self._lock_fd = fd
        await self.reconcile()
        self._started = True

    async def reconcile(self) -> dict:
        """Remove what a previous run left: cgroups (and anything still in them),
        child layer directories, zygote stages. Only safe while we hold the lock."""
        removed = {"cgroups": 0, "layers": 0}
        for cg in self.cgroups.existing():
            if await cg.kill_and_remove(timeout=2.0):
                removed["cgroups"] += 1
        for entry in self.run_dir.iterdir():
            if entry.is_dir():
                _unmount(entry)
                await asyncio.to_thread(shutil.rmtree, entry, True)
                removed["layers"] += 1
        if (self.state / "network.json").exists():
            await self._network_manager().teardown()
        stages = self.state / "zygotes"
        if stages.is_dir():
            for entry in stages.iterdir():
                with contextlib.suppress(OSError):
                    entry.rmdir()
        if any(removed.values()):
            log.warning("reconcile removed leftovers of a previous run: %s", removed)
        return removed

    async def close(self) -> None:
        if self._cg_refill is not None:
            self._cg_refill.cancel()
        # A cgroup still being made would outlive the scope's removal below.
        for made in await asyncio.gather(*self._cg_making, return_exceptions=True):
            if isinstance(made, Cgroup):
                made.remove()
        await asyncio.gather(*(self.kill(c) for c in list(self._children.values())), return_exceptions=True)
        for stock in self._cg_stock.values():
            for cg in stock:
                cg.remove()
        self._cg_stock.clear()
        if self.net is not None:
            await self.net.teardown()
            self.net = None
        for z in list(self._zygotes.values()):
            await z.close()
        self._zygotes.clear()
        self.cgroups.remove_scope()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._started = False

    # -- parents --
    async def prepare(self, template: str) -> Snapshot:
        await self.start()
        z = self._zygotes.get(template)
        if z is not None and z.alive():
            return self._snapshots[template]
        tpl = self.store.get(template)
        t0 = time.perf_counter()
        z = await self._launch(tpl)
        self._zygotes[template] = z
        snap = Snapshot(
            id=f"zygote-{template}",
            template=template,
            backend=self.name,
            meta={"digest": tpl.digest, "warm": z.info.get("warm"), "start_s": time.perf_counter() - t0},
        )
        self._snapshots[template] = snap
        self._refill_cgroups(Limits())
        return snap

    async def _launch(self, tpl: Template) -> Zygote:
        lib = _copy_lib(self.state / "lib")
        zname = f"{tpl.name}-{uuid.uuid4().hex[:8]}"
        stage = self.state / "zygotes" / zname
        stage.mkdir(parents=True)
        # The zygote is root of its own user namespace, i.e. UID_BASE on the host:
        # it creates children's layers in a directory that uid owns.
        zrun = self.run_dir / zname
        zrun.mkdir(mode=0o700)
        # In memory: BRANCH writes every captured layer and saved namespace here,
        # and reads them back at each branch child's start.
        L.mount("tmpfs", str(zrun), "tmpfs", 0, f"mode=0700,uid={UID_BASE},gid={UID_BASE}")
        seccomp = filter_file(zrun)
        logs = self.state / "logs"
        logs.mkdir(exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [
            sys.executable, "-m", "forkd_runtime._zygote_launch",
            "--rootfs", str(tpl.rootfs), "--stage", str(stage), "--run-dir", str(zrun),
            "--lib-dir", str(lib), "--uid-base", str(UID_BASE), "--",
            "--zygote", f"fd:{theirs.fileno()}",
            "--seccomp", f"/opt/forkd/run/{seccomp.name}",
            "--warmup", tpl.spec.warmup, "--log-level", "WARNING",
        ]  # fmt: skip
        with open(logs / f"zygote-{tpl.name}.log", "ab") as log_file:
            proc = subprocess.Popen(
                cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        theirs.close()
        ours.setblocking(False)
        z = Zygote(tpl, proc, ours, stage, zrun)
        try:
            z.info, _ = await z.request("ping", {}, timeout=60)
            z.pidfd = os.pidfd_open(z.info["pid"])
            z.set_background(True)
        except (SpawnError, TimeoutError, OSError) as exc:
            await z.close()
            tail = (logs / f"zygote-{tpl.name}.log").read_text(errors="replace")[-2000:]
            raise SpawnError(f"zygote for {tpl.name} did not start: {exc}\n{tail}") from None
        return z

    async def settle(self, template: str, timeout: float = 10.0) -> dict:
        """Wait until the idle-time preparations are done: the zygote's network
        namespaces and the runtime's cgroups made ahead; returns the zygote's status."""
        z = self._zygotes[template]
        deadline = time.monotonic() + timeout
        if self._cg_refill is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._cg_refill), timeout)
        while True:
            status, _ = await z.request("ping", {})
            if status.get("netns_ready", 0) >= status.get("netns_target", 0) or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.1)

    # -- children --
    def children(self) -> list[Child]:
        return list(self._children.values())

    async def spawn(self, snapshot: Snapshot, n: int, options: SpawnOptions | None = None) -> list[Child]:
        options = options or SpawnOptions()
        resolv_conf = b""
        if options.internet:
            net = await self._network()
            resolv_conf = "".join(f"nameserver {d}\n" for d in net.dns).encode()
        z = self._zygotes.get(snapshot.template)
        if z is None or not z.alive():
            snapshot = await self.prepare(snapshot.template)
            z = self._zygotes[snapshot.template]
        children: list[_ChildProcess] = []
        placings: list[asyncio.Future[dict[int, str]]] = []
        finishing: list[asyncio.Future] = []
        errors: list[str] = []
        specs = []
        for _ in range(n):
            cid = f"sbx-{uuid.uuid4().hex[:16]}"
            specs.append(
                {
                    "id": cid,
                    "hostname": cid,
                    "sandbox_id": cid,
                    "entropy": os.urandom(32),
                    "disk_mb": options.limits.disk_mb,
                    "resolv_conf": resolv_conf,
                    "seeds": snapshot.meta.get("seeds", []),
                    "state": snapshot.meta.get("state"),
                }
            )
        # Branch children restore their source's code contexts before they count as ready.
        extra_steps = options.internet or bool(snapshot.meta.get("contexts"))

        def forked(result: dict, fds: list[int]) -> None:
            # Admitted while the zygote forks the next chunk: neither waits for the other.
            errors.extend(f"{e['id']}: {e['error']}" for e in result.get("errors", []))
            kids = list(zip(result.get("children", []), fds, strict=False))
            for fd in fds[len(kids) :]:
                os.close(fd)
            if not kids:
                return
            admitted = [self._admit(snapshot, info["id"], info["pid"], fd, options) for info, fd in kids]
            children.extend(admitted)
            # Limits before a child is handed out (nothing but our agent has run in it yet).
            # One thread for the chunk: moving a task between cgroups can wait ~10 ms for
            # the kernel (an RCU grace period), which must not stall every sandbox's relays.
            moves = [(c.handle.cgroup, c.pid) for c in admitted]
            placings.append(asyncio.ensure_future(asyncio.to_thread(_place, moves)))
            if extra_steps:
                finishing.extend(asyncio.ensure_future(self._finish(c, snapshot)) for c in admitted)

        try:
            _done, fds = await z.request("fork", {"children": specs, "chunk": CHUNK}, on_notice=forked)
            for fd in fds:  # the children came with the notifications
                os.close(fd)
            if children:
                await asyncio.wait([c.handle.answered for c in children], timeout=ADMIT_TIMEOUT)
            unplaced: dict[int, str] = {}
            for placed in await asyncio.gather(*placings, return_exceptions=True):
                if isinstance(placed, BaseException):  # not an OSError: count the whole chunk out
                    raise SpawnError(f"cannot place children in their cgroups: {placed}")
                unplaced.update(placed)
            finished = await asyncio.gather(*finishing, return_exceptions=True)
        except BaseException:
            for f in finishing:
                f.cancel()
            await asyncio.gather(*(self.kill(c) for c in children), return_exceptions=True)
            raise
        failures = {
            c.id: str(e) for c, e in zip(children, finished, strict=False) if isinstance(e, BaseException)
        }
        ready = []
        loop = asyncio.get_running_loop()
        for c in children:
            h: _Handle = c.handle
            why = failures.get(c.id)
            if not h.answered.done():
                why = f"did not answer its first ping within {ADMIT_TIMEOUT:.0f} s"
            elif h.answered.cancelled():
                why = "killed"
            elif h.answered.exception() is not None:
                why = str(h.answered.exception())
            elif c.pid in unplaced:
                why = f"cannot place it in its cgroup: {unplaced[c.pid]}"
            if why or h.killed:
                errors.append(f"{c.id}: did not come up: {why or 'killed'}")
                await self.kill(c)
                continue
            # From now on its exit releases what it holds, connection or not.
            loop.add_reader(h.pidfd, self._on_exit, c)
            ready.append(c)
        self._refill_cgroups(options.limits)
        if errors:
            log.warning("%d of %d children failed: %s", len(errors), n, errors[:3])
        if not ready and n:
            raise SpawnError(f"no child started: {errors[0] if errors else 'unknown error'}")
        return ready

    def _admit(self, snapshot: Snapshot, cid: str, pid: int, fd: int, options: SpawnOptions) -> _ChildProcess:
        """Take a forked child in: its channel, pidfd and cgroup (moved into by the
        caller), and its first ping, written at once and read back by ``_read_answer``.
        No task, stream or Connection: those come with the first ``child.conn``."""
        loop = asyncio.get_running_loop()
        h = _Handle(cgroup=self._take_cgroup(options.limits), pidfd=-1, fd=fd, answered=loop.create_future())
        child = _ChildProcess(id=cid, snapshot=snapshot, pid=pid, conn=None, options=options, handle=h)
        child._connect = self._connect
        self._children[cid] = child
        try:
            h.pidfd = os.pidfd_open(pid)
            os.set_blocking(fd, False)
            os.write(fd, PING)  # 20 bytes into an empty socket buffer: never short
        except OSError:  # died in its set-up (and maybe already reaped)
            h.answered.set_exception(SpawnError("exited during set-up (the zygote's log says why)"))
            return child
        loop.add_reader(fd, self._read_answer, child)
        return child

    def _read_answer(self, child: _ChildProcess) -> None:
        h: _Handle = child.handle
        try:
            data = os.read(h.fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        loop = asyncio.get_running_loop()
        if not data:
            loop.remove_reader(h.fd)
            if not h.answered.done():
                h.answered.set_exception(SpawnError("exited during set-up (the zygote's log says why)"))
            return
        buf = h.initial = h.initial + data
        size = int.from_bytes(buf[:4], "big") if len(buf) >= 4 else -1
        if size < 0 or len(buf) < 4 + size:
            if size > p.MAX_FRAME_SIZE:
                loop.remove_reader(h.fd)
                h.answered.set_exception(SpawnError(f"sent a {size}-byte frame for its first answer"))
            return
        loop.remove_reader(h.fd)
        h.initial = buf[4 + size :]  # whatever follows belongs to the Connection
        try:
            msg = p.decode(buf[4 : 4 + size])
        except p.ProtocolError as exc:
            h.answered.set_exception(SpawnError(f"bad answer to its first ping: {exc.message}"))
            return
        if not isinstance(msg, p.Response) or msg.id != PING_ID or msg.error is not None:
            h.answered.set_exception(SpawnError(f"unexpected answer to its first ping: {msg!r}"))
            return
        child.ready_at = time.monotonic()
        h.answered.set_result(None)

    async def _finish(self, child: _ChildProcess, snapshot: Snapshot) -> None:
        """What a child needs beyond its first ping: internet access (while it sets
        itself up), its source's code contexts (a branch)."""
        h: _Handle = child.handle
        if child.options.internet:
            h.net = await self.net.attach(child.pid, pidfd=h.pidfd)
        await h.answered
        contexts = snapshot.meta.get("contexts")
        if contexts:
            restored = await child.conn.request("branch.restore", {"contexts": contexts}, timeout=300)
            failed = [c for c in restored.get("contexts", []) if c.get("error")]
            if failed:
                log.warning("%s: code contexts not restored: %s", child.id, failed)
            child.ready_at = time.monotonic()

    def _connect(self, child: _ChildProcess) -> Connection:
        """``child.conn``, made on first use: takes the channel and what the
        admission read past its ping's answer."""
        h: _Handle = child.handle
        conn = Connection(_LazyChannel(h.fd, h.initial), name=child.id)
        h.fd, h.initial = -1, b""
        if h.killed:  # its channel is gone already: a closed connection, as after an EOF
            conn.close_reason = "killed"
            conn.closed.set()
            return conn
        conn.start()
        conn.add_close_callback(lambda _c: self._on_channel_closed(child))
        return conn

    def _on_exit(self, child: _ChildProcess) -> None:
        h: _Handle = child.handle
        asyncio.get_running_loop().remove_reader(h.pidfd)
        h.exited = True
        # A child with a connection is released when that connection sees its end
        # (its users learn why from it); one without has nobody else to notice.
        if child._conn is None and not h.killed:
            asyncio.ensure_future(self.kill(child))

    async def capture(self, child: Child) -> Snapshot:
        """BRANCH: a snapshot of a live child; it keeps running (docs/branch-design.md).

        - Files: the child's writable layer is copied while it runs, then brought
          up to date while its cgroup is frozen; the copy becomes a read-only
          layer that the snapshot's children stack over the source's own layers
          (so each step of a chain copies only its own changes).
        - Code contexts: each kernel forks a writer of its namespace (its pause is
          the fork) and stays locked until the files are captured; the
          snapshot's children load the namespaces into new kernels.
        - Not carried: running processes, threads, open sockets and pipes, and
          whatever a namespace holds that cannot be pickled (listed per name).
        """
        h: _Handle = child.handle
        if h.killed or not child.alive or h.cgroup is None:
            raise BranchError(f"{child.id} is not running")
        if h.capturing:
            raise BranchBusy(f"{child.id} is busy: another branch of it is under way")
        z = self._zygotes.get(child.snapshot.template)
        if z is None or not z.alive():
            raise BranchError(f"the zygote of {child.snapshot.template} is gone")
        h.capturing = True
        try:
            return await self._capture(child, h, z)
        finally:
            h.capturing = False

    async def _capture(self, child: Child, h: _Handle, z: Zygote) -> Snapshot:
        seed = f"seed-{uuid.uuid4().hex[:16]}"
        seeds_dir = z.run_dir / "seeds"
        seeds_dir.mkdir(mode=0o755, exist_ok=True)
        tmp = seeds_dir / f"{seed}.tmp"
        state = seeds_dir / f"{seed}.state"
        layer_fd = upper_fd = -1
        try:
            try:
                layer_fd = os.open(f"/proc/{child.pid}/fd/{LAYER_FD}", os.O_PATH | os.O_DIRECTORY)
                upper_fd = os.open("upper", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=layer_fd)
            except OSError as exc:
                raise BranchError(f"{child.id} is not running ({exc.strerror})") from None
            manifest = await asyncio.to_thread(precopy, upper_fd, str(tmp))
            try:
                exported = await child.conn.request("branch.export", {}, timeout=30)
            except p.RpcError as exc:
                busy = exc.code == p.ErrorCode.CONFLICT
                raise (BranchBusy if busy else BranchError)(f"{child.id}: {exc}") from None
            except (ConnectionError, OSError) as exc:
                raise BranchError(f"{child.id} is not running ({exc})") from None
            try:
                t0 = time.monotonic()
                await h.cgroup.freeze()
                try:
                    manifest = await asyncio.to_thread(sync, upper_fd, str(tmp), manifest)
                finally:
                    await h.cgroup.thaw()
                frozen = time.monotonic() - t0
            finally:
                finished = await child.conn.request(
                    "branch.finish", {"token": exported["token"]}, timeout=600
                )
            contexts = await asyncio.to_thread(self._take_contexts, layer_fd, finished, state)
            os.chmod(tmp, 0o755)
            os.rename(tmp, seeds_dir / seed)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(state, ignore_errors=True)
            raise
        finally:
            for fd in (upper_fd, layer_fd):
                if fd >= 0:
                    os.close(fd)
        forked = float(exported.get("fork_s") or 0.0)
        not_inherited = [
            {"what": "running processes", "why": "the process backend carries files and code contexts only"},
        ]
        for c in contexts:
            if c.get("error"):
                not_inherited.append({"what": f"code context {c['id']}", "why": c["error"]})
            for skipped in c.get("skipped") or []:
                not_inherited.append(
                    {
                        "what": f"variable {skipped.get('name')} of context {c['id']}",
                        "why": skipped.get("why"),
                    }
                )
        snap = Snapshot(
            id=seed,
            template=child.snapshot.template,
            backend=self.name,
            parent=child.snapshot,
            meta={
                **child.snapshot.meta,
                "seeds": [seed, *child.snapshot.meta.get("seeds", [])],
                "state": state.name,
                "contexts": [{k: c.get(k) for k in ("id", "cwd", "envs", "count", "file")} for c in contexts],
                "source": child.id,
                "pause_s": forked + frozen,
                "pause_kernels_s": forked,
                "pause_files_s": frozen,
                "captured_bytes": manifest.copied_bytes,
                "inherited": ["files", "code contexts", "environment"],
                "not_inherited": not_inherited,
            },
        )
        self._captured[seed] = snap
        return snap

    @staticmethod
    def _take_contexts(layer_fd: int, finished: dict, state: Path) -> list[dict]:
        """Move the namespaces the source's kernels wrote (in its layer, beside
        its files) into the snapshot's state directory."""
        name = finished.get("dir")
        # The agent named it, and the agent is inside the sandbox: check the name.
        if not isinstance(name, str) or not re.fullmatch(r"branch-[0-9a-f]{16}", name):
            raise BranchError(f"the sandbox reported a bad export directory {name!r}")
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=layer_fd)
        try:
            present = set(copy_files(fd, str(state)))
        finally:
            os.close(fd)
        shutil.rmtree(name, dir_fd=layer_fd, ignore_errors=True)
        contexts = []
        for c in finished.get("contexts") or []:
            if not isinstance(c, dict) or not isinstance(c.get("id"), str):
                continue
            if c.get("file") not in present:
                c["file"] = None
            contexts.append(c)
        return contexts

    async def delete_snapshot(self, snapshot: Snapshot) -> None:
        snap = self._captured.get(snapshot.id)
        if snap is None:
            return
        users = sorted(c.id for c in self._children.values() if snap.id in c.snapshot.meta.get("seeds", ()))
        stacked = sorted(
            s.id for s in self._captured.values() if s is not snap and snap.id in s.meta["seeds"]
        )
        if users or stacked:
            what = [f"sandbox {u}" for u in users] + [f"snapshot {s}" for s in stacked]
            raise SnapshotInUse(f"snapshot {snap.id} is in use by {', '.join(what)}")
        del self._captured[snap.id]
        z = self._zygotes.get(snap.template)
        if z is not None:
            seeds_dir = z.run_dir / "seeds"
            await asyncio.to_thread(shutil.rmtree, seeds_dir / snap.id, True)
            await asyncio.to_thread(shutil.rmtree, seeds_dir / snap.meta["state"], True)

    def activate(self, child: Child) -> None:
        # Pool children start at SCHED_IDLE or nice 10 (Zygote.set_background,
        # _zygote_launch): normal priority from now on, for whatever the
        # sandbox already runs (usually its agent alone).
        h: _Handle = child.handle
        pids = [child.pid]
        if h.cgroup is not None:
            # One hierarchy is enough (every one holds the same tasks): this is a create's hot path.
            with contextlib.suppress(OSError, ValueError):
                pids = [int(x) for x in (h.cgroup.dirs[0] / "cgroup.procs").read_text().split()] or pids
        for pid in pids:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, pid, 0)

    def _network_manager(self) -> NetworkManager:
        return NetworkManager(
            bridge=f"fk{self._scope[:7]}",
            table=f"forkd_{self._scope}",
            state_file=self.state / "network.json",
        )

    async def _network(self) -> NetworkManager:
        async with self._net_lock:
            if self.net is None:
                net = self._network_manager()
                await net.setup()
                self.net = net
            return self.net

    def _take_cgroup(self, limits: Limits) -> Cgroup:
        stock = self._cg_stock.get(limits)
        if stock:
            return stock.pop()
        return self.cgroups.create(f"cg-{uuid.uuid4().hex[:12]}", limits)

    def _refill_cgroups(self, limits: Limits) -> None:
        if self._cg_refill is None or self._cg_refill.done():
            self._cg_refill = asyncio.ensure_future(self._refill_loop(limits))

    async def _refill_loop(self, limits: Limits) -> None:
        stock = self._cg_stock.setdefault(limits, [])
        try:
            while len(stock) < CGROUP_STOCK and self._started:
                # In a thread: ~1 ms of cgroupfs writes (more on a busy host) per cgroup.
                name = f"cg-{uuid.uuid4().hex[:12]}"
                made = asyncio.ensure_future(asyncio.to_thread(self.cgroups.create, name, limits))
                self._cg_making.add(made)
                made.add_done_callback(self._cg_making.discard)
                try:
                    stock.append(await asyncio.shield(made))
                except asyncio.CancelledError:  # close(): the thread still finishes; drop its cgroup
                    made.add_done_callback(_remove_made_cgroup)
                    raise
        except Exception:
            log.exception("cannot stock cgroups")

    def _on_channel_closed(self, child: Child) -> None:
        # The sandbox died (or was killed): release its resources.
        if not child.handle.killed:
            asyncio.ensure_future(self.kill(child))

    async def kill(self, child: Child) -> None:
        h: _Handle = child.handle
        if h.killed:
            return
        h.killed = True
        self._children.pop(child.id, None)
        loop = asyncio.get_running_loop()
        if h.answered is not None and not h.answered.done():
            h.answered.cancel()  # a spawn still admitting it counts it out
        if h.pidfd >= 0:
            loop.remove_reader(h.pidfd)  # the exit watcher (_on_exit)
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(h.pidfd, signal.SIGKILL)
        conn = child._conn if isinstance(child, _ChildProcess) else child.conn
        if conn is not None:
            await conn.close("killed")
        elif h.fd >= 0:  # never connected: the admission's reader may still watch it
            loop.remove_reader(h.fd)
            os.close(h.fd)
            h.fd = -1
        if h.pidfd >= 0:
            await self._wait_exit(h.pidfd)
            os.close(h.pidfd)
            h.pidfd = -1
        if h.net is not None and self.net is not None:
            # After the exit: the kernel is already tearing the namespace down.
            await self.net.detach(h.net)
        if h.cgroup is not None:
            await h.cgroup.kill_and_remove()

    async def _wait_exit(self, pidfd: int, timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            log.error("child did not exit within %.1f s of SIGKILL", timeout)
        finally:
            loop.remove_reader(pidfd)
