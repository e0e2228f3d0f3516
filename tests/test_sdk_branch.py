"""fork / branch / snapshots through the SDK, sync and async, against a real gateway (uvicorn, websockets,
process backend) with two API keys.

The gateway runs on the sync API's background loop, so ``Sandbox`` and ``AsyncSandbox`` (on the test's
own loop) both reach it over websockets, as user programs do.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from forkd import (
    AsyncSandbox,
    AsyncSnapshotPaginator,
    BranchReport,
    ConflictException,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SnapshotInfo,
    SnapshotPaginator,
    TemplateException,
    _portal,
)
from forkd._sandbox import _all_or_nothing

ALICE, BOB = "sdk-branch-alice", "sdk-branch-bob"


@pytest.fixture(scope="module")
def url(template_store, tmp_path_factory):
    from forkd_gateway._app import running_server
    from forkd_gateway._auth import ApiKeys
    from forkd_gateway._config import GatewayConfig, PoolConfig
    from forkd_gateway._gateway import Gateway

    state = tmp_path_factory.mktemp("sdk-branch")
    gateway = Gateway(
        GatewayConfig(
            backend="process",
            state_dir=state,
            templates_dir=Path(template_store.root).parent,
            pools={"base": PoolConfig(min_ready=2, max_total=32)},
            keys=ApiKeys({"alice": ALICE, "bob": BOB}),
            heartbeat=0,
        )
    )
    stack = contextlib.AsyncExitStack()

    async def start() -> str:
        await gateway.start()
        stack.push_async_callback(gateway.close)
        return await stack.enter_async_context(running_server(gateway))

    yield _portal.run(start())
    _portal.run(stack.aclose())


@pytest.fixture
def alice(url):
    return {"url": url, "api_key": ALICE}


@pytest.fixture
def bob(url):
    return {"url": url, "api_key": BOB}


# -- sync ------------------------------------------------------------------------------


def test_fork_returns_one_sandbox_per_requested_fork(alice):
    with Sandbox.create(**alice) as sbx:
        sbx.files.write("state.txt", "before the fork")
        forks = sbx.fork(count=2)
        try:
            assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
            assert [f.files.read("state.txt") for f in forks] == ["before the fork"] * 2
            report = sbx.last_branch_report
            assert isinstance(report, BranchReport) and report.pause_ms >= 0 and "files" in report.inherited
            assert forks[0].branch_report == report
            (static,) = Sandbox.fork(sbx.sandbox_id, **alice)  # E2B's static form; count defaults to 1
            assert static.files.read("state.txt") == "before the fork"
            static.kill()
            sbx.files.write("state.txt", "changed")  # the source goes on; the forks keep theirs
            assert forks[0].files.read("state.txt") == "before the fork"
        finally:
            for f in forks:
                f.kill()
        for count in (0, 65, True):
            with pytest.raises(InvalidArgumentException):
                sbx.fork(count=count)


def test_branch_inherits_files_and_code_state(alice):
    with Sandbox.create(**alice) as sbx:
        sbx.files.write("/tmp/data.txt", "41")
        kids = sbx.branch(count=2, timeout=60)
        try:
            assert len(kids) == 2
            for kid in kids:
                assert kid.commands.run("cat /tmp/data.txt").stdout == "41"
                assert 55 < (kid.get_info().end_at - kid.get_info().started_at).total_seconds() <= 61
        finally:
            for kid in kids:
                kid.kill()


def test_branch_inherits_a_code_context_variable_sync(alice):
    with Sandbox.create(**alice) as sbx:
        sbx.run_code("x = 41")
        kids = sbx.branch(count=2)
        try:
            assert [k.run_code("x + 1").text for k in kids] == ["42", "42"]
            kids[0].run_code("x = 0")
            assert kids[1].run_code("x").text == "41" and sbx.run_code("x").text == "41"
        finally:
            for kid in kids:
                kid.kill()


def test_snapshot_lifecycle_sync(alice, bob):
    with Sandbox.create(**alice) as sbx:
        sbx.files.write("/tmp/kept.txt", "kept")
        info = sbx.create_snapshot()
        assert isinstance(info, SnapshotInfo) and info.snapshot_id.startswith("snap-") and info.names == []
        assert info.sandbox_id == sbx.sandbox_id and info.template_id == "base"
        child = Sandbox.create(template=info.snapshot_id, **alice)
        assert child.files.read("/tmp/kept.txt") == "kept"

        pages = sbx.list_snapshots(limit=10)
        assert isinstance(pages, SnapshotPaginator)
        assert [s.snapshot_id for s in pages.next_items()] == [info.snapshot_id] and not pages.has_next
        with pytest.raises(Exception, match="No more items"):
            pages.next_items()
        assert Sandbox.list_snapshots(**bob).next_items() == []

        with pytest.raises(ConflictException, match=child.sandbox_id):
            Sandbox.delete_snapshot(info.snapshot_id, **alice)
        assert Sandbox.delete_snapshot(info.snapshot_id, **bob) is False
        child.kill()
        assert Sandbox.delete_snapshot(info.snapshot_id, **alice) is True
        assert Sandbox.delete_snapshot(info.snapshot_id, **alice) is False
        with pytest.raises(TemplateException):
            Sandbox.create(template=info.snapshot_id, **alice)


def test_errors_sync(alice, bob):
    sbx = Sandbox.create(**alice)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork(sbx.sandbox_id, **bob)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot(sbx.sandbox_id, **bob)
    with pytest.raises(InvalidArgumentException):
        sbx.create_snapshot(mode="filesystem")
    sbx.kill()
    with pytest.raises(SandboxNotRunningException):
        sbx.fork()
    with pytest.raises(SandboxNotRunningException):
        sbx.branch()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.branch("sbx-0000000000000000", **alice)


# -- async -----------------------------------------------------------------------------


async def test_async_fork_branch_and_chain(alice):
    sbx = await AsyncSandbox.create(**alice)
    try:
        await sbx.files.write("/tmp/depth", "0")
        forks = await AsyncSandbox.fork(sbx.sandbox_id, count=2, **alice)
        assert len(forks) == 2 and all(isinstance(f, AsyncSandbox) for f in forks)
        assert forks[0].branch_report is not None and forks[0].branch_report.pause_ms >= 0
        for f in forks:
            await f.kill()

        chain = [sbx]
        for depth in range(1, 6):
            await chain[-1].files.write(f"/tmp/step{depth}", str(depth))
            (kid,) = await chain[-1].branch()
            chain.append(kid)
        out = await chain[-1].commands.run("cat /tmp/step1 /tmp/step2 /tmp/step3 /tmp/step4 /tmp/step5")
        assert out.stdout == "12345"
        assert chain[-2].last_branch_report is chain[-1].branch_report
        for kid in chain[1:]:
            await kid.kill()
    finally:
        await sbx.kill()


async def test_async_branch_inherits_a_code_context_variable(alice):
    sbx = await AsyncSandbox.create(**alice)
    try:
        await sbx.run_code("x = 41")
        kids = await sbx.branch(count=2)
        assert [(await k.run_code("x + 1")).text for k in kids] == ["42", "42"]
        for kid in kids:
            await kid.kill()
    finally:
        await sbx.kill()


async def test_async_concurrent_branches(alice):
    sources = await asyncio.gather(*(AsyncSandbox.create(**alice) for _ in range(3)))
    try:
        await asyncio.gather(*(s.files.write("/tmp/who", s.sandbox_id) for s in sources))
        families = await asyncio.gather(*(s.branch(count=2) for s in sources))
        for source, kids in zip(sources, families, strict=True):
            assert [await k.files.read("/tmp/who") for k in kids] == [source.sandbox_id] * 2
            await asyncio.gather(*(k.kill() for k in kids))
    finally:
        await asyncio.gather(*(s.kill() for s in sources))


async def test_async_snapshot_lifecycle(alice, bob):
    sbx = await AsyncSandbox.create(**alice)
    try:
        await sbx.files.write("/tmp/kept.txt", "kept")
        named = await sbx.create_snapshot("async-snap")
        assert named.names == ["async-snap"] and named.created_at is not None
        plain = await AsyncSandbox.create_snapshot(sbx.sandbox_id, **alice)
        child = await AsyncSandbox.create(template="async-snap", **alice)
        assert await child.files.read("/tmp/kept.txt") == "kept"

        pages = AsyncSandbox.list_snapshots(sandbox_id=sbx.sandbox_id, limit=1, **alice)
        assert isinstance(pages, AsyncSnapshotPaginator)
        seen = []
        while pages.has_next:
            seen += [s.snapshot_id for s in await pages.next_items()]
        assert seen == [named.snapshot_id, plain.snapshot_id]
        found = await sbx.list_snapshots(name="async-snap").next_items()
        assert [s.snapshot_id for s in found] == [named.snapshot_id]

        with pytest.raises(ConflictException):
            await AsyncSandbox.delete_snapshot(named.snapshot_id, **alice)
        with pytest.raises(TemplateException):
            await AsyncSandbox.create(template=named.snapshot_id, **bob)
        await child.kill()
        assert await AsyncSandbox.delete_snapshot(named.snapshot_id, **alice) is True
        assert await AsyncSandbox.delete_snapshot(named.snapshot_id, **alice) is False
        assert await AsyncSandbox.delete_snapshot(plain.snapshot_id, **alice) is True
    finally:
        await sbx.kill()


async def test_async_errors(alice, bob):
    sbx = await AsyncSandbox.create(**alice)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.fork(sbx.sandbox_id, **bob)
    with pytest.raises(InvalidArgumentException):
        await sbx.fork(count=0)
    await sbx.kill()
    with pytest.raises(SandboxNotRunningException):
        await sbx.fork()
    with pytest.raises(SandboxNotRunningException):
        await sbx.create_snapshot()
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.fork("sbx-0000000000000000", **alice)


async def test_branch_is_all_or_nothing():
    killed = []

    class Started:
        async def kill(self):
            killed.append(self)

    ok, also_ok = Started(), Started()
    first, second = SandboxException("first"), SandboxException("second")
    with pytest.raises(SandboxException, match="first"):
        await _all_or_nothing([ok, first, also_ok, second])
    assert killed == [ok, also_ok]
    assert await _all_or_nothing([ok]) == [ok]


def test_e2b_module_paths_of_snapshot_names():
    from forkd.sandbox.sandbox_api import SnapshotInfo as Info
    from forkd.sandbox_async.paginator import AsyncSnapshotPaginator as AsyncPages
    from forkd.sandbox_sync.paginator import SnapshotPaginator as Pages

    assert (Info, AsyncPages, Pages) == (SnapshotInfo, AsyncSnapshotPaginator, SnapshotPaginator)
