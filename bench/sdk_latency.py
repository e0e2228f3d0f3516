"""SDK latency benchmark: what a user of `from forkd import Sandbox` waits for.

    python bench/sdk_latency.py --json

Starts a real gateway (uvicorn, websockets, process backend, warm pool of the
`base` template) in this process's event loop, and drives it through the
async SDK over a real websocket:

- create_run_p50_ms / p99: `AsyncSandbox.create()` then `commands.run("true")`
  done, over --iterations (each sandbox is killed after, off the clock);
- create_p50_ms: the create alone;
- eval_p50_ms: `sbx.eval("1+1")` on a warm sandbox;
- stream_mb_s: a command writing --stream-mb MB to stdout, received by the SDK;
- first_byte_ms: from `commands.run(..., background=True)` to the first stdout byte.
The baseline in the same run is the agent's own round trip (`ping` straight
to a sandbox's agent, no gateway, no SDK): ratios show what the layers add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from _gateway import TEMPLATES_DIR, local_gateway, pct


async def run(args: argparse.Namespace) -> dict:
    from forkd import AsyncSandbox
    from forkd_gateway._config import PoolConfig

    async with local_gateway(
        args.templates_dir,
        args.json,
        backend="process",
        pools={"base": PoolConfig(min_ready=args.pool, max_total=args.pool + 64)},
    ) as gateway:
        opts = {"api_key": None}
        # Warm the connection (one websocket per client, reused by every sandbox).
        s = await AsyncSandbox.create(**opts)
        await s.commands.run("true")
        await s.kill()

        create_ms, create_run_ms = [], []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            sbx = await AsyncSandbox.create(**opts)
            t1 = time.perf_counter()
            await sbx.commands.run("true")
            t2 = time.perf_counter()
            create_ms.append((t1 - t0) * 1000)
            create_run_ms.append((t2 - t0) * 1000)
            await sbx.kill()
            if args.pace:
                await asyncio.sleep(args.pace)  # let the pool refill, as between real requests

        sbx = await AsyncSandbox.create(**opts)
        await sbx.eval("1+1")
        eval_ms = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            assert await sbx.eval("1+1") == 2
            eval_ms.append((time.perf_counter() - t0) * 1000)

        first_ms = []
        for _ in range(20):
            got = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            h = await sbx.commands.run(
                "echo x; sleep 5",
                background=True,
                on_stdout=lambda _s, f=got: f.done() or f.set_result(time.perf_counter()),
            )
            first_ms.append((await got - t0) * 1000)
            await h.kill()

        n = args.stream_mb * 1024 * 1024
        received = 0

        def count(chunk: str) -> None:
            nonlocal received
            received += len(chunk)

        t0 = time.perf_counter()
        await sbx.commands.run(f"head -c {n} /dev/zero | tr '\\0' 'x'", on_stdout=count, timeout=600)
        stream_s = time.perf_counter() - t0
        if received != n:
            raise RuntimeError(f"received {received} of {n} bytes")

        # Baseline: the agent's own round trip, no gateway, no SDK.
        child = gateway.sandboxes[sbx.sandbox_id].child
        ping_ms = []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            await child.conn.request("ping")
            ping_ms.append((time.perf_counter() - t0) * 1000)
        await sbx.kill()
    return {
        "iterations": args.iterations,
        "create_run_p50_ms": round(statistics.median(create_run_ms), 2),
        "create_run_p99_ms": round(pct(create_run_ms, 0.99), 2),
        "create_p50_ms": round(statistics.median(create_ms), 2),
        "eval_p50_ms": round(statistics.median(eval_ms), 3),
        "stream_mb_s": round(args.stream_mb / stream_s, 1),
        "first_byte_ms": round(statistics.median(first_ms), 2),
        "agent_ping_p50_ms": round(statistics.median(ping_ms), 3),
        "eval_vs_agent_ping": round(statistics.median(eval_ms) / statistics.median(ping_ms), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--pool", type=int, default=16, help="warm pool size (min_ready)")
    ap.add_argument("--pace", type=float, default=0.0, help="seconds between create iterations")
    ap.add_argument("--stream-mb", type=int, default=200)
    ap.add_argument("--templates-dir", default=TEMPLATES_DIR)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
