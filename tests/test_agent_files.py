"""Filesystem methods of the guest agent, exercised through the protocol on a real agent."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import uuid

import pytest

from agent_harness import wait_for
from forkd import protocol as p

MiB = 1024 * 1024


# -- client-side helpers: what an SDK does with the methods -------------------------


async def upload(conn, path, chunks, *, window=p.DEFAULT_WINDOW, **extra):
    sid = conn.new_stream_id()
    opened = await conn.request("files.write_open", {"path": path, "stream": sid, "window": window, **extra})
    conn.open_outbound(sid, opened["window"])
    offset = 0
    for chunk in chunks:
        await conn.send_stream(sid, 0, offset, chunk)
        offset += len(chunk)
    return await conn.request("files.write_close", {"stream": sid})


async def download(conn, path, *, window=p.DEFAULT_WINDOW, sink=None, **extra):
    """(result, bytes or None when sink is given, stream end info)."""
    sid = conn.new_stream_id()
    stream = conn.open_inbound(sid, window)
    try:
        info = await conn.request("files.read", {"path": path, "stream": sid, "window": window, **extra})
    except BaseException:
        await stream.close()
        raise
    data = bytearray()
    expected = extra.get("offset", 0)
    async for fd, offset, chunk in stream:
        assert fd == 0 and offset == expected and len(chunk) <= p.CHUNK_SIZE
        expected += len(chunk)
        if sink is not None:
            sink(chunk)
        else:
            data += chunk
    return info, (None if sink is not None else bytes(data)), stream.end_info


async def error_of(coro) -> p.ErrorCode:
    with pytest.raises(p.RpcError) as ei:
        await coro
    return ei.value.code


def temp_leftovers(d) -> list[str]:
    return [n for n in os.listdir(d) if "forkd-tmp" in n]


def vm_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(field)


# -- round trips ---------------------------------------------------------------------


async def test_small_write_and_streamed_read_round_trip(agent, tmp_path):
    cases = {"text.txt": "héllo\nwörld\n", "bin.dat": bytes(range(256)) * 10, "empty": b""}
    for name, data in cases.items():
        path = str(tmp_path / name)
        info = await agent.request("files.write", {"path": path, "data": data})
        assert info == {"name": name, "type": "file", "path": path}
        raw = data.encode() if isinstance(data, str) else data
        assert (tmp_path / name).read_bytes() == raw
        result, got, end = await download(agent, path)
        assert result == {"path": path, "size": len(raw)}
        assert got == raw and "error" not in end
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


async def test_streamed_write_round_trip_and_partial_read(agent, tmp_path):
    path = str(tmp_path / "a" / "b" / "data.bin")
    chunks = [os.urandom(p.CHUNK_SIZE), os.urandom(1234), b"", os.urandom(p.CHUNK_SIZE)]
    info = await upload(agent, path, chunks)
    assert info == {"name": "data.bin", "type": "file", "path": path}
    whole = b"".join(chunks)
    assert open(path, "rb").read() == whole
    # Parent directories were created with 0755 even under a strict umask.
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755
    _, got, _ = await download(agent, path, offset=1000, length=p.CHUNK_SIZE + 50)
    assert got == whole[1000 : 1000 + p.CHUNK_SIZE + 50]
    _, got, _ = await download(agent, path, offset=len(whole) + 5)
    assert got == b""


async def test_relative_paths_resolve_against_home(agent):
    home = pwd.getpwuid(os.geteuid()).pw_dir  # no 'user' account here: the agent's own user
    rel = f"forkd-test-{uuid.uuid4().hex[:8]}"
    try:
        info = await agent.request("files.write", {"path": f"{rel}/x.txt", "data": "hi"})
        assert info["path"] == os.path.join(home, rel, "x.txt")
        assert open(os.path.join(home, rel, "x.txt")).read() == "hi"
        entries = await agent.request("files.list", {"path": rel})
        assert [e["path"] for e in entries] == [os.path.join(home, rel, "x.txt")]
        assert await agent.request("files.exists", {"path": f"~/{rel}/x.txt"}) is True
    finally:
        shutil.rmtree(os.path.join(home, rel), ignore_errors=True)


async def test_files_for_another_user_are_owned_by_that_user(agent, tmp_path):
    nobody = pwd.getpwnam("nobody")
    base = tmp_path / "shared"
    base.mkdir()
    await agent.request("files.write", {"path": str(base / "d" / "f.txt"), "data": "x", "user": "nobody"})
    await upload(agent, str(base / "big.txt"), [b"y" * 10], user="nobody")
    assert await agent.request("files.make_dir", {"path": str(base / "m"), "user": "nobody"}) is True
    for rel in ("d", "d/f.txt", "big.txt", "m"):
        st = os.stat(base / rel)
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), rel
    info = await agent.request("files.stat", {"path": str(base / "d" / "f.txt")})
    assert info["owner"] == "nobody"
    assert await error_of(agent.request("files.write", {"path": "x", "data": "", "user": "nosuchuser"})) == (
        p.ErrorCode.INVALID_ARGUMENT
    )


async def test_100_mib_streamed_without_buffering_in_the_agent(agent, agent_proc, tmp_path):
    pid = agent_proc.proc.pid
    before = vm_kib(pid, "VmHWM")
    path = str(tmp_path / "big.bin")
    sent = hashlib.sha256()
    block = os.urandom(p.CHUNK_SIZE)

    def chunks():
        for i in range(100):
            chunk = block[i:] + block[:i]  # distinct chunks, no 100 MiB in the test either
            sent.update(chunk)
            yield chunk

    await upload(agent, path, chunks())
    assert os.path.getsize(path) == 100 * MiB
    got = hashlib.sha256()
    info, _, end = await download(agent, path, sink=got.update)
    assert info["size"] == 100 * MiB and "error" not in end
    assert got.hexdigest() == sent.hexdigest()
    grown_mib = (vm_kib(pid, "VmHWM") - before) / 1024
    assert grown_mib < 40, f"agent peak memory grew by {grown_mib:.0f} MiB"


# -- atomic replacement and failures ---------------------------------------------------


async def test_write_replaces_atomically(agent, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old content")
    os.chmod(path, 0o600)  # an existing file keeps its mode
    sid = agent.new_stream_id()
    opened = await agent.request("files.write_open", {"path": str(path), "stream": sid})
    agent.open_outbound(sid, opened["window"])
    await agent.send_stream(sid, 0, 0, b"new ")
    await agent.request("ping")  # the agent has processed the frame by now
    assert path.read_text() == "old content"
    await agent.send_stream(sid, 0, 4, b"content")
    await agent.request("files.write_close", {"stream": sid})
    assert path.read_text() == "new content"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert temp_leftovers(tmp_path) == []


async def test_write_through_symlink_updates_its_target(agent, tmp_path):
    (tmp_path / "real.txt").write_text("a")
    os.symlink("real.txt", tmp_path / "link.txt")
    await agent.request("files.write", {"path": str(tmp_path / "link.txt"), "data": "b"})
    assert os.path.islink(tmp_path / "link.txt")
    assert (tmp_path / "real.txt").read_text() == "b"


async def test_write_abort_and_gap_leave_old_file(agent, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("keep")
    sid = agent.new_stream_id()
    opened = await agent.request("files.write_open", {"path": str(path), "stream": sid})
    agent.open_outbound(sid, opened["window"])
    await agent.send_stream(sid, 0, 0, b"xxxx")
    assert await agent.request("files.write_abort", {"stream": sid}) == {}
    assert path.read_text() == "keep" and temp_leftovers(tmp_path) == []
    # A gap between chunks is refused at close.
    sid = agent.new_stream_id()
    opened = await agent.request("files.write_open", {"path": str(path), "stream": sid})
    agent.open_outbound(sid, opened["window"])
    await agent.send_stream(sid, 0, 0, b"ab")
    await agent.send_stream(sid, 0, 5, b"cd")
    assert await error_of(agent.request("files.write_close", {"stream": sid})) == p.ErrorCode.INVALID_ARGUMENT
    assert path.read_text() == "keep" and temp_leftovers(tmp_path) == []
    assert await error_of(agent.request("files.write_close", {"stream": sid})) == p.ErrorCode.INVALID_ARGUMENT


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_disk_is_not_enough_space_and_keeps_old_file(agent, tiny_fs):
    path = tiny_fs / "f.bin"
    path.write_bytes(b"old")
    chunks = [b"z" * p.CHUNK_SIZE] * 4
    assert await error_of(upload(agent, str(path), chunks)) == p.ErrorCode.NOT_ENOUGH_SPACE
    assert path.read_bytes() == b"old"
    assert temp_leftovers(tiny_fs) == []
    # The small-file path too.
    (tiny_fs / "filler").write_bytes(b"f" * (1024 * 1024 - 64 * 1024))
    code = await error_of(agent.request("files.write", {"path": str(path), "data": b"q" * 512 * 1024}))
    assert code == p.ErrorCode.NOT_ENOUGH_SPACE
    assert path.read_bytes() == b"old" and temp_leftovers(tiny_fs) == []


async def test_client_disconnect_mid_write_leaves_no_temp_file(agent_proc, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    conn = await agent_proc.connect()
    sid = conn.new_stream_id()
    opened = await conn.request("files.write_open", {"path": str(path), "stream": sid})
    conn.open_outbound(sid, opened["window"])
    await conn.send_stream(sid, 0, 0, b"partial")
    await conn.request("ping")
    assert len(temp_leftovers(tmp_path)) == 1
    await conn.close()
    await wait_for(lambda: temp_leftovers(tmp_path) == [])
    assert path.read_text() == "old"
    # Same when the client had sent everything but never closed the write.
    conn = await agent_proc.connect()
    sid = conn.new_stream_id()
    opened = await conn.request("files.write_open", {"path": str(path), "stream": sid})
    conn.open_outbound(sid, opened["window"])
    await conn.send_stream(sid, 0, 0, b"all")
    await conn.end_stream(sid)
    await conn.request("ping")
    await conn.close()
    await wait_for(lambda: temp_leftovers(tmp_path) == [])
    assert path.read_text() == "old"


async def test_write_errors(agent, tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        ({"path": str(tmp_path / "afile" / "sub.txt"), "data": "x"}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": str(tmp_path / "adir"), "data": "x"}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": str(tmp_path / "big"), "data": b"x" * (p.CHUNK_SIZE + 1)}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": str(tmp_path / "n"), "data": 5}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": "", "data": "x"}, p.ErrorCode.INVALID_ARGUMENT),
    ]
    for params, code in cases:
        assert await error_of(agent.request("files.write", params)) == code, params
    sid = agent.new_stream_id()
    code = await error_of(
        agent.request("files.write_open", {"path": str(tmp_path / "afile" / "x"), "stream": sid})
    )
    assert code == p.ErrorCode.INVALID_ARGUMENT
    assert not (tmp_path / "big").exists() and temp_leftovers(tmp_path) == []


async def test_read_errors_and_mid_read_abort(agent, tmp_path):
    assert await error_of(download(agent, str(tmp_path / "missing"))) == p.ErrorCode.FILE_NOT_FOUND
    assert await error_of(download(agent, str(tmp_path))) == p.ErrorCode.INVALID_ARGUMENT
    os.mkfifo(tmp_path / "fifo")
    assert await error_of(download(agent, str(tmp_path / "fifo"))) == p.ErrorCode.INVALID_ARGUMENT
    # A reader that stops early aborts the stream; the agent stays healthy.
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * (8 * MiB))
    sid = agent.new_stream_id()
    stream = agent.open_inbound(sid, MiB)
    await agent.request("files.read", {"path": str(path), "stream": sid, "window": MiB})
    _, offset, _chunk = await stream.__anext__()
    assert offset == 0
    await stream.close()
    assert await agent.request("files.read_abort", {"stream": sid}) == {}
    _, got, _ = await download(agent, str(path), length=3)
    assert got == b"aaa"


# -- metadata and tree operations ----------------------------------------------------


async def test_list_depth(agent, tmp_path):
    tmp_path = tmp_path / "tree"  # the agent's socket and log live in tmp_path itself
    tmp_path.mkdir()
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "deep.txt").write_text("x")
    (tmp_path / "d" / "f.txt").write_text("x")
    (tmp_path / "top.txt").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "hidden.txt").write_text("x")
    os.symlink(tmp_path / "other", tmp_path / "link")
    one = await agent.request("files.list", {"path": str(tmp_path)})
    names = {e["name"]: e["type"] for e in one}
    assert names == {"d": "dir", "top.txt": "file", "other": "dir", "link": "symlink"}
    two = await agent.request("files.list", {"path": str(tmp_path), "depth": 2})
    paths = [os.path.relpath(e["path"], tmp_path) for e in two]
    assert set(paths) == {"d", "d/f.txt", "d/sub", "top.txt", "other", "other/hidden.txt", "link"}
    assert paths.index("d") < paths.index("d/f.txt")  # parents before children
    three = await agent.request("files.list", {"path": str(tmp_path), "depth": 3})
    assert "d/sub/deep.txt" in {os.path.relpath(e["path"], tmp_path) for e in three}
    # Listing through a symlinked directory works, entries are reported under the asked path.
    via = await agent.request("files.list", {"path": str(tmp_path / "link")})
    assert [e["path"] for e in via] == [str(tmp_path / "link" / "hidden.txt")]
    for params, code in [
        ({"path": str(tmp_path), "depth": 0}, p.ErrorCode.INVALID_ARGUMENT),
        ({"path": str(tmp_path / "missing")}, p.ErrorCode.FILE_NOT_FOUND),
        ({"path": str(tmp_path / "top.txt")}, p.ErrorCode.INVALID_ARGUMENT),
    ]:
        assert await error_of(agent.request("files.list", params)) == code, params


async def test_stat_fields(agent, tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    os.chmod(f, 0o640)
    os.utime(f, (1_700_000_000.5, 1_700_000_000.5))
    info = await agent.request("files.stat", {"path": str(f)})
    assert info == {
        "name": "f.txt",
        "type": "file",
        "path": str(f),
        "size": 5,
        "mode": 0o640,
        "permissions": "-rw-r-----",
        "owner": pwd.getpwuid(os.getuid()).pw_name,
        "group": info["group"],
        "modified_time": pytest.approx(1_700_000_000.5),
        "symlink_target": None,
    }
    d = await agent.request("files.stat", {"path": str(tmp_path)})
    assert d["type"] == "dir" and d["permissions"].startswith("d") and d["name"] == tmp_path.name
    os.symlink("f.txt", tmp_path / "link")
    link = await agent.request("files.stat", {"path": str(tmp_path / "link")})
    assert link["type"] == "symlink" and link["symlink_target"] == str(f)
    assert link["permissions"] == "Lrwxrwxrwx" and link["mode"] == 0o640 and link["size"] == len("f.txt")
    os.symlink("nowhere", tmp_path / "dangling")
    dangling = await agent.request("files.stat", {"path": str(tmp_path / "dangling")})
    assert dangling["type"] == "symlink" and dangling["symlink_target"] == "nowhere"
    sticky = await agent.request("files.stat", {"path": "/tmp"})
    assert sticky["permissions"] == "dtrwxrwxrwx"
    assert (
        await error_of(agent.request("files.stat", {"path": str(tmp_path / "nope")}))
        == p.ErrorCode.FILE_NOT_FOUND
    )
    code = await error_of(agent.request("files.stat", {"path": str(f / "under-a-file")}))
    assert code == p.ErrorCode.FILE_NOT_FOUND


async def test_exists_make_dir_remove_rename(agent, tmp_path):
    d = tmp_path / "x" / "y"
    assert await agent.request("files.exists", {"path": str(d)}) is False
    assert await agent.request("files.make_dir", {"path": str(d)}) is True
    assert d.is_dir() and stat.S_IMODE(os.stat(d).st_mode) == 0o755
    assert await agent.request("files.make_dir", {"path": str(d)}) is False
    assert await agent.request("files.exists", {"path": str(d)}) is True
    (d / "f.txt").write_text("x")
    code = await error_of(agent.request("files.make_dir", {"path": str(d / "f.txt")}))
    assert code == p.ErrorCode.INVALID_ARGUMENT
    assert await agent.request("files.exists", {"path": str(d / "f.txt" / "z")}) is False

    moved = await agent.request(
        "files.rename", {"old_path": str(d / "f.txt"), "new_path": str(tmp_path / "n" / "g.txt")}
    )
    assert moved["path"] == str(tmp_path / "n" / "g.txt") and moved["type"] == "file" and moved["size"] == 1
    assert not (d / "f.txt").exists() and (tmp_path / "n" / "g.txt").read_text() == "x"
    code = await error_of(
        agent.request("files.rename", {"old_path": str(d / "f.txt"), "new_path": str(d / "h")})
    )
    assert code == p.ErrorCode.FILE_NOT_FOUND

    assert await agent.request("files.remove", {"path": str(tmp_path / "x")}) is None
    assert not (tmp_path / "x").exists()
    assert (
        await error_of(agent.request("files.remove", {"path": str(tmp_path / "x")}))
        == p.ErrorCode.FILE_NOT_FOUND
    )
    os.symlink(tmp_path / "n", tmp_path / "ln")
    await agent.request("files.remove", {"path": str(tmp_path / "ln")})  # removes the link, not the target
    assert (tmp_path / "n" / "g.txt").exists()


async def test_many_concurrent_writes_on_one_connection(agent, tmp_path):
    async def one(i):
        data = [bytes([i]) * 1000, bytes([i]) * 7]
        await upload(agent, str(tmp_path / f"f{i}"), data, window=512)
        return i

    assert sorted(await asyncio.gather(*(one(i) for i in range(20)))) == list(range(20))
    for i in range(20):
        assert (tmp_path / f"f{i}").read_bytes() == bytes([i]) * 1007


async def test_write_close_waits_for_frames_the_agent_has_not_written_yet(agent_proc, tmp_path):
    """The consumer can lag behind write_close: here its stream.ack cannot be sent because
    the agent's socket is full of download frames the client is not reading yet."""
    reader, writer = await asyncio.open_unix_connection(agent_proc.sock)
    frames = p.FrameReader()

    async def response(rid: int) -> p.Response:
        while True:
            for body in frames.frames():
                msg = p.decode(body)
                if isinstance(msg, p.Response) and msg.id == rid:
                    return msg
            data = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert data, "agent closed the connection"
            frames.feed(data)

    def send(*msgs) -> None:
        writer.write(b"".join(p.frame(p.encode(m)) for m in msgs))

    big = tmp_path / "big.bin"
    big.write_bytes(b"b" * (16 * MiB))
    target = tmp_path / "out.bin"
    send(p.Request(1, "hello", {"version": p.PROTOCOL_VERSION}))
    send(p.Request(2, "files.write_open", {"path": str(target), "stream": 7, "window": 1}))
    assert (await response(2)).error is None
    # A download the client does not read fills the agent's socket buffer...
    send(p.Request(3, "files.read", {"path": str(big), "stream": 8, "window": 64 * MiB}))
    await writer.drain()
    await asyncio.sleep(0.2)
    # ...so the consumer's first ack blocks, while write_close arrives with the frames.
    chunk = 64 * 1024
    send(
        *(p.StreamData(7, 0, i * chunk, bytes([i]) * chunk) for i in range(8)),
        p.Request(4, "files.write_close", {"stream": 7}),
    )
    await writer.drain()
    closed = await response(4)
    assert closed.error is None, closed.error
    assert target.read_bytes() == b"".join(bytes([i]) * chunk for i in range(8))
    writer.close()
