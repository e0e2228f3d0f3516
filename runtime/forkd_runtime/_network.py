"""Opt-in internet access for sandboxes: a host bridge with NAT and a firewall.

By default a sandbox has only loopback. With internet access requested it gets
one network device on a host bridge: a veth pair for a process sandbox (the
far end moved into the sandbox's network namespace as ``eth0``), or a tap
device for a microVM. The host side is the same for both: the device is a port
of the bridge with bridge port isolation on, and an nftables set records which
MAC and IPv4 address may send from that port.

What a sandbox can reach, and why:

* outside hosts, IPv4 only, source NATed (masquerade) to the host's address on
  whatever interface the host routes the packet out of (the default route for
  the internet);
* not the host itself: any packet from the bridge addressed to one of the
  host's own addresses (the bridge address, every other interface's address,
  127.0.0.0/8 even where ``route_localnet`` is on, broadcast and multicast) is
  dropped in prerouting, *before* any DNAT another program installed (published
  container ports, kube-proxy's localnet tricks) could redirect it. Only replies
  to connections the host opened itself get in;
* not other sandboxes: isolated bridge ports drop frames between ports, and
  the forward chain drops anything routed from the bridge back into it;
* nobody outside can open a connection to a sandbox (forward: only
  established/related traffic goes towards the bridge);
* no link-local destinations (169.254.0.0/16: cloud metadata services) unless
  listed as a resolver, and whatever else ``blocked`` lists;
* no spoofing: a port may only send frames with the MAC and IPv4 address it was
  given (ARP included), so a sandbox cannot take over another one's address or
  poison the host's neighbour table.

DNS: the host serves nothing to sandboxes. Children are given the host's
upstream resolvers (``nameserver`` lines of /etc/resolv.conf, or of
systemd-resolved's /run/systemd/resolve/resolv.conf when the former points at a
local stub) that are reachable IPv4 addresses outside the host; they reach them
through NAT like any outside host (port 53 to them is allowed even inside a
blocked range). If the host has only a local resolver, ``NetHandle.dns`` is
empty unless ``dns=`` names resolvers explicitly. The runtime hands these to the
sandbox (e.g. writes the sandbox's /etc/resolv.conf through its agent); this
module writes nothing inside a sandbox.

Rules live in two dedicated nftables tables (``inet <table>`` and ``bridge
<table>``), loaded through libnftables (the library behind the ``nft`` tool,
Debian package ``nftables``) in-process: a set-element update costs ~0.1 ms
instead of ~4 ms for running ``nft``. Links are created with pyroute2. Netlink
calls block in the kernel (deleting a veth takes 15-40 ms of RCU
synchronisation), so all of it runs on one worker thread and the event loop
never waits.

Other rulesets still apply: an ``accept`` here does not override a ``drop`` in
another table (e.g. a FORWARD policy of DROP set by Docker). If IPv4 forwarding
was off, setup turns it on and adds a rule that drops forwarding between any
other interfaces, so the host does not start routing for anybody else;
teardown restores the previous value.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["NetworkManager", "NetHandle", "NetworkError", "DEFAULT_BLOCKED", "CANDIDATE_SUBNETS"]

log = logging.getLogger("forkd.runtime.network")

T = TypeVar("T")

CANDIDATE_SUBNETS = ("10.203.0.0/16", "10.213.0.0/16", "10.223.0.0/16", "172.29.0.0/16", "172.30.0.0/16")
DEFAULT_BLOCKED = ("169.254.0.0/16",)
RESOLV_CONFS = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")
IP_FORWARD = "net/ipv4/ip_forward"
CLONE_NEWNET = 0x40000000
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,8}$")


class NetworkError(Exception):
    pass


@dataclass(frozen=True)
class NetHandle:
    """One sandbox's attachment: what the caller needs to configure or report it.

    ``ifname`` is the host side (veth end or tap); ``mac`` is the only MAC the
    sandbox side may send from (the veth peer already has it; a VM must be
    given it, e.g. ``-device virtio-net-...,mac=<mac>``)."""

    kind: str  # "veth" or "tap"
    ifname: str
    ip: str
    prefixlen: int
    gateway: str
    mac: str
    dns: tuple[str, ...]
    mtu: int
    index: int  # the address's host number in the subnet (internal)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dns"] = list(self.dns)
        return d


# -- libnftables --------------------------------------------------------------
class _Nft:
    """The nft command language through libnftables, in-process."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise NetworkError("libnftables not found: install the Debian package nftables") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NetworkError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> str:
        """Run ``commands`` as one transaction (all or nothing)."""
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode()
        err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode()
        if rc != 0:
            raise NetworkError(f"nft: {err.strip() or 'failed'}")
        return out

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


# -- pure helpers (tested without privileges) ----------------------------------
def upstream_resolvers(
    paths: Iterable[str | os.PathLike], host_addrs: Iterable[str], subnet: ipaddress.IPv4Network
) -> tuple[str, ...]:
    """IPv4 nameservers a sandbox can use through NAT, from the first file that
    names any: a file naming only host-local ones (a stub such as
    systemd-resolved's 127.0.0.53) or IPv6 ones passes to the next."""
    local = {ipaddress.ip_address(a) for a in host_addrs}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        found: list[str] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[0] != "nameserver":
                continue
            try:
                addr = ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            if (
                addr.version != 4
                or addr.is_loopback
                or addr.is_unspecified
                or addr.is_multicast
                or addr in local
                or addr in subnet
            ):
                continue
            if str(addr) not in found:
                found.append(str(addr))
        if found:
            return tuple(found)
    return ()


def subnet_clashes(
    subnet: ipaddress.IPv4Network, routes: Iterable[tuple[str, int]], addrs: Iterable[str]
) -> list[str]:
    """Why ``subnet`` cannot be used: host routes or addresses that overlap it
    (default routes excluded; the caller leaves out what is on our own bridge)."""
    reasons = []
    for dst, plen in routes:
        if plen == 0:
            continue
        net = ipaddress.ip_network(f"{dst}/{plen}", strict=False)
        if net.overlaps(subnet):
            reasons.append(f"route {net}")
    for a in addrs:
        if ipaddress.ip_address(a) in subnet:
            reasons.append(f"address {a}")
    return sorted(set(reasons))


def mac_for(ip: ipaddress.IPv4Address) -> str:
    # Locally administered unicast, unique per address.
    return "02:66:" + ":".join(f"{b:02x}" for b in ip.packed)


# -- the manager ----------------------------------------------------------------
class NetworkManager:
    """Host side of sandbox networking. One per bridge (and table) name.

    ``setup()`` once, ``attach(pid)`` / ``attach_tap()`` per sandbox that asked
    for internet access, ``detach(handle)`` when it goes, ``teardown()`` to
    remove everything. ``state_file`` (optional) remembers sysctl values setup
    changed, so a runtime that crashed still restores them at a later teardown.
    """

    def __init__(
        self,
        *,
        bridge: str = "fkbr0",
        subnet: str | None = None,
        table: str = "forkd",
        dns: Iterable[str] | None = None,
        blocked: Iterable[str] = DEFAULT_BLOCKED,
        state_file: str | os.PathLike | None = None,
        resolv_confs: Iterable[str | os.PathLike] = RESOLV_CONFS,
    ) -> None:
        if not _NAME_RE.match(bridge):
            raise ValueError(f"bridge name {bridge!r}: lowercase letters, digits, '_', at most 9 characters")
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]{0,30}$", table):
            raise ValueError(f"nftables table name {table!r} is not valid")
        self.bridge = bridge
        self.table = table
        self.port_prefix = bridge + "v"
        self._want_subnet = ipaddress.IPv4Network(subnet) if subnet else None
        if self._want_subnet is not None and not 12 <= self._want_subnet.prefixlen <= 29:
            raise ValueError("subnet prefix length must be between /12 and /29")
        self._want_dns = None if dns is None else tuple(str(ipaddress.IPv4Address(a)) for a in dns)
        self.blocked = tuple(str(ipaddress.IPv4Network(b)) for b in blocked)
        self.state_file = Path(state_file) if state_file else None
        self.resolv_confs = tuple(resolv_confs)
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: ipaddress.IPv4Address | None = None
        self.dns: tuple[str, ...] = ()
        self._leases: dict[int, NetHandle | None] = {}
        self._cursor = 1
        self._ready = False
        self._lock = asyncio.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ipr: Any = None  # pyroute2 IPRoute, used on the worker thread only
        self._nft: _Nft | None = None
        self._host_ns: tuple[int, int] | None = None
        self._memory_state: dict = {}
        self._br_index = 0
        self.mtu = 1500

    # -- worker thread --
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forkd-net")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _w_open(self) -> None:
        from pyroute2 import IPRoute

        if self._ipr is None:
            self._ipr = IPRoute()
        if self._nft is None:
            self._nft = _Nft()
        st = os.stat("/proc/self/ns/net")
        self._host_ns = (st.st_dev, st.st_ino)

    def _w_close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    # -- setup --
    async def setup(self) -> None:
        """Create (or take over and reset) the bridge and rules. A no-op when
        this manager is already set up."""
        async with self._lock:
            if self._ready:
                return
            try:
                await self._run(self._w_setup)
            except BaseException:
                await self._run(self._w_teardown)
                raise
            self._ready = True

    def _w_setup(self) -> None:
        self._w_open()
        ipr = self._ipr
        state = self._read_state()
        # Leftovers of a crashed run: ports (their sandboxes are gone) and set elements.
        if n := self._w_remove_ports():
            log.warning("removed %d leftover sandbox network devices on %s", n, self.bridge)
        br = ipr.link_lookup(ifname=self.bridge)
        if br:
            kind = _kind(ipr, br[0])
            if kind != "bridge":
                raise NetworkError(f"{self.bridge} exists and is not a bridge ({kind})")
            br_index = br[0]
        else:
            br_index = None
        subnet = self._pick_subnet(br_index, state)
        gateway = subnet.network_address + 1
        if br_index is None:
            ipr.link("add", ifname=self.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
            br_index = ipr.link_lookup(ifname=self.bridge)[0]
        for a in ipr.get_addr(index=br_index, family=socket.AF_INET):
            if (a.get("IFA_ADDRESS"), a["prefixlen"]) != (str(gateway), subnet.prefixlen):
                ipr.addr("del", index=br_index, address=a.get("IFA_ADDRESS"), prefixlen=a["prefixlen"])
        if not any(
            a.get("IFA_ADDRESS") == str(gateway) for a in ipr.get_addr(index=br_index, family=socket.AF_INET)
        ):
            ipr.addr("add", index=br_index, address=str(gateway), prefixlen=subnet.prefixlen)
        # The host offers sandboxes nothing over IPv6: no address for them to find.
        _write_sysctl(f"net/ipv6/conf/{self.bridge}/disable_ipv6", "1", missing_ok=True)
        ipr.link("set", index=br_index, state="up")

        self.subnet, self.gateway = subnet, gateway
        self._br_index = br_index
        self.mtu = self._uplink_mtu()
        self.dns = self._want_dns if self._want_dns is not None else self._host_resolvers(subnet)
        # A value recorded by a crashed run is the host's real one; the current "1" may be ours.
        sysctls = dict(state.get("sysctls", {}))
        forwarding = _read_sysctl(IP_FORWARD)
        if forwarding != "1":
            sysctls.setdefault(IP_FORWARD, forwarding)
        self._write_state({"bridge": self.bridge, "subnet": str(subnet), "sysctls": sysctls})
        # Rules first: forwarding never runs without them.
        self._nft.run(self._ruleset(foreign_forward_drop=sysctls.get(IP_FORWARD) == "0"))
        if forwarding != "1":
            _write_sysctl(IP_FORWARD, "1")

    def _uplink_mtu(self) -> int:
        """The MTU of the interface behind the default route (1500 without one):
        sandboxes get it so they never send what the uplink cannot carry."""
        for r in self._ipr.route("dump", family=socket.AF_INET, table=254):
            if r.get("dst_len") == 0 and r.get("RTA_OIF"):
                return int(self._ipr.link("get", index=r.get("RTA_OIF"))[0].get("IFLA_MTU") or 1500)
        log.warning("no IPv4 default route on the host: sandboxes will reach nothing outside")
        return 1500

    def _pick_subnet(self, br_index: int | None, state: dict) -> ipaddress.IPv4Network:
        ipr = self._ipr
        routes = [
            (r.get("RTA_DST") or "0.0.0.0", r["dst_len"])
            for r in ipr.route("dump", family=socket.AF_INET)
            if br_index is None or r.get("RTA_OIF") != br_index
        ]
        addrs = [
            a.get("IFA_ADDRESS")
            for a in ipr.get_addr(family=socket.AF_INET)
            if br_index is None or a["index"] != br_index
        ]
        resolvers = []
        for path in self.resolv_confs:
            with contextlib.suppress(OSError):
                resolvers += re.findall(r"^\s*nameserver\s+([0-9.]+)\s*$", Path(path).read_text(), re.M)
        addrs_and_dns = addrs + [d for d in resolvers if _is_ipv4(d)] + list(self._want_dns or ())

        def clashes(net: ipaddress.IPv4Network) -> list[str]:
            return subnet_clashes(net, routes, addrs_and_dns)

        if self._want_subnet is not None:
            why = clashes(self._want_subnet)
            if why:
                raise NetworkError(
                    f"sandbox subnet {self._want_subnet} overlaps the host's {', '.join(why)}: choose another"
                )
            return self._want_subnet
        candidates: list[ipaddress.IPv4Network] = []
        if state.get("subnet"):
            candidates.append(ipaddress.IPv4Network(state["subnet"]))
        if br_index is not None:
            for a in ipr.get_addr(index=br_index, family=socket.AF_INET):
                candidates.append(
                    ipaddress.IPv4Network(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}", strict=False)
                )
        candidates += [ipaddress.IPv4Network(c) for c in CANDIDATE_SUBNETS]
        for net in candidates:
            if 12 <= net.prefixlen <= 29 and not clashes(net):
                return net
        raise NetworkError(
            f"every candidate sandbox subnet ({', '.join(CANDIDATE_SUBNETS)}) overlaps a host route: pass subnet="
        )

    def _host_resolvers(self, subnet: ipaddress.IPv4Network) -> tuple[str, ...]:
        host_addrs = [a.get("IFA_ADDRESS") for a in self._ipr.get_addr()]
        found = upstream_resolvers(self.resolv_confs, host_addrs, subnet)
        if not found:
            log.warning("the host has no upstream DNS resolver sandboxes can reach; pass dns=[...]")
        return found

    def _ruleset(self, *, foreign_forward_drop: bool) -> str:
        br, t, subnet = self.bridge, self.table, self.subnet
        dns = ", ".join(self.dns)
        blocked = ", ".join(self.blocked)
        lines = [
            # Declaring then deleting makes the load an atomic replace whether or not the table existed.
            f"table inet {t} {{}}",
            f"delete table inet {t}",
            f"table inet {t} {{",
            "  chain prerouting {",
            # After conntrack (-200), before any DNAT (-100).
            "    type filter hook prerouting priority -150; policy accept;",
            f'    iifname != "{br}" accept',
            "    ct state established,related accept",
            "    meta nfproto != ipv4 drop",
            f"    ip saddr != {subnet} drop",
            "    ip daddr 127.0.0.0/8 drop",
            "    fib daddr type { local, broadcast, multicast } drop",
        ]
        if dns:
            lines.append(f"    ip daddr {{ {dns} }} meta l4proto {{ tcp, udp }} th dport 53 accept")
        if blocked:
            lines.append(f"    ip daddr {{ {blocked} }} drop")
        lines += [
            "  }",
            "  chain input {",
            "    type filter hook input priority 0; policy accept;",
            f'    iifname "{br}" ct state established,related accept',
            f'    iifname "{br}" drop',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority 0; policy accept;",
            f'    iifname "{br}" oifname "{br}" drop',
            # Other hops may have a smaller MTU than the uplink: clamp TCP MSS to the route's.
            f'    iifname "{br}" tcp flags syn tcp option maxseg size set rt mtu',
            f'    oifname "{br}" tcp flags syn tcp option maxseg size set rt mtu',
            f'    oifname "{br}" ct state established,related accept',
            f'    oifname "{br}" drop',
            f'    iifname "{br}" accept',
        ]
        if foreign_forward_drop:
            lines.append("    drop")
        lines += [
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority 100; policy accept;",
            f'    ip saddr {subnet} oifname != "{br}" masquerade',
            "  }",
            "}",
            f"table bridge {t} {{}}",
            f"delete table bridge {t}",
            f"table bridge {t} {{",
            "  set ports { type ifname . ether_addr . ipv4_addr; }",
            "  chain prerouting {",
            "    type filter hook prerouting priority -200; policy accept;",
            f'    iifname != "{self.port_prefix}*" accept',
            "    ether type ip iifname . ether saddr . ip saddr @ports accept",
            "    ether type arp iifname . ether saddr . arp saddr ip @ports"
            " iifname . arp saddr ether . arp saddr ip @ports accept",
            "    drop",
            "  }",
            "}",
        ]
        return "\n".join(lines) + "\n"

    # -- attach / detach --
    def _allocate(self) -> tuple[int, ipaddress.IPv4Address]:
        if not self._ready or self.subnet is None:
            raise NetworkError("network is not set up")
        size = self.subnet.num_addresses
        # Round robin: an address (and its conntrack entries) is reused as late as possible.
        for _ in range(size):
            self._cursor = self._cursor + 1 if self._cursor + 1 < size - 1 else 2
            if self._cursor not in self._leases:
                self._leases[self._cursor] = None
                return self._cursor, self.subnet.network_address + self._cursor
        raise NetworkError(f"no free address in {self.subnet}")

    def _handle(self, kind: str, index: int, ip: ipaddress.IPv4Address) -> NetHandle:
        assert self.subnet is not None
        return NetHandle(
            kind=kind,
            ifname=f"{self.port_prefix}{index:x}",
            ip=str(ip),
            prefixlen=self.subnet.prefixlen,
            gateway=str(self.gateway),
            mac=mac_for(ip),
            dns=self.dns,
            mtu=self.mtu,
            index=index,
        )

    async def attach(self, pid: int, pidfd: int | None = None) -> NetHandle:
        """Give the process ``pid``'s network namespace an ``eth0`` on the bridge.

        ``pidfd`` (recommended): a pidfd of that process; it proves ``pid`` was
        not recycled between the caller's check and ours."""
        return await self._attach("veth", self._w_attach_veth, pid, pidfd)

    async def attach_tap(self, uid: int | None = None) -> NetHandle:
        """Create a tap device on the bridge for a microVM (owned by ``uid`` so an
        unprivileged QEMU may open it). The VM must use ``handle.mac``; its
        guest configures ``ip/prefixlen``, ``gateway`` and ``dns``."""
        return await self._attach("tap", self._w_attach_tap, uid)

    async def _attach(self, kind: str, work: Callable[..., None], *args: Any) -> NetHandle:
        index, ip = self._allocate()
        handle = self._handle(kind, index, ip)
        done = asyncio.ensure_future(self._run(work, handle, *args))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            # The worker finishes regardless: undo its work once it has.
            asyncio.ensure_future(self._abandon(done, handle))
            raise
        except NetworkError:
            del self._leases[index]
            raise
        except Exception as exc:
            del self._leases[index]
            raise NetworkError(f"attaching a {kind}: {exc}") from exc
        self._leases[index] = handle
        return handle

    async def _abandon(self, done: asyncio.Future, handle: NetHandle) -> None:
        try:
            await done
        except Exception:
            self._leases.pop(handle.index, None)
            return
        self._leases[handle.index] = handle
        await self.detach(handle)

    async def detach(self, handle: NetHandle) -> None:
        """Remove the sandbox's device and free its address. Idempotent; fine
        after the sandbox died (its end of a veth is then already gone)."""
        if self._leases.get(handle.index) is not handle:
            return
        try:
            await self._run(self._w_detach, handle)
        finally:
            self._leases.pop(handle.index, None)

    def handles(self) -> list[NetHandle]:
        return [h for h in self._leases.values() if h is not None]

    def _w_attach_veth(self, h: NetHandle, pid: int, pidfd: int | None) -> None:
        try:
            nsfd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NetworkError(f"process {pid} does not exist") from None
        try:
            if pidfd is not None:
                try:
                    signal.pidfd_send_signal(pidfd, 0)
                except ProcessLookupError:
                    raise NetworkError(f"process {pid} exited") from None
            st = os.fstat(nsfd)
            if (st.st_dev, st.st_ino) == self._host_ns:
                raise NetworkError(f"process {pid} is in the host's network namespace")
            peer = {"ifname": "eth0", "net_ns_fd": nsfd, "address": h.mac, "mtu": h.mtu}
            # Created already enslaved and up: one netlink round trip less.
            self._w_create(
                h,
                lambda: self._ipr.link(
                    "add",
                    ifname=h.ifname,
                    kind="veth",
                    peer=peer,
                    master=self._br_index,
                    state="up",
                    mtu=h.mtu,
                ),
            )
            try:
                link = self._ipr.link("get", ifname=h.ifname)[0]
                peer_index = link.get("IFLA_LINK")
                self._w_plug(h, link["index"], enslaved=True)
                self._w_configure_inside(nsfd, peer_index, h)
            except BaseException:
                self._w_unplug(h)
                raise
        finally:
            os.close(nsfd)

    def _w_attach_tap(self, h: NetHandle, uid: int | None) -> None:
        kw = {"uid": uid} if uid is not None else {}
        self._w_create(h, lambda: self._ipr.link("add", ifname=h.ifname, kind="tuntap", mode="tap", **kw))
        try:
            self._w_plug(h, self._ipr.link_lookup(ifname=h.ifname)[0])
        except BaseException:
            self._w_unplug(h)
            raise

    def _w_create(self, h: NetHandle, create: Callable[[], Any]) -> None:
        from pyroute2 import NetlinkError

        try:
            create()
        except NetlinkError as exc:
            if exc.code != errno.EEXIST or not self._ipr.link_lookup(ifname=h.ifname):
                if exc.code == errno.EEXIST:
                    raise NetworkError("the sandbox already has an eth0") from None
                raise NetworkError(f"creating {h.ifname}: {exc}") from None
            # A stale device of the same name (a sandbox that died while its
            # namespace is still being torn down): ours now.
            self._w_delete_link(h.ifname)
            create()

    def _w_plug(self, h: NetHandle, host_index: int, enslaved: bool = False) -> None:
        if not enslaved:
            self._ipr.link("set", index=host_index, master=self._br_index, state="up", mtu=h.mtu)
        self._ipr.brport("set", index=host_index, isolated=1)
        self._nft.run(f"add element bridge {self.table} ports {{ {self._element(h)} }}")

    def _w_configure_inside(self, nsfd: int, peer_index: int, h: NetHandle) -> None:
        from pyroute2 import IPRoute

        sock = _netlink_socket_in(nsfd)
        with IPRoute(fileno=sock.detach()) as nr:
            nr.addr("add", index=peer_index, address=h.ip, prefixlen=h.prefixlen)
            nr.link("set", index=peer_index, state="up")
            nr.route("add", dst="0.0.0.0/0", gateway=h.gateway)

    def _element(self, h: NetHandle) -> str:
        return f'"{h.ifname}" . {h.mac} . {h.ip}'

    def _w_unplug(self, h: NetHandle) -> None:
        with contextlib.suppress(NetworkError):
            self._nft.run(f"delete element bridge {self.table} ports {{ {self._element(h)} }}")
        self._w_delete_link(h.ifname)

    def _w_detach(self, h: NetHandle) -> None:
        if self._nft is None:
            return
        self._w_unplug(h)

    def _w_delete_link(self, ifname: str) -> None:
        from pyroute2 import NetlinkError

        try:
            self._ipr.link("del", ifname=ifname)
        except NetlinkError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                raise

    def _w_remove_ports(self) -> int:
        n = 0
        for link in self._ipr.get_links():
            name = link.get("IFLA_IFNAME") or ""
            if name.startswith(self.port_prefix):
                self._w_delete_link(name)
                n += 1
        return n

    # -- teardown --
    async def teardown(self) -> None:
        """Remove every device, the bridge and the rules; restore sysctls."""
        async with self._lock:
            try:
                await self._run(self._w_teardown)
            finally:
                self._leases.clear()
                self._ready = False
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                    self._pool = None

    def _w_teardown(self) -> None:
        self._w_open()
        try:
            # Forwarding off before the rules that confine it go.
            for key, value in self._read_state().get("sysctls", {}).items():
                # Only undo what is still our doing.
                if key == IP_FORWARD and _read_sysctl(key) == "1":
                    _write_sysctl(key, value)
            self._w_remove_ports()
            for family in ("inet", "bridge"):
                self._nft.run(f"table {family} {self.table} {{}}\ndelete table {family} {self.table}\n")
            for index in self._ipr.link_lookup(ifname=self.bridge):
                if _kind(self._ipr, index) == "bridge":  # never someone else's device of that name
                    self._ipr.link("del", index=index)
            if self.state_file is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.state_file.unlink()
            self._memory_state = {}
        finally:
            self._w_close()

    # -- state --
    def _read_state(self) -> dict:
        if self.state_file is not None:
            try:
                return json.loads(self.state_file.read_text())
            except (FileNotFoundError, ValueError):
                return {}
        return dict(self._memory_state)

    def _write_state(self, state: dict) -> None:
        self._memory_state = state
        if self.state_file is not None:
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, self.state_file)


# -- small helpers ---------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _netlink_socket_in(nsfd: int) -> socket.socket:
    """A rtnetlink socket in another network namespace. A socket keeps the
    namespace it was created in, so a throwaway thread enters the namespace
    (setns affects only the calling thread) and creates it."""
    out: dict[str, Any] = {}

    def run() -> None:
        if _libc.setns(nsfd, CLONE_NEWNET) != 0:
            out["error"] = OSError(ctypes.get_errno(), "setns into the sandbox's network namespace")
            return
        out["sock"] = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)

    t = threading.Thread(target=run, name="forkd-netns")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["sock"]


def _kind(ipr: Any, index: int) -> str | None:
    return ipr.link("get", index=index)[0].get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))


def _read_sysctl(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()


def _write_sysctl(key: str, value: str, missing_ok: bool = False) -> None:
    try:
        Path("/proc/sys", key).write_text(value)
    except FileNotFoundError:
        if not missing_ok:
            raise


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True
