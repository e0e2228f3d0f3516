"""BRANCH benchmark: fan a live, busy sandbox out into new ones.

    python bench/branch.py --backend process --json
    python bench/branch.py --backend vm --json

Starts a real gateway (uvicorn, websockets) on the chosen backend and drives it
through the async SDK. The source sandbox holds --memory-mb MiB of touched
memory in its interpreter (a numpy array made with `run_code`) and --files-mb
MiB of files in its home directory. Then:

- pause_ms_p50 / p90: how long the source was stopped, per branch (the
  gateway's report: on the process backend the kernels' fork plus the frozen
  file sync; on the VM backend the vCPU stop to `cont`);
- branch_ms_p50: `sbx.branch(count=1)` from call to return (the child has
  answered and holds the state), over --iterations;
- children_ready_s: `sbx.branch(count=10)` from call to return;
- every child is checked: it sees the array and the files.

Baseline in the same run: rebuild_s, what a branch saves, i.e. a new sandbox
made the slow way: create it, then redo the source's work (allocate and fill
the array, write the files). ratio = rebuild_s / branch_ms_p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from _gateway import TEMPLATES_DIR, local_gateway, pct


def setup_code(memory_mb: int) -> str:
    # Touch every page: ones() writes them all.
    return f"import numpy as np\nbig = np.ones({memory_mb} * 2**20 // 8)\nbig[::4096] = 2\n"


def files_cmd(files_mb: int) -> str:
    return (
        "mkdir -p /home/user/data && "
        f"for i in $(seq {files_mb}); do head -c 1048576 /dev/urandom > /home/user/data/f$i; done"
    )


async def check_child(sbx, memory_mb: int, files_mb: int) -> None:
    n = memory_mb * 2**20 // 8
    expected = n + len(range(0, n, 4096))
    got = await sbx.eval("int(big.sum())")
    if got != expected:
        raise RuntimeError(f"{sbx.sandbox_id}: the array sums to {got}, not {expected}")
    out = (await sbx.commands.run("du -sm /home/user/data | cut -f1")).stdout.strip()
    if abs(int(out) - files_mb) > 1:
        raise RuntimeError(f"{sbx.sandbox_id}: {out} MiB of files, not {files_mb}")


async def run(args: argparse.Namespace) -> dict:
    from forkd import AsyncSandbox
    from forkd_gateway._config import PoolConfig
    from forkd_runtime._backend import Limits

    async with local_gateway(
        args.templates_dir,
        args.json,
        backend=args.backend,
        pools={"base": PoolConfig(min_ready=2, max_total=64)},
        limits=Limits(memory_mb=args.limit_mb),
    ):
        opts = {"api_key": None}

        async def prepared():
            sbx = await AsyncSandbox.create(**opts)
            result = await sbx.run_code(setup_code(args.memory_mb), timeout=600)
            if result.error:
                raise RuntimeError(f"setup failed: {result.error}")
            await sbx.commands.run(files_cmd(args.files_mb), timeout=600)
            return sbx

        # Baseline: what a branch replaces.
        rebuild = []
        for _ in range(args.baseline_runs):
            t0 = time.perf_counter()
            sbx = await prepared()
            rebuild.append(time.perf_counter() - t0)
            await sbx.kill()

        source = await prepared()
        pause_ms, branch_ms = [], []
        for _ in range(args.iterations):
            t0 = time.perf_counter()
            (kid,) = await source.branch(count=1)
            branch_ms.append((time.perf_counter() - t0) * 1000)
            pause_ms.append(source.last_branch_report.pause_ms)
            await check_child(kid, args.memory_mb, args.files_mb)
            await kid.kill()

        t0 = time.perf_counter()
        kids = await source.branch(count=args.count)
        ready_s = time.perf_counter() - t0
        pause_ms.append(source.last_branch_report.pause_ms)
        await asyncio.gather(*(check_child(k, args.memory_mb, args.files_mb) for k in kids))
        not_inherited = source.last_branch_report.not_inherited
        await asyncio.gather(*(k.kill() for k in kids))
        # The source is unharmed.
        await check_child(source, args.memory_mb, args.files_mb)
        await source.kill()
    rebuild_s = statistics.median(rebuild)
    return {
        "backend": args.backend,
        "memory_mb": args.memory_mb,
        "files_mb": args.files_mb,
        "iterations": args.iterations,
        "pause_ms_p50": round(statistics.median(pause_ms), 1),
        "pause_ms_p90": round(pct(pause_ms, 0.9), 1),
        "branch_ms_p50": round(statistics.median(branch_ms), 1),
        "branch_ms_p90": round(pct(branch_ms, 0.9), 1),
        "count": args.count,
        "children_ready_s": round(ready_s, 3),
        "rebuild_s": round(rebuild_s, 3),
        "ratio": round(rebuild_s / (statistics.median(branch_ms) / 1000), 1),
        "not_inherited": [n["what"] for n in not_inherited],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("process", "vm"), default="process")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--files-mb", type=int, default=50)
    ap.add_argument("--limit-mb", type=int, default=1024, help="memory limit of each sandbox")
    ap.add_argument("--baseline-runs", type=int, default=3)
    ap.add_argument("--templates-dir", default=TEMPLATES_DIR)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
