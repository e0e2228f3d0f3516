"""The stand-in libcapstone that forkd's QEMU processes load (vm/_qemu_libs.py):
used only when it serves the installed QEMU, and it saves what it claims."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from forkd_runtime.vm import _qemu_libs
from forkd_runtime.vm._qemu_libs import _needed_capstone, capstone_stub, qemu_env

QEMU = shutil.which("qemu-system-x86_64")
links_capstone = pytest.mark.skipif(
    QEMU is None or _needed_capstone(QEMU) is None or shutil.which("cc") is None,
    reason="needs a QEMU that links libcapstone, and a C compiler",
)


def _start(env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [QEMU, "-M", "none", "-S", "-display", "none", "-nodefaults", "-accel", "tcg"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(f"/proc/{proc.pid}/maps") as f:
            if "libglib" in f.read():  # past the dynamic linker
                time.sleep(0.3)
                return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("QEMU did not start")


def _capstone_mappings(pid: int) -> tuple[set[str], int]:
    """(paths of the capstone library mapped, its private dirty KiB)."""
    paths, private, current = set(), 0, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and ":" not in parts[0]:
                current = parts[5] if len(parts) > 5 and "libcapstone" in parts[5] else None
                if current:
                    paths.add(current)
            elif current and parts[0] == "Private_Dirty:":
                private += int(parts[1])
    return paths, private


@links_capstone
def test_qemu_runs_with_the_stand_in_and_saves_its_private_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("FORKD_VM_CAPSTONE", raising=False)
    stub = capstone_stub(QEMU, tmp_path)
    assert stub is not None and (stub / _needed_capstone(QEMU)).is_file()
    ours, real = _start(qemu_env(QEMU, tmp_path)), _start({})
    try:
        (ours_paths, ours_kib), (real_paths, real_kib) = (
            _capstone_mappings(ours.pid),
            _capstone_mappings(real.pid),
        )
        assert ours_paths and all(p.startswith(str(stub)) for p in ours_paths)
        assert real_paths and not any(p.startswith(str(tmp_path)) for p in real_paths)
        assert ours_kib <= 16 and real_kib >= 512, (ours_kib, real_kib)
    finally:
        for proc in (ours, real):
            proc.kill()
            proc.wait()


@links_capstone
def test_the_real_library_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKD_VM_CAPSTONE", "real")
    assert capstone_stub(QEMU, tmp_path) is None
    assert (
        "LD_LIBRARY_PATH" not in qemu_env(QEMU, tmp_path)
        or str(tmp_path) not in qemu_env(QEMU, tmp_path)["LD_LIBRARY_PATH"]
    )


@links_capstone
def test_a_stand_in_missing_an_entry_point_is_not_used(tmp_path, monkeypatch, caplog):
    partial = tmp_path / "partial.c"
    partial.write_text(
        '__attribute__((visibility("default"))) int cs_close(void *h) { (void)h; return 0; }\n'
    )
    monkeypatch.setattr(_qemu_libs, "STUB_SOURCE", partial)
    monkeypatch.delenv("FORKD_VM_CAPSTONE", raising=False)
    assert capstone_stub(QEMU, tmp_path / "lib") is None
    assert "keeps the real" in caplog.text and "cs_" in caplog.text
    assert qemu_env(QEMU, tmp_path / "lib").get("LD_LIBRARY_PATH", "").find(str(tmp_path)) < 0


def test_a_qemu_without_capstone_gets_no_stand_in(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_bytes(b"\x7fELF not linked against it\0libglib-2.0.so.0\0")
    assert capstone_stub(str(fake), tmp_path / "lib") is None
    assert not (tmp_path / "lib").exists()
