"""The warm pool: QEMU processes started per snapshot, waiting in ``-incoming defer``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid

from .._backend import Snapshot, SpawnError
from ._qemu import command
from ._snapshot_meta import LoadedSnapshot
from ._vm_process import VmProcess

__all__ = ["WarmPool"]

log = logging.getLogger("forkd.runtime.vm")


class WarmPool:
    """Mixed into ``VmBackend``: uses its ``machine``, ``run_root``, ``empty``,
    ``ksm`` and ``_idle`` (set between spawn bursts), and starts QEMU through
    ``VmProcesses``."""

    def _set_pool(self, s: LoadedSnapshot, target: int) -> None:
        s.pool_target = target
        self._kick(s)

    def _kick(self, s: LoadedSnapshot) -> None:
        if s.filling is None or s.filling.done():
            s.filling = asyncio.ensure_future(self._fill(s))

    async def warm(self, snapshot: Snapshot, n: int) -> None:
        """Grow the pool of ``snapshot`` to ``n`` waiting processes and wait until
        it is full: for a burst known ahead (or a benchmark). After the next
        spawn the pool is refilled to its usual size only."""
        s = self._snaps[snapshot.id]
        s.pool_target = max(s.pool_target, n)
        self._kick(s)
        while len(s.pool) < n:
            if s.filling is None or s.filling.done():
                if s.filling is not None and s.filling.exception():
                    raise SpawnError(f"pool: {s.filling.exception()}")
                self._kick(s)
            await asyncio.sleep(0.05)

    async def _fill(self, s: LoadedSnapshot) -> None:
        parallel = max(1, os.cpu_count() or 1)
        failures = 0
        while len(s.pool) + s.launching < s.pool_target:
            # A spawn burst has the CPU first: refilling waits until it is over.
            await self._idle.wait()
            k = min(parallel, s.pool_target - len(s.pool) - s.launching)
            s.launching += k
            try:
                results = await asyncio.gather(*(self._pool_vm(s) for _ in range(k)), return_exceptions=True)
            finally:
                s.launching -= k
            for r in results:
                if isinstance(r, VmProcess):
                    if s.pool_target > len(s.pool):
                        s.pool.append(r)
                    else:
                        await self._destroy(r)
                else:
                    failures += 1
                    log.error("vm pool: starting a QEMU for %s failed: %s", s.snapshot.id, r)
            if failures >= 3 * parallel:
                raise SpawnError(f"pool of {s.snapshot.id}: QEMU keeps failing to start")

    async def _pool_vm(self, s: LoadedSnapshot, tap_fd: int | None = None) -> VmProcess:
        """A QEMU waiting in ``-incoming defer`` for this snapshot, channels open
        (its NIC on ``tap_fd`` if given, else on a tap in its own empty namespace)."""
        assert self.machine is not None
        machine = self.machine
        vid = f"sbx-{uuid.uuid4().hex[:16]}"
        run = self.run_root / vid
        # The overlay must exist before QEMU opens it: a copy of the snapshot's
        # empty one (it names the parent's layer as its backing file).
        run.mkdir(mode=0o700)
        try:
            await asyncio.to_thread(shutil.copyfile, s.upper_template, run / "upper.qcow2")
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise

        layers = s.layers

        def build(qmp_fd: int, agent_fd: int) -> list[str]:
            return command(
                machine,
                s.image,
                mem_path=s.memory,
                share=False,
                qmp_fd=qmp_fd,
                agent_fd=agent_fd,
                upper=run / "upper.qcow2",
                console=None,
                incoming=True,
                chroot=self.empty,
                tap_fd=tap_fd,
                layers=layers,
                merge=self.ksm,
            )

        extra = () if tap_fd is None else (tap_fd,)
        vm = await self._launch(
            vid, build, self.default_limits, incoming=True, run=run, extra_fds=extra, mergeable=self.ksm
        )
        vm.top_file = run / "upper.qcow2"
        vm.layers = list(layers)
        try:
            await vm.qmp.set_capability("x-ignore-shared")
            # QEMU starts reading the pipe now and waits for the bytes: the
            # restore itself is then a write, no QMP round trip.
            await vm.qmp.execute("migrate-incoming", {"uri": f"fd:{vm.state_r}"})
            os.close(vm.state_r)
            vm.state_r = -1
            # A BRANCH's child starts where its source's channel was cut.
            await self._connect_agent(vm, resync=s.captured)
        except BaseException:
            await self._destroy(vm)
            raise
        return vm
