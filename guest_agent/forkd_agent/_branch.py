"""BRANCH on the process backend, the agent's part: code contexts out of a
source sandbox and into its branches (docs/branch-design.md).

The runtime drives it:
  branch.export  every idle kernel forks a writer of its namespace into a new
                 directory of the sandbox's layer (fd LAYER_FD: the runtime
                 reads it from the host, the sandbox's own files never show it);
                 the contexts stay locked, so no code runs until...
  branch.finish  ...the runtime has captured the files. Unlocks, waits for the
                 writers, reports what each context carried and left out.
  branch.restore in a branch child: each context gets a kernel that loads its
                 namespace from fd STATE_FD (the snapshot's directory, opened
                 by the zygote before the child's root was sealed).
A context running code is busy: export refuses (conflict) rather than wait, so
the caller decides. Locks held by an export are released after EXPORT_HOLD
seconds whatever happens, so a runtime that vanished cannot wedge the sandbox.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import msgpack

from forkd import protocol as p
from forkd._connection import Connection

from . import _params
from ._contexts import Context
from ._kernel_client import Job
from ._methods import component, method

__all__ = ["Branches", "LAYER_FD", "STATE_FD"]

# Set up by the zygote (_zygote.py) in every child it forks:
LAYER_FD = 4  # the sandbox's writable layer, held open so the runtime can capture it
STATE_FD = 5  # in a branch child: its snapshot's directory (saved code contexts)
EXPORT_HOLD = 30.0
WRITER_TIMEOUT = 300.0
_STATUS_LIMIT = 1 << 20


def _conflict(message: str) -> p.RpcError:
    return p.RpcError(p.ErrorCode.CONFLICT, message)


class _Export:
    def __init__(self, token: str) -> None:
        self.token = token
        self.dir = f"branch-{token}"
        self.locked: list[Context] = []
        self.contexts: list[dict] = []
        self.writers: list[asyncio.Future] = []
        self.release: asyncio.TimerHandle | None = None
        self.expired = False

    def unlock(self) -> None:
        if self.release is not None:
            self.release.cancel()
            self.release = None
        for ctx in self.locked:
            ctx.job = None
            ctx.lock.release()
        self.locked.clear()


def _read_status(loop: asyncio.AbstractEventLoop, fd: int) -> asyncio.Future:
    """The writer's report: everything on the pipe until end of file."""
    fut: asyncio.Future = loop.create_future()
    buf = bytearray()
    os.set_blocking(fd, False)

    def done(result: Any) -> None:
        loop.remove_reader(fd)
        os.close(fd)
        if not fut.done():
            fut.set_result(result)

    def on_readable() -> None:
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data and len(buf) < _STATUS_LIMIT:
            buf.extend(data)
            return
        try:
            status = msgpack.unpackb(bytes(buf)) if buf else None
        except Exception:
            status = None
        if not isinstance(status, dict):
            status = {"ok": False, "error": "the writer died before it finished"}
        done(status)

    loop.add_reader(fd, on_readable)
    fut.add_done_callback(lambda f: f.cancelled() and done(None))
    return fut


async def _last_event(job: Job) -> tuple:
    """Wait out a job whose output is not wanted: ("done", payload) or ("dead",)."""
    event = await job.next()
    while event[0] not in ("done", "dead"):
        event = await job.next()
    return event


@component("branches")
class Branches:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.exports: dict[str, _Export] = {}

    async def export(self) -> dict:
        contexts = self.agent.contexts
        table = list(contexts._by_id.values())
        busy = [ctx.id for ctx in table if ctx.lock.locked()]
        if busy:
            raise _conflict(f"code is running in context {busy[0]!r}; branch when it is done")
        for stale in [e for e in self.exports.values() if e.expired]:
            self._drop(stale)
        if self.exports:
            raise _conflict("another branch of this sandbox is under way")
        exp = _Export(uuid.uuid4().hex[:16])
        try:
            os.mkdir(exp.dir, 0o700, dir_fd=LAYER_FD)
            dir_fd = os.open(exp.dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=LAYER_FD)
        except OSError as exc:
            raise p.RpcError(
                p.ErrorCode.SANDBOX, f"this sandbox cannot export its code contexts: {exc}"
            ) from None
        loop = asyncio.get_running_loop()
        self.exports[exp.token] = exp
        # Free locks are taken without suspending: no job can slip in between.
        for ctx in table:
            await ctx.lock.acquire()
            exp.locked.append(ctx)
        exp.release = loop.call_later(EXPORT_HOLD, self._expire, exp.token)
        jobs = []
        try:
            for i, ctx in enumerate(table):
                entry = {"id": ctx.id, "cwd": ctx.cwd, "envs": ctx.envs, "file": None, "count": 0}
                exp.contexts.append(entry)
                kernel = ctx.kernel
                if kernel is None or not kernel.alive:
                    continue  # nothing to carry: its branches start it fresh
                name = f"{i}.dill"
                data_fd = os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
                status_r, status_w = os.pipe()
                job = Job(False)
                ctx.job = job
                try:
                    kernel.submit(job, "export", {}, fds=(data_fd, status_w))
                finally:
                    os.close(data_fd)
                    os.close(status_w)
                entry["file"] = name
                exp.writers.append(_read_status(loop, status_r))
                jobs.append((entry, job))
            fork_s = 0.0
            for entry, job in jobs:
                event = await _last_event(job)
                if event[0] == "dead" or event[1].get("error"):
                    why = "its kernel died" if event[0] == "dead" else event[1]["error"]
                    entry["file"], entry["error"] = None, str(why)
                    continue
                entry["count"] = event[1].get("count") or 0
                fork_s = max(fork_s, float(event[1].get("fork_s") or 0.0))
        except BaseException:
            self._drop(exp)
            raise
        finally:
            os.close(dir_fd)
        return {"token": exp.token, "dir": exp.dir, "contexts": exp.contexts, "fork_s": fork_s}

    async def finish(self, token: str) -> dict:
        exp = self.exports.pop(token, None)
        if exp is None:
            raise p.RpcError(p.ErrorCode.NOT_FOUND, f"no branch export {token!r} is under way")
        exp.unlock()
        try:
            statuses = await asyncio.wait_for(asyncio.gather(*exp.writers), WRITER_TIMEOUT)
        except TimeoutError:
            raise p.RpcError(p.ErrorCode.TIMEOUT, "writing the code contexts took too long") from None
        writers = iter(statuses)
        for entry in exp.contexts:
            if entry["file"] is None:
                continue
            status = next(writers)
            entry["skipped"] = status.get("skipped") or []
            if not status.get("ok"):
                entry["file"], entry["error"] = None, status.get("error") or "the writer failed"
        return {"token": token, "dir": exp.dir, "contexts": exp.contexts}

    async def restore(self, entries: list) -> dict:
        contexts = self.agent.contexts
        jobs = []
        report = []
        for entry in entries:
            if not isinstance(entry, dict) or type(entry.get("id")) is not str:
                raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, "each context is a map with an 'id'")
            envs = entry.get("envs") if isinstance(entry.get("envs"), dict) else {}
            cwd = entry.get("cwd") if isinstance(entry.get("cwd"), str) else None
            if cwd is not None and not os.path.isdir(cwd):
                cwd = None
            ctx = contexts.adopt(entry["id"], cwd, {str(k): str(v) for k, v in envs.items()})
            item = {"id": ctx.id, "names": [], "error": None}
            report.append(item)
            name = entry.get("file")
            if not isinstance(name, str) or "/" in name or name.startswith("."):
                continue
            await ctx.lock.acquire()
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=STATE_FD)
            except OSError as exc:
                ctx.lock.release()
                item["error"] = f"cannot open the saved namespace: {exc}"
                continue
            job = Job(False)
            ctx.job = job
            try:
                ctx.ensure_kernel(self.agent.reaper).submit(
                    job, "restore", {"count": entry.get("count") or 0}, fds=(fd,)
                )
            finally:
                os.close(fd)
            jobs.append((ctx, item, job))
        for ctx, item, job in jobs:
            try:
                event = await _last_event(job)
            finally:
                ctx.job = None
                ctx.lock.release()
            if event[0] == "dead":
                item["error"] = "the kernel died while loading the namespace"
                continue
            error = event[1].get("error")
            item["names"] = event[1].get("names") or []
            if error:
                item["error"] = (
                    f"{error.get('name')}: {error.get('value')}" if isinstance(error, dict) else str(error)
                )
        return {"contexts": report}

    def _drop(self, exp: _Export) -> None:
        self.exports.pop(exp.token, None)
        exp.unlock()
        for fut in exp.writers:
            fut.cancel()

    def _expire(self, token: str) -> None:
        exp = self.exports.get(token)
        if exp is not None:
            exp.release = None
            exp.expired = True
            exp.unlock()  # the writers' reports stay for a late finish

    async def close(self) -> None:
        for exp in list(self.exports.values()):
            self._drop(exp)


@method("branch.export")
async def _branch_export(agent: Any, conn: Connection, params: dict) -> dict:
    return await agent.branches.export()


@method("branch.finish")
async def _branch_finish(agent: Any, conn: Connection, params: dict) -> dict:
    return await agent.branches.finish(_params.get(params, "token", str))


@method("branch.restore")
async def _branch_restore(agent: Any, conn: Connection, params: dict) -> dict:
    entries = _params.get(params, "contexts", list)
    return await agent.branches.restore(entries)
