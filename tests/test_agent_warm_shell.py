"""The parked login shell (``_warm_shell.py``): a quiet sandbox starts the shell its next
command will probably need, and a matching command runs in it with the same results as
a shell started for it."""

from __future__ import annotations

import asyncio
import os
import signal

from agent_harness import collect, wait_for


def _children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(name))
    return kids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def parked(agent_proc) -> list[int]:
    return [pid for pid in _children(agent_proc.proc.pid) if "read -r -u" in _cmdline(pid)]


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().decode().split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in items if "=" in item)


def _stdin_is_pipe(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/fd/0").startswith("pipe:")
    except OSError:
        return False


async def wait_parked(
    agent_proc, not_pid: int | None = None, envs: dict | None = None, stdin: bool | None = None
) -> int:
    """The one parked shell (other than ``not_pid``, with ``envs`` in its environment, ``stdin`` a pipe or not)."""

    def one():
        pids = [pid for pid in parked(agent_proc) if pid != not_pid]
        if envs is not None:
            pids = [pid for pid in pids if envs.items() <= _environ(pid).items()]
        if stdin is not None:
            pids = [pid for pid in pids if _stdin_is_pipe(pid) == stdin]
        return pids[0] if len(pids) == 1 else None

    return await wait_for(one, 10)


async def run(conn, cmd: str, **params) -> tuple[str, str, dict, int]:
    stream = conn.open_inbound()
    res = await conn.request("exec.start", {"cmd": cmd, "stream": stream.id, **params})
    out, err, end = await asyncio.wait_for(collect(stream), 20)
    return out.decode(), err.decode(), end, res["pid"]


async def test_a_quiet_agent_parks_a_shell_and_the_next_command_runs_in_it(agent_proc, agent):
    await run(agent, "true")
    shell = await wait_parked(agent_proc)  # parked for the spec of the command before
    out, err, end, pid = await run(
        agent, 'echo "$$ $FORKD_SANDBOX_ID $PWD"; echo oops >&2; shopt -q login_shell && echo login; exit 7'
    )
    assert pid == shell
    info = await agent.request("info")
    assert out.split("\n")[0] == f"{shell} {info['sandbox_id']} {os.path.expanduser('~')}"
    assert "login" in out
    assert err == "oops\n"
    assert (end["exit_code"], end["reason"]) == (7, "exited")
    # ...and, once it is done and the agent has been quiet a moment, a new one is parked.
    assert await wait_parked(agent_proc, not_pid=shell) != shell


async def test_results_match_a_shell_started_for_the_command(agent_proc, agent, tmp_path):
    cases = [
        "echo a; no_such_command_here",  # 127, message on stderr
        "echo (",  # syntax error: exit 2
        "x=1; for i in 1 2 3; do x=$((x*i)); done; echo $x $LINENO",
        'echo "$BASH_EXECUTION_STRING"',  # the command, as bash -c has it
        "cat; echo after-stdin",  # stdin is /dev/null
        "sleep 0.05 & wait; echo $?",
    ]
    await run(agent, "true")
    last = await wait_parked(agent_proc)  # parked for the default spec
    for i, cmd in enumerate(cases):
        # Unlike the spec of any shell parked so far: this one starts its own. The host's own
        # login scripts (this agent runs on the host) stay out of the comparison.
        envs = {"K": f"v{i}", "HOME": str(tmp_path)}
        cold = await run(agent, cmd, envs=envs)
        assert cold[3] != last
        last = await wait_parked(agent_proc, envs=envs)  # now parked for this spec
        warm = await run(agent, cmd, envs=envs)
        assert warm[3] == last, cmd
        assert warm[0] == cold[0], cmd
        assert warm[2]["exit_code"] == cold[2]["exit_code"], cmd
        assert warm[1].replace("eval:", "-c:") == cold[1], cmd


async def test_a_command_unlike_the_parked_one_starts_its_own_and_is_remembered(agent_proc, agent, tmp_path):
    await run(agent, "true")
    first = await wait_parked(agent_proc)
    out, _, _, pid = await run(agent, "echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd=str(tmp_path))
    assert pid != first and out == f"hi\n{tmp_path}\n"
    # The next park is for that spec: a command like it takes the new shell.
    second = await wait_parked(agent_proc, envs={"GREETING": "hi"})
    out, _, _, pid = await run(agent, "echo $GREETING; pwd", envs={"GREETING": "hi"}, cwd=str(tmp_path))
    assert pid == second and out == f"hi\n{tmp_path}\n"
    assert first not in _children(agent_proc.proc.pid)  # the unused one was let go


async def test_large_commands_and_stdin_go_through_a_parked_shell(agent_proc, agent):
    # A 300 KB command line: read from the memfd in one go, not a byte at a time.
    await run(agent, "true")
    await wait_parked(agent_proc)
    big = "x=" + "a" * 300_000 + "; echo ${#x}"
    out, _, end, _ = await run(agent, big)
    assert (out, end["exit_code"]) == ("300000\n", 0)
    # A spec with stdin gets its shell parked with a stdin pipe.
    stream = agent.open_inbound()
    res = await agent.request("exec.start", {"cmd": "cat", "stdin": True, "stream": stream.id})
    await agent.request("exec.close_stdin", {"pid": res["pid"]})
    await asyncio.wait_for(collect(stream), 20)
    shell = await wait_parked(agent_proc, stdin=True)
    stream = agent.open_inbound()
    res = await agent.request("exec.start", {"cmd": "tr a-z A-Z", "stdin": True, "stream": stream.id})
    assert res["pid"] == shell
    await agent.request("exec.stdin", {"pid": shell, "data": b"hello\n"})
    await agent.request("exec.close_stdin", {"pid": shell})
    out, _, end = await asyncio.wait_for(collect(stream), 20)
    assert (out, end["exit_code"]) == (b"HELLO\n", 0)


async def test_a_parked_shell_that_died_is_not_used(agent_proc, agent):
    await run(agent, "true")
    shell = await wait_parked(agent_proc)
    os.kill(shell, signal.SIGKILL)
    await wait_for(lambda: shell not in parked(agent_proc), 5)
    out, _, end, pid = await run(agent, "echo still-works")
    assert (out, end["exit_code"]) == ("still-works\n", 0) and pid != shell


async def test_a_parked_shell_takes_the_identity_it_runs_with(agent_proc, agent):
    # A forked sandbox (VM child, BRANCH) inherits its parent's parked shell: what the shell
    # learned when it started (ids, hostname, $RANDOM's seed, $SECONDS) comes with the command.
    await run(agent, "true")
    shell = await wait_parked(agent_proc)
    await agent.request("identity.refresh", {"sandbox_id": "sbx-new-id"})
    await asyncio.sleep(1.1)
    out, _, _, pid = await run(agent, 'echo $FORKD_SANDBOX_ID $E2B_SANDBOX_ID $SECONDS "$HOSTNAME"')
    assert (pid, out) == (shell, f"sbx-new-id sbx-new-id 0 {os.uname().nodename}\n")


async def test_prepare_parks_at_once_and_a_files_write_discards(agent_proc, agent, tmp_path):
    envs = {"HOME": str(tmp_path)}  # login scripts from here
    res = await agent.request("exec.prepare", {"envs": envs})
    assert res == {"prepared": True}
    shell = await wait_parked(agent_proc, envs=envs)
    # A login script written through the files API: the parked shell read the old ones.
    await agent.request("files.write", {"path": f"{tmp_path}/.bash_profile", "data": b"FROM_PROFILE=yes\n"})
    await wait_for(lambda: shell not in _children(agent_proc.proc.pid), 5)
    out, _, _, pid = await run(agent, "echo $FROM_PROFILE", envs=envs)
    assert out == "yes\n" and pid != shell
    # A terminal is never parked.
    assert (await agent.request("exec.prepare", {"pty": {"rows": 24, "cols": 80}})) == {"prepared": False}


async def test_a_stopping_agent_leaves_no_parked_shell(tmp_path):
    from agent_harness import AgentProcess

    proc = AgentProcess(tmp_path)
    try:
        conn = await proc.connect()
        await run(conn, "true")
        shell = await wait_parked(proc)
        await conn.close()
        proc.proc.send_signal(signal.SIGTERM)
        await asyncio.get_running_loop().run_in_executor(None, proc.proc.wait, 10)
        assert not os.path.exists(f"/proc/{shell}") or "Z" in open(f"/proc/{shell}/stat").read().split()[2]
    finally:
        proc.stop()


async def test_in_a_sandbox_the_parked_shell_runs_as_the_default_user(process_backend):
    snap = await process_backend.prepare("base")
    [child] = await process_backend.spawn(snap, 1)
    await run(child.conn, "true")  # as `user`, through setpriv

    def parked_in_sandbox():
        # Seen from the host: the agent's child waiting for its command; its pid inside and its uid.
        found = []
        for host_pid in _children(child.pid):
            if "read -r -u" in _cmdline(host_pid):
                with open(f"/proc/{host_pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
                found.append((int(status["NSpid"].split()[-1]), status["Uid"].split()[0]))
        return found

    [(pid, host_uid)] = await wait_for(parked_in_sandbox, 10)
    out, _, end, started = await run(child.conn, "echo $$ $(id -un) $HOME")
    assert (started, out, end["exit_code"]) == (pid, f"{pid} user /home/user\n", 0)
    assert host_uid != "0"  # root inside maps to an unprivileged uid outside; `user` too
