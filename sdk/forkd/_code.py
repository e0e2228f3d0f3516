"""The code interpreter (``run_code`` and code contexts) and forkd's ``eval`` fast path.

``code.run`` streams the cell's stdout/stderr on a stream and its display
results as ``code.result`` notifications; the response carries every result,
the error and the execution count. The ``Execution`` is assembled here.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import time
from typing import Any

from . import protocol as p
from ._client import map_error
from ._code_models import Context, Execution, ExecutionError, OutputMessage, Result
from ._exceptions import InvalidArgumentException, SandboxException, TimeoutException
from ._link import Link, call_back

__all__ = ["AsyncCode", "EvalException", "DEFAULT_CODE_TIMEOUT"]

DEFAULT_CODE_TIMEOUT = 300.0
# The agent interrupts a cell at its timeout and answers within ~2 s; past this
# much more the client stops waiting on its own.
_GRACE = 10.0


def execution_timeout_error() -> TimeoutException:
    return TimeoutException("Execution timed out — the 'timeout' option can be used to increase this timeout")


class EvalException(SandboxException):
    """``sbx.eval(expr)`` raised in the sandbox; ``error`` holds its name, value and traceback."""

    def __init__(self, error: ExecutionError) -> None:
        super().__init__(f"{error.name}: {error.value}")
        self.error = error
        self.name = error.name
        self.value = error.value
        self.traceback = error.traceback


def _context_id(context: Context | str) -> str:
    return context.id if isinstance(context, Context) else context


def _error(d: dict | None) -> ExecutionError | None:
    if not d:
        return None
    return ExecutionError(d.get("name", ""), d.get("value", ""), d.get("traceback", ""))


class AsyncCode:
    """The code-interpreter calls of one sandbox."""

    def __init__(self, link: Link) -> None:
        self._link = link

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | None = None,
        on_stdout: Any = None,
        on_stderr: Any = None,
        on_result: Any = None,
        on_error: Any = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = None,
        request_timeout: float | None = None,
    ) -> Execution:
        if context and language:
            raise InvalidArgumentException(
                "You can provide context or language, but not both at the same time."
            )
        run_timeout = None if timeout == 0 else (timeout or DEFAULT_CODE_TIMEOUT)
        client = await self._link.client()
        stream = client.open_stream(p.DEFAULT_WINDOW)
        params: dict[str, Any] = {
            "sandbox_id": self._link.sandbox_id,
            "code": code,
            "stream": stream.id,
            "window": p.DEFAULT_WINDOW,
        }
        if context is not None:
            params["context"] = _context_id(context)
        if language:
            params["language"] = language
        if envs:
            params["envs"] = envs
        if run_timeout is not None:
            params["timeout"] = float(run_timeout)

        execution = Execution()
        displayed: list[Result] = []
        pending: asyncio.Queue = asyncio.Queue()
        client.code_results[stream.id] = pending.put_nowait
        decoders = {
            p.FD_STDOUT: codecs.getincrementaldecoder("utf-8")(errors="replace"),
            p.FD_STDERR: codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }

        async def results_so_far() -> None:
            while not pending.empty():
                result = Result(**pending.get_nowait())
                displayed.append(result)
                if on_result is not None:
                    await call_back(on_result, result)

        async def output(fd: int, text: str) -> None:
            if not text:
                return
            is_err = fd == p.FD_STDERR
            (execution.logs.stderr if is_err else execution.logs.stdout).append(text)
            cb = on_stderr if is_err else on_stdout
            if cb is not None:
                await call_back(cb, OutputMessage(text, time.time_ns(), is_err))

        async def read_stream() -> None:
            async for fd, _offset, data in stream:
                await results_so_far()
                await output(fd, decoders.get(fd, decoders[p.FD_STDOUT]).decode(data))
            for fd, dec in decoders.items():
                await output(fd, dec.decode(b"", final=True))

        async def run() -> Any:
            request = asyncio.ensure_future(client.call("code.run", params, None))
            reader = asyncio.ensure_future(read_stream())
            try:
                await asyncio.wait((request, reader), return_when=asyncio.FIRST_COMPLETED)
                if request.done() and request.exception() is not None and not reader.done():
                    # Refused before running: no stream will follow.
                    return request.result()
                await reader
                if stream.error is not None:
                    raise map_error(stream.error)
                return await request
            finally:
                for task in (request, reader):
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task

        try:
            async with asyncio.timeout(None if run_timeout is None else run_timeout + _GRACE):
                res = await run()
        except TimeoutError:
            raise execution_timeout_error() from None
        finally:
            client.code_results.pop(stream.id, None)
            with contextlib.suppress(Exception):
                await stream.close()
        await results_so_far()

        results = [Result(**r) for r in res.get("results") or []]
        if res.get("omitted_results"):
            main = [r for r in results if r.is_main_result]
            results = displayed + main
        execution.results = results
        execution.execution_count = res.get("execution_count")
        if on_result is not None:
            # The main result comes only in the response, and a display result's
            # notification may trail the response: call back for what was not seen.
            shown = 0
            for r in results:
                if not r.is_main_result:
                    shown += 1
                    if shown <= len(displayed):
                        continue
                await call_back(on_result, r)
        execution.error = _error(res.get("error"))
        if execution.error is not None and on_error is not None:
            await call_back(on_error, execution.error)
        return execution

    async def create_code_context(
        self, cwd: str | None = None, language: str | None = None, request_timeout: float | None = None
    ) -> Context:
        params: dict[str, Any] = {}
        if cwd:
            params["cwd"] = cwd
        if language:
            params["language"] = language
        return Context.from_json(await self._link.call("context.create", params, request_timeout))

    async def list_code_contexts(self, request_timeout: float | None = None) -> list[Context]:
        return [Context.from_json(d) for d in await self._link.call("context.list", {}, request_timeout)]

    async def remove_code_context(self, context: Context | str, request_timeout: float | None = None) -> None:
        await self._link.call("context.remove", {"id": _context_id(context)}, request_timeout)

    async def restart_code_context(
        self, context: Context | str, request_timeout: float | None = None
    ) -> None:
        await self._link.call("context.restart", {"id": _context_id(context)}, request_timeout)

    async def eval(
        self, expr: str, context: Context | str | None = None, request_timeout: float | None = None
    ) -> Any:
        params: dict[str, Any] = {"expr": expr}
        if context is not None:
            params["context"] = _context_id(context)
        res = await self._link.call("code.eval", params, request_timeout)
        err = _error(res.get("error"))
        if err is not None:
            raise EvalException(err)
        value, text = res.get("value"), res.get("text")
        if value is not None or text in (None, "None"):
            return value
        return text
