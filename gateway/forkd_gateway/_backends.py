"""Choosing and starting the fork engine, and timing its spawns.

``auto`` picks the microVM backend where KVM is usable and that backend is installed, else the process
backend. A backend module registers here by name (``_FACTORIES``); each factory takes the gateway's
configuration and returns a started ``Backend``.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Awaitable, Callable

from forkd_runtime import TemplateStore
from forkd_runtime._backend import Backend, Child, Snapshot, SpawnOptions

from ._config import ConfigError, GatewayConfig
from ._metrics import Metrics

__all__ = ["make_backend", "choose_backend", "kvm_usable", "MeteredBackend"]

log = logging.getLogger("forkd.gateway.backends")

# Where the microVM backend class may live (written separately; looked up, not imported eagerly). Its
# constructor is expected to take the process backend's arguments: (store=TemplateStore, root=state dir).
VM_BACKEND_CANDIDATES = (
    ("forkd_runtime.vm", "VmBackend"),
    ("forkd_runtime.vm._backend", "VmBackend"),
    ("forkd_runtime._vm_backend", "VmBackend"),
)


def kvm_usable() -> bool:
    """Real hardware virtualization behind /dev/kvm. A PVM /dev/kvm opens fine
    but runs only PVM guest kernels, so opening it proves nothing."""
    try:
        from forkd_runtime.vm import kvm_status
    except ImportError:
        return False
    return kvm_status()[0]


def _vm_class() -> type[Backend] | None:
    for module, name in VM_BACKEND_CANDIDATES:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def choose_backend(requested: str) -> str:
    """The backend ``requested`` ("auto", "process", "vm") resolves to on this host."""
    if requested == "process":
        return "process"
    if requested == "vm":
        # Asked for explicitly: without KVM it still works, under TCG (slowly).
        if _vm_class() is None:
            raise ConfigError("the forkd microVM backend is not installed (use --backend process)")
        if not kvm_usable():
            log.warning("no usable KVM on this host: the vm backend runs under TCG (software emulation)")
        return "vm"
    return "vm" if kvm_usable() and _vm_class() is not None else "process"


async def _process(cfg: GatewayConfig) -> Backend:
    from forkd_runtime._process_backend import ProcessBackend

    backend = ProcessBackend(store=TemplateStore(cfg.resolved_templates_dir()), root=cfg.resolved_state_dir())
    await backend.start()
    return backend


async def _vm(cfg: GatewayConfig) -> Backend:
    cls = _vm_class()
    backend = cls(store=TemplateStore(cfg.resolved_templates_dir()), root=cfg.resolved_state_dir())
    start = getattr(backend, "start", None)
    if start is not None:
        await start()
    return backend


_FACTORIES: dict[str, Callable[[GatewayConfig], Awaitable[Backend]]] = {"process": _process, "vm": _vm}


async def make_backend(cfg: GatewayConfig) -> Backend:
    name = choose_backend(cfg.backend)
    log.info("backend: %s (requested %s)", name, cfg.backend)
    return await _FACTORIES[name](cfg)


class MeteredBackend(Backend):
    """The backend as pools see it: the same calls, with spawn latency recorded.

    Delegates by attribute lookup at call time, so a test that wraps the real backend's ``spawn`` sees
    every spawn the pools make.
    """

    def __init__(self, inner: Backend, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.name = inner.name
        self.refresh_on_handout = inner.refresh_on_handout

    async def prepare(self, template: str) -> Snapshot:
        return await self.inner.prepare(template)

    async def spawn(self, snapshot: Snapshot, n: int, options: SpawnOptions | None = None) -> list[Child]:
        t0 = time.perf_counter()
        children = await self.inner.spawn(snapshot, n, options)
        self.metrics.spawn_seconds.labels(snapshot.template).observe(time.perf_counter() - t0)
        self.metrics.spawned.labels(snapshot.template).inc(len(children))
        return children

    async def kill(self, child: Child) -> None:
        await self.inner.kill(child)

    async def capture(self, child: Child) -> Snapshot:
        return await self.inner.capture(child)

    async def delete_snapshot(self, snapshot: Snapshot) -> None:
        await self.inner.delete_snapshot(snapshot)

    def children(self) -> list[Child]:
        return self.inner.children()

    def activate(self, child: Child) -> None:
        self.inner.activate(child)

    async def close(self) -> None:
        await self.inner.close()
