"""QEMU command lines and the host facts they depend on (accelerator, version).

One function builds every command line, for the parent and for children alike:
a restore only works when the destination's machine, devices and RAM layout are
the ones the snapshot was taken with, so the two may differ only in what a
migration does not carry (the memory mapping's sharing, sockets, files).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ._image import AGENT_PORT, VmImage

__all__ = ["Machine", "QemuError", "kvm_status", "detect_accel", "qemu_binary", "qemu_version", "command"]

# An unprivileged uid for QEMU after start-up (-runas); it owns nothing on the host.
QEMU_UID = 524287
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
# Under TCG the guest's timer calibration is flaky and boot can hang without these.
TCG_CMDLINE = "tsc_early_khz=2300000 tsc=reliable lpj=4600000"
# Every kernel code path a child runs after its restore is translated anew under
# TCG (nothing of the parent's translation cache survives), so the guest is
# told to do as little as possible: no pressure stall or memory-cgroup
# accounting, no LSMs (the VM is the boundary), no audit, no lockup watchdogs
# (they misfire when the host is busy), no transparent huge pages.
CMDLINE = (
    "console=ttyS0 reboot=t panic=-1 quiet mitigations=off random.trust_cpu=on "
    "psi=0 lsm=capability audit=0 cgroup_disable=memory nowatchdog nosoftlockup transparent_hugepage=never"
)


# Every image file node: no page-cache drop when block devices are activated
# again (a BRANCH resumes its source after a completed migration, and QEMU
# would otherwise evict the host's cache of the root disk and every layer,
# which all VMs share), and no fsync: the writable layers are scratch, thrown
# away after a host crash anyway, and a flush would otherwise hold a BRANCH's
# pause for as long as the host takes to write the sandbox's dirty data.
FILE_OPTS = "drop-cache=off"
WRITABLE_OPTS = "cache.no-flush=on"
RAM_PAD_KIB = 8  # -m is rounded up to 8 KiB


class QemuError(Exception):
    pass


def qemu_binary() -> str:
    path = os.environ.get("FORKD_QEMU") or shutil.which("qemu-system-x86_64")
    if not path:
        raise QemuError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return path


@functools.cache
def qemu_version(binary: str | None = None) -> str:
    """The first line of ``-version``, Debian revision included: a snapshot taken by
    one QEMU build is only restored by the same build."""
    out = subprocess.run([binary or qemu_binary(), "-version"], capture_output=True, text=True, timeout=30)
    line = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    if not line.startswith("QEMU emulator version"):
        raise QemuError(f"cannot tell the QEMU version: {out.stderr.strip() or out.stdout.strip()}")
    return line.removeprefix("QEMU emulator version ").strip()


def kvm_status() -> tuple[bool, str]:
    """(usable, why). Usable means real VT-x/AMD-V behind /dev/kvm: a PVM
    (pagetable-based nested virtualization) /dev/kvm runs only PVM guest
    kernels, never the stock Debian one."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is kvm_pvm (runs only PVM guest kernels)"
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        flags = set()
    if not flags & {"vmx", "svm"}:
        return False, "the CPU shows no vmx/svm flag"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return False, f"cannot open /dev/kvm: {exc.strerror}"
    return True, "hardware virtualization (" + ("vmx" if "vmx" in flags else "svm") + ")"


def detect_accel() -> str:
    forced = os.environ.get("FORKD_VM_ACCEL", "").strip()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise QemuError(f"FORKD_VM_ACCEL must be kvm or tcg, not {forced!r}")
        return forced
    return "kvm" if kvm_status()[0] else "tcg"


@dataclass(frozen=True)
class Machine:
    """Everything about the VM that a snapshot pins."""

    accel: str
    cpu: str
    memory_mb: int
    qemu_version: str
    # TCG translation cache per VM: a child executes little code, so a small cache
    # holds it all; the 1 GiB default only costs address space, but its page
    # tables and the flush heuristics scale with it.
    tb_size_mb: int = 32

    @classmethod
    def detect(cls, memory_mb: int = 512, accel: str | None = None, tb_size_mb: int | None = None) -> Machine:
        accel = accel or detect_accel()
        # KVM: the host CPU model (a snapshot then only restores on the same CPU
        # kind, which the metadata check enforces); TCG: a fixed model.
        cpu = "host" if accel == "kvm" else "max"
        tb = tb_size_mb or 32
        return cls(accel=accel, cpu=cpu, memory_mb=memory_mb, qemu_version=qemu_version(), tb_size_mb=tb)

    @property
    def ram_kib(self) -> int:
        """Guest RAM: ``memory_mb`` and two pages more. QEMU 7.2 under TCG loses
        writes during a live migration (BRANCH) when a RAM block's size is a
        multiple of 64 pages: its dirty-bitmap sync then takes a fast path that
        clears dirty bits without resetting the vCPU's TLB, so later stores
        through cached entries go unrecorded (fixed upstream in QEMU 9.0 by
        "physmem: Fix migration dirty bitmap coherency with TCG memory
        access"). Extra pages make every sync take the per-page path."""
        return self.memory_mb * 1024 + RAM_PAD_KIB

    def meta(self) -> dict:
        d = asdict(self)
        if self.accel == "kvm":
            d["host_cpu"] = _host_cpu_model()
        return d

    def kernel_cmdline(self) -> str:
        return CMDLINE + (" " + TCG_CMDLINE if self.accel == "tcg" else "")


def device_digest(machine: Machine, image: VmImage) -> str:
    """Identifies the machine and device set a snapshot's state belongs to (its
    command line with every per-VM path and descriptor left out)."""
    args = command(
        machine,
        image,
        mem_path=Path("MEM"),
        share=True,
        qmp_fd=0,
        agent_fd=0,
        upper=Path("UPPER"),
        console=None,
        incoming=False,
    )
    keep = [a for a in args[1:] if not a.startswith("/") and "fd=" not in a and "filename=" not in a]
    keep = [a.replace("share=on", "") for a in keep if "mem-path=" not in a] + [
        a.split("mem-path=")[0] for a in args if "mem-path=" in a
    ]
    return hashlib.sha256("\0".join(keep).encode()).hexdigest()[:16]


def _host_cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def disk_args(upper: Path, layers: Sequence[tuple[Path, str]]) -> list[str]:
    """The writable disk: node ``upper`` (qcow2 in ``upper``) over its backing
    chain, each layer a read-only node named ``layer<i>`` given explicitly (so
    every file node gets FILE_OPTS; the file names in the qcow2 headers are
    not followed). Without ``layers``, the chain the headers name."""
    args: list[str] = []
    below = ""
    for i, (path, fmt) in enumerate(layers):
        args += [
            "-blockdev", f"driver=file,filename={path},node-name=layer{i}-file,read-only=on,{FILE_OPTS}",
            "-blockdev", f"driver={fmt},file=layer{i}-file,node-name=layer{i},read-only=on{below}",
        ]  # fmt: skip
        below = f",backing=layer{i}"
    args += [
        "-blockdev", f"driver=file,filename={upper},node-name=upper-file,{FILE_OPTS},{WRITABLE_OPTS}",
        "-blockdev", f"driver=qcow2,file=upper-file,node-name=upper,{WRITABLE_OPTS}{below}",
    ]  # fmt: skip
    return args


def command(
    machine: Machine,
    image: VmImage,
    *,
    mem_path: Path,
    share: bool,
    qmp_fd: int,
    agent_fd: int,
    upper: Path,
    console: Path | None,
    incoming: bool,
    chroot: Path | None = None,
    tap_fd: int | None = None,
    layers: Sequence[tuple[Path, str]] = (),
    merge: bool = False,
) -> list[str]:
    """The QEMU command line for a parent (``share=True``, boots the kernel) or a
    child (``share=False``: a private copy-on-write mapping of the parent's RAM
    file; waits in ``-incoming defer`` for its device state). ``tap_fd``: an
    open queue of a host tap device for the NIC (a child with internet access).
    ``layers``: the read-only backing chain of ``upper``, bottom first, as
    ``(path, format)`` (see ``disk_args``). ``merge``: guest RAM may be merged
    by the host's KSM (QEMU's default; off here unless asked for, see
    ``VmBackend(ksm=)``: merged pages shared between sandboxes are a timing
    side channel between them)."""
    accel = "kvm" if machine.accel == "kvm" else f"tcg,tb-size={machine.tb_size_mb}"
    mem = machine.ram_kib
    args = [
        qemu_binary(),
        "-name", "forkd",
        # No PIT: the guest keeps time with the TSC and the local APIC, and an
        # i8254 left running from reset would wake every idle VM's QEMU 36 times
        # a second.
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=on,pit=off,memory-backend=mem",
        "-accel", accel,
        "-cpu", machine.cpu,
        "-smp", "1",
        "-m", f"{mem}K",
        # merge= after mem-path: not part of the device digest (it is no
        # migrated state), so one snapshot serves children with and without it.
        "-object", (
            f"memory-backend-file,id=mem,size={mem}K,mem-path={mem_path},share={'on' if share else 'off'},"
            f"merge={'on' if merge else 'off'}"
        ),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", machine.kernel_cmdline(),
        # Both channels are one end of a socketpair each, inherited: no socket
        # files, and the peer is connected before the VM runs (see _backend).
        "-chardev", f"socket,id=qmp,fd={qmp_fd}",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", f"socket,id=agent,fd={agent_fd}",
        "-device", "virtio-serial-device,max_ports=2",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-blockdev", f"driver=file,filename={image.rootfs},node-name=root-file,read-only=on,{FILE_OPTS}",
        "-blockdev", "driver=raw,file=root-file,node-name=root,read-only=on",
        "-device", "virtio-blk-device,drive=root",
        *disk_args(upper, layers),
        "-device", "virtio-blk-device,drive=upper",
        # No network unless asked for: the tap lives in QEMU's own, empty network
        # namespace. With internet access, a queue of a tap on the host's bridge,
        # opened by the runtime (the netdev backend is not part of the migrated
        # state, so the device set, and the snapshot, are the same).
        "-netdev", (
            f"tap,id=net0,fd={tap_fd}" if tap_fd is not None
            else "tap,id=net0,ifname=forkd0,script=no,downscript=no"
        ),
        # No guest announce after a restore: it would make every child's kernel
        # run its netlink and neighbour code for an interface that is down.
        "-device", "virtio-net-device,netdev=net0,mac=52:54:00:00:00:02,guest_announce=off",
        "-serial", f"file:{console}" if console else "null",
        "-sandbox", SANDBOX,
        "-runas", f"{QEMU_UID}:{QEMU_UID}",
    ]  # fmt: skip
    if chroot is not None:
        args += ["-chroot", str(chroot)]
    if incoming:
        args += ["-incoming", "defer"]
    return args
