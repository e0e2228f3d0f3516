"""Start the real guest agent as a subprocess and talk to it through the protocol."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport


class AgentProcess:
    def __init__(
        self,
        tmp: Path,
        warmup: str = "",
        extra: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.sock = str(tmp / "agent.sock")
        # prefix wraps the agent (e.g. `unshare --uts --fork`); proc.pid is then the wrapper's.
        cmd = [*(prefix or []), sys.executable, "-m", "forkd_agent", "--listen", f"unix:{self.sock}"]
        cmd += ["--log-level", "INFO"]
        if warmup:
            cmd += ["--warmup", warmup]
        cmd += extra or []
        self.log = open(tmp / "agent.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {self.proc.returncode}: {(tmp / 'agent.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not start")
            time.sleep(0.01)

    async def connect(self) -> Connection:
        # The socket file appears at bind(), a moment before listen(): a busy
        # machine can put a connect() in between, which is then refused.
        deadline = time.monotonic() + 5
        while True:
            try:
                transport = await StreamTransport.connect_unix(self.sock)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)
        conn = Connection(transport, name="test-client").start()
        await conn.request("hello", {"version": p.PROTOCOL_VERSION})
        return conn

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait(5)
        self.log.close()


async def collect(stream) -> tuple[bytes, bytes, dict]:
    """Drain an exec stream: (stdout, stderr, end_info)."""
    out, err = bytearray(), bytearray()
    async for fd, _offset, data in stream:
        (out if fd == p.FD_STDOUT else err).extend(data)
    return bytes(out), bytes(err), stream.end_info or {}


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
