"""What a process-backend sandbox can see and do: its own processes and files
only, root that is unprivileged on the host, a seccomp filter, loopback only,
and an identity of its own. Everything goes through the real backend and each
child's agent."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
import uuid

import pytest

from forkd_runtime._process_backend import UID_BASE
from process_helpers import check, descendants, run


async def _spawn(backend, n: int):
    snap = await backend.prepare("base")
    kids = await backend.spawn(snap, n)
    assert len(kids) == n
    return kids


def _host_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(ln for ln in f if ln.startswith("Uid:"))
    return int(line.split()[1])


def _inside_pids(ps_output: str) -> list[int]:
    return sorted(int(x) for x in ps_output.split())


# -- processes ---------------------------------------------------------------


async def test_child_sees_only_its_own_processes(process_backend):
    a, b = await _spawn(process_backend, 2)
    # Something long-lived and recognisable in each sandbox, and on the host.
    await a.conn.request("exec.start", {"cmd": "exec sleep 301", "user": "root"})
    await b.conn.request("exec.start", {"cmd": "exec sleep 302", "user": "root"})
    host = subprocess.Popen(["sleep", "303"])
    try:
        for kid, mine, other in ((a, "sleep 301", "sleep 302"), (b, "sleep 302", "sleep 301")):
            for _ in range(100):  # until the shell has exec'd the sleep
                out = await check(kid, "ps -e -o pid=,args=")
                args = [line.split(None, 1)[1] for line in out.splitlines() if line.strip()]
                if mine in args:
                    break
                await asyncio.sleep(0.02)
            assert mine in args
            assert other not in args and "sleep 303" not in args
            assert not any("pytest" in x for x in args)
            # /proc agrees with ps: the agent as 1, the sleep, and this command's processes.
            pids = _inside_pids(await check(kid, "ls /proc | grep -E '^[0-9]+$'"))
            assert pids[0] == 1 and len(pids) < 10, pids
            # Host pid numbers mean nothing inside: neither the host's process
            # nor a sibling (by its host pid) can be signalled.
            for target in (host.pid, os.getpid(), (b if kid is a else a).pid):
                r = await run(kid, f"kill -9 {target}")
                assert r.exit_code != 0 and b"No such process" in r.err, (target, r)
        assert host.poll() is None  # the host's sleep survived
        assert a.alive and b.alive
    finally:
        host.kill()
        host.wait()


async def test_root_inside_is_unprivileged_on_the_host(process_backend):
    (kid,) = await _spawn(process_backend, 1)
    assert (await check(kid, "id -u")).strip() == "0"
    assert _host_uid(kid.pid) == UID_BASE
    assert (await check(kid, "cat /proc/self/uid_map")).split() == ["0", str(UID_BASE), "65536"]
    # Processes started inside, as root and as `user`, are the range's uids on the host.
    await kid.conn.request("exec.start", {"cmd": "exec sleep 311", "user": "root"})
    await kid.conn.request("exec.start", {"cmd": "exec sleep 312", "user": "user"})
    want = {"311": UID_BASE, "312": UID_BASE + 1000}
    seen: dict[str, int] = {}
    for _ in range(100):
        for pid in descendants(kid.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv[:1] == [b"sleep"] and argv[1].decode() in want:
                seen[argv[1].decode()] = _host_uid(pid)
        if len(seen) == len(want):
            break
        await asyncio.sleep(0.02)
    assert seen == want


async def test_seccomp_and_no_new_privileges(process_backend):
    (kid,) = await _spawn(process_backend, 1)
    for cmd in ("unshare -U true", "unshare -n true", "mount -t tmpfs x /mnt", "umount /proc"):
        r = await run(kid, cmd)
        assert r.exit_code not in (0, None), (cmd, r)
    assert "NoNewPrivs:\t1" in await check(kid, "cat /proc/self/status")
    assert re.search(r"Seccomp:\s+2", await check(kid, "cat /proc/self/status"))
    # /mnt stayed the template's empty directory.
    assert (await check(kid, "ls -A /mnt")).strip() == ""


async def test_sudo_gains_nothing_beyond_the_sandbox(process_backend):
    (kid,) = await _spawn(process_backend, 1)
    assert (await check(kid, "id -u", user="user")).strip() == "1000"
    # Whatever sudo manages, the result is at most the sandbox's root: no
    # namespaces, no mounts, and its uids are the unprivileged host range.
    r = await run(
        kid,
        "sudo -n sh -c 'id -u; cat /proc/self/uid_map; unshare -U true && echo ESCAPED;"
        " mount -t tmpfs x /mnt && echo MOUNTED; exit 0'",
        user="user",
    )
    assert b"ESCAPED" not in r.out and b"MOUNTED" not in r.out, r
    if r.ok:
        lines = r.text.split("\n")
        assert lines[0] == "0"
        assert lines[1].split() == ["0", str(UID_BASE), "65536"]
    else:
        # Refused outright (no_new_privs stops the setuid bit): still user 1000.
        assert b"no new privileges" in r.err or b"password" in r.err, r


# -- files -------------------------------------------------------------------


async def test_host_files_are_not_visible(process_backend, tmp_path):
    marker = tmp_path / f"host-marker-{uuid.uuid4().hex}"
    marker.write_text("host secret")
    (kid,) = await _spawn(process_backend, 1)
    r = await run(kid, f"test -e {marker}")
    assert r.exit_code == 1
    r = await run(kid, f"ls {tmp_path}")
    assert r.exit_code != 0
    # The host's state directory (children's layers, the zygote's control files) is not reachable either.
    r = await run(kid, f"ls {process_backend.state}")
    assert r.exit_code != 0


async def test_etc_hostname_is_the_sandbox_s_not_the_host_s(process_backend):
    (kid,) = await _spawn(process_backend, 1)
    with open("/etc/hostname") as f:
        host_name = f.read().strip()
    inside = (await check(kid, "cat /etc/hostname")).strip()
    assert inside != host_name
    assert inside == (await check(kid, "hostname")).strip()
    # ...and it resolves, so tools like sudo do not complain.
    await check(kid, "getent hosts $(hostname)")


async def test_writes_stay_in_their_own_sandbox(process_backend):
    a, b = await _spawn(process_backend, 2)
    tpl = process_backend.store.get("base").rootfs
    name = f"written-{uuid.uuid4().hex}"
    original_issue = (tpl / "etc/issue").read_bytes()
    await check(a, f"echo from-a > /root/{name} && echo from-a > /tmp/{name} && echo changed > /etc/issue")
    await check(a, f"mkdir -p /usr/local/{name} && rm /etc/debian_version")
    assert (await check(a, f"cat /root/{name}")).strip() == "from-a"

    later = (await process_backend.spawn(await process_backend.prepare("base"), 1))[0]
    for kid in (b, later):
        for path in (f"/root/{name}", f"/tmp/{name}", f"/usr/local/{name}"):
            assert (await run(kid, f"test -e {path}")).exit_code == 1, (kid.id, path)
        assert (await check(kid, "cat /etc/issue")).encode() == original_issue
        await check(kid, "test -f /etc/debian_version")
    # The template on disk is untouched.
    for path in (f"root/{name}", f"tmp/{name}", f"usr/local/{name}"):
        assert not (tpl / path).exists()
    assert (tpl / "etc/issue").read_bytes() == original_issue
    assert (tpl / "etc/debian_version").is_file()


# -- network -----------------------------------------------------------------


def _primary_ip() -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.254", 9))  # no packet is sent: this only picks a route
        ip = s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()
    return None if ip.startswith("127.") else ip


CONNECT = """python3 -c '
import socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected", s.recv(16))
except OSError as e:
    print("refused", e.errno)
' {host} {port}"""


async def test_network_is_loopback_only(process_backend):
    (kid,) = await _spawn(process_backend, 1)
    names = (
        await check(kid, "python3 -c 'import socket; print(*[n for _, n in socket.if_nameindex()])'")
    ).split()
    assert names == ["lo"]
    dev = await check(kid, "cat /proc/net/dev")
    assert [ln.split(":")[0].strip() for ln in dev.splitlines()[2:]] == ["lo"]
    assert (await check(kid, "cat /proc/net/route")).count("\n") <= 1  # header only: no default route

    listeners = []
    try:
        targets = [("127.0.0.1", None)]
        primary = _primary_ip()
        if primary:
            targets.append((primary, None))
        for i, (host, _) in enumerate(targets):
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((host, 0))
            srv.listen(8)
            srv.setblocking(False)
            listeners.append(srv)
            targets[i] = (host, srv.getsockname()[1])
        for host, port in targets:
            out = await check(kid, CONNECT.format(host=host, port=port))
            assert out.startswith("refused"), (host, out)
        for srv in listeners:  # nobody got through to the host's listeners
            with pytest.raises(BlockingIOError):
                srv.accept()
        assert primary, "no host IP with a route to test against"
    finally:
        for srv in listeners:
            srv.close()


SERVE = """python3 -c '
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 8000))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode())
    c.close()
' {token} >/dev/null 2>&1"""


async def test_children_have_separate_network_namespaces(process_backend):
    a, b = await _spawn(process_backend, 2)
    tokens = {a.id: "token-a", b.id: "token-b"}
    for kid in (a, b):  # both bind the same address and port
        await kid.conn.request("exec.start", {"cmd": SERVE.format(token=tokens[kid.id]), "user": "root"})
    for kid in (a, b):
        for _ in range(100):
            out = await check(kid, CONNECT.format(host="127.0.0.1", port=8000))
            if out.startswith("connected"):
                break
            await asyncio.sleep(0.05)
        # Each reaches its own server only.
        assert out.strip() == f"connected b'{tokens[kid.id]}'", out
        assert (await check(kid, CONNECT.format(host="127.0.0.1", port=8001))).startswith("refused")


# -- identity ----------------------------------------------------------------


async def test_identity_is_unique_per_child(process_backend):
    kids = await _spawn(process_backend, 5)
    infos = [await k.conn.request("info") for k in kids]
    assert len({i["sandbox_id"] for i in infos}) == 5
    assert {i["sandbox_id"] for i in infos} == {k.id for k in kids}
    hostnames = [(await check(k, "hostname")).strip() for k in kids]
    assert len(set(hostnames)) == 5
    assert [i["hostname"] for i in infos] == hostnames
    script = 'python3 -c "import os,uuid,random;print(os.urandom(8).hex(), uuid.uuid4(), random.random())"'
    outs = [(await check(k, script)).split() for k in kids]
    for col in range(3):
        assert len({o[col] for o in outs}) == 5, outs


async def test_clock_matches_the_host(process_backend):
    kids = await _spawn(process_backend, 2)
    for kid in kids:
        before = time.time()
        inside = float(await check(kid, "python3 -c 'import time; print(time.time())'"))
        after = time.time()
        assert before - 1 <= inside <= after + 1
