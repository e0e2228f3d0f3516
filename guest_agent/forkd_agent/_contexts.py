"""Stateful Python code contexts: code.run / code.eval and context.* methods.

Each context owns one kernel process (see _kernel_client.py) whose namespace persists
across runs. A context runs one job at a time; later requests queue on its lock
in arrival order. A kernel that dies or is killed is replaced by a fresh one on
the context's next job (its state is lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from typing import Any

from forkd import protocol as p
from forkd._connection import Connection

from . import _params
from ._kernel_client import Job, Kernel, exit_text
from ._kernel_fork import spawn
from ._methods import component, method
from ._users import resolve_user

log = logging.getLogger("forkd.agent")

__all__ = ["Contexts", "Context", "DEFAULT_CONTEXT"]

DEFAULT_CONTEXT = "default"
LANGUAGE = "python"
# How long a kernel gets to unwind after SIGINT before it is killed (timeouts,
# abandoned runs).
KILL_GRACE = 2.0
# How long to wait for the exit status of a kernel whose channel closed.
_EXIT_WAIT = 2.0
# Response size beyond which display results already sent as code.result
# notifications are left out of the response (a frame carries 4 MiB at most).
_RESPONSE_BUDGET = 3 * 1024 * 1024


class Context:
    def __init__(self, cid: str, cwd: str, envs: dict[str, str]) -> None:
        self.id = cid
        self.language = LANGUAGE
        self.cwd = cwd
        self.envs = envs
        self.kernel: Kernel | None = None
        self.lock = asyncio.Lock()
        self.job: Job | None = None
        self.removed = False

    def describe(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def ensure_kernel(self, reaper: Any) -> Kernel:
        if self.kernel is None or not self.kernel.alive:
            self.kernel = spawn(self.cwd, self.envs, reaper)
        return self.kernel


def _check_language(language: str | None) -> None:
    if language is not None and language != LANGUAGE:
        raise p.RpcError(
            p.ErrorCode.INVALID_ARGUMENT,
            f"language {language!r} is not supported: forkd code contexts run {LANGUAGE}",
        )


def _default_cwd() -> str:
    home = resolve_user(None).home
    return home if os.path.isdir(home) else "/"


@component("contexts")
class Contexts:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self._by_id: dict[str, Context] = {}

    # -- table --
    def create(self, cwd: str | None, envs: dict[str, str], cid: str | None = None) -> Context:
        if cwd is None:
            cwd = _default_cwd()
        elif not os.path.isabs(cwd) or not os.path.isdir(cwd):
            raise p.RpcError(
                p.ErrorCode.INVALID_ARGUMENT, f"cwd {cwd!r} is not an existing absolute directory"
            )
        ctx = Context(cid or str(uuid.uuid4()), cwd, envs)
        ctx.ensure_kernel(self.agent.reaper)
        self._by_id[ctx.id] = ctx
        return ctx

    def adopt(self, cid: str, cwd: str | None, envs: dict[str, str]) -> Context:
        """A context with a given id (a branch's copy of its source's), replacing
        any context of that id; its kernel starts when it is first used."""
        old = self._by_id.pop(cid, None)
        if old is not None:
            old.removed = True
            if old.kernel is not None:
                old.kernel.kill("its context was replaced")
        ctx = Context(cid, cwd or _default_cwd(), envs)
        self._by_id[cid] = ctx
        return ctx

    def get(self, cid: str | None) -> Context:
        cid = cid or DEFAULT_CONTEXT
        ctx = self._by_id.get(cid)
        if ctx is None:
            if cid != DEFAULT_CONTEXT:
                raise p.RpcError(p.ErrorCode.NOT_FOUND, f"code context {cid!r} does not exist")
            ctx = self.create(None, {}, DEFAULT_CONTEXT)
        return ctx

    def find(self, cid: str) -> Context | None:
        """The context, or None for a "default" not created yet; unknown ids are not_found."""
        ctx = self._by_id.get(cid)
        if ctx is None and cid != DEFAULT_CONTEXT:
            raise p.RpcError(p.ErrorCode.NOT_FOUND, f"code context {cid!r} does not exist")
        return ctx

    def list(self) -> list[dict]:
        return [ctx.describe() for ctx in self._by_id.values()]

    def remove(self, cid: str) -> None:
        ctx = self._by_id.pop(cid, None)
        if ctx is None:
            raise p.RpcError(p.ErrorCode.NOT_FOUND, f"code context {cid!r} does not exist")
        ctx.removed = True
        if ctx.kernel is not None:
            ctx.kernel.kill("its context was removed")

    def restart(self, cid: str) -> Context:
        ctx = self.find(cid)
        if ctx is None:  # a default context not used yet: new is as fresh as restarted
            return self.get(cid)
        old, ctx.kernel = ctx.kernel, None
        if old is not None:
            old.kill("its context was restarted")
        ctx.ensure_kernel(self.agent.reaper)
        return ctx

    # -- jobs --
    async def execute(
        self,
        ctx: Context,
        conn: Connection | None,
        op: str,
        params: dict,
        *,
        output: bool,
        on_event=None,
        timeout: float | None = None,
    ) -> tuple[tuple, Job]:
        """Run one job on the context's kernel; returns its last event
        (("done", payload) or ("dead",)) and the job.

        ``on_event`` is awaited for each ("out", ...) and ("result", ...) event.
        If this coroutine fails or is cancelled while the kernel still runs the
        job, the job is interrupted and finished in the background; the context
        stays locked until its kernel is idle again.
        """
        await ctx.lock.acquire()
        try:
            if ctx.removed:  # while this request waited for the context
                raise p.RpcError(p.ErrorCode.NOT_FOUND, f"code context {ctx.id!r} was removed")
            kernel = ctx.ensure_kernel(self.agent.reaper)
        except BaseException:
            self._release(ctx)
            raise
        job = Job(output, conn)
        timer = None
        try:
            ctx.job = job
            kernel.submit(job, op, params)
            if timeout:
                timer = asyncio.get_running_loop().call_later(timeout, self._on_timeout, kernel, job)
            while True:
                event = await job.next()
                if event[0] in ("done", "dead"):
                    break
                if on_event is not None:
                    await on_event(event)
        except BaseException:
            if not job.finished:
                job.output = False
                asyncio.ensure_future(self._abandon(ctx, job))
                raise
            self._release(ctx)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._release(ctx)
        return event, job

    def _release(self, ctx: Context) -> None:
        ctx.job = None
        ctx.lock.release()

    async def _abandon(self, ctx: Context, job: Job) -> None:
        """Stop a job nobody waits for any more, then free its context."""
        try:
            self._interrupt(job, escalate=True)
            while (await job.next())[0] not in ("done", "dead"):
                pass
        except Exception:
            log.exception("finishing an abandoned code job failed")
        finally:
            self._release(ctx)

    def _on_timeout(self, kernel: Kernel, job: Job) -> None:
        if not job.finished:
            job.timed_out = True
            self._interrupt(job, escalate=True)

    def _interrupt(self, job: Job, escalate: bool) -> bool:
        kernel = job.kernel
        if escalate and job.escalated:
            return not job.finished
        if kernel is None or not kernel.interrupt(job):
            return False
        if escalate:
            job.escalated = True
            asyncio.get_running_loop().call_later(KILL_GRACE, self._kill_stuck, kernel, job)
        return True

    def _kill_stuck(self, kernel: Kernel, job: Job) -> None:
        if not job.finished:
            job.killed = True
            kernel.kill(f"it did not stop within {KILL_GRACE:g} s of an interrupt")

    async def death_error(self, job: Job) -> dict:
        """The execution error of a job whose kernel died under it."""
        kernel = job.kernel
        assert kernel is not None
        if not kernel.exited.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(kernel.exited), _EXIT_WAIT)
        if kernel.stop_reason:
            what = f"the kernel was stopped because {kernel.stop_reason}"
        else:
            what = f"the kernel {exit_text(kernel.status)} while running this code"
        return {
            "name": "DeadKernelError",
            "value": f"{what}; the context's state is lost and its next run starts a fresh kernel",
            "traceback": "",
        }

    # -- run --
    async def run(
        self,
        ctx: Context,
        conn: Connection,
        stream: int,
        code: str,
        envs: dict[str, str],
        timeout: float | None,
    ) -> dict:
        offsets = {p.FD_STDOUT: 0, p.FD_STDERR: 0}
        results: list[dict] = []
        sizes: list[int] = []

        async def on_event(event: tuple) -> None:
            if event[0] == "out":
                _, fd, data = event
                await conn.send_stream(stream, fd, offsets[fd], data)
                offsets[fd] += len(data)
            elif event[0] == "result":
                result, size = event[1], event[2]
                if not isinstance(result, dict):
                    return
                if not result.get("is_main_result"):
                    await conn.notify("code.result", {"stream": stream, "result": result})
                results.append(result)
                sizes.append(size)

        try:
            last, job = await self.execute(
                ctx,
                conn,
                "run",
                {"code": code, "envs": envs},
                output=True,
                on_event=on_event,
                timeout=timeout,
            )
        except BaseException:
            if not conn.closed.is_set():
                asyncio.ensure_future(_end_quietly(conn, stream))
            raise
        if last[0] == "dead":
            # A kernel killed for ignoring a timeout's interrupt is reported as the timeout below.
            error = None if job.killed and job.timed_out else await self.death_error(job)
            count = None
        else:
            error, count = last[1].get("error"), last[1].get("execution_count")
        await conn.end_stream(stream)
        if job.timed_out and (job.killed or (error or {}).get("name") == "KeyboardInterrupt"):
            if job.killed:
                raise p.RpcError(
                    p.ErrorCode.TIMEOUT,
                    f"code.run timed out after {timeout:g} s and its kernel did not stop within "
                    f"{KILL_GRACE:g} s of the interrupt, so it was killed: the context's state is lost "
                    "and its next run starts a fresh kernel",
                )
            raise p.RpcError(
                p.ErrorCode.TIMEOUT,
                f"code.run timed out after {timeout:g} s; the code was interrupted and the context "
                "keeps its state",
            )
        response: dict[str, Any] = {"results": results, "error": error, "execution_count": count}
        if sum(sizes) > _RESPONSE_BUDGET:
            # Display results already reached the client as notifications; keep the main one.
            response["results"] = [r for r in results if r.get("is_main_result")]
            response["omitted_results"] = len(results) - len(response["results"])
        return response

    async def eval(self, ctx: Context, expr: str) -> dict:
        last, job = await self.execute(ctx, None, "eval", {"expr": expr}, output=False)
        if last[0] == "dead":
            return {"text": None, "value": None, "error": await self.death_error(job)}
        payload = last[1]
        return {"text": payload.get("text"), "value": payload.get("value"), "error": payload.get("error")}

    def interrupt(self, ctx: Context) -> bool:
        job = ctx.job
        return job is not None and self._interrupt(job, escalate=False)

    async def reseed(self, entropy: bytes) -> int:
        """Give every live kernel's `random` (and numpy.random's global state if
        numpy is imported there) a fresh seed derived from ``entropy``, distinct
        per kernel. A busy kernel applies it when its current job ends, before
        any later job. Returns the number of kernels reseeded."""
        n = 0
        for ctx in self._by_id.values():
            kernel = ctx.kernel
            if kernel is None or not kernel.alive:
                continue
            seed = hashlib.sha256(
                b"forkd-kernel-seed\0" + entropy + b"\0" + ctx.id.encode() + kernel.pid.to_bytes(8, "big")
            ).digest()
            kernel.reseed(seed)
            n += 1
        return n

    # -- agent hooks --
    def drop_connection(self, conn: Connection) -> None:
        for ctx in self._by_id.values():
            job = ctx.job
            if job is not None and job.conn is conn:
                self._interrupt(job, escalate=True)

    async def close(self) -> None:
        for ctx in self._by_id.values():
            if ctx.kernel is not None:
                ctx.kernel.close()
        self._by_id.clear()


async def _end_quietly(conn: Connection, stream: int) -> None:
    with contextlib.suppress(Exception):
        await conn.end_stream(stream)


# -- methods ------------------------------------------------------------------


def _contexts(agent: Any) -> Contexts:
    return agent.contexts


@method("context.create")
async def _context_create(agent: Any, conn: Connection, params: dict) -> dict:
    cwd = _params.get(params, "cwd", str, None)
    language = _params.get(params, "language", str, None)
    envs = _params.get_str_map(params, "envs")
    _check_language(language)
    return _contexts(agent).create(cwd, envs).describe()


@method("context.list")
async def _context_list(agent: Any, conn: Connection, params: dict) -> list:
    return _contexts(agent).list()


@method("context.remove")
async def _context_remove(agent: Any, conn: Connection, params: dict) -> dict:
    _contexts(agent).remove(_params.get(params, "id", str))
    return {}


@method("context.restart")
async def _context_restart(agent: Any, conn: Connection, params: dict) -> dict:
    return _contexts(agent).restart(_params.get(params, "id", str)).describe()


@method("code.run")
async def _code_run(agent: Any, conn: Connection, params: dict) -> dict:
    code = _params.get(params, "code", str)
    cid = _params.get(params, "context", str, None)
    language = _params.get(params, "language", str, None)
    stream = _params.get_int(params, "stream", minimum=0)
    window = _params.get_int(params, "window", p.DEFAULT_WINDOW, minimum=1)
    timeout = _params.get_number(params, "timeout", None)
    envs = _params.get_str_map(params, "envs")
    if cid is not None and language is not None:
        raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, "pass either a context or a language, not both")
    _check_language(language)
    if timeout is not None and timeout < 0:
        raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, "parameter 'timeout' must be >= 0")
    contexts = _contexts(agent)
    ctx = contexts.get(cid)
    conn.open_outbound(stream, window)
    # No await before execute() takes the context's lock: runs keep arrival order.
    return await contexts.run(ctx, conn, stream, code, envs, timeout or None)


@method("code.eval")
async def _code_eval(agent: Any, conn: Connection, params: dict) -> dict:
    expr = _params.get(params, "expr", str)
    cid = _params.get(params, "context", str, None)
    contexts = _contexts(agent)
    return await contexts.eval(contexts.get(cid), expr)


@method("code.interrupt")
async def _code_interrupt(agent: Any, conn: Connection, params: dict) -> dict:
    cid = _params.get(params, "context", str, DEFAULT_CONTEXT)
    contexts = _contexts(agent)
    ctx = contexts.find(cid)
    return {"interrupted": ctx is not None and contexts.interrupt(ctx)}
