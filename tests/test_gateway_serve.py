"""`forkd serve` as a separate process: it serves, keeps its memory bounded with a slow client, and a
SIGTERM kills every sandbox it started."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from gateway_harness import Client

ROOT = Path(__file__).resolve().parent.parent
FORKD = [sys.executable, "-m", "forkd_gateway.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _describe(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/stat").read_text()
            + " "
            + Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        )
    except OSError as exc:
        return str(exc)


@pytest.fixture
def serve(template_store, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    cmd = FORKD + [
        "serve", "--port", str(port), "--state-dir", str(tmp_path / "state"),
        "--templates-dir", str(template_store.root.parent), "--backend", "process",
        "--pool", "base=1:8", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "serve.log").read_text())
        time.sleep(0.05)
    yield proc, url, tmp_path
    if proc.poll() is None:
        proc.terminate()  # a graceful stop cleans up (a SIGKILL is left for reconcile())
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()


async def test_slow_consumer_keeps_gateway_memory_bounded(serve):
    proc, url, _ = serve
    c = await Client.websocket(url)
    try:
        sid = await c.create()
        await c.run(sid, "head -c 8000000 /dev/zero")  # warm the allocator and buffers first
        base = rss_kb(proc.pid)
        total = 50_000_000
        stream = c.conn.open_inbound()
        await c.call("exec.start", sandbox_id=sid, cmd=f"head -c {total} /dev/zero", stream=stream.id)
        got, peak = 0, base
        async for _fd, _off, data in stream:
            got += len(data)
            peak = max(peak, rss_kb(proc.pid))
            await asyncio.sleep(0.01)  # a slow reader: the command could produce much faster
        assert got == total and stream.end_info["exit_code"] == 0
        growth_mb = (peak - base) / 1024
        print(
            f"gateway RSS: {base / 1024:.1f} MB before, peak growth {growth_mb:.1f} MB for {total / 1e6:.0f} MB relayed"
        )
        # Unbounded buffering would hold most of the 50 MB; the gateway holds about one window per hop.
        assert growth_mb < 24, f"gateway RSS grew by {growth_mb:.1f} MB"
    finally:
        await c.close()


async def test_sigterm_kills_every_sandbox(serve):
    proc, url, tmp_path = serve
    c = await Client.websocket(url)
    ids = [await c.create(), await c.create()]
    stream = c.conn.open_inbound()
    await c.call("exec.start", sandbox_id=ids[0], cmd="sleep 300", stream=stream.id)
    tree = descendants(proc.pid)
    before = {pid: _describe(pid) for pid in tree}
    assert len(tree) >= 3  # zygote, children...
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (the conventional exit status).
    assert await asyncio.to_thread(proc.wait, 30) in (0, -signal.SIGTERM)
    await c.close()
    # Sandboxes are killed and waited for; the zygote may take a moment more to exit (see the xfail below).
    for _ in range(100):
        if not any(alive(pid) for pid in tree):
            break
        await asyncio.sleep(0.05)
    left = {pid: (before[pid], _describe(pid)) for pid in tree if alive(pid)}
    assert not left, left
    lines = [json.loads(x) for x in (tmp_path / "state" / "audit.log").read_text().splitlines()]
    assert {r["sandbox_id"] for r in lines if r["event"] == "kill" and r.get("reason") == "shutdown"} >= set(
        ids
    )


def test_refuses_a_network_address_without_keys(tmp_path):
    out = subprocess.run(
        FORKD + ["serve", "--host", "0.0.0.0", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "without API keys" in out.stderr


async def test_backend_close_kills_the_zygote(process_backend):
    await process_backend.prepare("base")
    (zygote,) = [
        pid
        for pid in descendants(os.getpid())
        if b"forkd_agent\0--zygote" in Path(f"/proc/{pid}/cmdline").read_bytes()  # not the launcher
    ]
    os.kill(zygote, signal.SIGSTOP)  # a zygote that is slow to notice its socket closing
    try:
        await process_backend.close()
        for _ in range(40):
            if not alive(zygote):
                break
            await asyncio.sleep(0.05)
        assert not alive(zygote)
    finally:
        if alive(zygote):
            os.kill(zygote, signal.SIGKILL)
