"""``AsyncSandbox``: the one implementation of the sandbox API (``Sandbox`` wraps it).

Lifecycle calls go to the gateway (``sandbox.*``); calls into the sandbox
(``exec.*``, ``files.*``, ``context.*``, ``code.*``) carry its id and are relayed
to its agent. All of them travel on the shared connection (see ``_client``).
"""

from __future__ import annotations

from datetime import UTC
from typing import Any, Self

from ._branching import (
    AsyncSnapshotPaginator,
    branch_call,
    check_mode,
    create_snapshot_call,
    delete_snapshot_call,
)
from ._client import gateway_call
from ._code import AsyncCode
from ._code_models import Context, Execution
from ._commands import AsyncCommands, AsyncPty
from ._config import ConnectionConfig, config_from
from ._dual import dual
from ._exceptions import InvalidArgumentException, SandboxNotFoundException
from ._files import AsyncFilesystem
from ._link import Link
from ._models import BranchReport, SandboxInfo, SandboxQuery, SandboxState, SnapshotInfo
from ._paging import AsyncPages

__all__ = ["AsyncSandbox", "AsyncSandboxPaginator", "DEFAULT_TEMPLATE", "DEFAULT_SANDBOX_TIMEOUT"]

DEFAULT_TEMPLATE = "base"
DEFAULT_SANDBOX_TIMEOUT = 300


class AsyncSandboxPaginator(AsyncPages):
    """Pages of ``AsyncSandbox.list()``: ``while p.has_next: items = await p.next_items()``."""

    def __init__(
        self,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: str | None = None,
        **opts: Any,
    ) -> None:
        if order is not None and order not in ("asc", "desc"):
            raise InvalidArgumentException(f"Invalid order {order!r}, expected 'asc' or 'desc'")
        super().__init__(next_token, opts)
        self.query = query
        self.limit = limit
        self.order = order
        self._opts = opts

    def _params(self) -> dict:
        params: dict[str, Any] = {}
        q = self.query
        if q is not None and q.metadata:
            params["metadata"] = dict(q.metadata)
        if q is not None and q.state:
            params["state"] = [SandboxState(s).value if not isinstance(s, str) else str(s) for s in q.state]
        if self.limit:
            params["limit"] = self.limit
        return params

    def _keep(self, info: SandboxInfo) -> bool:
        q = self.query
        if q is None:
            return True
        if q.template and q.template not in (info.template_id, info.name):
            return False
        if q.started_after is not None:
            after = q.started_after
            if after.tzinfo is None:
                after = after.astimezone()
            if info.started_at < after.astimezone(UTC):
                return False
        return True

    def _page(self, raw: list[dict]) -> list[SandboxInfo]:
        items = [SandboxInfo._from_wire(d) for d in raw]
        items = [i for i in items if self._keep(i)]
        if self.order == "desc":
            items.sort(key=lambda i: i.started_at, reverse=True)
        elif self.order == "asc":
            items.sort(key=lambda i: i.started_at)
        return items

    async def next_items(self, **opts: Any) -> list[SandboxInfo]:
        """The next page. Past the last page: ``Exception("No more items to fetch")``."""
        return self._page(await self._fetch("sandbox.list", self._params(), opts))


class AsyncSandbox:
    """A forkd sandbox (async API). Create one with ``await AsyncSandbox.create()``.

    The same class serves as E2B's ``e2b.AsyncSandbox`` and
    ``e2b_code_interpreter.AsyncSandbox``: it has ``run_code`` and the code
    context calls, plus forkd's ``eval``.
    """

    default_template = DEFAULT_TEMPLATE
    default_sandbox_timeout = DEFAULT_SANDBOX_TIMEOUT

    def __init__(
        self,
        sandbox_id: str,
        connection_config: ConnectionConfig | None = None,
        info: SandboxInfo | None = None,
        **opts: Any,
    ) -> None:
        self._sandbox_id = sandbox_id
        self._config = connection_config or config_from(**opts)
        self._info = info
        # forkd extension: what the last fork()/branch() of this sandbox captured, and, on a
        # sandbox made by one, the report of the branch that made it.
        self.last_branch_report: BranchReport | None = None
        self.branch_report: BranchReport | None = None
        link = Link(sandbox_id, self._config)
        self._link = link
        self._commands = AsyncCommands(link)
        self._files = AsyncFilesystem(link)
        self._pty = AsyncPty(link)
        self._code = AsyncCode(link)

    # -- properties ------------------------------------------------------------
    @property
    def sandbox_id(self) -> str:
        """Unique id of the sandbox."""
        return self._sandbox_id

    @property
    def commands(self) -> AsyncCommands:
        """Run commands in the sandbox."""
        return self._commands

    @property
    def files(self) -> AsyncFilesystem:
        """The sandbox filesystem."""
        return self._files

    @property
    def pty(self) -> AsyncPty:
        """Interactive terminals."""
        return self._pty

    @property
    def connection_config(self) -> ConnectionConfig:
        """Gateway URL, API key and timeouts this sandbox uses."""
        return self._config

    @property
    def sandbox_domain(self) -> str | None:
        return self._config.domain

    def get_host(self, port: int) -> str:
        """A host name for ``port`` of the sandbox, in E2B's ``{port}-{sandbox_id}.{domain}`` form."""
        return self._config.get_host(self._sandbox_id, port)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._sandbox_id}>"

    # -- lifecycle -------------------------------------------------------------
    @classmethod
    async def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool | None = None,
        allow_internet_access: bool | None = None,
        mcp: Any = None,
        network: Any = None,
        iam: Any = None,
        lifecycle: Any = None,
        volume_mounts: Any = None,
        logger: Any = None,
        idempotency_key: str | None = None,
        **opts: Any,
    ) -> Self:
        """Create a sandbox from ``template`` (default ``"base"``) that lives ``timeout`` seconds (default 300).

        ``envs`` are default environment variables of every command and code
        context in it; ``metadata`` is kept and used by ``list`` filters.
        """
        # Ignoring these silently could, for `network`, let out traffic a caller meant to block.
        for name, value in (
            ("mcp", mcp),
            ("network", network),
            ("iam", iam),
            ("volume_mounts", volume_mounts),
        ):
            if value:
                raise InvalidArgumentException(f"forkd does not support the {name!r} option of create()")
        if lifecycle and (lifecycle.get("on_timeout") not in (None, "kill") or lifecycle.get("auto_resume")):
            raise InvalidArgumentException("forkd sandboxes are killed when their timeout expires (no pause)")
        config = config_from(**opts)
        params: dict[str, Any] = {
            "template": template or cls.default_template,
            "timeout": timeout if timeout is not None else cls.default_sandbox_timeout,
        }
        if metadata:
            params["metadata"] = dict(metadata)
        if envs:
            params["envs"] = dict(envs)
        if allow_internet_access is not None:
            params["allow_internet_access"] = allow_internet_access
        if secure is not None:
            params["secure"] = secure
        info = SandboxInfo._from_wire(await gateway_call("sandbox.create", params, config))
        return cls(info.sandbox_id, config, info)

    @classmethod
    async def _cls_connect(
        cls, sandbox_id: str, timeout: int | None = None, *, on_resume: str = "restore", **opts: Any
    ) -> Self:
        config = config_from(**opts)
        res = await gateway_call("sandbox.connect", {"sandbox_id": sandbox_id, "timeout": timeout}, config)
        return cls(sandbox_id, config, SandboxInfo._from_wire(res))

    @dual("_cls_connect")
    async def connect(self, timeout: int | None = None, *, on_resume: str = "restore", **opts: Any) -> Self:
        """Connect to a running sandbox (``AsyncSandbox.connect(sandbox_id)`` or ``sbx.connect()``).

        Missing id: SandboxNotFoundException. ``timeout`` extends the sandbox's
        timeout if it is longer than what is left.
        """
        config = self._config.with_options(**opts)
        await gateway_call("sandbox.connect", {"sandbox_id": self._sandbox_id, "timeout": timeout}, config)
        return self

    @classmethod
    async def _cls_kill(cls, sandbox_id: str, **opts: Any) -> bool:
        return bool(await gateway_call("sandbox.kill", {"sandbox_id": sandbox_id}, config_from(**opts)))

    @dual("_cls_kill")
    async def kill(self, **opts: Any) -> bool:
        """Kill the sandbox. False if it did not exist (anymore)."""
        config = self._config.with_options(**opts)
        return bool(await gateway_call("sandbox.kill", {"sandbox_id": self._sandbox_id}, config))

    @classmethod
    async def _cls_set_timeout(cls, sandbox_id: str, timeout: int, **opts: Any) -> None:
        await gateway_call(
            "sandbox.set_timeout", {"sandbox_id": sandbox_id, "timeout": timeout}, config_from(**opts)
        )

    @dual("_cls_set_timeout")
    async def set_timeout(self, timeout: int, **opts: Any) -> None:
        """Make the sandbox expire ``timeout`` seconds from now (shorter or longer than before)."""
        config = self._config.with_options(**opts)
        await gateway_call(
            "sandbox.set_timeout", {"sandbox_id": self._sandbox_id, "timeout": timeout}, config
        )

    @classmethod
    async def _cls_get_info(cls, sandbox_id: str, **opts: Any) -> SandboxInfo:
        return SandboxInfo._from_wire(
            await gateway_call("sandbox.info", {"sandbox_id": sandbox_id}, config_from(**opts))
        )

    @dual("_cls_get_info")
    async def get_info(self, **opts: Any) -> SandboxInfo:
        """SandboxInfo of the sandbox. Missing: SandboxNotFoundException."""
        config = self._config.with_options(**opts)
        return SandboxInfo._from_wire(
            await gateway_call("sandbox.info", {"sandbox_id": self._sandbox_id}, config)
        )

    async def is_running(self, request_timeout: float | None = None) -> bool:
        """Whether the sandbox is still running."""
        try:
            res = await gateway_call(
                "sandbox.info", {"sandbox_id": self._sandbox_id}, self._config, request_timeout
            )
        except SandboxNotFoundException:
            return False
        return (res.get("state") or "running") == "running"

    @classmethod
    def list(
        cls,
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        order: str | None = None,
        **opts: Any,
    ) -> AsyncSandboxPaginator:
        """Your sandboxes, a page at a time: ``while p.has_next: await p.next_items()``."""
        return AsyncSandboxPaginator(query=query, limit=limit, next_token=next_token, order=order, **opts)

    # -- BRANCH and snapshots ------------------------------------------------------
    @classmethod
    async def _branch(
        cls, sandbox_id: str, count: int | None, timeout: int | None, config: ConnectionConfig
    ) -> tuple[list[Self | Exception], BranchReport]:
        results, report = await branch_call(sandbox_id, count, timeout, config)
        out: list[Self | Exception] = []
        for r in results:
            if isinstance(r, SandboxInfo):
                child = cls(r.sandbox_id, config, r)
                child.branch_report = report
                out.append(child)
            else:
                out.append(r)
        return out, report

    @classmethod
    async def _cls_fork(
        cls,
        sandbox_id: str,
        timeout: int | None = None,
        count: int | None = None,
        logger: Any = None,
        **opts: Any,
    ) -> list[Self | Exception]:
        forks, _ = await cls._branch(sandbox_id, count, timeout, config_from(**opts))
        return forks

    @dual("_cls_fork")
    async def fork(
        self, timeout: int | None = None, count: int | None = None, **opts: Any
    ) -> list[Self | Exception]:
        """E2B's fork: ``count`` (default 1, at most 64) new sandboxes that inherit this one's
        state at this instant (forkd's BRANCH: one capture, then the children); this sandbox
        keeps running. One entry per requested fork: a running sandbox, or the exception that
        stopped that one. The children live ``timeout`` seconds (default 300) and keep this
        sandbox's template, metadata and envs. What they did not inherit: ``last_branch_report``.

        Also ``AsyncSandbox.fork(sandbox_id, timeout=None, count=None)``.
        """
        forks, report = await type(self)._branch(
            self._sandbox_id, count, timeout, self._config.with_options(**opts)
        )
        self.last_branch_report = report
        return forks

    @classmethod
    async def _cls_branch(
        cls, sandbox_id: str, count: int = 1, timeout: int | None = None, **opts: Any
    ) -> list[Self]:
        forks, _ = await cls._branch(sandbox_id, count, timeout, config_from(**opts))
        return await _all_or_nothing(forks)

    @dual("_cls_branch")
    async def branch(self, count: int = 1, timeout: int | None = None, **opts: Any) -> list[Self]:
        """forkd extension: like ``fork``, but all or nothing: the ``count`` new sandboxes, or, if
        any of them failed to start, the first failure raised (the ones that did start are
        killed first). ``last_branch_report`` says what the children did not inherit.

        Also ``AsyncSandbox.branch(sandbox_id, count=1, timeout=None)``.
        """
        forks, report = await type(self)._branch(
            self._sandbox_id, count, timeout, self._config.with_options(**opts)
        )
        self.last_branch_report = report
        return await _all_or_nothing(forks)

    @classmethod
    async def _cls_create_snapshot(
        cls, sandbox_id: str, name: str | None = None, *, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        check_mode(mode)
        return await create_snapshot_call(sandbox_id, name, config_from(**opts))

    @dual("_cls_create_snapshot")
    async def create_snapshot(
        self, name: str | None = None, *, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        """A snapshot of this sandbox as it is now (it keeps running): start any number of
        sandboxes from it later with ``AsyncSandbox.create(template=info.snapshot_id)`` (or its
        ``name``). A name already used by another of your snapshots moves to this one. Snapshots
        last until ``delete_snapshot`` or until the gateway stops.

        Also ``AsyncSandbox.create_snapshot(sandbox_id, name=None)``.
        """
        check_mode(mode)
        return await create_snapshot_call(self._sandbox_id, name, self._config.with_options(**opts))

    @classmethod
    def _cls_list_snapshots(
        cls,
        sandbox_id: str | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> AsyncSnapshotPaginator:
        return AsyncSnapshotPaginator(sandbox_id, limit, next_token, name, **opts)

    @dual("_cls_list_snapshots")
    def list_snapshots(
        self, limit: int | None = None, next_token: str | None = None, name: str | None = None, **opts: Any
    ) -> AsyncSnapshotPaginator:
        """This sandbox's snapshots, a page at a time (``AsyncSandbox.list_snapshots()``: all of yours)."""
        return AsyncSnapshotPaginator(
            self._sandbox_id, limit, next_token, name, **self._config.get_api_params(**opts)
        )

    @classmethod
    async def delete_snapshot(cls, snapshot_id: str, **opts: Any) -> bool:
        """Delete one of your snapshots: True, or False if there is none with this id. A snapshot
        that sandboxes (or snapshots of them) still depend on is not deleted:
        ``ConflictException`` names them."""
        return await delete_snapshot_call(snapshot_id, config_from(**opts))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        await self.kill()

    # -- code interpreter ---------------------------------------------------------
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
        """Run a notebook cell: state persists per context; the last expression is the main result.

        ``language`` and ``context`` are exclusive (InvalidArgumentException).
        ``timeout`` defaults to 300 s (0 = no limit). Callbacks may be coroutine functions.
        """
        return await self._code.run_code(
            code, language, context, on_stdout, on_stderr, on_result, on_error, envs, timeout, request_timeout
        )

    async def create_code_context(
        self, cwd: str | None = None, language: str | None = None, request_timeout: float | None = None
    ) -> Context:
        """A new code context (its own interpreter), working in ``cwd`` (default the user's home)."""
        return await self._code.create_code_context(cwd, language, request_timeout)

    async def list_code_contexts(self) -> list[Context]:
        """The existing code contexts."""
        return await self._code.list_code_contexts()

    async def remove_code_context(self, context: Context | str) -> None:
        """Remove a code context (kills its interpreter)."""
        await self._code.remove_code_context(context)

    async def restart_code_context(self, context: Context | str) -> None:
        """Restart a code context with a fresh interpreter state."""
        await self._code.restart_code_context(context)

    async def eval(
        self, expr: str, context: Context | str | None = None, request_timeout: float | None = None
    ) -> Any:
        """forkd extension: evaluate one Python expression in the warm interpreter.

        Returns the value when it is plain data (numbers, strings, bytes, lists,
        dicts...), else its ``repr`` text. An exception raises ``EvalException``.
        """
        return await self._code.eval(expr, context, request_timeout)


async def _all_or_nothing(forks: list[Any]) -> list[Any]:
    failed = [f for f in forks if isinstance(f, Exception)]
    if not failed:
        return forks
    for f in forks:
        if not isinstance(f, Exception):
            try:
                await f.kill()
            except Exception:  # the error the caller gets is the branch's, not this one
                pass
    raise failed[0]
