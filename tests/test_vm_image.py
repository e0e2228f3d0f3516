"""Fast checks of the microVM backend's parts that need no VM: image pieces,
host detection, the doctor report and the guest's early request loop."""

from __future__ import annotations

import lzma
import os
import shutil
import socket
import subprocess
import threading

import pytest

from forkd import protocol as p
from forkd_agent._lazy import answer_until_needed


def test_vmlinux_is_found_inside_vmlinuz(tmp_path):
    from forkd_runtime.vm._image import _vmlinux_from_vmlinuz

    elf = b"\x7fELF" + os.urandom(5000)
    # A bzImage: setup code, then the XZ stream (a decoy XZ magic first).
    blob = (
        os.urandom(3000)
        + b"\xfd7zXZ\x00garbage"
        + os.urandom(100)
        + lzma.compress(elf, format=lzma.FORMAT_XZ)
    )
    (tmp_path / "vmlinuz").write_bytes(blob + os.urandom(64))
    _vmlinux_from_vmlinuz(tmp_path / "vmlinuz", tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_vmlinuz_without_kernel_is_refused(tmp_path):
    from forkd_runtime._templates import TemplateError
    from forkd_runtime.vm._image import _vmlinux_from_vmlinuz

    (tmp_path / "vmlinuz").write_bytes(os.urandom(4096))
    with pytest.raises(TemplateError, match="no XZ-compressed ELF"):
        _vmlinux_from_vmlinuz(tmp_path / "vmlinuz", tmp_path / "vmlinux")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_cpio_archive_is_what_the_kernel_unpacks(tmp_path):
    from forkd_runtime.vm._image import _Cpio

    a = _Cpio()
    a.dir("bin")
    a.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    a.file("odd", b"x" * 7)
    a.chardev("console", 5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(a.finish())
    out = subprocess.run(
        ["busybox", "cpio", "-tv"], stdin=open(archive, "rb"), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("-rwxr-xr-x") and line.endswith("bin/hello") for line in lines)
    assert any(line.startswith("crw-------") and line.endswith("console") for line in lines)
    (tmp_path / "x").mkdir()
    subprocess.run(["busybox", "cpio", "-id"], stdin=open(archive, "rb"), cwd=tmp_path / "x", check=True)
    assert (tmp_path / "x" / "odd").read_bytes() == b"x" * 7


def test_guest_gets_only_the_protocol_layer_of_the_sdk():
    from forkd_runtime.vm._image import guest_lib_files

    names = {n for n, _ in guest_lib_files()}
    assert {"forkd/__init__.py", "forkd/protocol.py", "forkd/_connection.py", "forkd/_transports.py"} <= names
    assert "forkd_vm_guest.py" in names and "forkd_agent/__main__.py" in names
    assert not any(n.startswith("forkd/_sandbox") or n.startswith("forkd/_client") for n in names)


def test_kvm_detection_matches_the_host():
    from forkd_runtime.vm import detect_accel, kvm_status

    usable, why = kvm_status()
    if os.path.isdir("/sys/module/kvm_pvm"):
        assert not usable and "pvm" in why.lower()
    if not os.path.exists("/dev/kvm"):
        assert not usable
    assert detect_accel() == ("kvm" if usable else "tcg") or os.environ.get("FORKD_VM_ACCEL")


def test_doctor_report():
    from forkd_runtime._doctor import default_backend, report

    r = report()
    assert set(r) >= {"kvm", "qemu", "vm_accel", "cgroups", "user_namespaces", "default_backend"}
    assert r["cgroups"]["version"] in (1, 2)
    assert r["vm_accel"] in ("kvm", "tcg")
    assert default_backend(True, True)["name"] == "vm"
    assert default_backend(False, True)["name"] == "process"
    assert default_backend(True, False)["name"] == "process"


def test_snapshot_keys_cover_what_a_restore_depends_on():
    from forkd_runtime.vm._backend import SNAPSHOT_KEYS

    for key in ("qemu_version", "accel", "cpu", "memory_mb", "kernel", "template_digest"):
        assert key in SNAPSHOT_KEYS


def _request(sock, rid, method, params):
    sock.sendall(p.frame(p.encode(p.Request(rid, method, params))))


def _response(sock):
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
        buf += sock.recv(65536)
    return p.decode(buf[4:])


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_guest_early_loop(guest, native, request):
    from forkd_agent._features import load_features
    from forkd_agent._methods import METHODS

    load_features()
    ours, theirs = socket.socketpair()
    early = guest._Early("parent-id", {"marker": "m1"})
    serve = (
        guest.native_early(theirs.fileno(), early, str(request.getfixturevalue("early_library")))
        if native
        else None
    )
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.setdefault(
            "left",
            answer_until_needed(
                theirs.fileno(), guest.early_answer(early, METHODS), wait_on_eof=True, native=serve
            ),
        )
    )
    t.start()
    try:
        _request(ours, 1, "ping", {})
        assert _response(ours).result["pong"] is True
        # (No entropy or clock here: this is the host's kernel.)
        _request(ours, 2, "identity.refresh", {"sandbox_id": "child-7"})
        rep = _response(ours).result
        assert rep["sandbox_id"] == "child-7" and rep["random"]["ok"]
        _request(ours, 3, "info", {})
        info = _response(ours).result
        assert info["sandbox_id"] == "child-7" and info["warm"] == {"marker": "m1"}
        _request(ours, 4, "hello", {"version": 999})
        assert _response(ours).error.code == p.ErrorCode.PROTOCOL
        # The first frame the loop does not serve comes back whole, with what follows.
        tail = p.frame(p.encode(p.Request(5, "exec.start", {"cmd": "true"}))) + p.frame(
            p.encode(p.Request(6, "ping", {}))
        )
        ours.sendall(tail)
        t.join(10)
        assert not t.is_alive()
        assert result["left"] == tail
        # numpy's global state (if loaded) is left for the hand-over to seed.
        assert (early.material is not None) == ("numpy" in __import__("sys").modules)
    finally:
        ours.close()
        theirs.close()


def test_cli_builds_the_vm_image_of_a_template(template_store):
    # `forkd template build NAME --backend vm`: the template, then its VM image (cached after the first build).
    forkd = shutil.which("forkd") or os.path.join(os.path.dirname(os.sys.executable), "forkd")
    out = subprocess.run(
        [
            forkd,
            "--state-dir",
            str(template_store.root.parent),
            "template",
            "build",
            "base",
            "--backend",
            "vm",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    assert "template base is up to date" in out.stdout
    assert "vm image of base ready" in out.stdout
    assert (template_store.root / "vm").is_dir()
