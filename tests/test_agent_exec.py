"""exec.* against a real agent subprocess, through the protocol."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent_harness import collect, wait_for
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport


async def start(conn, cmd: str | None, **params):
    """exec.start subscribed to a fresh stream: (pid, stream)."""
    stream = conn.open_inbound()
    if cmd is not None:
        params["cmd"] = cmd
    res = await conn.request("exec.start", {"stream": stream.id, **params})
    return res["pid"], stream


async def run(conn, cmd: str, **params) -> tuple[bytes, bytes, dict]:
    _, stream = await start(conn, cmd, **params)
    return await asyncio.wait_for(collect(stream), 20)


async def frames(stream) -> list[tuple[int, int, bytes]]:
    return [item async for item in stream]


async def pty_output(stream) -> bytes:
    out = bytearray()
    async for fd, _off, data in stream:
        assert fd == p.FD_PTY
        out += data
    return bytes(out)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def running_pids(conn) -> set[int]:
    return {proc["pid"] for proc in await conn.request("exec.list")}


async def until_exited(conn, pid: int, timeout: float = 10) -> None:
    async def gone():
        return pid not in await running_pids(conn)

    await wait_for(gone, timeout)


async def expect_error(conn, code: p.ErrorCode, method: str, params: dict) -> str:
    with pytest.raises(p.RpcError) as ei:
        await conn.request(method, params)
    assert ei.value.code == code, ei.value
    return ei.value.message


async def test_stdout_stderr_and_exit_code(agent):
    out, err, end = await run(agent, "echo out; echo err >&2; exit 3")
    assert (out, err) == (b"out\n", b"err\n")
    assert end["exit_code"] == 3 and end["signal"] is None
    assert end["reason"] == "exited" and end["error"] == "exit status 3"
    out, err, end = await run(agent, "true")
    assert (out, err, end["exit_code"], end["error"]) == (b"", b"", 0, None)


async def test_offsets_are_contiguous_per_fd(agent):
    pid, stream = await start(agent, "for i in $(seq 200); do echo out$i; echo err$i >&2; done")
    got = await frames(stream)
    next_offset = {1: 0, 2: 0}
    data = {1: bytearray(), 2: bytearray()}
    for fd, off, chunk in got:
        assert off == next_offset[fd]
        next_offset[fd] += len(chunk)
        data[fd] += chunk
    assert bytes(data[1]) == b"".join(b"out%d\n" % i for i in range(1, 201))
    assert bytes(data[2]) == b"".join(b"err%d\n" % i for i in range(1, 201))
    assert stream.end_info["pid"] == pid


async def test_response_precedes_stream_frames(agent_proc):
    seen: list = []

    class Recording(StreamTransport):
        async def recv(self):
            body = await super().recv()
            seen.append(p.decode(body))
            return body

    reader, writer = await asyncio.open_unix_connection(agent_proc.sock)
    conn = Connection(Recording(reader, writer)).start()
    await conn.request("hello", {"version": p.PROTOCOL_VERSION})
    for _ in range(3):
        seen.clear()
        stream = conn.open_inbound()
        await conn.request("exec.start", {"cmd": "echo hi", "stream": stream.id})
        await collect(stream)
        kinds = [type(m).__name__ for m in seen if not isinstance(m, p.Notification)]
        assert kinds[:2] == ["Response", "StreamData"], kinds
    await conn.close()


async def test_large_output_intact_with_bounded_agent_memory(agent, agent_proc):
    def hwm_kib() -> int:
        with open(f"/proc/{agent_proc.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    await run(agent, "true")  # warm up the agent's code paths
    before = hwm_kib()
    n = 2_700_000  # seq writes ~20 MB
    pid, stream = await start(agent, f"seq {n}")
    # Do not read for a while: a well-behaved agent stops reading the pipe once
    # the credit window and ring are full, instead of buffering all 20 MB.
    await asyncio.sleep(0.5)
    assert pid in await running_pids(agent)  # blocked on a full pipe, not finished
    out, err, end = await asyncio.wait_for(collect(stream), 60)
    assert len(out) > 19_000_000
    assert out == "".join(f"{i}\n" for i in range(1, n + 1)).encode()
    assert end["exit_code"] == 0
    grown_mib = (hwm_kib() - before) / 1024
    assert grown_mib < 16, f"agent peak RSS grew by {grown_mib:.1f} MiB"


async def test_replay_from_second_connection(agent, agent_proc):
    out, _, end = await run(agent, "seq 5000; echo oops >&2; exit 4")
    pid = end["pid"]
    other = await agent_proc.connect()
    try:
        stream = other.open_inbound()
        res = await other.request("exec.attach", {"pid": pid, "stream": stream.id})
        assert res == {"pid": pid, "offsets": {"1": 0, "2": 0}, "truncated": False}
        out2, err2, end2 = await collect(stream)
        assert (out2, err2) == (out, b"oops\n")
        assert end2["exit_code"] == 4 and end2["reason"] == "exited"

        stream = other.open_inbound()
        res = await other.request(
            "exec.attach", {"pid": pid, "stream": stream.id, "offsets": {"1": 1000, "2": 4}}
        )
        assert res["offsets"] == {"1": 1000, "2": 4} and not res["truncated"]
        got = await frames(stream)
        assert got[0][1] in (1000, 4)
        assert b"".join(d for fd, _, d in got if fd == 1) == out[1000:]
        assert b"".join(d for fd, _, d in got if fd == 2) == b"\n"

        msg = await expect_error(
            other,
            p.ErrorCode.INVALID_ARGUMENT,
            "exec.attach",
            {"pid": pid, "stream": 99, "offsets": {"1": 10**9}},
        )
        assert "past the end" in msg
    finally:
        await other.close()


async def test_replay_keeps_stdout_stderr_order(agent, agent_proc):
    pid, live = await start(agent, "echo a; read x; echo b >&2; read x; echo c", stdin=True)
    seen = []
    async for fd, _off, data in live:
        seen.append((fd, data))
        if len(seen) < 3:  # let the next line be produced only once this one arrived
            await agent.request("exec.stdin", {"pid": pid, "data": b"\n"})
    assert seen == [(1, b"a\n"), (2, b"b\n"), (1, b"c\n")]
    other = await agent_proc.connect()
    try:
        stream = other.open_inbound()
        await other.request("exec.attach", {"pid": pid, "stream": stream.id})
        assert [(fd, data) for fd, _, data in await frames(stream)] == seen
    finally:
        await other.close()


async def test_attach_running_process_replays_then_follows(agent, agent_proc):
    pid, first = await start(agent, "echo first; cat; echo last", stdin=True)
    async for _fd, _off, data in first:
        assert data == b"first\n"
        break
    await agent.request("exec.detach", {"stream": first.id})
    await first.close()
    other = await agent_proc.connect()
    try:
        stream = other.open_inbound()
        await other.request("exec.attach", {"pid": pid, "stream": stream.id})
        await other.request("exec.stdin", {"pid": pid, "data": b"middle\n"})
        await other.request("exec.close_stdin", {"pid": pid})
        out, _, end = await asyncio.wait_for(collect(stream), 10)
        assert out == b"first\nmiddle\nlast\n"
        assert end["exit_code"] == 0
    finally:
        await other.close()


async def test_evicted_output_reports_truncation(agent):
    pid, _stream = await start(agent, "head -c 5000000 /dev/zero; echo tail")
    await agent.request("exec.detach", {"stream": _stream.id})
    await _stream.close()
    await until_exited(agent, pid)
    stream = agent.open_inbound()
    res = await agent.request("exec.attach", {"pid": pid, "stream": stream.id, "offsets": {"1": 0}})
    assert res["truncated"] is True
    assert res["offsets"]["1"] == 5_000_005 - 4 * 1024 * 1024
    out, _, end = await collect(stream)
    assert len(out) == 4 * 1024 * 1024 and out.endswith(b"\0tail\n")
    assert end["exit_code"] == 0


async def test_stdin_order_and_close(agent):
    pid, stream = await start(agent, "cat", stdin=True)
    chunks = [b"chunk%03d|" % i for i in range(100)]
    # Sent without waiting for each answer: the agent must keep request order.
    await asyncio.gather(*(agent.request("exec.stdin", {"pid": pid, "data": c}) for c in chunks))
    await agent.request("exec.stdin", {"pid": pid, "data": "text é"})
    await agent.request("exec.close_stdin", {"pid": pid})
    out, _, end = await collect(stream)
    assert out == b"".join(chunks) + "text é".encode()
    assert end["exit_code"] == 0
    msg = await expect_error(agent, p.ErrorCode.NOT_FOUND, "exec.stdin", {"pid": pid, "data": b"x"})
    assert "exited" in msg


async def test_stdin_errors(agent):
    pid, stream = await start(agent, "cat; sleep 30", stdin=True)
    await agent.request("exec.close_stdin", {"pid": pid})
    await agent.request("exec.close_stdin", {"pid": pid})  # idempotent
    msg = await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.stdin", {"pid": pid, "data": b"x"})
    assert "closed" in msg
    await agent.request("exec.kill", {"pid": pid})
    await collect(stream)

    pid, stream = await start(agent, "cat")  # stdin not requested: /dev/null
    out, _, end = await collect(stream)
    assert out == b"" and end["exit_code"] == 0
    await expect_error(agent, p.ErrorCode.NOT_FOUND, "exec.stdin", {"pid": 999_999_999, "data": b"x"})
    pid, stream = await start(agent, "sleep 30")
    msg = await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.stdin", {"pid": pid, "data": b"x"})
    assert "without stdin" in msg
    await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.stdin", {"pid": pid, "data": 5})
    await agent.request("exec.kill", {"pid": pid})
    await collect(stream)


async def test_signal_is_reported(agent):
    for sig in ("SIGTERM", "term", 15):
        pid, stream = await start(agent, "sleep 30")
        assert (await agent.request("exec.signal", {"pid": pid, "signal": sig}))["delivered"] is True
        _, _, end = await asyncio.wait_for(collect(stream), 10)
        assert end["signal"] == 15 and end["exit_code"] is None
        assert end["reason"] == "killed" and end["error"] == "signal: terminated"
        assert (await agent.request("exec.signal", {"pid": pid, "signal": "SIGTERM"}))["delivered"] is False


async def test_signal_errors(agent):
    await expect_error(agent, p.ErrorCode.NOT_FOUND, "exec.signal", {"pid": 999_999_999, "signal": 15})
    pid, stream = await start(agent, "sleep 30")
    for bad in ("SIGNOPE", 0, 1000, None, 1.5):
        await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.signal", {"pid": pid, "signal": bad})
    await agent.request("exec.kill", {"pid": pid})
    await collect(stream)


async def test_timeout_kills_the_whole_group(agent):
    pid, stream = await start(agent, "sleep 30 & echo $!; sleep 30", timeout=0.5)
    out, _, end = await asyncio.wait_for(collect(stream), 10)
    assert end["reason"] == "timeout" and end["signal"] == 9 and end["exit_code"] is None
    assert "timed out" in end["error"]
    grandchild = int(out)
    await wait_for(lambda: not alive(grandchild), 5)
    assert pid not in await running_pids(agent)


async def test_children_left_behind_do_not_hold_the_stream(agent):
    out, _, end = await asyncio.wait_for(run(agent, "sleep 30 & echo $!; echo done"), 10)
    grandchild = int(out.split()[0])
    try:
        assert out.endswith(b"done\n") and end["exit_code"] == 0
    finally:
        os.kill(grandchild, 9)


async def test_pty_size_default_and_resize(agent):
    pid, stream = await start(agent, "tput cols; stty size", pty={})
    out = await pty_output(stream)
    assert out.split() == [b"80", b"24", b"80"]
    assert stream.end_info["exit_code"] == 0

    pid, stream = await start(agent, "stty size", pty={"rows": 30, "cols": 120})
    assert (await pty_output(stream)).split() == [b"30", b"120"]

    pid, stream = await start(agent, "read line; tput cols; stty size", pty={"rows": 0, "cols": 0})
    await agent.request("exec.resize", {"pid": pid, "rows": 40, "cols": 100})
    await agent.request("exec.stdin", {"pid": pid, "data": b"go\n"})
    out = await asyncio.wait_for(pty_output(stream), 10)
    assert out.split()[-3:] == [b"100", b"40", b"100"], out


async def test_pty_interactive_shell(agent):
    pid, stream = await start(agent, None, pty={"rows": 24, "cols": 80})
    await agent.request(
        "exec.stdin",
        # PS1 is "@@2> " (set from an expansion, so the echoed input never contains it).
        {
            "pid": pid,
            "data": "PS1='@@'$((1+1))'> '; echo $((6*7)) $TERM; tty; sh -c 'echo ready$((40+2)); sleep 30'\n",
        },
    )
    out = bytearray()
    async for _fd, _off, data in stream:
        out += data
        if b"ready42" in out:  # the foreground job runs (the echoed input says ready$((40+2)))
            break
    # Ctrl-C reaches the foreground job only if the pty is the controlling terminal.
    # The job may not own the terminal yet when "ready" shows: repeat until the
    # shell is back at its prompt (a ^C at the prompt leaves $? at 130 too).
    mark = len(out)
    chunks = stream.__aiter__()
    for _ in range(20):
        await agent.request("exec.stdin", {"pid": pid, "data": b"\x03"})
        try:
            while b"@@2> " not in out[mark:]:
                _fd, _off, data = await asyncio.wait_for(chunks.__anext__(), 0.5)
                out += data
            break
        except TimeoutError:
            continue
    await agent.request("exec.stdin", {"pid": pid, "data": "echo status=$?; exit 5\n"})
    out += await asyncio.wait_for(pty_output(stream), 10)
    assert b"42 xterm-256color" in out and b"status=130" in out
    assert stream.end_info["exit_code"] == 5


async def test_pty_errors(agent):
    pid, stream = await start(agent, "sleep 30")
    msg = await expect_error(
        agent, p.ErrorCode.INVALID_ARGUMENT, "exec.resize", {"pid": pid, "rows": 10, "cols": 10}
    )
    assert "no terminal" in msg
    await agent.request("exec.kill", {"pid": pid})
    await collect(stream)
    pid, stream = await start(agent, "sleep 30", pty={})
    for rows, cols in ((0, 10), (10, -1), (70000, 10), ("a", 10)):
        await expect_error(
            agent, p.ErrorCode.INVALID_ARGUMENT, "exec.resize", {"pid": pid, "rows": rows, "cols": cols}
        )
    await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.close_stdin", {"pid": pid})
    await agent.request("exec.kill", {"pid": pid})
    await pty_output(stream)
    await expect_error(
        agent, p.ErrorCode.INVALID_ARGUMENT, "exec.start", {"cmd": "true", "pty": {"rows": -3}}
    )


async def test_list_and_kill(agent):
    pid, stream = await start(agent, "sleep 30", tag="napper", envs={"A": "1"})
    listed = {proc["pid"]: proc for proc in await agent.request("exec.list")}
    info = listed[pid]
    assert info["tag"] == "napper" and info["cmd"] == "sleep 30" and info["envs"] == {"A": "1"}
    assert info["pty"] is False and info["cwd"] and info["user"] and info["started_at"] > 0
    assert (await agent.request("exec.kill", {"pid": pid}))["killed"] is True
    _, _, end = await collect(stream)
    assert end["reason"] == "killed" and end["signal"] == 9
    assert pid not in await running_pids(agent)
    assert (await agent.request("exec.kill", {"pid": pid}))["killed"] is False
    assert (await agent.request("exec.kill", {"pid": 999_999_999}))["killed"] is False


async def test_background_process_survives_disconnect(agent, agent_proc):
    other = await agent_proc.connect()
    pid, _ = await start(other, "sleep 30")
    doomed, _ = await start(other, "sleep 30", keep_on_disconnect=False)
    await other.close()
    await until_exited(agent, doomed)
    assert pid in await running_pids(agent)
    stream = agent.open_inbound()
    await agent.request("exec.attach", {"pid": doomed, "stream": stream.id})
    _, _, end = await collect(stream)
    assert end["reason"] == "killed" and end["signal"] == 9
    stream = agent.open_inbound()
    await agent.request("exec.attach", {"pid": pid, "stream": stream.id})
    await agent.request("exec.kill", {"pid": pid})
    assert (await collect(stream))[2]["signal"] == 9


async def test_detach_keeps_process_running(agent):
    pid, stream = await start(agent, "echo a; sleep 30")
    assert await agent.request("exec.detach", {"stream": stream.id}) == {}
    assert await agent.request("exec.detach", {"stream": stream.id}) == {}  # idempotent
    assert pid in await running_pids(agent)
    await agent.request("exec.kill", {"pid": pid})


async def test_env_cwd_user(agent, tmp_path):
    sandbox_id = (await agent.request("info"))["sandbox_id"]
    out, err, end = await run(
        agent,
        'echo "$FOO|$E2B_SANDBOX_ID|$FORKD_SANDBOX_ID|$LANG|$HOME|$USER"; pwd; id -un',
        envs={"FOO": "bar baz"},
        cwd=str(tmp_path),
        user="root",
    )
    assert end["exit_code"] == 0, err
    lines = out.decode().splitlines()
    assert lines[0] == f"bar baz|{sandbox_id}|{sandbox_id}|C.UTF-8|/root|root"
    assert lines[1:] == [str(tmp_path), "root"]
    out, _, _ = await run(agent, "pwd", user="root")
    assert out == b"/root\n"
    out, _, _ = await run(agent, "echo $LANG", envs={"LANG": "en_US.UTF-8"})
    assert out == b"en_US.UTF-8\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
async def test_runs_as_another_user(agent):
    out, err, end = await run(agent, "id -un; echo $HOME", user="nobody")
    assert out.split()[0] == b"nobody", err
    pid, stream = await start(agent, "id -un; stty size", user="nobody", pty={})
    assert (await pty_output(stream)).split() == [b"nobody", b"24", b"80"]


async def test_bad_arguments_get_typed_errors(agent, tmp_path):
    start_errors = [
        ({}, p.ErrorCode.INVALID_ARGUMENT, "cmd"),
        ({"cmd": 5}, p.ErrorCode.INVALID_ARGUMENT, "cmd"),
        ({"cmd": "true", "envs": {"A": 1}}, p.ErrorCode.INVALID_ARGUMENT, "envs"),
        ({"cmd": "true", "envs": {"A=B": "1"}}, p.ErrorCode.INVALID_ARGUMENT, "A=B"),
        ({"cmd": "true", "timeout": -1}, p.ErrorCode.INVALID_ARGUMENT, "timeout"),
        ({"cmd": "true", "user": "no-such-user-xyz"}, p.ErrorCode.INVALID_ARGUMENT, "no-such-user-xyz"),
        ({"cmd": "true", "cwd": str(tmp_path / "missing")}, p.ErrorCode.FILE_NOT_FOUND, "missing"),
        ({"cmd": "true", "stream": "x"}, p.ErrorCode.INVALID_ARGUMENT, "stream"),
        ({"cmd": "true", "stdin": "yes"}, p.ErrorCode.INVALID_ARGUMENT, "stdin"),
    ]
    (tmp_path / "file").write_text("x")
    start_errors.append(
        ({"cmd": "true", "cwd": str(tmp_path / "file")}, p.ErrorCode.INVALID_ARGUMENT, "directory")
    )
    for params, code, word in start_errors:
        msg = await expect_error(agent, code, "exec.start", params)
        assert word in msg, msg
    assert await agent.request("exec.list") == []
    await expect_error(agent, p.ErrorCode.NOT_FOUND, "exec.attach", {"pid": 999_999_999, "stream": 1})
    await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.attach", {"pid": 1})
    await expect_error(
        agent, p.ErrorCode.NOT_FOUND, "exec.resize", {"pid": 999_999_999, "rows": 5, "cols": 5}
    )
    await expect_error(agent, p.ErrorCode.NOT_FOUND, "exec.close_stdin", {"pid": 999_999_999})
    pid, stream = await start(agent, "sleep 30")
    await expect_error(agent, p.ErrorCode.INVALID_ARGUMENT, "exec.attach", {"pid": pid, "stream": stream.id})
    await agent.request("exec.kill", {"pid": pid})
    await collect(stream)
    assert (await agent.request("ping"))["pong"]


async def test_invalid_utf8_passes_through(agent):
    out, err, _ = await run(agent, r"printf '\xff\xfe\x80ok\xc3'; printf '\xc0\xaf' >&2")
    assert out == b"\xff\xfe\x80ok\xc3" and err == b"\xc0\xaf"
