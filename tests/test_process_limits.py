"""Resource limits of process-backend sandboxes: memory, pids, disk and cpu.

One sandbox misbehaving must cost nobody else anything: its sibling keeps
answering, the backend keeps spawning, the host keeps its pids."""

from __future__ import annotations

import asyncio
import os

from forkd_runtime._backend import Limits, SpawnOptions
from process_helpers import cgroup_dirs_of, cgroup_file, check, descendants, host_pids, run

SMALL = Limits(memory_mb=64, pids=32, disk_mb=8, cpus=0.5)


async def _pair(backend, limits: Limits = SMALL):
    snap = await backend.prepare("base")
    kids = await backend.spawn(snap, 2, SpawnOptions(limits=limits))
    assert len(kids) == 2
    return kids


def _cg_file(child, controller: str, name: str) -> str:
    return cgroup_file(child.pid, controller, name)


async def _still_healthy(backend, sibling) -> None:
    assert (await check(sibling, "echo alive")).strip() == "alive"
    snap = await backend.prepare("base")
    (fresh,) = await backend.spawn(snap, 1, SpawnOptions(limits=SMALL))
    assert (await check(fresh, "echo fresh")).strip() == "fresh"
    await backend.kill(fresh)


async def test_limits_are_written_to_the_cgroups(process_backend):
    limits = Limits(memory_mb=48, pids=24, disk_mb=4, cpus=0.25)
    kid, _ = await _pair(process_backend, limits)
    if process_backend.cgroups.version == 1:
        memory = _cg_file(kid, "memory", "memory.limit_in_bytes")
        quota = int(_cg_file(kid, "cpu", "cpu.cfs_quota_us"))
        period = int(_cg_file(kid, "cpu", "cpu.cfs_period_us"))
    else:
        memory = _cg_file(kid, "memory", "memory.max")
        quota, period = map(int, _cg_file(kid, "cpu", "cpu.max").split())
    assert memory == str(48 << 20)
    assert quota == period // 4
    assert _cg_file(kid, "pids", "pids.max") == "24"
    # Every process of the sandbox is in those cgroups, including ones started later.
    await kid.conn.request("exec.start", {"cmd": "exec sleep 201", "user": "user"})
    for _ in range(100):
        tree = descendants(kid.pid)
        if len(tree) >= 2:
            break
        await asyncio.sleep(0.02)
    assert len(tree) >= 2
    for controller in ("pids", "memory", "cpu"):
        procs = set(map(int, _cg_file(kid, controller, "cgroup.procs").split()))
        # A process that exited between the two reads is no counterexample.
        assert {p for p in tree - procs if os.path.exists(f"/proc/{p}")} == set(), controller
    inside = await check(kid, "cat /proc/self/cgroup")
    assert all(f"{d.name}\n" in inside + "\n" for d in cgroup_dirs_of(kid.pid).values())
    assert (await check(kid, "df -m --output=size / | tail -1")).strip() == "4"


async def test_memory_hog_is_killed_alone(process_backend):
    hog, sibling = await _pair(process_backend)
    r = await run(hog, "python3 -c \"x = b'x' * (200 << 20); print('survived')\"")
    assert r.signal == 9 and r.reason == "killed", r
    assert b"survived" not in r.out
    events = _cg_file(
        hog, "memory", "memory.oom_control" if process_backend.cgroups.version == 1 else "memory.events"
    )
    assert dict(line.split() for line in events.splitlines())["oom_kill"] != "0", events
    # The OOM killer took the hog, not the sandbox's agent.
    assert hog.alive
    assert (await check(hog, "echo ok")).strip() == "ok"
    await _still_healthy(process_backend, sibling)


FORK_UNTIL_REFUSED = """python3 -c '
import os
r, w = os.pipe()
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # until the parent exits
            os._exit(0)
        n += 1
except OSError as e:
    print(n, e.errno)
'"""


async def test_pids_limit_refuses_forks(process_backend):
    kid, sibling = await _pair(process_backend)
    out = (await check(kid, FORK_UNTIL_REFUSED)).split()
    # EAGAIN after fewer forks than the limit (the agent, bash and python count too).
    assert out[1] == "11" and 10 <= int(out[0]) < SMALL.pids, out
    await _still_healthy(process_backend, sibling)


def _same_pidns(pid: int) -> set[int]:
    """Every host process in the pid namespace of ``pid`` (the whole sandbox)."""
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    out = set()
    for p in host_pids():
        try:
            if os.readlink(f"/proc/{p}/ns/pid") == ns:
                out.add(p)
        except OSError:
            continue
    return out


async def test_fork_bomb_is_contained(process_backend):
    bomb, sibling = await _pair(process_backend)
    await bomb.conn.request("exec.start", {"cmd": ":(){ :|:& };:", "user": "root", "timeout": 30})
    refused = 0
    for _ in range(200):
        await asyncio.sleep(0.05)
        assert int(_cg_file(bomb, "pids", "pids.current")) <= SMALL.pids
        # Nothing of the sandbox escaped its pid namespace's count on the host.
        assert len(_same_pidns(bomb.pid)) <= SMALL.pids
        refused = int(_cg_file(bomb, "pids", "pids.events").split()[-1])
        if refused:
            break
    assert refused > 0, "the bomb never reached pids.max"
    await _still_healthy(process_backend, sibling)
    # Killing the sandbox ends the bomb with it.
    cg_dirs = list(cgroup_dirs_of(bomb.pid).values())
    ns = _same_pidns(bomb.pid)
    await process_backend.kill(bomb)
    assert cg_dirs and not any(d.exists() for d in cg_dirs)
    assert not (ns & host_pids())


async def test_disk_limit_gives_enospc(process_backend):
    kid, sibling = await _pair(process_backend)
    r = await run(kid, "dd if=/dev/zero of=/root/big bs=1M count=20")
    assert r.exit_code != 0
    assert b"No space left on device" in r.err, r
    r = await run(kid, "python3 -c \"open('/tmp/more', 'wb').write(b'x' * (4 << 20))\"")
    assert r.exit_code != 0 and b"No space left on device" in r.err, r
    # Freeing space works again, and the sibling's disk is its own.
    await check(kid, "rm /root/big && echo small > /root/small")
    await check(sibling, "dd if=/dev/zero of=/root/fill bs=1M count=6 status=none")
    assert int((await check(sibling, "stat -c %s /root/fill")).strip()) == 6 << 20
    await _still_healthy(process_backend, sibling)
