"""KSM for VM children (``VmBackend(ksm=True)``): the QEMU processes are marked
mergeable as a whole, unmarked ones keep even guest RAM out of KSM, and, when
the host's ksmd runs, their identical pages really merge.

The runtime never turns ksmd on; the merging test runs only where the operator
did (``echo 1 > /sys/kernel/mm/ksm/run``) and is skipped otherwise.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import pytest_asyncio

KSM = Path("/sys/kernel/mm/ksm")


def guest_ram_flags(pid: int) -> set[str]:
    """VmFlags of the mapping of the snapshot's RAM file in a QEMU process."""
    in_ram = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith("VmFlags"):
                in_ram = "/dev/shm/forkd-" in line
            elif in_ram and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no guest RAM mapping in QEMU {pid}")


def test_command_line_merge_off_by_default_and_not_in_digest(monkeypatch):
    from forkd_runtime.vm import _qemu
    from forkd_runtime.vm._image import VmImage

    m = _qemu.Machine(accel="tcg", cpu="max", memory_mb=256, qemu_version="x")
    img = VmImage(**{f: Path(f"/{f}") for f in VmImage.__dataclass_fields__})
    kw = dict(mem_path=Path("/m"), share=False, qmp_fd=3, agent_fd=4, upper=Path("/u"), console=None)
    off = [a for a in _qemu.command(m, img, incoming=True, **kw) if "memory-backend-file" in a]
    on = [a for a in _qemu.command(m, img, incoming=True, merge=True, **kw) if "memory-backend-file" in a]
    assert off[0].endswith(",merge=off") and on[0].endswith(",merge=on")
    # One snapshot serves children with and without KSM: the device digest
    # (checked at every restore) is the same whatever merge= says.
    plain = _qemu.device_digest(m, img)
    real = _qemu.command
    monkeypatch.setattr(_qemu, "command", lambda *a, **k: real(*a, **{**k, "merge": True}))
    assert _qemu.device_digest(m, img) == plain


def test_env_knob(monkeypatch):
    from forkd_runtime.vm import VmBackend

    monkeypatch.setenv("FORKD_VM_KSM", "1")
    assert VmBackend(root="/nonexistent-forkd-test").ksm is True
    assert VmBackend(root="/nonexistent-forkd-test", ksm=False).ksm is False
    monkeypatch.setenv("FORKD_VM_KSM", "0")
    assert VmBackend(root="/nonexistent-forkd-test").ksm is False
    monkeypatch.setenv("FORKD_VM_KSM", "maybe")
    with pytest.raises(ValueError, match="FORKD_VM_KSM"):
        VmBackend(root="/nonexistent-forkd-test")


def test_doctor_reports_ksm():
    import platform

    from forkd_runtime._doctor import report

    ksm = report()["ksm"]
    if not KSM.is_dir():
        assert ksm["available"] is False
        return
    assert ksm["available"] is True
    assert ksm["ksmd_running"] == ((KSM / "run").read_text().strip() == "1")
    assert ksm["pages_to_scan"] == int((KSM / "pages_to_scan").read_text())
    assert ("hint" in ksm) != ksm["ksmd_running"]
    if tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 7):
        assert ksm["process_merge"] and ksm["process_merge_across_exec"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(vm_store, tmp_path_factory):
    from forkd_runtime.vm import VmBackend

    backend = VmBackend(
        store=vm_store, root=tmp_path_factory.mktemp("vmksm"), pool_size=0, keep_snapshots=False, ksm=True
    )
    await backend.start()
    backend.snap = await backend.prepare("base")
    yield backend
    await backend.close()


async def spawn(vm, n: int, ksm: bool):
    vm.ksm = ksm
    try:
        return await vm.spawn(vm.snap, n)
    finally:
        vm.ksm = True


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_children_marked_mergeable(vm):
    from forkd_runtime.vm._ksm import process_stat

    marked = await spawn(vm, 1, ksm=True)
    plain = await spawn(vm, 1, ksm=False)
    try:
        # The mark survived QEMU's exec and its drop to an unprivileged uid.
        assert process_stat(marked[0].pid)["merge_any"] is True
        assert "mg" in guest_ram_flags(marked[0].pid)
        # Off: not even guest RAM (QEMU's own default would mark it).
        assert process_stat(plain[0].pid)["merge_any"] is False
        assert "mg" not in guest_ram_flags(plain[0].pid)
        for k in marked + plain:
            await k.conn.request("ping", {}, timeout=30)  # both run
    finally:
        for k in marked + plain:
            await vm.kill(k)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_ksmd_merges_marked_children_only(vm):
    from forkd_runtime.vm._ksm import process_stat

    if (KSM / "run").read_text().strip() != "1":
        pytest.skip("the host's ksmd is off (echo 1 > /sys/kernel/mm/ksm/run to run this test)")
    marked = await spawn(vm, 2, ksm=True)
    plain = await spawn(vm, 1, ksm=False)
    try:

        def merged(pid: int) -> int:
            st = process_stat(pid)
            return int(st.get("merging_pages", 0)) + int(st.get("zero_pages", 0))

        deadline = time.monotonic() + 120
        while not all(merged(k.pid) for k in marked) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert all(merged(k.pid) > 0 for k in marked), [process_stat(k.pid) for k in marked]
        assert merged(plain[0].pid) == 0
    finally:
        for k in marked + plain:
            await vm.kill(k)
