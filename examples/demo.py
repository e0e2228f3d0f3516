"""forkd's main demo: 100 sandboxes through the E2B-style SDK, from a warm pool.

1. builds the `base` template if needed (a Debian root filesystem with Python and numpy),
2. starts `forkd serve` (the gateway) with a warm pool of forked, numpy-warmed sandboxes,
3. creates 100 sandboxes at once through `forkd.AsyncSandbox`, runs code in each,
   and prints the timings,
4. shows the one-line swap from E2B: `from forkd import Sandbox`.

Run it as root on Linux (sandboxes use namespaces and cgroups): `bash scripts/demo.sh`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = int(os.environ.get("FORKD_DEMO_N", "100"))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.1f} ms"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(state: Path, templates: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(ROOT / ".venv/bin/forkd"), "serve", "--port", str(port), "--backend", "process",
        "--state-dir", str(state), "--templates-dir", str(templates),
        "--pool", f"base={N}:{2 * N + 16}", "--log-level", "warning",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"forkd serve exited with {proc.returncode}")
        time.sleep(0.05)
    print(
        f"gateway up, warm pool of {N} sandboxes forked and ready in {time.perf_counter() - t0:.2f} s  ({url})"
    )
    return proc, url


async def fan_out(url: str) -> None:
    from forkd import AsyncSandbox

    os.environ["FORKD_URL"] = url
    warm = await AsyncSandbox.create()  # opens the client's one websocket
    await warm.kill()

    t0 = time.perf_counter()
    created: list[float] = []

    async def create() -> AsyncSandbox:
        t = time.perf_counter()
        sbx = await AsyncSandbox.create(metadata={"demo": "fan-out"})
        created.append(time.perf_counter() - t)
        return sbx

    sandboxes = await asyncio.gather(*(create() for _ in range(N)))
    t_created = time.perf_counter() - t0
    ids = {s.sandbox_id for s in sandboxes}

    # numpy is already imported in the warm parent: the cell only uses it.
    code = "import numpy as np, os\nrng = np.random.default_rng()\nint(rng.integers(1 << 30)), os.uname().nodename"
    ran: list[float] = []

    async def work(sbx: AsyncSandbox) -> str:
        t = time.perf_counter()
        execution = await sbx.run_code(code)
        r = await sbx.commands.run("id -un")
        ran.append(time.perf_counter() - t)
        return f"{execution.text} as {r.stdout.strip()}"

    t1 = time.perf_counter()
    results = await asyncio.gather(*(work(s) for s in sandboxes))
    t_ran = time.perf_counter() - t1

    print(
        f"\ncreated {len(ids)} distinct sandboxes in {ms(t_created)} "
        f"(each create: p50 {ms(statistics.median(created))}, max {ms(max(created))})"
    )
    print(
        f"ran Python (run_code) + a shell command in all {N} in {ms(t_ran)} "
        f"(per sandbox: p50 {ms(statistics.median(ran))})"
    )
    print(f"distinct random draws and hostnames: {len(set(results))} of {N}; e.g. {results[0]}")

    t2 = time.perf_counter()
    await asyncio.gather(*(s.kill() for s in sandboxes))
    print(f"killed all {N} in {ms(time.perf_counter() - t2)}")


def swap_example(url: str) -> None:
    print("\n--- the E2B swap: change the import line, nothing else ---")
    print("    # from e2b_code_interpreter import Sandbox\n    from forkd import Sandbox\n")
    os.environ["FORKD_URL"] = url
    from forkd import Sandbox

    t = time.perf_counter()
    with Sandbox.create() as sbx:
        r = sbx.commands.run("echo hello from $(hostname)")
        sbx.files.write("/home/user/data.txt", "1,2,3\n")
        ex = sbx.run_code("sum(int(x) for x in open('/home/user/data.txt').read().split(','))")
        print(f"    {r.stdout.strip()!r}, run_code -> {ex.text}, eval('6*7') -> {sbx.eval('6*7')}")
    print(f"    (create, command, file, code, kill: {ms(time.perf_counter() - t)})")


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the demo needs root: sandboxes use namespaces, cgroups and idmapped mounts")
    from forkd_runtime import TemplateStore, load_spec

    templates = Path(os.environ.get("FORKD_TEST_TEMPLATES", ROOT / ".cache" / "templates"))
    TemplateStore(templates).build(load_spec("base"), progress=lambda m: print(m, flush=True))
    with tempfile.TemporaryDirectory(prefix="forkd-demo-") as state:
        proc, url = start_gateway(Path(state), templates)
        try:
            asyncio.run(fan_out(url))
            swap_example(url)
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
