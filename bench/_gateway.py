"""What the gateway benchmarks share: a real gateway on a free loopback port, and percentiles."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = os.environ.get("FORKD_TEST_TEMPLATES", str(ROOT / ".cache" / "templates"))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


@contextlib.asynccontextmanager
async def local_gateway(templates_dir: str, quiet: bool, **config: Any) -> AsyncIterator[Any]:
    """A started ``Gateway`` (``config``: GatewayConfig fields) serving uvicorn on
    127.0.0.1, with ``FORKD_URL`` pointing the SDK at it; state in a temporary
    directory, removed with everything in it at the end."""
    from forkd_gateway._app import running_server
    from forkd_gateway._config import GatewayConfig
    from forkd_gateway._gateway import Gateway
    from forkd_runtime import TemplateStore, load_spec

    TemplateStore(templates_dir).build(load_spec("base"), progress=(lambda m: None) if quiet else print)
    with tempfile.TemporaryDirectory(prefix="forkd-bench-") as state:
        gateway = Gateway(
            GatewayConfig(state_dir=Path(state), templates_dir=Path(templates_dir), audit_log="", **config)
        )
        await gateway.start()
        try:
            async with running_server(gateway, "127.0.0.1", 0) as url:
                os.environ["FORKD_URL"] = url
                yield gateway
        finally:
            if hasattr(gateway.backend, "keep_snapshots"):
                # The state directory is temporary: so is the template's snapshot (its RAM file is in /dev/shm).
                gateway.backend.keep_snapshots = False
            await gateway.close()
