"""A real gateway for the compatibility tests: ``forkd serve`` (uvicorn, process backend) in a subprocess.

One gateway serves the whole run. It has two API keys, so the tests can check
that one key never sees another key's sandboxes. Tests talk to it over
websockets exactly as a user program would: ``FORKD_URL`` / ``FORKD_API_KEY``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = Path(os.environ.get("FORKD_TEST_TEMPLATES", ROOT / ".cache" / "templates"))
KEY = "compat-key-alice"
OTHER_KEY = "compat-key-bob"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.key, self.other_key = KEY, OTHER_KEY
        keys = root / "keys"
        keys.write_text(f"alice:{KEY}\nbob:{OTHER_KEY}\n")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "gateway.log", "wb")
        cmd = [
            sys.executable, "-m", "forkd_gateway.cli", "serve",
            "--port", str(self.port),
            "--backend", "process",
            "--state-dir", str(root / "state"),
            "--templates-dir", str(TEMPLATES_DIR),
            "--api-keys-file", str(keys),
            "--audit-log", str(root / "audit.log"),
            "--pool", "base=2",
            "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forkd serve exited: {(root / 'gateway.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("forkd serve did not become healthy")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self.log.close()


def _can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups)"
    if shutil.which("mmdebstrap") is None and not (TEMPLATES_DIR / "templates" / "base").exists():
        return "the base template is not built and mmdebstrap is missing"
    return None


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """The running gateway; sets FORKD_URL and FORKD_API_KEY for the SDK while it runs."""
    reason = _can_run()
    if reason:
        pytest.skip(reason)
    from forkd_runtime import TemplateStore, load_spec

    TemplateStore(TEMPLATES_DIR).build(load_spec("base"), progress=lambda m: print(m, flush=True))
    gw = GatewayProcess(tmp_path_factory.mktemp("gateway"))
    saved = {k: os.environ.get(k) for k in ("FORKD_URL", "FORKD_API_KEY", "E2B_API_KEY")}
    os.environ["FORKD_URL"] = gw.url
    os.environ["FORKD_API_KEY"] = KEY
    os.environ.pop("E2B_API_KEY", None)
    yield gw
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    gw.stop()
