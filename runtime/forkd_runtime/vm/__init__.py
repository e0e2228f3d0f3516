"""The QEMU microVM backend: a warm parent VM snapshotted once, children restored copy-on-write.

See docs/vm.md. ``VmBackend`` implements ``forkd_runtime.Backend``;
``build_image`` makes (and caches) a template's kernel, initramfs and disks;
``kvm_status`` / ``detect_accel`` tell whether this host runs VMs with KVM or TCG.
"""

from ._backend import SnapshotMismatch, VmBackend
from ._image import VmImage, build_image
from ._qemu import Machine, detect_accel, kvm_status

__all__ = ["VmBackend", "SnapshotMismatch", "VmImage", "build_image", "Machine", "detect_accel", "kvm_status"]
