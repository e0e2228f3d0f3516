"""Every row of ../shared/docs/e2b-api.md through ``forkd.AsyncSandbox`` (the async twin of test_compat_sync).

Against a real gateway (``forkd serve``, process backend) over websockets.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest

from forkd import (
    AsyncCommandHandle,
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    ProcessInfo,
    PtySize,
    SandboxException,
    SandboxInfo,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
    SnapshotInfo,
    TimeoutException,
    WriteInfo,
)
from forkd.exceptions import ConflictException


@pytest.fixture
async def sbx(gateway):
    s = await AsyncSandbox.create()
    yield s
    await s.kill()


async def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- lifecycle -----------------------------------------------------------------------


async def test_create_defaults_and_properties(gateway):
    async with await AsyncSandbox.create() as s:
        info = await s.get_info()
        assert isinstance(info, SandboxInfo) and info.sandbox_id == s.sandbox_id
        assert info.template_id == "base" and info.state == SandboxState.RUNNING
        assert round((info.end_at - info.started_at).total_seconds()) == 300
        assert s.connection_config.request_timeout == 60
        assert s.commands and s.files and s.pty and isinstance(s.get_host(3000), str)
        assert await s.is_running()
    assert not await s.is_running()


async def test_create_options(gateway):
    s = await AsyncSandbox.create(timeout=90, metadata={"suite": "compat-async"}, envs={"GREETING": "hej"})
    try:
        info = await AsyncSandbox.get_info(s.sandbox_id)
        assert info.metadata == {"suite": "compat-async"}
        assert round((info.end_at - info.started_at).total_seconds()) == 90
        assert (await s.commands.run("echo $GREETING")).stdout == "hej\n"
    finally:
        assert await AsyncSandbox.kill(s.sandbox_id) is True


async def test_connect(sbx):
    same = await AsyncSandbox.connect(sbx.sandbox_id)
    assert (await same.commands.run("echo ok")).stdout == "ok\n"
    assert await sbx.connect() is sbx
    end = (await sbx.get_info()).end_at
    await sbx.connect(timeout=5)
    assert (await sbx.get_info()).end_at == end
    await AsyncSandbox.connect(sbx.sandbox_id, timeout=3600)
    assert (await sbx.get_info()).end_at > end
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect("sbx-does-not-exist")


async def test_kill_get_info_set_timeout(gateway):
    a, b = await asyncio.gather(AsyncSandbox.create(), AsyncSandbox.create())
    assert await a.kill() is True and await a.kill() is False
    assert await AsyncSandbox.kill("sbx-unknown") is False
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(a.sandbox_id)
    await AsyncSandbox.set_timeout(b.sandbox_id, 1)

    async def gone():
        return not await b.is_running()

    await wait_until(gone, timeout=10)


async def test_list_and_paginator(gateway):
    tag = {"suite": f"alist-{time.monotonic_ns()}"}
    made = await asyncio.gather(*(AsyncSandbox.create(metadata=tag) for _ in range(3)))
    try:
        pager = AsyncSandbox.list(query=SandboxQuery(metadata=tag, state=[SandboxState.RUNNING]), limit=2)
        seen = []
        while pager.has_next:
            seen += await pager.next_items()
        assert sorted(i.sandbox_id for i in seen) == sorted(s.sandbox_id for s in made)
        with pytest.raises(Exception, match="No more items"):
            await pager.next_items()
    finally:
        await asyncio.gather(*(s.kill() for s in made))


async def test_another_keys_sandbox_is_invisible(gateway, sbx):
    other = {"api_key": gateway.other_key}
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(sbx.sandbox_id, **other)
    assert await AsyncSandbox.kill(sbx.sandbox_id, **other) is False
    intruder = AsyncSandbox(sbx.sandbox_id, api_key=gateway.other_key)
    with pytest.raises(SandboxNotFoundException):
        await intruder.commands.run("true")
    with pytest.raises(SandboxNotFoundException):
        await intruder.files.read("/etc/hostname")
    assert await sbx.is_running()


async def test_wrong_api_key(gateway):
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key="not-a-key")


# -- commands ----------------------------------------------------------------------------


async def test_run_foreground_and_exit_codes(sbx):
    r = await sbx.commands.run("echo out; echo err >&2")
    assert isinstance(r, CommandResult) and (r.stdout, r.stderr, r.exit_code) == ("out\n", "err\n", 0)
    assert (await sbx.commands.run("whoami", user="root")).stdout == "root\n"
    assert (await sbx.commands.run("pwd", cwd="/tmp")).stdout == "/tmp\n"
    assert (await sbx.commands.run("echo $X", envs={"X": "y"})).stdout == "y\n"
    with pytest.raises(CommandExitException) as info:
        await sbx.commands.run("echo broken >&2; exit 2")
    assert isinstance(info.value, CommandResult) and info.value.exit_code == 2
    assert str(info.value) == "Command exited with code 2 and error:\nbroken\n"


async def test_coroutine_callbacks(sbx):
    out, err = [], []

    async def on_out(s):
        await asyncio.sleep(0)
        out.append(s)

    r = await sbx.commands.run("echo 1; echo 2 >&2; echo 3", on_stdout=on_out, on_stderr=err.append)
    assert "".join(out) == r.stdout == "1\n3\n" and "".join(err) == "2\n"


async def test_timeout(sbx):
    with pytest.raises(TimeoutException):
        await sbx.commands.run("sleep 30", timeout=0.5)


async def test_background_handle(sbx):
    got = []
    h = await sbx.commands.run("echo a; sleep 0.2; echo b; exit 5", background=True, on_stdout=got.append)
    assert isinstance(h, AsyncCommandHandle) and h.pid > 0 and h.exit_code is None
    with pytest.raises(CommandExitException):
        await h.wait()
    assert (h.stdout, h.stderr, h.exit_code, h.error) == ("a\nb\n", "", 5, "exit status 5")
    assert "".join(got) == "a\nb\n"


async def test_stdin_list_kill_connect(sbx):
    h = await sbx.commands.run("cat", background=True, stdin=True)
    await h.send_stdin("abc")
    await sbx.commands.send_stdin(h.pid, b"def")
    await h.close_stdin()
    assert (await h.wait()).stdout == "abcdef"

    h = await sbx.commands.run("sleep 60", background=True)
    procs = await sbx.commands.list()
    assert all(isinstance(p, ProcessInfo) for p in procs) and h.pid in [p.pid for p in procs]
    follower = await sbx.commands.connect(h.pid)
    assert await h.kill() is True
    with pytest.raises(CommandExitException):
        await follower.wait()
    assert await sbx.commands.kill(h.pid) is False
    with pytest.raises(NotFoundException):
        await sbx.commands.connect(424242)


async def test_disconnect_and_reconnect(sbx):
    h = await sbx.commands.run("echo early; sleep 0.3; echo late", background=True)
    await h.disconnect()
    again = await sbx.commands.connect(h.pid)
    assert (await again.wait()).stdout == "early\nlate\n"  # the retained output is replayed


async def test_killed_sandbox_mid_command(gateway):
    s = await AsyncSandbox.create()
    task = asyncio.ensure_future(s.commands.run("sleep 60"))
    await asyncio.sleep(0.2)
    await AsyncSandbox.kill(s.sandbox_id)
    with pytest.raises(SandboxNotRunningException):
        await asyncio.wait_for(task, 10)


# -- files -------------------------------------------------------------------------------------


async def test_files(sbx):
    info = await sbx.files.write("d/a.txt", "héllo")
    assert isinstance(info, WriteInfo) and info.path == "/home/user/d/a.txt" and info.type == FileType.FILE
    assert await sbx.files.read("d/a.txt") == "héllo"
    assert await sbx.files.read("d/a.txt", format="bytes") == bytearray("héllo".encode())
    big = b"0123456789abcdef" * (300 * 1024)  # ~4.7 MiB
    await sbx.files.write("d/big.bin", io.BytesIO(big))
    chunks = [c async for c in await sbx.files.read("d/big.bin", format="stream")]
    assert b"".join(chunks) == big and len(chunks) > 1

    async def agen():
        for i in range(4):
            yield bytes([65 + i]) * 10

    await sbx.files.write("d/agen.txt", agen())
    assert await sbx.files.read("d/agen.txt") == "A" * 10 + "B" * 10 + "C" * 10 + "D" * 10
    assert [i.name for i in await sbx.files.write_files([{"path": "d/x", "data": "1"}])] == ["x"]
    assert await sbx.files.write_files([]) == []
    with pytest.raises(FileNotFoundException):
        await sbx.files.read("d/missing")
    assert await sbx.files.exists("d/x") and not await sbx.files.exists("d/missing")
    entry = await sbx.files.get_info("d/x")
    assert isinstance(entry, EntryInfo) and entry.size == 1 and entry.type == FileType.FILE
    assert {e.name for e in await sbx.files.list("d")} == {"a.txt", "big.bin", "agen.txt", "x"}
    with pytest.raises(InvalidArgumentException):
        await sbx.files.list("d", depth=0)
    assert (await sbx.files.rename("d/x", "e/y")).path == "/home/user/e/y"
    assert await sbx.files.make_dir("e") is False and await sbx.files.make_dir("f") is True
    await sbx.files.remove("d")
    assert not await sbx.files.exists("d")


async def test_watch_dir(sbx):
    await sbx.files.make_dir("w")
    events: list[FilesystemEvent] = []
    exits = []
    handle = await sbx.files.watch_dir("w", on_event=events.append, on_exit=exits.append)
    await sbx.files.write("w/f.txt", "1")
    await sbx.commands.run("echo 2 >> /home/user/w/f.txt; rm /home/user/w/f.txt")

    async def seen_remove():
        return any(e.type == FilesystemEventType.REMOVE for e in events)

    await wait_until(seen_remove)
    types = [e.type for e in events if e.name == "f.txt"]
    assert types[0] == FilesystemEventType.CREATE and FilesystemEventType.WRITE in types
    await handle.stop()
    assert exits == [None]


async def test_watch_timeout_ends_with_on_exit(sbx):
    await sbx.files.make_dir("w2")
    exits = []
    await sbx.files.watch_dir("w2", on_event=lambda e: None, on_exit=exits.append, timeout=0.3)

    async def ended():
        return bool(exits)

    await wait_until(ended)
    assert isinstance(exits[0], TimeoutException)


# -- pty -----------------------------------------------------------------------------------------


async def test_pty(sbx):
    data = bytearray()
    term = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=data.extend)
    await sbx.pty.resize(term.pid, PtySize(rows=33, cols=101))
    await sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    await term.wait()
    assert b"33 101" in data
    other = await sbx.pty.create(PtySize(24, 80), on_data=lambda b: None)
    assert await sbx.pty.kill(other.pid) is True
    with pytest.raises(CommandExitException):
        await other.wait()


# -- code interpreter -----------------------------------------------------------------------------


async def test_run_code_and_contexts(sbx):
    results = []

    async def on_result(r):
        results.append(r)

    ex = await sbx.run_code("a = 6\nprint('p')\na * 7", on_result=on_result)
    assert isinstance(ex, Execution) and ex.text == "42" and ex.logs.stdout == ["p\n"]
    assert [r.text for r in results] == ["42"]
    err = (await sbx.run_code("nope")).error
    assert (err.name, err.value) == ("NameError", "name 'nope' is not defined")
    ctx = await sbx.create_code_context()
    assert isinstance(ctx, Context)
    assert (await sbx.run_code("a", context=ctx)).error.name == "NameError"  # contexts are separate
    with pytest.raises(InvalidArgumentException):
        await sbx.run_code("1", language="python", context=ctx)
    assert ctx.id in [c.id for c in await sbx.list_code_contexts()]
    await sbx.restart_code_context(ctx)
    await sbx.remove_code_context(ctx)
    with pytest.raises(NotFoundException):
        await sbx.run_code("1", context=ctx)
    with pytest.raises(TimeoutException):
        await sbx.run_code("while True: pass", timeout=0.5)
    assert await sbx.eval("a") == 6


async def test_sandbox_exceptions_are_sandbox_exceptions(sbx):
    with pytest.raises(SandboxException):
        await sbx.files.read("/nope")


async def test_fork(sbx):
    await sbx.files.write("state.txt", "before the fork")
    forks = await AsyncSandbox.fork(sbx.sandbox_id, count=2)
    try:
        assert len(forks) == 2 and all(isinstance(f, AsyncSandbox) for f in forks)
        assert [await f.files.read("state.txt") for f in forks] == ["before the fork"] * 2
        (one,) = await sbx.fork()  # count defaults to 1
        await one.kill()
    finally:
        for f in forks:
            if isinstance(f, AsyncSandbox):
                await f.kill()


async def test_create_snapshot_then_create_from_it(gateway, sbx):
    await sbx.files.write("kept.txt", "kept")
    info = await sbx.create_snapshot()
    assert isinstance(info, SnapshotInfo) and info.snapshot_id
    assert [s.snapshot_id for s in await sbx.list_snapshots().next_items()] == [info.snapshot_id]
    child = await AsyncSandbox.create(template=info.snapshot_id)
    try:
        assert await child.files.read("kept.txt") == "kept"
        with pytest.raises(ConflictException):
            await AsyncSandbox.delete_snapshot(info.snapshot_id)
    finally:
        await child.kill()
    assert await AsyncSandbox.delete_snapshot(info.snapshot_id, api_key=gateway.other_key) is False
    assert await AsyncSandbox.delete_snapshot(info.snapshot_id) is True
    assert await AsyncSandbox.delete_snapshot(info.snapshot_id) is False
