"""Helpers shared by the process backend's behavioural tests: run a command in a
child through its real agent, and look at what the host has."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from forkd_runtime._process_backend import UID_BASE

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Result:
    out: bytes
    err: bytes
    exit_code: int | None
    signal: int | None
    reason: str | None

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


async def run(child, cmd: str, user: str = "root", timeout: float = 20) -> Result:
    """Run ``cmd`` in ``child`` through its agent and wait for the end of its output."""
    conn = child.conn
    s = conn.open_inbound()
    await conn.request(
        "exec.start", {"cmd": cmd, "stream": s.id, "user": user, "timeout": timeout}, timeout=timeout + 10
    )
    out, err = bytearray(), bytearray()
    async for fd, _off, data in s:
        (out if fd == 1 else err).extend(data)
    info = s.end_info or {}
    return Result(bytes(out), bytes(err), info.get("exit_code"), info.get("signal"), info.get("reason"))


async def check(child, cmd: str, user: str = "root") -> str:
    """Run ``cmd`` and return its stdout; fail the test if it did not exit 0."""
    r = await run(child, cmd, user)
    assert r.ok, f"{cmd!r} failed: {r}"
    return r.text


def host_pids() -> set[int]:
    return {int(e) for e in os.listdir("/proc") if e.isdigit()}


def pids_of_uid(uid: int = UID_BASE) -> set[int]:
    """Host processes whose real uid is ``uid`` (sandbox root)."""
    out = set()
    for pid in host_pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            out.add(pid)
                        break
        except OSError:
            continue
    return out


def descendants(root: int) -> set[int]:
    """``root`` and every host process below it (by parent pid)."""
    parents: dict[int, int] = {}
    for pid in host_pids():
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(c for c, pp in parents.items() if pp == p)
    return out


def scope_dirs(backend) -> list[Path]:
    """This backend's cgroup scope directories, one per controller."""
    return backend.cgroups._parents()


def cgroup_dirs_of(pid: int, root: Path = CGROUP_ROOT) -> dict[str, Path]:
    """The forkd cgroup directories that hold host process ``pid``, by
    controller ("" for the single cgroup v2 tree), read from /proc/<pid>/cgroup
    whatever the backend named them."""
    mounts = {tuple(d.name.split(",")): d for d in root.iterdir() if d.is_dir()}
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not path.startswith("/forkd/"):
                continue
            if not controllers:
                out[""] = root / path.lstrip("/")
                continue
            for c in controllers.split(","):
                out[c] = mounts[tuple(controllers.split(","))] / path.lstrip("/")
    return out


def cgroup_file(pid: int, controller: str, name: str) -> str:
    """A cgroup file of ``controller`` for host process ``pid`` (v1 or v2)."""
    dirs = cgroup_dirs_of(pid)
    d = dirs.get(controller) or dirs[""]
    return (d / name).read_text().strip()


def mountinfo() -> list[str]:
    """The host's mount table, without the per-mount ids that differ between reads."""
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:]) for line in f)


async def run_code(child, code: str, context: str | None = None) -> dict:
    """code.run in ``child``'s agent; returns the response with "stdout" added."""
    conn = child.conn
    s = conn.open_inbound()
    params = {"code": code, "stream": s.id}
    if context is not None:
        params["context"] = context
    result = await conn.request("code.run", params, timeout=60)
    out = bytearray()
    async for fd, _off, data in s:
        if fd == 1:
            out.extend(data)
    return {**result, "stdout": out.decode()}


async def eval_in(child, expr: str, context: str | None = None):
    params = {"expr": expr} if context is None else {"expr": expr, "context": context}
    result = await child.conn.request("code.eval", params, timeout=60)
    assert result.get("error") is None, result
    return result["value"]
