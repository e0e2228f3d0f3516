"""Every row of ../shared/docs/e2b-api.md through the synchronous ``forkd.Sandbox``.

Written from the contract, against a real gateway (``forkd serve``, process
backend) over websockets: the only change from an E2B program is the import.
"""

from __future__ import annotations

import io
import time

import pytest

from forkd import (
    AuthenticationException,
    CommandExitException,
    CommandHandle,
    CommandResult,
    Context,
    EntryInfo,
    Execution,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    ProcessInfo,
    PtySize,
    Sandbox,
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
def sbx(gateway):
    s = Sandbox.create()
    yield s
    s.kill()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -- lifecycle -----------------------------------------------------------------------


def test_create_defaults_and_properties(gateway):
    with Sandbox.create() as s:
        info = s.get_info()
        assert isinstance(info, SandboxInfo)
        assert info.sandbox_id == s.sandbox_id and info.template_id == "base"
        assert info.state == SandboxState.RUNNING
        assert round((info.end_at - info.started_at).total_seconds()) == 300
        assert info.cpu_count >= 1 and info.memory_mb > 0
        assert s.connection_config.api_key and s.connection_config.request_timeout == 60
        assert s.commands is not None and s.files is not None and s.pty is not None
        assert isinstance(s.get_host(8080), str) and "8080" in s.get_host(8080)
        assert s.is_running()
    # the context manager killed it
    assert not s.is_running()
    with pytest.raises(SandboxNotFoundException):
        s.get_info()


def test_create_options(gateway):
    s = Sandbox.create("base", timeout=120, metadata={"suite": "compat-sync"}, envs={"GREETING": "hej"},
                       request_timeout=30, api_key=None)  # fmt: skip
    try:
        info = Sandbox.get_info(s.sandbox_id)
        assert info.metadata == {"suite": "compat-sync"}
        assert round((info.end_at - info.started_at).total_seconds()) == 120
        assert s.commands.run("echo $GREETING").stdout == "hej\n"
        assert s.commands.run("echo $GREETING", envs={"GREETING": "hi"}).stdout == "hi\n"
    finally:
        assert Sandbox.kill(s.sandbox_id) is True


def test_connect(sbx):
    same = Sandbox.connect(sbx.sandbox_id)
    assert same.sandbox_id == sbx.sandbox_id
    assert same.commands.run("echo ok").stdout == "ok\n"
    assert sbx.connect() is sbx
    end = sbx.get_info().end_at
    Sandbox.connect(sbx.sandbox_id, timeout=10)  # shorter: no change
    assert sbx.get_info().end_at == end
    sbx.connect(timeout=3600)  # longer: extended
    assert sbx.get_info().end_at > end
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("sbx-does-not-exist")


def test_kill_and_get_info_as_class_and_instance(gateway):
    a, b = Sandbox.create(), Sandbox.create()
    assert Sandbox.get_info(a.sandbox_id).sandbox_id == a.sandbox_id
    assert a.kill() is True
    assert a.kill() is False
    assert Sandbox.kill(b.sandbox_id) is True
    assert Sandbox.kill("sbx-unknown") is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(b.sandbox_id)


def test_set_timeout_expires_the_sandbox(sbx):
    Sandbox.set_timeout(sbx.sandbox_id, 600)
    assert round((sbx.get_info().end_at - sbx.get_info().started_at).total_seconds()) > 500
    sbx.set_timeout(1)
    wait_until(lambda: not sbx.is_running(), timeout=10)
    with pytest.raises((SandboxNotRunningException, SandboxNotFoundException)):
        sbx.commands.run("true")


def test_list_and_paginator(gateway):
    tag = {"suite": f"list-{time.monotonic_ns()}"}
    made = [Sandbox.create(metadata=tag) for _ in range(3)]
    try:
        pager = Sandbox.list(query=SandboxQuery(metadata=tag, state=[SandboxState.RUNNING]), limit=2)
        assert pager.has_next
        seen = []
        while pager.has_next:
            seen += pager.next_items()
        assert sorted(i.sandbox_id for i in seen) == sorted(s.sandbox_id for s in made)
        assert all(isinstance(i, SandboxInfo) and i.metadata == tag for i in seen)
        assert pager.next_token is None
        with pytest.raises(Exception, match="No more items"):
            pager.next_items()
        everything = Sandbox.list().next_items()
        assert {s.sandbox_id for s in made} <= {i.sandbox_id for i in everything}
    finally:
        for s in made:
            s.kill()


def test_another_keys_sandbox_is_invisible(gateway, sbx):
    other = {"api_key": gateway.other_key}
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id, **other)
    assert Sandbox.kill(sbx.sandbox_id, **other) is False
    assert sbx.sandbox_id not in {i.sandbox_id for i in Sandbox.list(**other).next_items()}
    assert sbx.is_running()


def test_wrong_api_key(gateway):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="not-a-key")


# -- commands ----------------------------------------------------------------------------


def test_run_foreground(sbx):
    r = sbx.commands.run("echo out; echo err >&2")
    assert isinstance(r, CommandResult)
    assert (r.stdout, r.stderr, r.exit_code, r.error) == ("out\n", "err\n", 0, None)
    assert sbx.commands.run("echo $0 $HOME $(whoami) $PWD").stdout == "/bin/bash /home/user user /home/user\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("printf '\\xff'").stdout == "\ufffd"


def test_non_zero_exit_raises(sbx):
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo broken >&2; exit 3")
    e = info.value
    assert isinstance(e, CommandResult) and isinstance(e, SandboxException)
    assert (e.exit_code, e.stdout, e.stderr) == (3, "partial\n", "broken\n")
    assert e.error and str(e) == "Command exited with code 3 and error:\nbroken\n"


def test_callbacks_run_in_order(sbx):
    out, err = [], []
    r = sbx.commands.run(
        "for i in 1 2 3; do echo $i; echo e$i >&2; done", on_stdout=out.append, on_stderr=err.append
    )
    assert "".join(out) == r.stdout == "1\n2\n3\n"
    assert "".join(err) == r.stderr == "e1\ne2\ne3\n"


def test_timeout(sbx):
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=0.5)
    assert time.monotonic() - t0 < 10


def test_background_handle(sbx):
    h = sbx.commands.run("echo start; sleep 0.3; echo done; exit 4", background=True)
    assert isinstance(h, CommandHandle) and h.pid > 0
    events = list(h)
    assert ("start\n", None, None) in events and all(sum(x is not None for x in e) == 1 for e in events)
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == 4 and info.value.stdout == "start\ndone\n"


def test_stdin(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True)
    h.send_stdin("hello ")
    sbx.commands.send_stdin(h.pid, b"world")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "hello world"
    h2 = sbx.commands.run("cat", background=True, stdin=True)
    h2.send_stdin("x")
    h2.close_stdin()
    assert h2.wait(on_stdout=lambda s: None).stdout == "x"


def test_list_kill_connect(sbx):
    h = sbx.commands.run("sleep 60", background=True)
    procs = sbx.commands.list()
    assert all(isinstance(p, ProcessInfo) for p in procs)
    mine = [p for p in procs if p.pid == h.pid]
    assert mine and mine[0].cmd == "/bin/bash" and mine[0].args[-1] == "sleep 60"
    again = sbx.commands.connect(h.pid)
    assert again.pid == h.pid
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code != 0 and info.value.error == "signal: killed"
    assert sbx.commands.kill(h.pid) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999_999)
    with pytest.raises(NotFoundException):
        sbx.commands.send_stdin(999_999, "x")


def test_handle_kill_and_disconnect(sbx):
    h = sbx.commands.run("echo a; sleep 60", background=True)
    assert h.kill() is True
    with pytest.raises(CommandExitException):
        h.wait()
    h2 = sbx.commands.run("sleep 0.3; echo later", background=True)
    h2.disconnect()  # stops receiving; the command keeps running
    h3 = sbx.commands.connect(h2.pid)
    assert h3.wait().stdout == "later\n"


def test_killed_sandbox_mid_command(gateway):
    s = Sandbox.create()
    h = s.commands.run("sleep 60", background=True)
    Sandbox.kill(s.sandbox_id)
    t0 = time.monotonic()
    with pytest.raises((SandboxNotRunningException, SandboxNotFoundException)):
        h.wait()
    assert time.monotonic() - t0 < 10


# -- files -------------------------------------------------------------------------------------


def test_read_write(sbx):
    info = sbx.files.write("dir/sub/a.txt", "héllo")
    assert isinstance(info, WriteInfo)
    assert (info.name, info.type, info.path) == ("a.txt", FileType.FILE, "/home/user/dir/sub/a.txt")
    assert sbx.files.read("dir/sub/a.txt") == "héllo"
    assert sbx.files.read("/home/user/dir/sub/a.txt", format="bytes") == bytearray("héllo".encode())
    sbx.files.write("dir/sub/a.txt", b"\x00\x01")  # overwrite
    assert sbx.files.read("dir/sub/a.txt", format="bytes") == bytearray(b"\x00\x01")
    assert b"".join(sbx.files.read("dir/sub/a.txt", format="stream")) == b"\x00\x01"
    with pytest.raises(FileNotFoundException):
        sbx.files.read("missing.txt")
    with pytest.raises(NotFoundException):
        sbx.files.get_info("missing.txt")


def test_write_streams_big_data_io_and_iterables(sbx):
    big = bytes(range(256)) * (5 * 4096 + 3)  # ~5 MiB: several chunks
    sbx.files.write("big.bin", big)
    assert bytes(sbx.files.read("big.bin", format="bytes")) == big
    sbx.files.write("io.bin", io.BytesIO(big))
    assert sbx.files.get_info("io.bin").size == len(big)
    sbx.files.write("text-io.txt", io.StringIO("text io"))
    assert sbx.files.read("text-io.txt") == "text io"
    sbx.files.write("iter.bin", (bytes([i]) * 1000 for i in range(10)))
    assert sbx.files.get_info("iter.bin").size == 10_000
    with sbx.files.read("big.bin", format="stream") as stream:
        first = next(stream)
    assert first == big[: len(first)]


def test_write_files(sbx):
    infos = sbx.files.write_files([{"path": "m/one.txt", "data": "1"}, {"path": "m/two.txt", "data": b"2"}])
    assert [i.path for i in infos] == ["/home/user/m/one.txt", "/home/user/m/two.txt"]
    assert sbx.files.write_files([]) == []


def test_list_exists_info_remove_rename_make_dir(sbx):
    assert sbx.files.make_dir("tree/a/b") is True
    assert sbx.files.make_dir("tree/a/b") is False
    sbx.files.write("tree/a/f.txt", "12345")
    names = [e.name for e in sbx.files.list("tree")]
    assert names == ["a"]
    deep = sbx.files.list("tree", depth=3)
    assert {e.path for e in deep} == {"/home/user/tree/a", "/home/user/tree/a/b", "/home/user/tree/a/f.txt"}
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("tree", depth=0)
    assert sbx.files.exists("tree/a/f.txt") and not sbx.files.exists("tree/nope")
    info = sbx.files.get_info("tree/a/f.txt")
    assert isinstance(info, EntryInfo)
    assert (info.name, info.type, info.size, info.mode, info.permissions) == ("f.txt", FileType.FILE, 5, 0o644,
                                                                              "-rw-r--r--")  # fmt: skip
    assert (info.owner, info.group, info.symlink_target) == ("user", "user", None)
    assert info.modified_time.year >= 2024
    assert sbx.files.get_info("tree/a").type == FileType.DIR
    moved = sbx.files.rename("tree/a/f.txt", "tree/g.txt")
    assert isinstance(moved, EntryInfo) and moved.path == "/home/user/tree/g.txt"
    sbx.commands.run("ln -s /home/user/tree/g.txt /home/user/tree/link")
    link = sbx.files.get_info("tree/link")
    assert link.type == FileType.SYMLINK and link.symlink_target == "/home/user/tree/g.txt"
    assert sbx.files.remove("tree") is None
    assert not sbx.files.exists("tree")
    with pytest.raises(FileNotFoundException):
        sbx.files.remove("tree")
    root_file = sbx.files.write("/tmp/root.txt", "r", user="root")
    assert sbx.files.get_info(root_file.path).owner == "root"


def test_watch_dir(sbx):
    sbx.files.make_dir("watched")
    w = sbx.files.watch_dir("watched")
    sbx.files.write("watched/new.txt", "x")
    sbx.commands.run("echo more >> /home/user/watched/new.txt")
    events = []

    def got_write():
        events.extend(w.get_new_events())
        return any(e.type == FilesystemEventType.WRITE for e in events)

    wait_until(got_write)
    assert any(e.name == "new.txt" and e.type == FilesystemEventType.CREATE for e in events)
    w.stop()
    with pytest.raises(SandboxException):
        w.get_new_events()


# -- pty -----------------------------------------------------------------------------------------


def test_pty(sbx):
    term = sbx.pty.create(PtySize(rows=24, cols=80))
    assert isinstance(term, CommandHandle)
    sbx.pty.resize(term.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size; echo $TERM; exit\n")
    data = bytearray()
    term.wait(on_pty=data.extend)
    assert b"30 100" in data and b"xterm-256color" in data
    other = sbx.pty.create(PtySize(24, 80))
    again = sbx.pty.connect(other.pid)
    assert sbx.pty.kill(other.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()


# -- code interpreter -----------------------------------------------------------------------------


def test_run_code(sbx):
    ex = sbx.run_code("x = 40\nprint('hi')\nx + 2")
    assert isinstance(ex, Execution)
    assert ex.text == "42" and ex.results[0].text == "42" and ex.results[0].is_main_result
    assert ex.logs.stdout == ["hi\n"] and ex.logs.stderr == [] and ex.error is None
    assert sbx.run_code("x").text == "40"  # state persists
    assert sbx.run_code("1").results[0].text == "1"
    err = sbx.run_code("undefined_name").error
    assert (err.name, err.value) == ("NameError", "name 'undefined_name' is not defined")
    assert "undefined_name" in err.traceback


def test_run_code_callbacks_and_rich_results(sbx):
    seen = {"out": [], "err": [], "res": [], "error": []}
    code = (
        "import sys\n"
        "class H:\n"
        "    def _repr_html_(self): return '<b>h</b>'\n"
        "class P:\n"
        "    def _repr_png_(self): return b'\\x89PNG'\n"
        "print('o'); print('e', file=sys.stderr)\n"
        "display(H())\n"
        "P()\n"
    )
    ex = sbx.run_code(
        code,
        on_stdout=lambda m: seen["out"].append(m.line),
        on_stderr=lambda m: seen["err"].append(m.line),
        on_result=seen["res"].append,
        on_error=seen["error"].append,
    )
    assert seen["out"] == ["o\n"] and seen["err"] == ["e\n"] and seen["error"] == []
    assert [r.html for r in ex.results] == ["<b>h</b>", None]
    assert ex.results[1].png == "iVBORw==" and "png" in ex.results[1].formats()
    assert [r.is_main_result for r in seen["res"]] == [False, True]
    failed = sbx.run_code("1/0", on_error=seen["error"].append)
    assert failed.error.name == "ZeroDivisionError" and seen["error"][0].name == "ZeroDivisionError"


def test_code_contexts(sbx):
    ctx = sbx.create_code_context(cwd="/tmp")
    assert isinstance(ctx, Context) and ctx.language == "python" and ctx.cwd == "/tmp"
    sbx.run_code("y = 5", context=ctx)
    assert sbx.run_code("y", context=ctx).text == "5"
    assert sbx.run_code("import os; os.getcwd()", context=ctx).text == "'/tmp'"
    assert ctx.id in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(InvalidArgumentException):
        sbx.run_code("1", language="python", context=ctx)
    sbx.restart_code_context(ctx)
    assert sbx.run_code("y", context=ctx).error.name == "NameError"
    sbx.remove_code_context(ctx.id)
    assert ctx.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=ctx)
    assert sbx.run_code("2", language="python").text == "2"


def test_run_code_timeout(sbx):
    with pytest.raises(TimeoutException):
        sbx.run_code("import time; time.sleep(30)", timeout=0.5)
    assert sbx.run_code("3").text == "3"


def test_eval(sbx):
    assert sbx.eval("1 + 1") == 2
    assert sbx.eval("{'a': [1, 2.5]}") == {"a": [1, 2.5]}
    assert sbx.eval("None") is None
    assert sbx.eval("object()").startswith("<object object")


def test_fork(sbx):
    sbx.files.write("state.txt", "before the fork")
    forks = sbx.fork(count=2)
    try:
        assert len(forks) == 2 and all(isinstance(f, Sandbox) for f in forks)
        assert {f.sandbox_id for f in forks}.isdisjoint({sbx.sandbox_id})
        assert [f.files.read("state.txt") for f in forks] == ["before the fork"] * 2
        f0 = forks[0]
        f0.files.write("state.txt", "changed in one fork")
        assert forks[1].files.read("state.txt") == sbx.files.read("state.txt") == "before the fork"
    finally:
        for f in forks:
            if isinstance(f, Sandbox):
                f.kill()
    (static,) = Sandbox.fork(sbx.sandbox_id)  # the static form; count defaults to 1
    static.kill()


def test_create_snapshot_then_create_from_it(gateway, sbx):
    sbx.files.write("kept.txt", "kept")
    info = sbx.create_snapshot()
    assert isinstance(info, SnapshotInfo) and info.snapshot_id
    assert info.snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
    assert Sandbox.list_snapshots(api_key=gateway.other_key).next_items() == []
    with Sandbox.create(template=info.snapshot_id) as child:
        assert child.files.read("kept.txt") == "kept"
        with pytest.raises(ConflictException):
            Sandbox.delete_snapshot(info.snapshot_id)
    assert Sandbox.delete_snapshot(info.snapshot_id, api_key=gateway.other_key) is False
    assert Sandbox.delete_snapshot(info.snapshot_id) is True
    assert Sandbox.delete_snapshot(info.snapshot_id) is False
