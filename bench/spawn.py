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


async def measure_spawn(backend, snap, n: int, pss_of, settle=None) -> dict:
    """Spawn ``n`` children of ``snap``, time them, weigh them (``pss_of(pid)`` KiB), kill them.
    ``settle(kids)``: awaited before the kill; the figures it returns are added."""
    t0 = time.monotonic()
    kids = await backend.spawn(snap, n)
    ready_s = time.monotonic() - t0
    per_child = sorted((k.ready_at - t0) * 1000 for k in kids)
    pss = [pss_of(k.pid) for k in kids]
    extra = await settle(kids) if settle is not None else {}
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
        **extra,
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


# --ksm: the host's ksmd for the run (restored after it), fast enough to settle 100 children in ~15 s.
KSMD_BENCH = {"pages_to_scan": 5000, "sleep_millisecs": 20, "use_zero_pages": 1}


async def ksm_settle(kids, timeout: float, cpu0: float | None) -> dict:
    """Wait until ksmd has merged what it will (PSS flat for 3 s after at least
    3 full scans, or ``timeout``); PSS per child then, and ksmd's CPU."""
    from forkd_runtime.vm._ksm import KSM_SYSFS, ksmd_cpu_s, process_stat

    def full_scans() -> int:
        return int((KSM_SYSFS / "full_scans").read_text())

    t0, scans0, history = time.monotonic(), full_scans(), []
    while time.monotonic() - t0 < timeout:
        await asyncio.sleep(1.0)
        history.append(statistics.mean(pss_kib(k.pid) for k in kids) / 1024)
        if full_scans() - scans0 >= 3 and len(history) > 3 and history[-4] - history[-1] < 0.05:
            break
    stats = [process_stat(k.pid) for k in kids]
    cpu1 = ksmd_cpu_s()
    return {
        "pss_mib_per_child_settled": round(history[-1], 3) if history else None,
        "ksm_settle_s": round(time.monotonic() - t0, 1),
        "ksm_merged_mib_per_child": round(
            statistics.mean(int(s.get("merging_pages", 0)) + int(s.get("zero_pages", 0)) for s in stats)
            / 256,
            3,
        ),
        "ksmd_cpu_s": round(cpu1 - cpu0, 2) if cpu0 is not None and cpu1 is not None else None,
    }


async def spawn_vm(
    store: TemplateStore, template: str, n: int, cold_boots: int, ksm_timeout: float | None = None
) -> dict:
    from forkd_runtime.vm import VmBackend
    from forkd_runtime.vm._ksm import configure, ksmd_cpu_s

    cores = os.cpu_count() or 1
    ksm = ksm_timeout is not None
    ksmd_before: dict | None = None
    settle = None
    with tempfile.TemporaryDirectory(prefix="forkd-bench-vm-") as state:
        backend = VmBackend(store=store, root=state, pool_size=0, keep_snapshots=False, ksm=ksm)
        await backend.start()
        try:
            snap = await backend.prepare(template)
            t0 = time.monotonic()
            await backend.warm(snap, n)
            pool_fill_s = time.monotonic() - t0
            await asyncio.sleep(1.0)  # let the pool's processes go idle
            if ksm:
                # On before the clock starts, as on a host that runs it: ready_s includes its interference.
                cpu0 = ksmd_cpu_s()
                ksmd_before = configure(**KSMD_BENCH, run=1)
                settle = lambda kids: ksm_settle(kids, ksm_timeout, cpu0)  # noqa: E731
            try:
                figures = await measure_spawn(backend, snap, n, pss_kib, settle)
            finally:
                if ksmd_before is not None:
                    configure(**ksmd_before)
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
        **({"ksmd": {**KSMD_BENCH, "run": 1, "restored_to": ksmd_before}} if ksm else {}),
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
    ap.add_argument(
        "--ksm",
        type=float,
        metavar="TIMEOUT",
        default=None,
        help="vm: children mergeable, the host's ksmd ON for the run (restored after); wait up to TIMEOUT s "
        "for merging to settle and report pss_mib_per_child_settled and ksmd_cpu_s too",
    )
    args = ap.parse_args()

    store = TemplateStore(args.templates_dir)
    store.build(load_spec(args.template), progress=(lambda m: None) if args.json else print)
    rootfs = store.get(args.template).rootfs
    result = {"backend": args.backend, "n": args.n, "template": args.template}
    cores = os.cpu_count() or 1
    if args.backend == "vm":
        result.update(asyncio.run(spawn_vm(store, args.template, args.n, args.cold_boots or cores, args.ksm)))
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
