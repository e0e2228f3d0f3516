"""The layers import one way only, and the guest side needs nothing but stdlib + msgpack."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {
    "forkd": ROOT / "sdk/forkd",
    "forkd_agent": ROOT / "guest_agent/forkd_agent",
    "forkd_runtime": ROOT / "runtime/forkd_runtime",
    "forkd_gateway": ROOT / "gateway/forkd_gateway",
}
# who may import whom (besides itself)
ALLOWED = {
    "forkd": set(),
    "forkd_agent": {"forkd"},
    "forkd_runtime": {"forkd", "forkd_agent"},
    "forkd_gateway": {"forkd", "forkd_agent", "forkd_runtime"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_imports_point_one_way():
    bad = []
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            for mod in _imports(f) & set(PACKAGES):
                if mod != pkg and mod not in ALLOWED[pkg]:
                    bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_guest_side_runs_with_only_stdlib_and_msgpack():
    # Block every third-party module a sandbox image does not have.
    code = (
        "import sys\n"
        "for m in ('websockets', 'httpx', 'starlette', 'uvicorn', 'pyroute2', 'prometheus_client', 'pyseccomp'):\n"
        "    sys.modules[m] = None\n"
        "import forkd, forkd.protocol, forkd._connection, forkd._transports\n"
        "from forkd_agent._features import load_features\n"
        "load_features()\n"
        "import forkd_agent._zygote, forkd_agent._lazy, forkd_agent.__main__\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
