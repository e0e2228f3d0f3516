"""The guest side of a forkd microVM: PID 1 once the initramfs is done.

Copied into every VM image as ``forkd_vm_guest`` and run as
``python3 -m forkd_vm_guest --port /dev/virtio-ports/NAME --warmup-file F``.
Not imported on the host.

It runs the template's warm-up, then answers ``hello``, ``ping``, ``info`` and
``identity.refresh`` from a small blocking loop on the virtio-serial port, and
only starts the full asyncio agent at the first other frame, handing it every
byte not yet answered (frames are handled strictly in order; nothing is lost).

Why: the parent VM is snapshotted while waiting in this loop. Under TCG every
child translates anew all the guest code it runs after its restore; the host's
first requests to a child (its identity refresh, then a ping) cost about half
as much here as through the event loop, the connection engine and the task
machinery, and a child that is never used never pays for them at all.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from forkd import protocol as p
from forkd._transports import StreamTransport

EARLY = frozenset({"hello", "ping", "info", "identity.refresh"})
_LEN = 4


class _NeedsAgent(Exception):
    """An early handler wanted to wait for something: the full agent must run it."""


class _Early:
    """The part of the agent object the early handlers use."""

    contexts = None  # no eval kernel exists before the full agent

    def __init__(self, sandbox_id: str, warm: dict) -> None:
        self.sandbox_id = sandbox_id
        self.warm = warm
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        # Entropy of the last identity refresh: numpy's global state is seeded
        # from it when the full agent starts (see _refresh_early).
        self.material: bytes | None = None

    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic


def _run_now(coro):
    """Run a handler coroutine that never waits (these never do before the
    full agent exists) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise _NeedsAgent


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except InterruptedError:
            continue


def _refresh_early(handler, early: _Early, params: dict):
    """identity.refresh with numpy's global state left for the hand-over.

    Only code forked from the agent (eval kernels, which only the full agent
    starts) inherits numpy's state, and seeding it is a sixth of the guest code
    a child runs on its way to ready. So numpy is hidden from the refresh here
    and seeded from the same entropy just before the full agent starts."""
    np = sys.modules.pop("numpy", None)
    try:
        result = _run_now(handler(early, None, params))
    finally:
        if np is not None:
            sys.modules["numpy"] = np
    if np is not None and isinstance(result, dict):
        early.material = params.get("entropy") if isinstance(params.get("entropy"), bytes) else os.urandom(64)
        result.get("random", {})["numpy"] = True  # done before anything can use it
    return result


def _seed_numpy(early: _Early) -> None:
    if early.material is None or "numpy" not in sys.modules:
        return
    from forkd_agent import _identity

    state = __import__("random").getstate()
    _identity._refresh_random(early.material)  # numpy, and `random` again from the same seed
    __import__("random").setstate(state)


def serve_early(fd: int, early: _Early, methods: dict) -> bytes:
    """Answer early requests on the (blocking) port ``fd``; return the bytes
    from the first frame that needs the full agent on."""
    buf = bytearray()
    while True:
        try:
            data = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not data:
            # The host end is not connected (a read then returns at once):
            # wait for it without spinning.
            time.sleep(0.05)
            continue
        buf += data
        while len(buf) >= _LEN:
            size = int.from_bytes(buf[:_LEN], "big")
            if size > p.MAX_FRAME_SIZE:
                return bytes(buf)  # the agent refuses it properly
            if len(buf) < _LEN + size:
                break
            try:
                msg = p.decode(bytes(buf[_LEN : _LEN + size]))
            except p.ProtocolError:
                return bytes(buf)
            if not (isinstance(msg, p.Request) and msg.method in EARLY):
                return bytes(buf)
            try:
                handler = methods[msg.method]
                if msg.method == "identity.refresh":
                    result = _refresh_early(handler, early, msg.params)
                else:
                    result = _run_now(handler(early, None, msg.params))
                reply = p.Response(msg.id, None, result)
            except _NeedsAgent:
                return bytes(buf)
            except p.RpcError as exc:
                reply = p.Response(msg.id, exc, None)
            _write_all(fd, p.frame(p.encode(reply)))
            del buf[: _LEN + size]


async def serve_full(fd: int, port: str, initial: bytes, early: _Early) -> None:
    from forkd_agent._server import Agent, serve_device

    _seed_numpy(early)
    agent = Agent(sandbox_id=early.sandbox_id, warm=early.warm)
    agent.started_at, agent.started_monotonic = early.started_at, early.started_monotonic
    await agent.start()
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    rfile = os.fdopen(fd, "rb", buffering=0)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    reader = asyncio.StreamReader(limit=StreamTransport.READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    wtransport, wproto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
    writer = asyncio.StreamWriter(wtransport, wproto, reader, loop)
    conn = agent.attach(StreamTransport(reader, writer, initial=initial), name=f"device:{port}")
    await conn.wait_closed()
    # Later host connections: the agent's own port loop (reopens after each hang-up).
    await serve_device(agent, port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="forkd_vm_guest")
    ap.add_argument("--port", required=True, help="the agent's virtio-serial port")
    ap.add_argument("--warmup-file", default="")
    ap.add_argument("--sandbox-id", default="forkd-parent")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="forkd-agent %(levelname)s %(message)s")

    from forkd_agent.__main__ import warm_up
    from forkd_agent._features import load_features
    from forkd_agent._methods import METHODS

    code = ""
    if args.warmup_file:
        with open(args.warmup_file) as f:
            code = f.read()
    load_features()
    early = _Early(args.sandbox_id, warm_up(code))
    while True:
        try:
            fd = os.open(args.port, os.O_RDWR | os.O_CLOEXEC)
            break
        except OSError as exc:
            print(f"forkd_vm_guest: cannot open {args.port}: {exc}", file=sys.stderr)
            time.sleep(0.1)
    initial = serve_early(fd, early, METHODS)
    asyncio.run(serve_full(fd, args.port, initial, early))


if __name__ == "__main__":
    main()
