"""The QEMU fork server (vm/_qemu_zygote.*): real QEMU processes forked from a
pre-linked one, what they get, what they share, and what happens when the
server goes away."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from forkd_runtime.vm._qemu_zygote import QemuZygote, ZygoteError, library

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None or shutil.which("cc") is None or os.geteuid() != 0,
    reason="needs QEMU, a C compiler and root (each child gets its own network namespace)",
)
IDLE = [QEMU or "qemu", "-M", "none", "-S", "-display", "none", "-nodefaults", "-no-user-config"]


@pytest.fixture
async def zygote(tmp_path):
    lib = library(tmp_path / "lib")
    assert lib is not None
    (tmp_path / "cwd").mkdir()
    z = QemuZygote(QEMU, dict(os.environ), lib, tmp_path / "cwd", tmp_path / "zygote.log")
    await z.start()
    yield z
    z.close()


async def _exited(pidfd: int, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        loop.remove_reader(pidfd)


def _private_dirty_of_binary(pid: int) -> int:
    total, ours = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                ours = len(parts) > 5 and parts[5] == os.path.realpath(QEMU)
            elif ours and parts[0] == "Private_Dirty:":
                total += int(parts[1])
    return total


async def test_a_forked_qemu_gets_its_argv_fds_namespace_and_directory(zygote, tmp_path):
    log = tmp_path / "child.log"
    ours, theirs = socket.socketpair()
    with open(log, "wb") as logf, open(os.devnull, "rb") as null:
        # QMP on an inherited socket at a number of our choosing (a runtime with
        # hundreds of VMs has fds numbered that high), as the backend does.
        argv = [*IDLE, "-chardev", "socket,id=qmp,fd=700", "-mon", "chardev=qmp,mode=control"]
        proc, pidfd = await zygote.spawn(
            argv,
            {0: null.fileno(), 1: logf.fileno(), 2: logf.fileno(), 700: theirs.fileno()},
            tmp_path / "cwd",
            newnet=True,
            no_thp=True,
            mergeable=False,
        )
    theirs.close()
    try:
        ours.settimeout(10)
        assert b'"QMP"' in ours.recv(4096)  # QEMU's greeting on the fd it was given
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(tmp_path / "cwd")
        assert os.readlink(f"/proc/{proc.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        with open(f"/proc/{proc.pid}/status") as f:
            assert "THP_enabled:\t0" in f.read()
        assert os.readlink(f"/proc/{proc.pid}/fd/700").startswith("socket:")
        assert os.readlink(f"/proc/{proc.pid}/fd/1") == str(log)
        assert open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")[:2] == [QEMU.encode(), b"-M"]
        assert proc.poll() is None
    finally:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        await _exited(pidfd)
        os.close(pidfd)
        ours.close()
    for _ in range(100):  # the status comes from the server
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proc.poll() == -signal.SIGKILL


async def test_a_qemu_that_fails_reports_its_exit_status(zygote, tmp_path):
    with open(tmp_path / "bad.log", "wb") as logf:
        proc, pidfd = await zygote.spawn(
            [QEMU, "-no-such-option"],
            {1: logf.fileno(), 2: logf.fileno()},
            tmp_path,
            newnet=False,
            no_thp=False,
            mergeable=False,
        )
    await _exited(pidfd)
    os.close(pidfd)
    for _ in range(100):
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    assert proc.poll() == 1
    assert b"no-such-option" in (tmp_path / "bad.log").read_bytes()


async def test_forked_qemus_share_what_the_dynamic_linker_wrote(zygote, tmp_path):
    forked, direct, pidfds = [], [], []
    try:
        for _ in range(3):
            proc, pidfd = await zygote.spawn(IDLE, {}, tmp_path, newnet=False, no_thp=True, mergeable=False)
            forked.append(proc.pid)
            pidfds.append(pidfd)
            direct.append(subprocess.Popen(IDLE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        await asyncio.sleep(1.5)  # past start-up
        forked_kib = sum(_private_dirty_of_binary(p) for p in forked) / 3
        direct_kib = sum(_private_dirty_of_binary(p.pid) for p in direct) / 3
        # The relocated data of qemu-system-x86_64 alone is ~2 MiB per exec'd process.
        assert direct_kib > 1024 and forked_kib < direct_kib / 2, (forked_kib, direct_kib)
    finally:
        for fd in pidfds:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        for p in direct:
            p.kill()
            p.wait()


async def test_without_its_server_a_spawn_fails_clearly(zygote, tmp_path):
    zygote.proc.kill()
    zygote.proc.wait()
    with pytest.raises(ZygoteError):
        await zygote.spawn(IDLE, {}, tmp_path, newnet=False, no_thp=False, mergeable=False)
    assert zygote.closed


async def test_the_server_ends_with_its_runtime_socket(tmp_path):
    lib = library(tmp_path / "lib")
    z = QemuZygote(QEMU, dict(os.environ), lib, tmp_path, tmp_path / "zygote.log")
    await z.start()
    proc = z.proc
    asyncio.get_running_loop().remove_reader(z._sock.fileno())
    z._sock.close()  # as when the runtime dies
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert proc.poll() == 0


async def test_a_request_it_cannot_serve_leaves_the_server_running(zygote, tmp_path):
    with pytest.raises(ZygoteError) as err:
        await zygote.spawn(
            IDLE, {i: 0 for i in range(17)}, tmp_path, newnet=False, no_thp=False, mergeable=False
        )
    assert not err.value.server_gone and not zygote.closed
    proc, pidfd = await zygote.spawn(IDLE, {}, tmp_path, newnet=False, no_thp=False, mergeable=False)
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    await _exited(pidfd)
    os.close(pidfd)


async def test_a_retired_server_ends_with_its_last_child(zygote, tmp_path):
    proc, pidfd = await zygote.spawn(IDLE, {}, tmp_path, newnet=False, no_thp=False, mergeable=False)
    zygote.retire()
    assert not zygote.closed and zygote.proc.poll() is None  # it still reports for its child
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    os.close(pidfd)
    assert await proc.wait_status(10) == -signal.SIGKILL
    for _ in range(100):
        if zygote.closed:
            break
        await asyncio.sleep(0.05)
    assert zygote.closed and zygote.proc.wait(5) is not None


async def test_a_forked_qemu_is_in_its_cgroup_before_its_main(zygote, tmp_path):
    from forkd_runtime._backend import Limits
    from forkd_runtime._cgroups import detect

    cgroups = detect(f"zygote-test-{os.getpid()}")
    cg = cgroups.create("vm-1", Limits(memory_mb=256))
    procs = [os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC) for d in cg.dirs]
    pidfd = -1
    try:
        proc, pidfd = await zygote.spawn(
            IDLE, {}, tmp_path, newnet=False, no_thp=False, mergeable=False, cgroup_procs=procs
        )
        # It joins right after the fork (the answer may come first), before QEMU's main().
        for _ in range(100):
            if proc.pid in cg.pids():
                break
            await asyncio.sleep(0.02)
        assert proc.pid in cg.pids()
        await asyncio.sleep(1.0)
        # Charged to it: QEMU's whole initialisation happened inside.
        usage = cg.dirs[0] / ("memory.usage_in_bytes" if cgroups.version == 1 else "memory.current")
        assert int(usage.read_text()) >= 2 << 20
    finally:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await _exited(pidfd)
            os.close(pidfd)
        for fd in procs:
            os.close(fd)
        cg.kill()
        for _ in range(50):
            if cg.remove():
                break
            await asyncio.sleep(0.1)
        cgroups.remove_scope()
