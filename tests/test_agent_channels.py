"""The agent serves the same protocol over every byte stream it may be given."""

import asyncio
import os
import pty
import socket
import subprocess
import sys
import termios
import tty

import forkd
from forkd import _exceptions as exc
from forkd import protocol as p
from forkd._connection import Connection
from forkd._transports import StreamTransport


async def _talk(conn: Connection) -> dict:
    await conn.request("hello", {"version": p.PROTOCOL_VERSION})
    stream = conn.open_inbound()
    await conn.request("exec.start", {"cmd": "echo over-the-channel", "stream": stream.id})
    out = b"".join([d async for _, _, d in stream])
    assert out == b"over-the-channel\n"
    return await conn.request("info")


async def test_inherited_socketpair_and_exit_when_it_closes():
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forkd_agent", "--listen", f"fd:{theirs.fileno()}"],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    try:
        ours.setblocking(False)
        conn = Connection(await StreamTransport.from_socket(ours)).start()
        info = await _talk(conn)
        assert info["pid"] == proc.pid
        await conn.close()
        # The runtime's private channel is the sandbox's lifeline: closing it ends the agent.
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_character_device_channel():
    # A pty slave in raw mode is a character device carrying bytes unchanged,
    # like a virtio-serial port inside a VM.
    master, slave = pty.openpty()
    tty.setraw(slave)
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    path = os.ttyname(slave)
    proc = subprocess.Popen([sys.executable, "-m", "forkd_agent", "--listen", f"device:{path}"])
    try:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(master, "rb", 0))
        wt, wp = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(master), "wb", 0)
        )
        writer = asyncio.StreamWriter(wt, wp, reader, loop)
        conn = Connection(StreamTransport(reader, writer)).start()
        info = await asyncio.wait_for(_talk(conn), 20)
        assert info["pid"] == proc.pid
        await conn.close()
    finally:
        proc.kill()
        proc.wait()
        os.close(slave)


def test_every_wire_code_maps_to_exactly_one_exception_class():
    assert set(exc.ERROR_CLASSES) == set(p.ErrorCode)
    assert len(set(exc.ERROR_CLASSES.values())) == len(p.ErrorCode)
    for code, cls in exc.ERROR_CLASSES.items():
        raised = exc.from_rpc_error(p.RpcError(code, "boom"))
        assert type(raised) is cls and str(raised) == "boom"
        assert getattr(forkd, cls.__name__) is cls  # importable from the top-level package
    # E2B's hierarchy
    assert issubclass(exc.FileNotFoundException, exc.NotFoundException)
    assert issubclass(exc.SandboxNotRunningException, exc.TimeoutException)
    assert not issubclass(exc.AuthenticationException, exc.SandboxException)
