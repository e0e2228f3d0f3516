"""Spawn benchmark: how fast N warm children come up, against cold-starting the same work.

    python bench/spawn.py --backend process -n 100 --json

ready_s: wall time from the spawn request until all N children answered a ping
through their agent. per_child_ms_*: each child's time from the request to its
answer. pss_mib_per_child: mean Pss of the children's processes (smaps_rollup),
taken while all N are alive. baseline_s: the same N, each a cold
`python3 -c "import numpy; numpy.zeros(5).tolist()"` with the template's own
interpreter (chroot into its root), as many at a time as there are cores,
measured in the same run. ratio = baseline_s / ready_s.

--backend vm: children are QEMU microVMs restored from the template's warm
parent snapshot (accel: "kvm" on VT-x/AMD-V hosts, else "tcg"). The pool of
pre-started QEMU processes is filled to N before the clock starts (pool_fill_s
says how long that took); ready means each child answered its identity refresh.
pss_mib_per_child is the QEMU process's Pss. The baseline is what a fork saves:
cold-booting the same template to an answering agent with its warm-up done,
under the same accelerator; `cores` boots at once are measured in the same run
(cold_boot_s) and scaled to N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from forkd_runtime import TemplateStore, load_spec

ROOT = Path(__file__).resolve().parent.parent
COLD = "import numpy; numpy.zeros(5).tolist()"


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(pid: int) -> int:
    """Pss of a process and all its descendants (a sandbox's whole process tree)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += pss_kib(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return total


def baseline(rootfs: Path, n: int, parallel: int) -> float:
    async def one(sem: asyncio.Semaphore) -> None:
        async with sem:
            proc = await asyncio.create_subprocess_exec("chroot", str(rootfs), "python3", "-c", COLD)
            if await proc.wait() != 0:
                raise RuntimeError("cold python failed")

    async def run() -> float:
        sem = asyncio.Semaphore(parallel)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(sem) for _ in range(n)))
        return time.perf_counter() - t0

    return asyncio.run(run())


async def measure_spawn(backend, snap, n: int, pss_of) -> dict:
    """Spawn ``n`` children of ``snap``, time them, weigh them (``pss_of(pid)`` KiB), kill them."""
    t0 = time.monotonic()
    kids = await backend.spawn(snap, n)
    ready_s = time.monotonic() - t0
    per_child = sorted((k.ready_at - t0) * 1000 for k in kids)
    pss = [pss_of(k.pid) for k in kids]
    t1 = time.monotonic()
    await asyncio.gather(*(backend.kill(k) for k in kids))
    teardown_s = time.monotonic() - t1
    return {
        "n_ready": len(kids),
        "ready_s": round(ready_s, 4),
        "per_child_ms_p50": round(statistics.median(per_child), 2),
        "per_child_ms_p90": round(per_child[int(0.9 * (len(per_child) - 1))], 2),
        "pss_mib_per_child": round(statistics.mean(pss) / 1024, 3),
        "teardown_s": round(teardown_s, 4),
    }


async def spawn_process(store: TemplateStore, template: str, n: int) -> dict:
    from forkd_runtime._process_backend import ProcessBackend

    with tempfile.TemporaryDirectory(prefix="forkd-bench-") as state:
        backend = ProcessBackend(store=store, root=state)
        await backend.start()
        try:
            snap = await backend.prepare(template)
            # Steady state: the zygote has made its network namespaces ahead (as it
            # does whenever it is idle); the cold figure is reported separately.
            await backend.settle(template)
            return await measure_spawn(backend, snap, n, tree_pss_kib)
        finally:
            await backend.close()


async def spawn_vm(store: TemplateStore, template: str, n: int, cold_boots: int) -> dict:
    from forkd_runtime.vm import VmBackend

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="forkd-bench-vm-") as state:
        backend = VmBackend(store=store, root=state, pool_size=0, keep_snapshots=False)
        await backend.start()
        try:
            snap = await backend.prepare(template)
            t0 = time.monotonic()
            await backend.warm(snap, n)
            pool_fill_s = time.monotonic() - t0
            await asyncio.sleep(1.0)  # let the pool's processes go idle
            figures = await measure_spawn(backend, snap, n, pss_kib)
            # The baseline: cold boots to a warm, answering agent (cores at a time).
            batches = max(1, cold_boots // cores)
            t2 = time.monotonic()
            boots: list[float] = []
            for _ in range(batches):
                boots += await backend.cold_boot(template, cores)
            batch_s = (time.monotonic() - t2) / batches
        finally:
            await backend.close()
    return {
        "accel": snap.meta["accel"],
        **figures,
        "pool_fill_s": round(pool_fill_s, 3),
        "parent_boot_s": snap.meta["boot_s"],
        "snapshot_ms": snap.meta["snapshot_ms"],
        "cold_boot_s": [round(b, 2) for b in boots],
        # N cold boots, `cores` at a time, each batch taking what the measured ones took.
        "baseline_s": round(batch_s * n / cores, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["process", "vm"], default="process")
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--template", default="base")
    ap.add_argument(
        "--templates-dir", default=os.environ.get("FORKD_TEST_TEMPLATES", str(ROOT / ".cache" / "templates"))
    )
    ap.add_argument("--baseline-n", type=int, default=0, help="cold runs to time (default n)")
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    ap.add_argument("--cold-boots", type=int, default=0, help="vm: cold boots to time (default: cores)")
    args = ap.parse_args()

    store = TemplateStore(args.templates_dir)
    store.build(load_spec(args.template), progress=(lambda m: None) if args.json else print)
    rootfs = store.get(args.template).rootfs
    result = {"backend": args.backend, "n": args.n, "template": args.template}
    cores = os.cpu_count() or 1
    if args.backend == "vm":
        result.update(asyncio.run(spawn_vm(store, args.template, args.n, args.cold_boots or cores)))
        result["baseline_parallel"] = cores
        result["ratio"] = round(result["baseline_s"] / result["ready_s"], 1)
        print(json.dumps(result))
        return
    result.update(asyncio.run(spawn_process(store, args.template, args.n)))
    bn = args.baseline_n or args.n
    b = baseline(rootfs, bn, cores) * (args.n / bn)
    result["baseline_s"] = round(b, 3)
    result["baseline_parallel"] = cores
    result["ratio"] = round(b / result["ready_s"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
