"""Internet access for VM children: the bridge, and a tap per child handed to QEMU."""

from __future__ import annotations

import fcntl
import os
import struct

from .._backend import Child, SpawnOptions
from .._network import NetworkManager
from ._snapshot_meta import LoadedSnapshot

__all__ = ["ChildNetwork", "NET_CONFIGURE"]

# The guest's method that configures eth0 (``forkd_vm_guest.NET_CONFIGURE``;
# that module runs in the guest only, so it is not imported here).
NET_CONFIGURE = "vm.net.configure"
# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


class ChildNetwork:
    """Mixed into ``VmBackend``: uses its ``scope``, ``vm_dir``, ``network`` and
    ``_net_lock``; a child is then restored by ``VmBackend._restore``."""

    def _network_manager(self) -> NetworkManager:
        # Names of its own (never the process backend's fk<scope>/forkd_<scope>:
        # setting up a manager removes every port of its bridge left by others).
        return NetworkManager(
            bridge=f"fv{self.scope[:7]}",
            table=f"forkd_vm_{self.scope}",
            state_file=self.vm_dir / "network.json",
        )

    async def _network(self) -> NetworkManager:
        """The bridge, NAT and firewall for children with internet access (set
        up on first use; the same rules as the process backend's)."""
        async with self._net_lock:
            if self.network is None:
                net = self._network_manager()
                await net.setup()
                self.network = net
            else:
                await self.network.setup()  # a no-op once set up
            return self.network

    async def _cold_net(self, s: LoadedSnapshot, options: SpawnOptions, net: NetworkManager) -> Child:
        """A child with internet access: a tap on the bridge (host namespace,
        owned by root: only the runtime can attach to it), one queue of it
        opened here and inherited by QEMU as ``-netdev tap,fd=N``. QEMU itself
        still runs in its own empty network namespace; the guest configures its
        side after the restore (``_restore``)."""
        handle = await net.attach_tap()
        try:
            fd = _open_tap(handle.ifname)
            try:
                async with self._cold_starts:
                    vm = await self._pool_vm(s, tap_fd=fd)
            finally:
                os.close(fd)  # QEMU holds its own copy
        except BaseException:
            await net.detach(handle)
            raise
        vm.net = handle
        return await self._restore(s, vm, options)


def _open_tap(ifname: str) -> int:
    """A queue of the existing tap ``ifname`` in this (the host's) namespace,
    with the virtio-net header: QEMU opens its own taps that way, and the
    snapshot's negotiated NIC features (offloads) depend on it."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    return fd
