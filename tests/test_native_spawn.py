"""A sandbox agent starting commands as another user through its zygote's
library (``fk_spawn`` in _forkcore.c) instead of setpriv: the command must see
exactly what a Popen-started one sees."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from test_agent_warm_shell import _children, _cmdline, run

from agent_harness import wait_for
from forkd.protocol import ErrorCode, RpcError

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="no C compiler: no native library, the agent keeps setpriv",
)


async def sandbox(process_backend):
    snap = await process_backend.prepare("base")
    [child] = await process_backend.spawn(snap, 1)
    return child


async def without_setpriv(child) -> None:
    """Take setpriv away (this sandbox's copy): only the native path can still switch user."""
    _, err, end, _ = await run(child.conn, "mv /usr/bin/setpriv /usr/bin/setpriv.off", user="root")
    assert end["exit_code"] == 0, err


async def test_a_command_as_user_sees_what_popen_would_give_it(process_backend):
    child = await sandbox(process_backend)
    expected, _, _, _ = await run(
        child.conn, "echo $(id -u user) $(id -g user) $(id -G user | tr ' ' '\\n' | sort -n)", user="root"
    )
    await without_setpriv(child)
    conn = child.conn
    stream = conn.open_inbound()
    script = (
        "echo $(id -u) $(id -g) $(id -G | tr ' ' '\\n' | sort -n); pwd; echo $MARK; "
        "echo sid $(ps -o sid= -p $$) $$; ls /proc/$$/fd > /tmp/fds; echo fds $(cat /tmp/fds); read line; echo in $line; echo oops >&2"
    )
    res = await conn.request(
        "exec.start",
        {
            "cmd": script,
            "stream": stream.id,
            "user": "user",
            "cwd": "/tmp",
            "envs": {"MARK": "m1"},
            "stdin": True,
        },
    )
    await conn.request("exec.stdin", {"pid": res["pid"], "data": b"hello\n"})
    out, err = bytearray(), bytearray()
    async for fd, _off, data in stream:
        (out if fd == 1 else err).extend(data)
    lines = out.decode().splitlines()
    assert lines[0] == expected.strip()
    assert lines[1:3] == ["/tmp", "m1"]
    sid, pid = lines[3].split()[1:]
    assert sid == pid == str(res["pid"])  # its own session, led by the command
    assert lines[4] == "fds 0 1 2"  # nothing of the agent's leaks in
    assert lines[5] == "in hello"
    assert err.decode() == "oops\n"
    assert stream.end_info["exit_code"] == 0


async def test_signal_dispositions_match_a_popen_started_command(process_backend):
    child = await sandbox(process_backend)
    await without_setpriv(child)
    show = "grep -E '^Sig(Blk|Ign|Cgt)' /proc/self/status; yes | head -c 2"
    as_root = await run(child.conn, show, user="root")  # the agent's own user: Popen
    as_user = await run(child.conn, show, user="user")
    assert as_user[0] == as_root[0]
    # SIGPIPE is back to its default (Python ignores it): `yes` dies quietly on the closed pipe.
    assert as_user[0].endswith("y\n") and as_user[1] == ""


async def test_killing_the_group_ends_the_command(process_backend):
    child = await sandbox(process_backend)
    await without_setpriv(child)
    conn = child.conn
    stream = conn.open_inbound()
    res = await conn.request(
        "exec.start", {"cmd": "sleep 30 & sleep 30", "stream": stream.id, "user": "user"}
    )
    await conn.request("exec.kill", {"pid": res["pid"]})
    await asyncio.wait_for(_drain(stream), 10)
    assert stream.end_info["signal"] == 9
    out, _, _, _ = await run(conn, "pgrep -u user -x sleep || true", user="root")
    assert out == ""


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def parked_in_sandbox(child) -> list[int]:
    """The agent's parked shells, by their pid inside the sandbox."""
    found = []
    for host_pid in _children(child.pid):
        if "read -r -u" in _cmdline(host_pid):
            with open(f"/proc/{host_pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            found.append(int(status["NSpid"].split()[-1]))
    return found


async def test_a_parked_shell_is_started_natively_and_used(process_backend):
    child = await sandbox(process_backend)
    await without_setpriv(child)
    assert (await child.conn.request("exec.prepare", {"user": "user"}))["prepared"] is True
    [pid] = await wait_for(lambda: parked_in_sandbox(child), 10)
    out, _, end, started = await run(child.conn, "echo $$ $(id -un)")
    assert (started, out, end["exit_code"]) == (pid, f"{pid} user\n", 0)


async def test_an_exec_failure_is_a_typed_error_and_leaves_no_child(process_backend):
    child = await sandbox(process_backend)
    # Executable for root only: the agent still picks bash, the user cannot run it.
    await run(child.conn, "chmod 0700 /bin/bash", user="root")
    with pytest.raises(RpcError) as failed:
        await run(child.conn, "true", user="user")
    assert failed.value.code == ErrorCode.INVALID_ARGUMENT
    assert "Permission denied: '/bin/bash'" in str(failed.value)
    await run(child.conn, "chmod 0755 /bin/bash", user="root")
    out, _, _, _ = await run(child.conn, "echo ok", user="user")
    assert out == "ok\n"
    zombies, _, _, _ = await run(child.conn, "ps -eo stat= | grep -c Z || true", user="root")
    assert zombies.strip() == "0"


async def test_a_missing_cwd_is_still_file_not_found(process_backend):
    child = await sandbox(process_backend)
    with pytest.raises(RpcError) as failed:
        await run(child.conn, "true", user="user", cwd="/no/such/dir")
    assert failed.value.code == ErrorCode.FILE_NOT_FOUND
