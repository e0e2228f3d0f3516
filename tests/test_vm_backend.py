"""The microVM backend with real VMs (TCG here, KVM where the host has it).

One parent VM is booted and snapshotted for the whole module (~10 s under TCG);
every test restores its own children from it. The image (kernel, initramfs,
disks) is built once into the template cache and reused across runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import pytest_asyncio

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(vm_store, tmp_path_factory):
    """A started VmBackend with the `base` snapshot taken (snapshots deleted on close)."""
    from forkd_runtime.vm import VmBackend

    backend = VmBackend(
        store=vm_store, root=tmp_path_factory.mktemp("vmstate"), pool_size=2, keep_snapshots=False
    )
    await backend.start()
    backend.snap = await backend.prepare("base")
    yield backend
    await backend.close()


async def run(child, cmd: str, user: str = "root", timeout: float = 60) -> tuple[int, str]:
    conn = child.conn
    s = conn.open_inbound()
    await conn.request("exec.start", {"cmd": cmd, "stream": s.id, "user": user}, timeout=timeout)
    out = b"".join([d async for _, _, d in s])
    return s.end_info["exit_code"], out.decode(errors="replace")


def rollup(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


async def test_fork_inherits_warm_state(vm):
    snap = vm.snap
    assert snap.backend == "vm" and snap.meta["accel"] in ("tcg", "kvm")
    assert snap.meta["warm"]["marker"], "the template's warm-up ran in the parent"
    assert snap.meta["state_bytes"] < 1 << 20, "device state only: RAM is not copied"
    kids = await vm.spawn(snap, 2)
    assert len(kids) == 2
    for k in kids:
        info = await k.conn.request("info", {})
        assert info["pid"] == 1  # the agent is the guest's init
        assert info["warm"] == snap.meta["warm"]  # same warm-up, run once, in the parent
        assert info["sandbox_id"] == k.id and info["hostname"] == k.id
        # numpy was imported by the parent's warm-up; the child never imported it.
        code, out = await run(k, "grep -c _multiarray_umath /proc/1/maps")
        assert code == 0 and int(out) >= 1
        assert k.ready_at > 0
    assert len({k.pid for k in kids}) == 2
    for k in kids:
        await vm.kill(k)


async def test_exec_and_files(vm):
    [k] = await vm.spawn(vm.snap, 1)
    code, out = await run(k, "echo hello; uname -r; id -un", user="user")
    assert code == 0
    lines = out.split()
    assert lines[0] == "hello" and lines[-1] == "user"
    await k.conn.request(
        "files.write", {"path": "/home/user/note.txt", "data": "from the host\n", "user": "user"}
    )
    s = k.conn.open_inbound()
    res = await k.conn.request("files.read", {"path": "/home/user/note.txt", "stream": s.id})
    data = b"".join([d async for _, _, d in s])
    assert res["size"] == 14 and data == b"from the host\n"
    code, out = await run(k, "cat /home/user/note.txt; stat -c %U /home/user/note.txt")
    assert out.split() == ["from", "the", "host", "user"]
    await vm.kill(k)


async def test_copy_on_write_memory(vm):
    a, b = await vm.spawn(vm.snap, 2)
    await asyncio.sleep(0.5)
    before_a, before_b = rollup(a.pid)["Anonymous"], rollup(b.pid)["Anonymous"]
    mem = Path(vm.snap.meta["memory_path"])
    shm_before = mem.stat().st_blocks
    # 50 MiB written by one guest: only that child's QEMU gets private copies.
    code, out = await run(a, "python3 -c \"x = b'\\x01' * (50 << 20); print(len(x))\"")
    assert code == 0 and out.strip() == str(50 << 20)
    await asyncio.sleep(0.2)
    grown_a = rollup(a.pid)["Anonymous"] - before_a
    grown_b = rollup(b.pid)["Anonymous"] - before_b
    assert grown_a >= 45 * 1024, f"the writer copied only {grown_a} KiB"
    assert grown_b < 8 * 1024, f"the sibling grew {grown_b} KiB"
    # The parent's memory file is never written by a child (MAP_PRIVATE).
    assert mem.stat().st_blocks == shm_before
    for k in (a, b):
        await vm.kill(k)


async def test_children_are_isolated(vm):
    a, b = await vm.spawn(vm.snap, 2)
    # Memory (tmpfs in guest RAM) and disk (each child's own writable layer).
    code, _ = await run(a, "echo a > /dev/shm/mem-a && echo a > /root/disk-a && sync")
    assert code == 0
    code, out = await run(b, "ls /dev/shm/mem-a /root/disk-a 2>&1; cat /etc/debian_version")
    assert out.count("No such file") == 2 and out.split()[-1][:2].isdigit()
    code, out = await run(a, "cat /dev/shm/mem-a /root/disk-a")
    assert out.split() == ["a", "a"]
    # Disk files of the two children are distinct on the host too.
    assert (a.handle.run / "upper.qcow2") != (b.handle.run / "upper.qcow2")
    # Network: only loopback is up, nothing is reachable, and each QEMU sits in
    # its own network namespace, not the host's.
    code, out = await run(
        a,
        "python3 - <<'EOF'\n"
        + textwrap.dedent("""
            import socket
            try:
                socket.create_connection(("10.0.2.2", 80), timeout=2)
                print("connected")
            except OSError as e:
                print("unreachable", e.errno)
            """)
        + "EOF\ncat /sys/class/net/eth0/operstate",
    )
    assert "unreachable" in out and "connected" not in out and out.split()[-1] == "down"
    host_ns = os.readlink("/proc/self/ns/net")
    ns = {os.readlink(f"/proc/{k.pid}/ns/net") for k in (a, b)}
    assert len(ns) == 2 and host_ns not in ns
    for k in (a, b):
        await vm.kill(k)


async def test_identity_is_unique_and_clock_correct(vm):
    kids = await vm.spawn(vm.snap, 3)
    probe = (
        'python3 -c "import os, uuid, random, time; '
        'print(os.urandom(16).hex(), uuid.uuid4(), random.getrandbits(64), time.time())"'
    )
    seen = []
    for k in kids:
        code, out = await run(k, probe)
        assert code == 0
        rnd, uid, r, guest_time = out.split()
        # Wall clock set at restore (the snapshot is older than this test).
        assert abs(float(guest_time) - time.time()) < 2.0
        seen.append((rnd, uid, r))
    assert len({s[0] for s in seen}) == 3 and len({s[1] for s in seen}) == 3
    # The agent's own `random` (inherited by its eval kernels) was reseeded per child too.
    fps = set()
    for k in kids:
        rep = await k.conn.request("identity.refresh", {})
        fps.add(rep["random_fingerprint"])
    assert len(fps) == 3
    for k in kids:
        await vm.kill(k)


async def test_first_command_runs_in_the_shell_parked_in_the_parent(vm):
    # The parent parked a login shell for the default user before its snapshot: each child's
    # first such command runs in its copy, with the child's own identity handed over.
    kids = await vm.spawn(vm.snap, 2)
    seen = []
    for k in kids:
        info = await k.conn.request("info")
        s = k.conn.open_inbound()
        await k.conn.request(
            "exec.start",
            {
                "cmd": 'tr "\\0" " " </proc/$$/cmdline; echo; echo $HOSTNAME $FORKD_SANDBOX_ID $RANDOM $(id -un)',
                "stream": s.id,
            },
            timeout=60,
        )
        out = b"".join([d async for _, _, d in s]).decode()
        assert s.end_info["exit_code"] == 0, out
        cmdline, ids = out.splitlines()
        assert "read -r -u" in cmdline  # the parked shell's bootstrap, not this command
        hostname, sandbox_id, rnd, user = ids.split()
        assert (hostname, sandbox_id, user) == (info["hostname"], info["sandbox_id"], "user")
        seen.append(rnd)
    assert seen[0] != seen[1]  # $RANDOM reseeded per child, not the parent's sequence
    for k in kids:
        await vm.kill(k)


async def test_limits_applied_to_qemu_cgroup(vm):
    from forkd_runtime._backend import Limits, SpawnOptions

    limits = Limits(memory_mb=300, cpus=0.5, pids=64)
    [k] = await vm.spawn(vm.snap, 1, SpawnOptions(limits=limits))
    cg = k.handle.cgroup
    assert k.pid in cg.pids()
    if vm.cgroups.version == 1:
        mem = int((cg.dirs[0] / "memory.limit_in_bytes").read_text())
        quota = int((cg.dirs[1] / "cpu.cfs_quota_us").read_text())
        pids = int((cg.dirs[2] / "pids.max").read_text())
    else:
        mem = int((cg.dirs[0] / "memory.max").read_text())
        quota = int((cg.dirs[0] / "cpu.max").read_text().split()[0])
        pids = int((cg.dirs[0] / "pids.max").read_text())
    from forkd_runtime.vm._vm_limits import QEMU_OVERHEAD_MB

    assert mem == (300 + QEMU_OVERHEAD_MB) << 20 and quota == 50_000 and pids == 64
    # QEMU's own memory (its heap, its translated code) counts against the VM.
    usage = cg.dirs[0] / ("memory.usage_in_bytes" if vm.cgroups.version == 1 else "memory.current")
    assert int(usage.read_text()) >= 4 << 20
    # QEMU runs unprivileged and sandboxed once started.
    status = Path(f"/proc/{k.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] != "0"
    assert "Seccomp:\t2" in status
    await vm.kill(k)


async def test_teardown_leaves_nothing(vm):
    kids = await vm.spawn(vm.snap, 2)
    handles = [k.handle for k in kids]
    for k in kids:
        await vm.kill(k)
        await vm.kill(k)  # idempotent
    for h in handles:
        assert h.proc.poll() is not None, "QEMU still running"
        assert not h.run.exists(), "run directory left behind"
        assert all(not d.exists() for d in h.cgroup.dirs), "cgroup left behind"
    assert all(c.id not in {k.id for k in kids} for c in vm.children())
    # A child whose QEMU dies on its own is cleaned up too.
    [k] = await vm.spawn(vm.snap, 1)
    os.kill(k.pid, 9)
    await asyncio.wait_for(k.conn.closed.wait(), 10)
    for _ in range(100):
        if not k.handle.run.exists():
            break
        await asyncio.sleep(0.05)
    assert not k.handle.run.exists() and k not in vm.children()


async def test_snapshot_mismatch_is_refused(vm):
    from forkd_runtime.vm import SnapshotMismatch

    src = vm.snap_root / vm.snap.id
    fake_id = vm.snap.id + "-old"
    dst = vm.snap_root / fake_id
    shutil.copytree(src, dst)
    try:
        meta = json.loads((dst / "meta.json").read_text())
        meta["qemu_version"] = "6.2.0 (Debian 1:6.2+dfsg-2)"
        meta["memory_mb"] = 256
        (dst / "meta.json").write_text(json.dumps(meta))
        old = vm.load_snapshot(fake_id)
        with pytest.raises(SnapshotMismatch) as err:
            await vm.spawn(old, 1)
        msg = str(err.value)
        assert "qemu_version" in msg and "6.2.0" in msg and "memory_mb" in msg and "prepare('base')" in msg
        assert vm.children() == []
    finally:
        shutil.rmtree(dst, ignore_errors=True)


CRASHER = """
import asyncio, os, sys
from forkd_runtime import TemplateStore
from forkd_runtime._backend import SpawnOptions
from forkd_runtime.vm import VmBackend

async def main():
    b = VmBackend(TemplateStore(sys.argv[1]), root=sys.argv[2], pool_size=1, keep_snapshots=True)
    snap = await b.prepare("base")
    kids = await b.spawn(snap, 1) + await b.spawn(snap, 1, SpawnOptions(internet=True))
    print(snap.id, *[k.pid for k in kids], flush=True)
    os._exit(3)  # a crash: nothing cleaned up

asyncio.run(main())
"""


async def test_recovery_after_a_crash(vm_store, tmp_path):
    """A runtime that dies leaves QEMU processes, run dirs, cgroups and the network
    of its internet child; the next start on the same state dir removes them and
    reuses the snapshot."""
    from forkd_runtime.vm import VmBackend

    forwarding = Path("/proc/sys/net/ipv4/ip_forward").read_text()

    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, str(vm_store.root.parent), str(state), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 3
    sid, *pids = out.decode().split()
    pids = [int(p) for p in pids]
    assert all(Path(f"/proc/{p}").exists() for p in pids), "the orphans should still run"
    b = VmBackend(vm_store, root=state, pool_size=0, keep_snapshots=False)
    try:
        await b.start()
        for p in pids:
            for _ in range(100):
                if not Path(f"/proc/{p}").exists():
                    break
                await asyncio.sleep(0.05)
            assert not Path(f"/proc/{p}").exists(), f"orphan QEMU {p} survived reconcile"
        assert list((state / "vm" / "run").iterdir()) == []
        assert b.cgroups.existing() == []
        # The crashed run's bridge, its tap and rules are gone, forwarding as it was.
        bridge = b._network_manager().bridge
        assert not Path(f"/sys/class/net/{bridge}").exists()
        assert f"forkd_vm_{b.scope}" not in sh("nft", "list", "tables")
        assert not (state / "vm" / "network.json").exists()
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == forwarding
        t0 = time.monotonic()
        snap = await b.prepare("base")
        assert snap.id == sid and time.monotonic() - t0 < 5, "the snapshot on disk is reused"
        [k] = await b.spawn(snap, 1)
        assert (await k.conn.request("ping", {}))["pong"]
    finally:
        await b.close()
    assert not Path(snap.meta["memory_path"]).exists()
    assert not any((state / "vm" / "snapshots").iterdir())


# -- internet access ------------------------------------------------------------------------
UP_LINK = f"fkvu{os.getpid() % 100000}"
UP_HOST, UP_PEER = "203.0.113.1", "203.0.113.2"  # TEST-NET-3 (test_network.py uses TEST-NET-2)


def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: {r.stderr}")
    return r.stdout


def ns_socket(pid: int) -> socket.socket:
    """A TCP socket living in the network namespace of ``pid`` (setns on a throwaway thread)."""
    out: dict = {}
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)

    def make() -> None:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
            out["err"] = OSError(ctypes.get_errno(), "setns")
        else:
            out["sock"] = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    os.close(fd)
    if "err" in out:
        raise out["err"]
    return out["sock"]


@pytest.fixture
def upstream():
    """An 'outside host': a namespace at 203.0.113.2 behind a host veth (203.0.113.1),
    with no route back to the sandbox subnet (a reply there proves masquerade)."""
    proc = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        own = os.readlink("/proc/self/ns/net")
        for _ in range(500):
            if os.path.exists(f"/proc/{proc.pid}/ns/net") and os.readlink(f"/proc/{proc.pid}/ns/net") != own:
                break
            time.sleep(0.002)
        ns = ("nsenter", "-t", str(proc.pid), "-n")
        sh("ip", "link", "add", UP_LINK, "type", "veth", "peer", "name", "eth0", "netns", str(proc.pid))
        sh("ip", "addr", "add", f"{UP_HOST}/24", "dev", UP_LINK)
        sh("ip", "link", "set", UP_LINK, "up")
        sh(*ns, "ip", "addr", "add", f"{UP_PEER}/24", "dev", "eth0")
        sh(*ns, "ip", "link", "set", "eth0", "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        sh("ip", "link", "del", UP_LINK, check=False)


async def serve(sock=None, host: str = "0.0.0.0"):
    """A TCP server telling each client the address it connects from."""

    async def greet(reader, writer) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        await writer.drain()
        writer.close()

    if sock is None:
        server = await asyncio.start_server(greet, host, 0)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(8)
        sock.setblocking(False)
        server = await asyncio.start_server(greet, sock=sock)
    return server, server.sockets[0].getsockname()[1]


# Run in a guest: what each server says, or why none answered (2 s each).
PROBE = """
import socket, sys
for target in sys.argv[1:]:
    host, port = target.split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.settimeout(5)
            print(target, s.recv(100).decode().strip() or "empty")
    except OSError as e:
        print(target, "blocked", e.errno)
"""
# Run in a guest: accept on port 8080 and print each peer until one says "stop".
LISTEN = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
s.settimeout(60)
while True:
    c, peer = s.accept()
    c.settimeout(5)
    data = c.recv(10)
    print("peer", peer[0], data.decode(), flush=True)
    c.close()
    if data == b"stop":
        break
"""


async def probe(child, *targets: str) -> dict[str, str]:
    code, out = await run(child, f"python3 - {' '.join(targets)} <<'EOF'\n{PROBE}EOF")
    assert code == 0, out
    return dict(line.split(" ", 1) for line in out.strip().splitlines())


async def test_internet_access_is_opt_in_and_isolated(vm, upstream):
    """A child with internet access reaches an outside host through NAT, not the
    host's own services; nobody outside reaches it; a sibling without it has no
    network at all. The same rules as the process backend's (forkd_runtime._network)."""
    from forkd_runtime._backend import SpawnOptions

    [k] = await vm.spawn(vm.snap, 1, SpawnOptions(internet=True))
    [plain] = await vm.spawn(vm.snap, 1)
    h = k.handle.net
    up_server, up_port = await serve(ns_socket(upstream))
    host_server, host_port = await serve()
    try:
        assert h is not None and h.kind == "tap" and plain.handle.net is None
        # The tap is on the bridge in the host's namespace; QEMU still sits in its own.
        assert Path(f"/sys/class/net/{h.ifname}/master").resolve().name == vm.network.bridge
        assert os.readlink(f"/proc/{k.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        code, out = await run(
            k, "cat /sys/class/net/eth0/address /sys/class/net/eth0/operstate; grep -c . /proc/net/route"
        )
        mac, state, routes = out.split()
        assert (mac, state) == (h.mac, "up") and int(routes) >= 2  # default + subnet
        code, resolv = await run(k, "cat /etc/resolv.conf")
        assert resolv.split() == [w for d in h.dns for w in ("nameserver", d)]

        seen = await probe(
            k,
            f"{UP_PEER}:{up_port}",
            f"{h.gateway}:{host_port}",
            f"{UP_HOST}:{host_port}",
            f"127.0.0.1:{host_port}",
        )
        assert seen[f"{UP_PEER}:{up_port}"] == UP_HOST  # out, masqueraded to the host's uplink address
        for target in (f"{h.gateway}:{host_port}", f"{UP_HOST}:{host_port}", f"127.0.0.1:{host_port}"):
            assert seen[target].startswith("blocked"), (target, seen[target])

        # Inbound: even with a route to the sandbox subnet, the outside host cannot connect.
        sh("nsenter", "-t", str(upstream), "-n", "ip", "route", "add", str(vm.network.subnet), "via", UP_HOST)
        listener = asyncio.ensure_future(run(k, f"python3 - <<'EOF'\n{LISTEN}EOF"))
        loop = asyncio.get_running_loop()
        for _ in range(600):  # until the guest listens (the host itself may connect: replies only)
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(h.ip, 8080), 2)
                w.write(b"host")
                await w.drain()
                w.close()
                break
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
        s = ns_socket(upstream)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (h.ip, 8080)), 2)
            await loop.sock_sendall(s, b"outside")
            inbound = "connected"
        except (OSError, TimeoutError):
            inbound = "blocked"
        finally:
            s.close()
        r, w = await asyncio.wait_for(asyncio.open_connection(h.ip, 8080), 5)
        w.write(b"stop")
        await w.drain()
        w.close()
        code, out = await asyncio.wait_for(listener, 60)
        assert inbound == "blocked" and "outside" not in out and f"{h.gateway} host" in out, out

        # The sibling without internet access: eth0 down, no route, nothing reachable.
        code, out = await run(plain, "cat /sys/class/net/eth0/operstate; grep -c . /proc/net/route")
        assert out.split() == ["down", "1"]  # the header line only
        seen = await probe(plain, f"{UP_PEER}:{up_port}")
        assert seen[f"{UP_PEER}:{up_port}"].startswith("blocked")
    finally:
        up_server.close()
        host_server.close()
        for c in (k, plain):
            await vm.kill(c)
    assert not Path(f"/sys/class/net/{h.ifname}").exists(), "tap left behind"
    assert vm.network.handles() == []


def _ppid(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


async def test_qemu_fork_servers_rotate_and_qemu_starts_directly_without_one(vm):
    # Last in this module: the module's backend runs on without its fork server.
    from forkd_runtime.vm._qemu_zygote import FORKS_PER_SERVER

    z = vm.qemu_zygote
    if z is None:
        pytest.skip("no QEMU fork server on this host")
    [first] = await vm.spawn(vm.snap, 1)
    # A new server (a new address-space layout) every FORKS_PER_SERVER QEMU processes.
    z.forks = FORKS_PER_SERVER
    kids = [first, *await vm.spawn(vm.snap, 3)]  # more than the pool held: new QEMU processes
    assert vm.qemu_zygote is not z and z.retired and not z.closed  # it still has children
    assert _ppid(kids[-1].pid) == vm.qemu_zygote.proc.pid
    # A server that dies is replaced at the next QEMU process.
    vm.qemu_zygote.proc.kill()
    kids += await vm.spawn(vm.snap, 3)
    assert vm.qemu_zygote is not None and _ppid(kids[-1].pid) == vm.qemu_zygote.proc.pid
    # Without one (turned off, or it cannot start here), QEMU starts directly.
    vm.qemu_zygote.close()
    vm._zygote_wanted = False
    kids += await vm.spawn(vm.snap, 3)
    assert _ppid(kids[-1].pid) == os.getpid()
    for k in kids:
        assert (await run(k, "echo up"))[1] == "up\n"
        await vm.kill(k)
        # Gone (a zombie at most, if its server is gone and nothing reaps orphans here).
        with contextlib.suppress(FileNotFoundError):
            assert open(f"/proc/{k.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    assert z.closed  # the retired server ended with its last child
