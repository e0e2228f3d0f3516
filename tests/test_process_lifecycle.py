"""Teardown and recovery of the process backend: a killed sandbox, a closed
backend and a runtime killed -9 leave no process, cgroup, mount or layer
behind, and the next runtime on the same state directory starts clean."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from forkd_runtime._process_backend import ProcessBackend
from process_helpers import cgroup_dirs_of, check, descendants, host_pids, mountinfo, scope_dirs

# What a closed backend may leave in its state directory: the lock file, the
# zygote log, the content-addressed copy of forkd's code, and empty run/stage dirs.
EXPECTED_STATE = {"process-backend.lock", "logs", "lib", "run", "zygotes"}


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (absent, or a zombie nobody has reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _sandbox_pids(child_pid: int) -> set[int]:
    """Every host process in the pid namespace whose init is ``child_pid``."""
    ns = os.readlink(f"/proc/{child_pid}/ns/pid")
    out = set()
    for p in host_pids():
        try:
            if os.readlink(f"/proc/{p}/ns/pid") == ns:
                out.add(p)
        except OSError:
            continue
    return out


async def _wait_gone(pids: set[int], timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if not _gone(p)}
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


def _our_mounts(*paths) -> list[str]:
    """Host mounts that involve any of ``paths`` (others' tests mount things too)."""
    keys = [str(p) for p in paths]
    return [m for m in mountinfo() if any(k in m for k in keys)]


async def _busy(child) -> set[int]:
    """Give a sandbox some processes of its own (root, user, a detached daemon) and return them all."""
    await child.conn.request("exec.start", {"cmd": "exec sleep 401", "user": "root"})
    await child.conn.request("exec.start", {"cmd": "exec sleep 402", "user": "user"})
    await check(child, "setsid sleep 403 >/dev/null 2>&1 < /dev/null &")
    for _ in range(100):
        pids = _sandbox_pids(child.pid)
        if len(pids) >= 4:
            return pids
        await asyncio.sleep(0.02)
    raise AssertionError(f"sandbox processes did not start: {pids}")


async def test_kill_releases_everything_the_child_had(process_backend, tmp_path):
    tpl = process_backend.store.get("base").rootfs
    snap = await process_backend.prepare("base")
    zygote_mounts = _our_mounts(tmp_path, tpl)  # the zygote's own (its run directory's tmpfs)
    a, b = await process_backend.spawn(snap, 2)
    pids = await _busy(a)
    assert a.pid in pids
    cg_dirs = list(cgroup_dirs_of(a.pid).values())
    assert cg_dirs and all(d.is_dir() for d in cg_dirs)

    await process_backend.kill(a)
    assert not a.alive
    assert await _wait_gone(pids, 2.0) == set()  # kill() waited for the child itself
    assert not any(d.exists() for d in cg_dirs)
    assert process_backend.children() == [b]
    assert _our_mounts(tmp_path, tpl) == zygote_mounts
    # The layer lived in the sandbox's own tmpfs: nothing per child on the host's disk.
    run = process_backend.state / "run"
    assert not [p for p in run.rglob("*") if a.id in p.name]
    await process_backend.kill(a)  # idempotent
    # The sibling is untouched.
    assert (await check(b, "echo ok")).strip() == "ok"


async def test_close_leaves_nothing_behind(template_store, tmp_path):
    tpl = template_store.get("base").rootfs
    mounts_before = _our_mounts(tmp_path, tpl)
    backend = ProcessBackend(store=template_store, root=tmp_path / "state")
    try:
        await backend.start()
        snap = await backend.prepare("base")
        kids = await backend.spawn(snap, 3)
        zygote = backend._zygotes["base"]
        pids = descendants(zygote.proc.pid)
        for kid in kids[:2]:
            pids |= await _busy(kid)
        assert all(k.pid in pids for k in kids)
        cg_dirs = [d for k in kids for d in cgroup_dirs_of(k.pid).values()]
        scopes = scope_dirs(backend)
    finally:
        await backend.close()
    assert await _wait_gone(pids, 2.0) == set()
    assert not any(d.exists() for d in cg_dirs)
    for scope in scopes:  # no sandbox cgroup left in this runtime's scope
        assert not scope.exists() or not [e for e in scope.iterdir() if e.is_dir()]
    assert _our_mounts(tmp_path, tpl) == mounts_before == []
    state = backend.state
    assert {e.name for e in state.iterdir()} <= EXPECTED_STATE
    assert list((state / "run").iterdir()) == []
    assert list((state / "zygotes").iterdir()) == []
    assert backend.children() == []


async def test_close_removes_the_cgroup_scope(template_store, tmp_path):
    backend = ProcessBackend(store=template_store, root=tmp_path / "state")
    try:
        await backend.start()
        await backend.spawn(await backend.prepare("base"), 1)
        scopes = scope_dirs(backend)
        assert all(s.is_dir() for s in scopes)
    finally:
        await backend.close()
    assert [s for s in scopes if s.exists()] == []


RUNTIME = """
import asyncio, json, sys
from forkd_runtime import TemplateStore
from forkd_runtime._process_backend import ProcessBackend

async def main():
    backend = ProcessBackend(store=TemplateStore(sys.argv[1]), root=sys.argv[2])
    await backend.start()
    kids = await backend.spawn(await backend.prepare("base"), 3)
    # One child runs its full agent and a command; the others are still in their lazy loop.
    await kids[0].conn.request("exec.start", {"cmd": "exec sleep 501", "user": "root"})
    await kids[1].conn.request("info")
    cgroups = [line.split(":", 2) for k in kids for line in open(f"/proc/{k.pid}/cgroup").read().splitlines()]
    print(json.dumps({"pids": [k.pid for k in kids], "ids": [k.id for k in kids],
                      "cgroups": sorted({path for _, _, path in cgroups if path.startswith("/forkd/")}),
                      "launcher": backend._zygotes["base"].proc.pid}), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the runtime subprocess printed nothing"
    return proc.stdout.readline()


async def test_recovery_after_the_runtime_is_killed(template_store, tmp_path):
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNTIME, str(template_store.root.parent), str(state)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(proc, 60)
        assert line, f"runtime subprocess exited with {proc.wait()}"
        started = json.loads(line)
        pids = descendants(started["launcher"])
        for pid in started["pids"]:
            pids |= _sandbox_pids(pid)
        assert len(pids) >= 2 + 3 + 1  # launcher, zygote, 3 agents, the sleep
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # Every channel closed with the runtime: the children and the zygote end on their own.
    assert await _wait_gone(pids, 5.0) == set()

    # A new runtime on the same state directory cleans up what the old one left.
    backend = ProcessBackend(store=template_store, root=state)
    scopes = scope_dirs(backend)
    leftovers = [s / path.rsplit("/", 1)[1] for s in scopes for path in started["cgroups"]]
    assert len(leftovers) >= 3 * len(scopes)
    assert all(d.is_dir() for d in leftovers)  # nobody else removes them
    try:
        await backend.start()
        assert not any(d.exists() for d in leftovers)
        # Nothing at all of the old run is left in this runtime's scope.
        assert [e for s in scopes if s.is_dir() for e in s.iterdir() if e.is_dir()] == []
        assert list((state / "run").iterdir()) == []
        assert list((state / "zygotes").iterdir()) == []
        kids = await backend.spawn(await backend.prepare("base"), 2)
        assert [(await check(k, "echo back")).strip() for k in kids] == ["back", "back"]
        assert {k.id for k in kids}.isdisjoint(started["ids"])
    finally:
        await backend.close()


async def test_a_second_runtime_on_the_same_state_dir_is_refused(process_backend, template_store):
    from forkd_runtime._backend import SpawnError

    other = ProcessBackend(store=template_store, root=process_backend.state)
    with pytest.raises(SpawnError, match="another forkd runtime"):
        await other.start()
    # ... and did not touch the running one's sandboxes.
    (kid,) = await process_backend.spawn(await process_backend.prepare("base"), 1)
    assert (await check(kid, "echo ok")).strip() == "ok"


async def test_close_leaves_no_cgroup_behind_while_the_stock_is_being_made(template_store, tmp_path):
    from forkd_runtime._backend import Limits
    from forkd_runtime._process_backend import ProcessBackend

    backend = ProcessBackend(store=template_store, root=tmp_path / "state")
    await backend.start()
    await backend.prepare("base")
    create = backend.cgroups.create

    def slow_create(name, limits):  # a busy host: cgroupfs writes take a while
        time.sleep(0.5)
        return create(name, limits)

    backend.cgroups.create = slow_create
    backend._refill_cgroups(Limits(memory_mb=300))  # a stock being made, in a thread
    await asyncio.sleep(0.05)
    await backend.close()
    await asyncio.sleep(1.0)  # long after any thread could have finished
    assert [p for p in backend.cgroups._parents() if p.exists()] == []
