"""One QEMU process: its handle, its start (channels, cgroup, QMP) and its cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from forkd._connection import Connection

from .._backend import Limits
from .._cgroups import Cgroup
from .._network import NetHandle
from ._channel import AgentChannel
from ._ksm import mark_mergeable, process_stat
from ._qemu_zygote import ForkedQemu, ZygoteError
from ._qmp import Qmp
from ._vm_limits import with_overhead

__all__ = ["VmProcess", "VmProcesses", "start_time"]

log = logging.getLogger("forkd.runtime.vm")

# A pipe that holds a whole device state (~70 KB) without blocking the writer.
PIPE_SIZE = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_PR_SET_THP_DISABLE = 41


def _qemu_preexec() -> None:
    # Runs in the forked child before exec. An empty network namespace: the VM
    # has no network unless one is plugged in for it. No transparent huge
    # pages: QEMU asks for them on its translation cache, and each 2 MiB page
    # touched would count whole against a child that uses a few KiB of it.
    if _libc.unshare(_CLONE_NEWNET) != 0:
        os._exit(126)
    _libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)


def _qemu_preexec_mergeable() -> None:
    # As above, and the whole process mergeable by the host's ksmd (QEMU's
    # heap and data, not only guest RAM). A kernel that refuses (older than
    # 6.4) still runs the VM, unmarked: _launch notices and says so.
    _qemu_preexec()
    mark_mergeable()


@dataclass(eq=False)
class VmProcess:
    """One QEMU process and what the runtime holds of it."""

    id: str
    run: Path
    proc: subprocess.Popen | ForkedQemu
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
    channel: AgentChannel | None = None
    # QEMU's end of the agent socketpair, as numbered inside QEMU.
    agent_fd: int = -1
    # Its writable disk: the qcow2 file QEMU writes now and the node that
    # holds it, over the read-only layers below it (bottom first). A BRANCH
    # freezes the top into a snapshot's layer and puts a new one over it.
    top_file: Path | None = None
    top_node: str = "upper"
    layers: list[tuple[Path, str]] = field(default_factory=list)
    branches: int = 0
    branch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def pid(self) -> int:
        return self.proc.pid


class VmProcesses:
    """Starting and destroying QEMU processes (mixed into ``VmBackend``: uses its
    ``run_root``, ``empty``, ``qemu_env``, ``_fork_server``, ``cgroups``, ``network``
    and ``_vms``)."""

    async def _launch(
        self,
        vid: str,
        build: Callable[[int, int], list[str]],
        limits: Limits,
        incoming: bool,
        run: Path | None = None,
        extra_fds: tuple[int, ...] = (),
        mergeable: bool = False,
    ) -> VmProcess:
        """Start QEMU with its channels as inherited socketpairs (``build(qmp_fd,
        agent_fd)`` makes the command line); into its cgroup at once; QMP
        negotiated before this returns. ``incoming``: also hand it the read end
        of a pipe to load its device state from (``vm.state_r``). ``mergeable``:
        the whole process is marked for KSM (``PR_SET_MEMORY_MERGE``)."""
        if run is None:
            run = self.run_root / vid
            run.mkdir(mode=0o700)
        q_ours, q_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a_ours, a_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        state_r = state_w = -1
        fds = [q_theirs.fileno(), a_theirs.fileno(), *extra_fds]
        cgroup: Cgroup | None = None
        try:
            # Made first: a QEMU forked by the fork server joins it before its main().
            cgroup = self.cgroups.create(vid, with_overhead(limits))
            if incoming:
                state_r, state_w = os.pipe2(os.O_CLOEXEC)
                # Room for the whole device state: the restore is then one write.
                fcntl.fcntl(state_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                os.set_blocking(state_w, False)
                fds.append(state_r)
            argv = build(q_theirs.fileno(), a_theirs.fileno())
            with open(run / "qemu.log", "wb") as logf:
                proc, pidfd = await self._start_qemu(argv, fds, logf.fileno(), mergeable, cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.kill()  # a QEMU forked into it before the failure
                cgroup.remove()
            for sk in (q_ours, q_theirs, a_ours, a_theirs):
                sk.close()
            for fd in (state_r, state_w):
                if fd >= 0:
                    os.close(fd)
            shutil.rmtree(run, ignore_errors=True)
            raise
        agent_fd = a_theirs.fileno()  # the same number in QEMU (pass_fds)
        q_theirs.close()
        a_theirs.close()
        (run / "pid").write_text(f"{proc.pid} {start_time(proc.pid)}\n")
        if mergeable:
            _check_mergeable(proc.pid)
        loop = asyncio.get_running_loop()
        vm = VmProcess(
            id=vid, run=run, proc=proc, pidfd=pidfd, qmp=Qmp(vid), agent_sock=a_ours, state_w=state_w
        )
        vm.state_r = state_r
        vm.agent_fd = agent_fd
        vm.exited = loop.create_future()
        loop.add_reader(pidfd, self._on_exit, vm)
        self._vms.add(vm)
        vm.cgroup, vm.limits = cgroup, limits
        try:
            cgroup.add(proc.pid)  # started directly: in it now (forked: already in)
            q_ours.setblocking(False)
            await vm.qmp.connect(q_ours)
        except BaseException:
            await self._destroy(vm)
            raise
        return vm

    async def _start_qemu(
        self, argv: list[str], fds: list[int], logfd: int, mergeable: bool, cgroup: Cgroup
    ) -> tuple[subprocess.Popen | ForkedQemu, int]:
        """A QEMU process running ``argv`` with ``fds`` at the same numbers and
        its output to ``logfd``, in an empty network namespace, without
        transparent huge pages: forked by the fork server (inside ``cgroup``
        before its first allocation) when there is one, else started directly
        (the caller then moves it into ``cgroup``). (process, pidfd)."""
        zygote = await self._fork_server()
        if zygote is not None:
            procs = [os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for d in cgroup.dirs]
            try:
                with open(os.devnull, "rb") as null:
                    return await zygote.spawn(
                        argv,
                        {0: null.fileno(), 1: logfd, 2: logfd, **{fd: fd for fd in fds}},
                        self.empty,
                        newnet=True,
                        no_thp=True,
                        mergeable=mergeable,
                        cgroup_procs=procs,
                    )
            except ZygoteError as exc:
                log.warning("QEMU fork server: %s; starting this QEMU directly", exc)
                if exc.server_gone:
                    zygote.close()  # the next QEMU gets a new server
            finally:
                for fd in procs:
                    os.close(fd)
        proc = subprocess.Popen(
            argv,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=logfd,
            stderr=logfd,
            preexec_fn=_qemu_preexec_mergeable if mergeable else _qemu_preexec,
            cwd=self.empty,
            env=self.qemu_env,
        )
        return proc, os.pidfd_open(proc.pid)

    def _on_exit(self, vm: VmProcess) -> None:
        asyncio.get_running_loop().remove_reader(vm.pidfd)
        if vm.exited is not None and not vm.exited.done():
            vm.exited.set_result(vm.proc.poll())

    async def _connect_agent(self, vm: VmProcess, resync: bool = False) -> Connection:
        """The connection to the VM's agent. ``resync``: a child restored from a
        BRANCH (see ``_channel``)."""
        vm.agent_sock.setblocking(False)
        vm.channel = await AgentChannel.from_socket(vm.agent_sock, resync=resync)
        vm.conn = Connection(vm.channel, name=vm.id)
        vm.conn.start()
        return vm.conn

    async def _destroy(self, vm: VmProcess) -> None:
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
        if isinstance(vm.proc, ForkedQemu):
            await vm.proc.wait_status(2.0)  # reaped by the fork server, which tells us
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
            await vm.cgroup.kill_and_remove()
        await asyncio.to_thread(shutil.rmtree, vm.run, True)
        self._vms.discard(vm)


_ksm_warned = False


def _check_mergeable(pid: int) -> None:
    # Kernels before 6.7 drop the mark at execve (and before 6.4 have none).
    global _ksm_warned
    if process_stat(pid).get("merge_any") is False and not _ksm_warned:
        _ksm_warned = True
        log.warning("ksm: QEMU processes are not mergeable on this kernel (needs Linux 6.7+)")


def start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"
