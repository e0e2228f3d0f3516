"""BRANCH on the microVM backend (``VmBackend.capture``), with real VMs (TCG here).

One parent VM is booted for the module and one source sandbox prepared from it
(a variable in its Python context, files, a background process that keeps
ticking); tests branch it and sandboxes made from it, and check what the
children inherit, that they diverge, that the source carries on, chains,
concurrent branches, deleting and clean-up (close, crash).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
from test_vm_backend import run, upstream  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]
log = logging.getLogger("test_vm_branch")

# The count is renamed into place: a reader never sees the file empty, as it would between
# a shell's truncate and write.
TICKER = "i=0; while true; do i=$((i+1)); echo $i; echo $i > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.1; done"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(vm_store, tmp_path_factory):
    """A VmBackend with the `base` snapshot (256 MiB guests: captures copy less)."""
    from forkd_runtime.vm import VmBackend

    root = tmp_path_factory.mktemp("vmbranch")
    backend = VmBackend(store=vm_store, root=root, memory_mb=256, pool_size=2, keep_snapshots=True)
    await backend.start()
    backend.snap = await backend.prepare("base")
    yield backend
    await backend.close()
    await backend.delete_snapshot(backend.snap)


async def code(child, src: str, timeout: float = 60) -> tuple[str, dict]:
    s = child.conn.open_inbound()
    res = await child.conn.request("code.run", {"code": src, "stream": s.id}, timeout=timeout)
    out = b"".join([d async for _, _, d in s]).decode()
    return out, res


async def source_with_state(vm):
    """A sandbox with state in every place a branch must carry."""
    [src] = await vm.spawn(vm.snap, 1)
    out, res = await code(src, "import numpy\nx = 41\narr = numpy.arange(1 << 20)\nprint('ok')")
    assert out == "ok\n" and res["error"] is None
    code_, _ = await run(src, "echo before > /root/file && head -c 3000000 /dev/urandom > /root/blob && sync")
    assert code_ == 0
    s = src.conn.open_inbound()
    await src.conn.request("exec.start", {"cmd": TICKER, "stream": s.id, "user": "root"})
    src.ticker = s  # its output keeps streaming to the source's connection
    await asyncio.sleep(0.3)
    return src


async def ticks(child) -> int:
    code_, out = await run(child, "cat /tmp/tick")
    assert code_ == 0, out
    return int(out)


async def still_ticking(child) -> bool:
    a = await ticks(child)
    for _ in range(30):
        await asyncio.sleep(0.2)
        if await ticks(child) > a:
            return True
    return False


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source(vm):
    src = await source_with_state(vm)
    yield src
    await vm.kill(src)


async def drop(vm, snap, *kids) -> None:
    """Kill the children and delete the snapshot (a disk layer its source still
    stands on stays until the source ends)."""
    for k in kids:
        await vm.kill(k)
    await vm.delete_snapshot(snap)


# -- inheritance, divergence, the source -----------------------------------------------------


async def test_children_inherit_memory_files_and_processes(vm, source):
    md5 = (await run(source, "md5sum /root/blob"))[1].split()[0]
    snap = await vm.capture(source)
    assert snap.backend == "vm" and snap.parent is source.snapshot and snap.template == "base"
    assert snap.meta["inherited"] == ["memory", "processes", "files", "contexts", "environment"]
    assert {n["what"] for n in snap.meta["not_inherited"]} >= {"network connections"}
    assert 0 < snap.meta["pause_s"] < 30
    assert Path(snap.meta["memory_path"]).stat().st_size == (256 << 20) + 8192
    kids = await vm.spawn(snap, 2)
    assert len(kids) == 2
    noise = []
    for k in kids:
        # Interpreter state: variables and imported modules, in the same kernel.
        out, res = await code(k, "x += 1\nprint(x, int(arr.sum()), numpy.__name__)")
        assert res["error"] is None and out.split() == ["42", str(sum(range(1 << 20))), "numpy"]
        # Files, including what was only in the guest's page cache.
        _, out = await run(k, "cat /root/file; md5sum /root/blob")
        assert out.split()[0] == "before" and out.split()[1] == md5
        # The background process runs on in each child.
        assert await still_ticking(k)
        # A fresh identity each.
        info = await k.conn.request("info", {})
        assert info["sandbox_id"] == k.id and info["hostname"] == k.id
        _, out = await run(k, "python3 -c 'import os, uuid; print(os.urandom(8).hex(), uuid.uuid4())'")
        noise.append(out)
    assert noise[0] != noise[1]
    await drop(vm, snap, *kids)


async def test_children_diverge_from_each_other_and_the_source(vm, source):
    snap = await vm.capture(source)
    a, b = await vm.spawn(snap, 2)
    await run(a, "echo from-a > /root/file")
    await code(a, "x = 'a'")
    await run(source, "echo from-source > /root/file")
    await code(source, "y_source = 1")
    assert (await run(b, "cat /root/file"))[1].strip() == "before"
    assert (await code(b, "print(x, 'y_source' in globals())"))[0].split() == ["41", "False"]
    assert (await run(a, "cat /root/file"))[1].strip() == "from-a"
    assert (await code(source, "print(x)"))[0].strip() == "41"
    assert (await run(source, "cat /root/file"))[1].strip() == "from-source"
    # Their disks are separate files over the snapshot's frozen layer.
    assert a.handle.top_file != b.handle.top_file != source.handle.top_file
    await run(source, "echo before > /root/file")
    await drop(vm, snap, a, b)


async def test_source_keeps_running_through_the_branch(vm, source):
    """The source's agent connection, its output stream and its processes carry
    on; requests sent during the capture are answered after it."""
    received = []

    async def drain():
        async for _, _, data in source.ticker:
            received.append(data)

    reader = asyncio.ensure_future(drain())
    before = await ticks(source)
    capture = asyncio.ensure_future(vm.capture(source))
    pings = [await source.conn.request("ping", {}, timeout=60) for _ in range(3)]
    snap = await capture
    assert all(p["pong"] for p in pings)
    out, res = await code(source, "x += 0\nprint(x)")
    assert out.strip() == "41" and res["error"] is None
    assert await ticks(source) > before and await still_ticking(source)
    n = len(received)
    await asyncio.sleep(0.5)
    assert len(received) > n, "the source's output stream stopped"
    reader.cancel()
    # The capture's layer is under the source now, and the children's.
    assert source.handle.layers[-1][0] == vm.snap_root / snap.id / "upper.qcow2"
    [k] = await vm.spawn(snap, 1)
    assert (await code(k, "print(x)"))[0].strip() == "41"
    await drop(vm, snap, k)


async def test_branch_during_a_running_cell(vm, source):
    """A cell still running at the branch finishes in the source; the children's
    copy of it belonged to the source's client and is interrupted."""
    cell = asyncio.ensure_future(code(source, "import time\ntime.sleep(2)\nz = 7\nprint('done')", timeout=60))
    await asyncio.sleep(0.7)
    snap = await vm.capture(source)
    out, res = await cell
    assert out.strip() == "done" and res["error"] is None
    [k] = await vm.spawn(snap, 1)
    out, res = await code(k, "print(x)")
    assert out.strip() == "41", res
    await drop(vm, snap, k)


async def test_branch_while_the_host_is_writing_to_the_source(vm, monkeypatch):
    """Host-to-guest bytes still under way at the stop: the capture starts
    over with the source's channel quiet first, and still succeeds; a request
    made meanwhile is answered."""
    from forkd_runtime.vm import _branch

    [src] = await vm.spawn(vm.snap, 1)
    await code(src, "w = 3")
    real, calls = _branch._settled, []

    async def busy(channel, peer):
        calls.append(await real(channel, peer))
        return len(calls) > 1

    monkeypatch.setattr(_branch, "_settled", busy)
    snap = await vm.capture(src)
    assert calls == [True] and snap.meta["migration"]["channel_held"] == "capture"
    monkeypatch.setattr(_branch, "_settled", real)
    again = await vm.capture(src)
    assert again.meta["migration"]["channel_held"] == "pause"
    for s in (snap, again):
        [k] = await vm.spawn(s, 1)
        assert (await code(k, "print(w)"))[0].strip() == "3"
        await vm.kill(k)
    await drop(vm, again, src)
    await vm.delete_snapshot(snap)


async def test_branch_of_a_sandbox_with_internet_access(vm, upstream):  # noqa: F811 (the fixture)
    """A source on the network is branched: a child that asks for internet
    access gets its own address and reaches out; one that does not is cut off
    (the guest still has the source's eth0 settings, the NIC leads nowhere)."""
    from test_vm_backend import UP_HOST, UP_PEER, ns_socket, probe, serve

    from forkd_runtime._backend import SpawnOptions

    [src] = await vm.spawn(vm.snap, 1, SpawnOptions(internet=True))
    up_server, up_port = await serve(ns_socket(upstream))
    target = f"{UP_PEER}:{up_port}"
    kids = []
    try:
        assert (await probe(src, target))[target] == UP_HOST
        snap = await vm.capture(src)
        assert {n["what"] for n in snap.meta["not_inherited"]} >= {"network connections"}
        [net] = await vm.spawn(snap, 1, SpawnOptions(internet=True))
        [plain] = await vm.spawn(snap, 1)
        kids = [net, plain]
        _, mac = await run(net, "cat /sys/class/net/eth0/address")
        assert mac.strip() == net.handle.net.mac != src.handle.net.mac
        assert (await probe(net, target))[target] == UP_HOST
        assert (await probe(plain, target))[target].startswith("blocked")
        assert (await probe(src, target))[target] == UP_HOST
    finally:
        up_server.close()
        for k in [*kids, src]:
            await vm.kill(k)


# -- chains and concurrency ------------------------------------------------------------------


async def test_chain_of_five(vm):
    """A branch of a branch of ... : each level adds a line and a variable step;
    the last child has them all. What a capture costs does not grow with depth."""
    [k] = await vm.spawn(vm.snap, 1)
    await code(k, "steps = []")
    snaps, kids, costs = [], [k], []
    for depth in range(1, 6):
        await run(k, f"echo level{depth} >> /root/chain")
        await code(k, f"steps.append({depth})")
        snap = await vm.capture(k)
        assert snap.meta["depth"] == depth + (vm.snap.meta.get("depth", 0))
        assert len(snap.meta["layers"]) == 2 + depth
        costs.append((depth, snap.meta["pause_s"], snap.meta["capture_s"]))
        snaps.append(snap)
        [k] = await vm.spawn(snap, 1)
        kids.append(k)
    log.warning("chain depth / pause_s / capture_s: %s", costs)
    print("chain depth, pause_s, capture_s:", costs)
    _, out = await run(k, "cat /root/chain")
    assert out.split() == [f"level{d}" for d in range(1, 6)]
    assert (await code(k, "print(steps)"))[0].strip() == "[1, 2, 3, 4, 5]"
    for k in kids:
        await vm.kill(k)
    for snap in reversed(snaps):
        await vm.delete_snapshot(snap)


async def test_concurrent_branches(vm):
    a, b = await vm.spawn(vm.snap, 2)
    await code(a, "who = 'a'")
    await code(b, "who = 'b'")
    # Two sources at once, and the same source twice (the second waits).
    sa, sb, sa2 = await asyncio.gather(vm.capture(a), vm.capture(b), vm.capture(a))
    assert len({sa.id, sb.id, sa2.id}) == 3
    kids = []
    for snap, who in ((sa, "a"), (sb, "b"), (sa2, "a")):
        [k] = await vm.spawn(snap, 1)
        kids.append(k)
        assert (await code(k, "print(who)"))[0].strip() == who
    for k in [*kids, a, b]:
        await vm.kill(k)
    for snap in (sb, sa2, sa):
        await vm.delete_snapshot(snap)


# -- deleting and errors ---------------------------------------------------------------------


async def test_delete_refused_while_in_use(vm):
    from forkd_runtime._backend import SnapshotInUse

    [src] = await vm.spawn(vm.snap, 1)
    s1 = await vm.capture(src)
    [k] = await vm.spawn(s1, 1)
    s2 = await vm.capture(k)  # stacks on s1's layer
    files1 = [vm.snap_root / s1.id, Path(s1.meta["memory_path"])]
    files2 = [vm.snap_root / s2.id, Path(s2.meta["memory_path"])]
    with pytest.raises(SnapshotInUse, match="live sandboxes"):
        await vm.delete_snapshot(s1)
    await vm.kill(k)
    with pytest.raises(SnapshotInUse, match=s2.id):  # and the source's disk
        await vm.delete_snapshot(s1)
    with pytest.raises(SnapshotInUse):  # the template's layer is under both
        await vm.delete_snapshot(vm.snap)
    await vm.delete_snapshot(s2)
    assert not any(f.exists() for f in files2)
    # The source still stands on s1's disk layer: the snapshot and its RAM file go now,
    # the layer file when the source ends.
    await vm.delete_snapshot(s1)
    layer = vm.snap_root / s1.id / "upper.qcow2"
    assert not Path(s1.meta["memory_path"]).exists() and layer.exists()
    assert await run(src, "echo still here") == (0, "still here\n")
    await vm.kill(src)
    assert not any(f.exists() for f in files1)


async def test_capturing_a_dead_or_killed_child_fails(vm):
    from forkd_runtime._backend import BranchError

    a, b = await vm.spawn(vm.snap, 2)
    before = set(vm.snap_root.iterdir())
    await vm.kill(a)
    with pytest.raises(BranchError, match="not"):
        await vm.capture(a)
    os.kill(b.pid, 9)
    await asyncio.wait_for(b.conn.closed.wait(), 10)
    with pytest.raises(BranchError):
        await vm.capture(b)
    assert set(vm.snap_root.iterdir()) == before


async def test_a_failed_capture_leaves_the_source_running(vm):
    """The RAM sink dies mid-stream: BranchError, nothing left behind but the
    layer the source now stands on, and the source works and branches again."""
    from forkd_runtime._backend import BranchError
    from forkd_runtime.vm import _branch

    [src] = await vm.spawn(vm.snap, 1)
    await code(src, "v = 5")
    dirs, shm = set(vm.snap_root.iterdir()), set(Path("/dev/shm").glob(f"forkd-{vm.scope}-*"))
    real = _branch._sink_result

    def broken(sink):
        raise BranchError("the RAM sink failed (test)")

    _branch._sink_result = broken
    try:
        with pytest.raises(BranchError, match="test"):
            await vm.capture(src)
    finally:
        _branch._sink_result = real
    assert (await code(src, "print(v)"))[0].strip() == "5"
    assert set(Path("/dev/shm").glob(f"forkd-{vm.scope}-*")) == shm
    # The old top layer is under the source now: kept, in a directory of its own.
    [kept] = set(vm.snap_root.iterdir()) - dirs
    assert [p.name for p in kept.iterdir()] == ["upper.qcow2"]
    snap = await vm.capture(src)
    [k] = await vm.spawn(snap, 1)
    assert (await code(k, "print(v)"))[0].strip() == "5"
    await drop(vm, snap, k, src)
    assert set(vm.snap_root.iterdir()) == dirs, "a loose layer stayed"


# -- clean-up ---------------------------------------------------------------------------------

CRASHER = """
import asyncio, os, sys
from forkd_runtime import TemplateStore
from forkd_runtime.vm import VmBackend

async def main():
    b = VmBackend(TemplateStore(sys.argv[1]), root=sys.argv[2], memory_mb=256, pool_size=0)
    snap = await b.prepare("base")
    [k] = await b.spawn(snap, 1)
    cap = await b.capture(k)
    [kk] = await b.spawn(cap, 1)
    print(cap.id, cap.meta["memory_path"], k.pid, kk.pid, flush=True)
    os._exit(3)  # a crash: nothing cleaned up

asyncio.run(main())
"""


async def test_close_and_crash_remove_every_capture_file(vm, vm_store):
    """Last in the module: close() removes every capture's files; so does the
    next start after a crashed runtime."""
    from forkd_runtime.vm import VmBackend

    [k] = await vm.spawn(vm.snap, 1)
    snap = await vm.capture(k)
    await vm.spawn(snap, 1)
    made = [vm.snap_root / snap.id, Path(snap.meta["memory_path"])]
    assert all(f.exists() for f in made)
    await vm.close()
    assert not any(f.exists() for f in made)
    assert [d.name for d in vm.snap_root.iterdir()] == [vm.snap.id]
    assert not list(vm.run_root.iterdir())

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, str(vm_store.root.parent), str(vm.state), stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 3, out
    sid, mem, *pids = out.decode().split()
    assert (vm.snap_root / sid).exists() and Path(mem).exists()
    again = VmBackend(store=vm_store, root=vm.state, memory_mb=256, pool_size=0)
    await again.start()
    try:
        assert not (vm.snap_root / sid).exists() and not Path(mem).exists()
        for pid in map(int, pids):
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                await asyncio.sleep(0.05)
            assert not Path(f"/proc/{pid}").exists()
    finally:
        await again.close()
    await vm.start()  # the fixture's teardown closes it again


# -- measurement (not a test): python tests/test_vm_branch.py [--captures N] [--count N] ------


async def measure(captures: int = 5, count: int = 10, memory_mb: int = 256, files_mb: int = 50) -> dict:
    """What bench/branch.py reports, at the backend's level: a source holding
    ``memory_mb`` MiB of touched memory in its interpreter and ``files_mb`` MiB
    of files; ``captures`` captures of it (pause, call time), then ``count``
    children of the last one (time until all have answered)."""
    import statistics
    import tempfile

    from forkd_runtime import TemplateStore, load_spec
    from forkd_runtime.vm import VmBackend

    root = Path(__file__).resolve().parent.parent
    store = TemplateStore(os.environ.get("FORKD_TEST_TEMPLATES", root / ".cache" / "templates"))
    store.build(load_spec("base"), progress=lambda m: None)
    with tempfile.TemporaryDirectory(prefix="forkd-vm-branch-") as state:
        vm = VmBackend(store=store, root=state, keep_snapshots=False)
        try:
            snap = await vm.prepare("base")
            [src] = await vm.spawn(snap, 1)
            out, res = await code(
                src, f"import numpy as np\nbig = np.ones({memory_mb} * 2**20 // 8)\nbig[::4096] = 2\n", 600
            )
            assert res["error"] is None, res
            await run(
                src,
                f"mkdir -p /home/user/data && for i in $(seq {files_mb}); do "
                "head -c 1048576 /dev/urandom > /home/user/data/f$i; done",
                timeout=600,
            )
            pauses, calls, phases, snaps = [], [], [], []
            for _ in range(captures):
                t0 = time.perf_counter()
                s = await vm.capture(src)
                calls.append(time.perf_counter() - t0)
                pauses.append(s.meta["pause_s"])
                phases.append({**s.meta["pause_phases_ms"], **s.meta["migration"]})
                snaps.append(s)
            t0 = time.perf_counter()
            kids = await vm.spawn(snaps[-1], count)
            ready = time.perf_counter() - t0
            n = memory_mb * 2**20 // 8
            expected = n + len(range(0, n, 4096))
            for k in kids:
                out, _ = await code(k, "print(int(big.sum()))")
                assert int(out) == expected, out
            # A chain: depth 1 vs 5 (each step branches the previous step's child).
            chain, k = [], src
            for _ in range(5):
                s = await vm.capture(k)
                chain.append((round(s.meta["pause_s"] * 1000, 1), round(s.meta["capture_s"], 3)))
                [k] = await vm.spawn(s, 1)
        finally:
            await vm.close()

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]

    return {
        "captures": captures,
        "pause_ms_p50": round(statistics.median(pauses) * 1000, 1),
        "pause_ms_p90": round(pct(pauses, 0.9) * 1000, 1),
        "pause_ms": [round(p * 1000, 1) for p in pauses],
        "capture_s_p50": round(statistics.median(calls), 3),
        "capture_s": [round(c, 3) for c in calls],
        "children": count,
        "children_ready_s": round(ready, 3),
        "pause_phases_ms": phases,
        "chain_pause_ms_capture_s_by_depth": chain,
    }


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Measure VmBackend.capture (BRANCH).")
    ap.add_argument("--captures", type=int, default=5)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--files-mb", type=int, default=50)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(measure(a.captures, a.count, a.memory_mb, a.files_mb)), indent=1))
