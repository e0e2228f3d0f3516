"""``python -m forkd_agent --listen unix:/run/forkd.sock [--warmup 'import numpy']``"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import sys
import time

from ._features import load_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="forkd_agent", description="forkd guest agent")
    ap.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="unix:PATH (listen), fd:N (inherited socket), device:PATH (virtio-serial port); repeatable",
    )
    ap.add_argument("--warmup", default="", help="Python code run once before serving (e.g. 'import numpy')")
    ap.add_argument("--warmup-file", default="", help="file holding warm-up code")
    ap.add_argument("--sandbox-id", default="")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--zygote", default="", metavar="fd:N", help="run as a zygote on this control socket")
    ap.add_argument("--seccomp", default="", help="zygote: file with the children's seccomp BPF program")
    return ap.parse_args(argv)


def warm_up(code: str) -> dict:
    """Run the warm-up in ``__main__`` so every fork (eval kernels, children) inherits it."""
    t0 = time.perf_counter()
    if code:
        main = sys.modules["__main__"].__dict__
        exec(compile(code, "<warmup>", "exec"), main)
    return {
        "marker": hashlib.sha256(code.encode()).hexdigest()[:16] if code else None,
        "warmup_s": round(time.perf_counter() - t0, 6),
        "at": time.time(),
    }


async def run(args: argparse.Namespace, warm: dict) -> None:
    from ._server import Agent, serve_device, serve_fd, serve_unix

    agent = Agent(sandbox_id=args.sandbox_id, warm=warm)
    await agent.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stopping.set)
    waiters = []
    servers = []
    for addr in args.listen or ["unix:/run/forkd-agent.sock"]:
        kind, _, target = addr.partition(":")
        if kind == "unix":
            servers.append(await serve_unix(agent, target))
        elif kind == "fd":
            # The runtime's private channel: when it closes, the sandbox is over.
            waiters.append(asyncio.ensure_future(serve_fd(agent, int(target))))
        elif kind == "device":
            waiters.append(asyncio.ensure_future(serve_device(agent, target)))
        else:
            raise SystemExit(f"unknown listen address {addr!r}")
    stop = asyncio.ensure_future(agent.stopping.wait())
    await asyncio.wait([stop, *waiters], return_when=asyncio.FIRST_COMPLETED)
    for s in servers:
        s.close()
    for w in waiters:
        w.cancel()
    await agent.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="forkd-agent %(levelname)s %(message)s")
    code = args.warmup
    if args.warmup_file:
        with open(args.warmup_file) as f:
            code = f.read()
    load_features()
    warm = warm_up(code)
    if args.zygote:
        from . import _zygote

        kind, _, fd = args.zygote.partition(":")
        if kind != "fd":
            raise SystemExit("--zygote takes fd:N")
        _zygote.run(int(fd), warm, args.seccomp)
        return
    asyncio.run(run(args, warm))


if __name__ == "__main__":
    main()
