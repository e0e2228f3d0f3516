import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_harness import AgentProcess  # noqa: E402


@pytest.fixture
def agent_proc(tmp_path):
    agent = AgentProcess(tmp_path)
    yield agent
    agent.stop()


@pytest.fixture
async def agent(agent_proc):
    """A protocol connection to a fresh real agent subprocess."""
    conn = await agent_proc.connect()
    yield conn
    await conn.close()


# -- templates and the process backend ---------------------------------------
# Templates are built once per run into a directory the suite controls and
# shared by every test; each test's runtime gets its own state directory.
import os  # noqa: E402
import shutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = Path(os.environ.get("FORKD_TEST_TEMPLATES", ROOT / ".cache" / "templates"))


def _can_build() -> str | None:
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, mmdebstrap)"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (scripts/setup.sh installs it)"
    return None


@pytest.fixture(scope="session")
def template_store():
    """A TemplateStore with the `base` template built (once per run; a no-op when up to date)."""
    reason = _can_build()
    if reason:
        pytest.skip(reason)
    from forkd_runtime import TemplateStore, load_spec

    store = TemplateStore(TEMPLATES_DIR)
    store.build(load_spec("base"), progress=lambda m: print(m, flush=True))
    return store


@pytest.fixture
async def process_backend(template_store, tmp_path):
    """A ProcessBackend with a private state directory, closed (children killed) after the test."""
    from forkd_runtime._process_backend import ProcessBackend

    backend = ProcessBackend(store=template_store, root=tmp_path / "state")
    await backend.start()
    yield backend
    await backend.close()


# -- the microVM backend's tests (test_vm_*.py) --


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (cgroups, network namespaces, image build)"
    for tool in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "apt-get", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "qemu.qmp is not installed (pip install -e '.[server]')"
    return None


@pytest.fixture(scope="module")
def vm_store(template_store):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return template_store


@pytest.fixture
def guest():
    """The VM guest entry point, loaded from its source file (in a VM it is the
    top-level module forkd_vm_guest)."""
    import importlib.util
    from pathlib import Path

    import forkd_runtime.vm as vm

    spec = importlib.util.spec_from_file_location("forkd_vm_guest", Path(vm.__file__).with_name("_guest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def early_library(tmp_path_factory):
    """The VM guest's native early loop (vm/_guest_early.c), compiled as an image build does."""
    from forkd_runtime.vm._image import GUEST_EARLY_LIBRARY, _guest_early_library

    data = _guest_early_library()
    if data is None:
        pytest.skip("no C compiler here: the guest's native early loop is not built")
    path = tmp_path_factory.mktemp("guest-early") / GUEST_EARLY_LIBRARY
    path.write_bytes(data)
    return path
