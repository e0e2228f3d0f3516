"""The synchronous layer (Sandbox) against the real gateway over the in-memory transport.

The sync API runs every call on its background event loop; the gateway runs on
that same loop here, so the in-memory transport connects them. These tests check
what is particular to the sync layer: callbacks in the caller's thread (and
allowed to call the API), incremental iteration, uploads read from the caller's
thread, errors raised where the caller is.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from forkd import (
    CommandExitException,
    FilesystemEventType,
    InvalidArgumentException,
    PtySize,
    Sandbox,
    SandboxNotRunningException,
    _portal,
)
from forkd._transports import memory_pair


@pytest.fixture(scope="module")
def opts(template_store, tmp_path_factory):
    from forkd_gateway._config import GatewayConfig, PoolConfig
    from forkd_gateway._gateway import Gateway

    state = tmp_path_factory.mktemp("sdk-sync")
    gateway = Gateway(
        GatewayConfig(
            backend="process",
            state_dir=state,
            templates_dir=Path(template_store.root).parent,
            pools={"base": PoolConfig(min_ready=2, max_total=32)},
            audit_log=state / "audit.log",
        )
    )
    _portal.run(gateway.start())

    async def factory():
        ours, theirs = memory_pair()
        asyncio.get_running_loop().create_task(gateway.serve(theirs, "alice"))
        return ours

    yield {"transport_factory": factory}
    _portal.run(gateway.close())


@pytest.fixture
def sbx(opts):
    with Sandbox.create(**opts) as s:
        yield s


def test_callbacks_run_in_the_callers_thread_and_may_call_the_api(sbx):
    me = threading.get_ident()
    threads, written = set(), []

    def on_stdout(text):
        threads.add(threading.get_ident())
        written.append(
            sbx.files.write(f"echo-{len(written)}.txt", text).path
        )  # a sync call inside a callback

    r = sbx.commands.run("echo a; sleep 0.05; echo b", on_stdout=on_stdout)
    assert r.stdout == "a\nb\n" and threads == {me}
    assert [sbx.files.read(p) for p in written] == ["a\n", "b\n"]

    results = []
    ex = sbx.run_code("print(1)\ndisplay('shown')\n2", on_stdout=lambda m: threads.add(threading.get_ident()),
                      on_result=results.append)  # fmt: skip
    assert threads == {me} and [r.text for r in results] == ["'shown'", "2"] and ex.text == "2"


def test_a_failing_callback_stops_the_call(sbx):
    def boom(_text):
        raise ValueError("callback failed")

    with pytest.raises(ValueError, match="callback failed"):
        sbx.commands.run("echo x; sleep 5", on_stdout=boom)


def test_iteration_is_incremental(sbx):
    # The command waits for the test to see its first line: iterating must not wait for its end
    # (if it did, the command would time out instead).
    h = sbx.commands.run("echo first; while [ ! -e go ]; do sleep 0.01; done; echo second", background=True,
                         timeout=20)  # fmt: skip
    it = iter(h)
    assert next(it) == ("first\n", None, None)
    assert h.exit_code is None
    sbx.files.write("go", "")
    assert list(it) == [("second\n", None, None)]
    assert h.wait().exit_code == 0


def test_background_callbacks_apply_to_wait(sbx):
    got = []
    h = sbx.commands.run("echo x; exit 1", background=True, on_stdout=got.append)
    with pytest.raises(CommandExitException):
        h.wait()
    assert got == ["x\n"]


def test_uploads_are_read_in_the_callers_thread(sbx):
    me, seen = threading.get_ident(), set()

    def chunks():
        for i in range(3):
            seen.add(threading.get_ident())
            yield bytes([48 + i]) * (700 * 1024)

    info = sbx.files.write("gen.bin", chunks())
    assert seen == {me} and sbx.files.get_info(info.path).size == 3 * 700 * 1024

    async def agen():
        yield b"x"

    with pytest.raises(InvalidArgumentException):
        sbx.files.write("async.bin", agen())


def test_stream_read_and_close(sbx):
    sbx.files.write("s.bin", b"q" * (3 * 1024 * 1024))
    total = sum(len(c) for c in sbx.files.read("s.bin", format="stream"))
    assert total == 3 * 1024 * 1024
    with sbx.files.read("s.bin", format="stream") as stream:
        assert next(stream)[:1] == b"q"
    assert sbx.files.read("s.bin", format="bytes")[:1] == bytearray(b"q")


def test_watch_polling(sbx):
    sbx.files.make_dir("w")
    w = sbx.files.watch_dir("w", recursive=True)
    sbx.files.make_dir("w/sub")
    sbx.files.write("w/sub/f.txt", "1")
    events = []
    deadline = time.monotonic() + 5
    while not any(e.name == "sub/f.txt" for e in events) and time.monotonic() < deadline:
        events += w.get_new_events()
        time.sleep(0.02)
    assert ("sub", FilesystemEventType.CREATE) in [(e.name, e.type) for e in events]
    assert not any("forkd-tmp" in e.name for e in events)
    w.stop()


def test_pty_iteration(sbx):
    term = sbx.pty.create(PtySize(rows=10, cols=40))
    sbx.pty.send_stdin(term.pid, b"echo $((6*7)); exit\n")
    output = b"".join(pty for _, _, pty in term if pty is not None)
    assert b"42" in output


def test_killed_sandbox_fails_pending_iteration(opts):
    s = Sandbox.create(**opts)
    h = s.commands.run("sleep 30", background=True)
    killer = threading.Timer(0.2, lambda: Sandbox.kill(s.sandbox_id, **opts))
    killer.start()
    with pytest.raises(SandboxNotRunningException):
        list(h)
    killer.join()
