"""The VM image of a template: guest kernel, initramfs and root disk, from Debian packages alone.

- kernel: a pinned ``linux-image-<abi>-amd64`` (the generic flavour: it has
  CONFIG_VMGENID), unpacked with ``dpkg -x``; its ``vmlinuz`` holds an XZ stream
  that decompresses to the ELF ``vmlinux`` QEMU's microvm boots through PVH.
- initramfs: busybox-static, the virtio/ext4/overlay modules in dependency
  order, forkd's guest-side packages and an ``init`` that assembles the root and
  starts the agent on a virtio-serial port. Written as a newc cpio by hand (no
  host cpio needed).
- root disk: the template's root filesystem as a read-only ext4 image
  (``mkfs.ext4 -d``), shared by the parent and every child; plus an empty ext4
  image for the writable layer, of which each VM gets a private qcow2 overlay.

Everything is cached: the kernel per package version, the root image inside the
template's (immutable) build directory, the initramfs by content digest. A build
takes an exclusive lock, so concurrent runtimes build once. The package versions
and the sha256 of each .deb are recorded in ``versions.txt`` beside the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import forkd
import forkd_agent

from .._native_build import build as native_build
from .._templates import Template, TemplateError

__all__ = ["VmImage", "build_image", "KERNEL_PIN", "BUSYBOX_PIN", "AGENT_PORT", "guest_lib_files"]

Progress = Callable[[str], None]

# Security updates replace these on the mirror; when a pin is gone we take the
# current one and say so (the versions actually used are recorded either way).
KERNEL_PIN = ("linux-image-6.1.0-50-amd64", "6.1.176-1")
BUSYBOX_PIN = ("busybox-static", "1:1.35.0-4+deb12u1+b1")
# Bump when the image layout or init changes in a way that needs a rebuild.
IMAGE_RECIPE = 3
# The virtio-serial port name the agent listens on (/dev/virtio-ports/<name>).
AGENT_PORT = "org.forkd.agent"
# Modules the guest needs; their dependencies are found from each module's modinfo.
# ext4 looks crc32c up through the crypto API at mount time (a soft dependency).
MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "overlay",
)
# The writable layer's capacity: a sparse image, so only what a sandbox writes uses host disk.
UPPER_MB = 2048
XZ_MAGIC = b"\xfd7zXZ\x00"


@dataclass(frozen=True)
class VmImage:
    template: str
    template_digest: str
    kernel: Path  # uncompressed ELF vmlinux
    initramfs: Path
    rootfs: Path  # read-only ext4
    upper: Path  # empty ext4, base of each VM's writable overlay
    kernel_version: str  # "package=version"
    digest: str  # identifies everything a snapshot depends on
    warmup: str

    def versions(self) -> str:
        return (self.rootfs.parent / "versions.txt").read_text()


# -- package download ----------------------------------------------------------


def _apt(*args: str) -> subprocess.CompletedProcess:
    # apt's sandbox user cannot write into root's temporary directories.
    return subprocess.run(
        ["apt-get", "-q", "-o", "APT::Sandbox::User=root", *args], capture_output=True, text=True
    )


def _candidate(package: str) -> str | None:
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            return None if value == "(none)" else value
    return None


def _current_kernel_package() -> str | None:
    out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split(":", 1)[1].strip()
    return None


def _download(package: str, version: str, dest: Path, progress: Progress, fallback=None) -> tuple[Path, str]:
    """Fetch one .deb into ``dest``: the pinned version if the mirror still has it,
    else (with a warning) the current candidate of ``fallback()`` (default: the
    same package). Returns (path, "package=version")."""
    if shutil.which("apt-get") is None:
        raise TemplateError("building a VM image needs apt-get (Debian's packages are the only source)")

    def attempt(pkg: str, ver: str) -> Path | None:
        res = subprocess.run(
            ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", f"{pkg}={ver}"],
            cwd=dest,
            capture_output=True,
            text=True,
        )
        debs = sorted(dest.glob(f"{pkg}_*.deb"))
        return debs[-1] if res.returncode == 0 and debs else None

    tried = []
    for refresh in (False, True):
        if refresh:
            # A fresh machine may have no package lists yet, or stale ones.
            progress("  apt-get update (package lists missing or stale)")
            _apt("update")
        deb = attempt(package, version)
        tried.append(f"{package}={version}")
        if deb is not None:
            return deb, f"{package}={version}"
        alt = (fallback() if fallback else None) or package
        cand = _candidate(alt)
        if cand:
            deb = attempt(alt, cand)
            tried.append(f"{alt}={cand}")
            if deb is not None:
                progress(f"  warning: {package}={version} is not on the mirror any more; using {alt}={cand}")
                return deb, f"{alt}={cand}"
    raise TemplateError(f"cannot download {package} (tried {', '.join(dict.fromkeys(tried))})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- kernel ------------------------------------------------------------------------


def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 file (enough for .modinfo)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise TemplateError("not an ELF64 file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx]
    names = data[strtab[4] : strtab[4] + strtab[5]]
    out = {}
    for h in headers:
        name = names[h[0] : names.index(b"\0", h[0])].decode()
        out[name] = data[h[4] : h[4] + h[5]] if h[1] != 8 else b""  # 8: SHT_NOBITS
    return out


def _module_depends(ko: Path) -> list[str]:
    info = _elf_sections(ko.read_bytes()).get(".modinfo", b"")
    for entry in info.split(b"\0"):
        if entry.startswith(b"depends="):
            return [d for d in entry[8:].decode().split(",") if d]
    return []


def _module_order(modroot: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for ``wanted`` plus their dependencies, each after what it needs."""
    index: dict[str, Path] = {}
    for ko in modroot.rglob("*.ko"):
        index[ko.stem.replace("-", "_")] = ko
    builtin = set()
    with contextlib.suppress(OSError):
        for line in (modroot / "modules.builtin").read_text().splitlines():
            builtin.add(Path(line).name.removesuffix(".ko").replace("-", "_"))
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise TemplateError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        ko = index.get(name)
        if ko is None:
            raise TemplateError(f"kernel module {name} not found in {modroot}")
        for dep in _module_depends(ko):
            visit(dep, (*chain, name))
        seen.add(name)
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order


def _vmlinux_from_vmlinuz(vmlinuz: Path, out: Path) -> None:
    data = vmlinuz.read_bytes()
    pos = data.find(XZ_MAGIC)
    while pos >= 0:
        try:
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(elf)
            os.replace(tmp, out)
            return
        pos = data.find(XZ_MAGIC, pos + 1)
    raise TemplateError(f"no XZ-compressed ELF kernel found in {vmlinuz}")


@dataclass(frozen=True)
class _Kernel:
    dir: Path
    package: str  # package=version
    deb_sha256: str
    release: str  # uname -r

    @property
    def vmlinux(self) -> Path:
        return self.dir / "vmlinux"

    def modules(self) -> list[Path]:
        return [self.dir / "modules" / n for n in (self.dir / "modules" / "order").read_text().split()]


def _kernel(cache: Path, progress: Progress) -> _Kernel:
    """Download, unpack and cache the guest kernel (once per package version)."""
    with _locked(cache / "kernel.lock"):
        pinned = cache / "kernel-current.json"
        if pinned.is_file():
            meta = json.loads(pinned.read_text())
            kdir = cache / meta["dir"]
            if (kdir / "vmlinux").is_file() and meta.get("pin") == list(KERNEL_PIN):
                return _Kernel(kdir, meta["package"], meta["sha256"], meta["release"])
        progress(f"vm image: fetching guest kernel {KERNEL_PIN[0]}={KERNEL_PIN[1]}")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".kernel-") as tmp:
            t = Path(tmp)
            deb, spec = _download(*KERNEL_PIN, t, progress, fallback=_current_kernel_package)
            sha = _sha256(deb)
            kdir = cache / ("kernel-" + spec.replace("=", "_").replace(":", "%"))
            if not (kdir / "vmlinux").is_file():
                progress(f"vm image: unpacking {deb.name}")
                subprocess.run(["dpkg-deb", "-x", str(deb), str(t / "x")], check=True)
                vmlinuz = next((t / "x" / "boot").glob("vmlinuz-*"))
                release = vmlinuz.name.removeprefix("vmlinuz-")
                work = t / "k"
                (work / "modules").mkdir(parents=True)
                progress("vm image: decompressing vmlinuz to a PVH-bootable vmlinux")
                _vmlinux_from_vmlinuz(vmlinuz, work / "vmlinux")
                order = _module_order(t / "x" / "lib" / "modules" / release, MODULES)
                for ko in order:
                    shutil.copy2(ko, work / "modules" / ko.name)
                (work / "modules" / "order").write_text("\n".join(k.name for k in order) + "\n")
                (work / "release").write_text(release + "\n")
                shutil.rmtree(kdir, ignore_errors=True)
                os.rename(work, kdir)
            release = (kdir / "release").read_text().strip()
            meta = {
                "dir": kdir.name,
                "package": spec,
                "sha256": sha,
                "release": release,
                "pin": list(KERNEL_PIN),
            }
            _write_atomic(pinned, json.dumps(meta, indent=2).encode())
            return _Kernel(kdir, spec, sha, release)


def _busybox(cache: Path, progress: Progress) -> tuple[Path, str, str]:
    with _locked(cache / "busybox.lock"):
        meta_path = cache / "busybox.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if (cache / "busybox").is_file() and meta.get("pin") == list(BUSYBOX_PIN):
                return cache / "busybox", meta["package"], meta["sha256"]
        progress(f"vm image: fetching {BUSYBOX_PIN[0]}")
        with tempfile.TemporaryDirectory(dir=cache, prefix=".busybox-") as tmp:
            t = Path(tmp)
            deb, spec = _download(*BUSYBOX_PIN, t, progress)
            sha = _sha256(deb)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(t / "x")], check=True)
            shutil.copy2(t / "x" / "bin" / "busybox", cache / "busybox.tmp")
            os.replace(cache / "busybox.tmp", cache / "busybox")
        _write_atomic(
            meta_path, json.dumps({"package": spec, "sha256": sha, "pin": list(BUSYBOX_PIN)}).encode()
        )
        return cache / "busybox", spec, sha


# -- initramfs ---------------------------------------------------------------------


# The agent needs only the SDK's protocol layer; the rest of the SDK (the client)
# stays out of the guest, and editing it does not change the image.
GUEST_SDK_MODULES = ("protocol.py", "_connection.py", "_transports.py")
GUEST_SDK_INIT = b'"""forkd inside a sandbox: only the protocol layer the agent uses."""\n'


def guest_lib_files() -> list[tuple[str, bytes]]:
    """forkd's guest-side code (the agent, the SDK's protocol layer, the VM entry
    point) as (relative path, contents)."""
    files = [("forkd/__init__.py", GUEST_SDK_INIT)]
    sdk = Path(forkd.__file__).parent
    files += [(f"forkd/{name}", (sdk / name).read_bytes()) for name in GUEST_SDK_MODULES]
    base = Path(forkd_agent.__file__).parent
    for f in sorted(base.rglob("*.py")):
        files.append((f"forkd_agent/{f.relative_to(base)}", f.read_bytes()))
    files.append(("forkd_vm_guest.py", Path(__file__).with_name("_guest.py").read_bytes()))
    native = _guest_early_library()
    if native is not None:
        files.append((GUEST_EARLY_LIBRARY, native))
    return files


GUEST_EARLY_LIBRARY = "forkd_vm_early.so"


@functools.cache
def _guest_early_library() -> bytes | None:
    """``_guest_early.c`` compiled (freestanding, so the template's C library does
    not matter), or None without a compiler: the guest then answers its first
    requests from Python (slower under TCG, otherwise the same)."""
    with tempfile.TemporaryDirectory(prefix="forkd-early-") as tmp:
        out = Path(tmp) / GUEST_EARLY_LIBRARY
        if not native_build(Path(__file__).with_name("_guest_early.c"), out):
            return None
        return out.read_bytes()


class _Cpio:
    """A newc ("070701") archive, the format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        self.buf.write(b"\0" * (-(110 + len(raw)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _init_script(env: dict) -> str:
    exports = "".join(f"export {k}={_sh_quote(str(v))}\n" for k, v in sorted(env.items()))
    return (
        Path(__file__)
        .with_name("init.sh")
        .read_text()
        .replace("@AGENT_PORT@", AGENT_PORT)
        .replace("@ENV@", exports)
    )


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _initramfs(cache: Path, kernel: _Kernel, busybox: Path, tpl: Template) -> tuple[Path, str]:
    lib = guest_lib_files()
    env = dict(tpl.spec.env)
    h = hashlib.sha256()
    for part in (
        str(IMAGE_RECIPE),
        kernel.package,
        _sha256(busybox),
        _init_script(env),
        tpl.spec.warmup,
    ):
        h.update(part.encode() + b"\0")
    for name, data in lib:
        h.update(name.encode() + b"\0" + data)
    digest = h.hexdigest()[:16]
    path = cache / f"initramfs-{digest}.cpio"
    if path.is_file():
        return path, digest
    a = _Cpio()
    for d in (
        "bin",
        "dev",
        "proc",
        "sys",
        "lower",
        "upper",
        "newroot",
        "lib",
        "lib/modules",
        "forkd",
        "forkd/lib",
    ):
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.chardev("dev/null", 1, 3)
    a.file("bin/busybox", busybox.read_bytes(), 0o755)
    a.file("init", _init_script(env).encode(), 0o755)
    names = []
    for ko in kernel.modules():
        a.file(f"lib/modules/{ko.name}", ko.read_bytes())
        names.append(ko.name)
    a.file("lib/modules/order", ("\n".join(names) + "\n").encode())
    dirs = set()
    for name, data in lib:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "forkd/lib/" + "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                a.dir(d)
        a.file(f"forkd/lib/{name}", data)
    a.file("forkd/warmup.py", tpl.spec.warmup.encode())
    _write_atomic(path, a.finish())
    return path, digest


# -- disks ---------------------------------------------------------------------------


def _du_bytes(root: Path) -> int:
    out = subprocess.run(["du", "-sxb", str(root)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def _mkfs(image: Path, size_mb: int, source: Path | None, label: str, journal: bool) -> None:
    tmp = image.with_name(image.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    features = "^has_journal" if not journal else "has_journal"
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-O", features, "-m", "0"]
    # Zero the inode tables now: lazy init would make every VM do it in the background.
    cmd += ["-E", "lazy_itable_init=0,lazy_journal_init=0"]
    if source is not None:
        cmd += ["-d", str(source)]
    cmd += [str(tmp), f"{size_mb}M"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise TemplateError(f"mkfs.ext4 failed: {res.stderr.strip() or res.stdout.strip()}")
    os.replace(tmp, image)


def _disks(tpl: Template, progress: Progress) -> tuple[Path, Path]:
    vm_dir = tpl.path / "vm"
    vm_dir.mkdir(exist_ok=True)
    rootfs = vm_dir / f"rootfs-r{IMAGE_RECIPE}.ext4"
    upper = vm_dir / f"upper-r{IMAGE_RECIPE}-{UPPER_MB}m.ext4"
    with _locked(vm_dir / "build.lock"):
        if not rootfs.is_file():
            if shutil.which("mkfs.ext4") is None:
                raise TemplateError("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
            used = _du_bytes(tpl.rootfs)
            # Room for ext4's own metadata; the image is read-only, so no free space is needed.
            size_mb = int(used * 1.15 / 2**20) + 64
            progress(f"vm image: root disk for {tpl.name} ({size_mb} MiB ext4, read-only)")
            _mkfs(rootfs, size_mb, tpl.rootfs, "forkd-root", journal=False)
        if not upper.is_file():
            progress(f"vm image: writable-layer base ({UPPER_MB} MiB sparse ext4)")
            _mkfs(upper, UPPER_MB, None, "forkd-upper", journal=False)
    return rootfs, upper


# -- helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_image(tpl: Template, cache: Path, progress: Progress = print) -> VmImage:
    """The VM image of a built template (built on first use, then cached)."""
    if os.geteuid() != 0:
        raise TemplateError("building a VM image needs root (apt-get download, mkfs of a root-owned tree)")
    cache.mkdir(parents=True, exist_ok=True)
    kernel = _kernel(cache, progress)
    busybox, bb_spec, bb_sha = _busybox(cache, progress)
    rootfs, upper = _disks(tpl, progress)
    initramfs, init_digest = _initramfs(cache, kernel, busybox, tpl)
    versions = rootfs.parent / "versions.txt"
    lines = [
        f"{kernel.package} sha256={kernel.deb_sha256}",
        f"{bb_spec} sha256={bb_sha}",
        f"template {tpl.name} {tpl.digest}",
        f"recipe {IMAGE_RECIPE}",
    ]
    text = "\n".join(lines) + "\n"
    if not versions.is_file() or versions.read_text() != text:
        _write_atomic(versions, text.encode())
    h = hashlib.sha256(
        "\0".join([kernel.package, kernel.deb_sha256, init_digest, tpl.digest, str(IMAGE_RECIPE)]).encode()
    )
    return VmImage(
        template=tpl.name,
        template_digest=tpl.digest,
        kernel=kernel.vmlinux,
        initramfs=initramfs,
        rootfs=rootfs,
        upper=upper,
        kernel_version=kernel.package,
        digest=h.hexdigest()[:24],
        warmup=tpl.spec.warmup,
    )
