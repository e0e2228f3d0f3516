"""Opt-in sandbox networking on real namespaces, veths, a bridge and nftables.

A "sandbox" here is a process in its own network namespace (``unshare --net
sleep``); the test process opens sockets inside that namespace to act as the
sandbox. The outside world is another namespace ("upstream", 198.51.100.2) behind
a veth the host routes to, with no route back to the sandbox subnet: a sandbox
reaching it proves masquerade. Nothing here needs the real internet.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from forkd_runtime._network import (
    IP_FORWARD,
    NetworkError,
    NetworkManager,
    mac_for,
    subnet_clashes,
    upstream_resolvers,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, nftables)")

TAG = f"{os.getpid() % 100000}"
BRIDGE = f"fkt{TAG}"  # test names never collide with a real runtime's fkbr0 / forkd
TABLE = f"forkd_test{TAG}"
UP_LINK = f"fku{TAG}"
UP_HOST, UP_PEER = "198.51.100.1", "198.51.100.2"  # TEST-NET-2
_libc = ctypes.CDLL(None, use_errno=True)


# -- plumbing --------------------------------------------------------------------
def sh(*cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd}: {r.stderr}")
    return r.stdout


def in_ns(pid: int, *cmd: str) -> str:
    return sh("nsenter", "-t", str(pid), "-n", *cmd)


class NetNs:
    """A process alone in a fresh network namespace (stands in for a sandbox)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "120"])
        self.pid = self.proc.pid
        own = os.readlink("/proc/self/ns/net")
        for _ in range(500):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{self.pid}/ns/net") != own:
                    return
            threading.Event().wait(0.002)
        raise AssertionError("unshare did not enter a new network namespace")

    def socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket that lives in this namespace (setns on a throwaway thread)."""
        out: dict = {}
        fd = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)

        def run() -> None:
            if _libc.setns(fd, 0x40000000) != 0:
                out["err"] = OSError(ctypes.get_errno(), "setns")
            else:
                out["sock"] = socket.socket(socket.AF_INET, kind)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        os.close(fd)
        if "err" in out:
            raise out["err"]
        return out["sock"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def serve(sock: socket.socket | None = None, host: str = "0.0.0.0", port: int = 0):
    """A TCP server (on ``sock``, a socket made in some namespace, if given) that
    tells each client the address it sees it connecting from: (server, port)."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        await writer.drain()
        writer.close()

    if sock is None:
        server = await asyncio.start_server(greet, host, port)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
        sock.setblocking(False)
        server = await asyncio.start_server(greet, sock=sock)
    return server, server.sockets[0].getsockname()[1]


async def connect(ns: NetNs, host: str, port: int, *, source: str | None = None, timeout: float = 0.5):
    """What the server at host:port says from inside ``ns`` (the peer address it
    saw), or None when no connection could be made within ``timeout``."""
    s = ns.socket()
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        if source:
            s.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(s, (host, port)), timeout)
        data = await asyncio.wait_for(loop.sock_recv(s, 100), 5)
        return data.decode().strip()
    except (OSError, TimeoutError):
        return None
    finally:
        s.close()


async def from_host(host: str, port: int) -> str:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    data = await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return data.decode().strip()


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def nft_tables() -> str:
    return sh("nft", "list", "tables")


def sweep() -> None:
    """Remove anything these tests may have left behind."""
    for name in os.listdir("/sys/class/net"):
        if name.startswith(BRIDGE) or name == UP_LINK:
            sh("ip", "link", "del", name, check=False)
    for family in ("inet", "bridge"):
        sh("nft", "delete", "table", family, TABLE, check=False)


@pytest.fixture
def forward_sysctl():
    """The host's IPv4 forwarding value before the test; put back afterwards."""
    before = Path("/proc/sys", IP_FORWARD).read_text().strip()
    yield before
    Path("/proc/sys", IP_FORWARD).write_text(before)


@pytest.fixture
def upstream():
    """An 'outside host' namespace at 198.51.100.2 behind a host veth (198.51.100.1)."""
    ns = NetNs()
    try:
        sh("ip", "link", "add", UP_LINK, "type", "veth", "peer", "name", "eth0", "netns", str(ns.pid))
        sh("ip", "addr", "add", f"{UP_HOST}/24", "dev", UP_LINK)
        sh("ip", "link", "set", UP_LINK, "up")
        in_ns(ns.pid, "ip", "addr", "add", f"{UP_PEER}/24", "dev", "eth0")
        in_ns(ns.pid, "ip", "link", "set", "eth0", "up")
        in_ns(ns.pid, "ip", "link", "set", "lo", "up")
        yield ns
    finally:
        ns.kill()
        sh("ip", "link", "del", UP_LINK, check=False)


@pytest.fixture
async def make_net(tmp_path, forward_sysctl):
    """Factory for set-up NetworkManagers on the test bridge; torn down (and swept) after."""
    made: list[NetworkManager] = []

    async def make(**kw) -> NetworkManager:
        kw.setdefault("bridge", BRIDGE)
        kw.setdefault("table", TABLE)
        kw.setdefault("state_file", tmp_path / "net.json")
        nm = NetworkManager(**kw)
        made.append(nm)
        await nm.setup()
        return nm

    try:
        yield make
    finally:
        for nm in made:
            with contextlib.suppress(Exception):
                await nm.teardown()
        sweep()


@pytest.fixture
def sandboxes():
    """Factory for sandbox stand-ins, killed after the test."""
    made: list[NetNs] = []

    def make() -> NetNs:
        ns = NetNs()
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.kill()


def host_primary_ip() -> str | None:
    routes = json.loads(sh("ip", "-j", "-4", "route", "get", "1.1.1.1", check=False) or "[]")
    return routes[0].get("prefsrc") if routes else None


# -- pure helpers ------------------------------------------------------------------
def test_resolvers_skip_local_stubs_and_ipv6(tmp_path):
    subnet = ipaddress.IPv4Network("10.203.0.0/16")
    stub = tmp_path / "stub.conf"
    stub.write_text("# systemd-resolved\nnameserver 127.0.0.53\noptions edns0\n")
    upstream_conf = tmp_path / "upstream.conf"
    upstream_conf.write_text(
        "nameserver 2001:db8::53\nnameserver 192.0.2.2\nnameserver 9.9.9.9\nnameserver 10.203.0.9\n"
        "nameserver 1.1.1.1\nnameserver 9.9.9.9\n"
    )
    # host-local (own address), IPv6, inside the sandbox subnet and duplicates are left out
    assert upstream_resolvers([stub, upstream_conf], ["192.0.2.2"], subnet) == ("9.9.9.9", "1.1.1.1")
    assert upstream_resolvers([stub], [], subnet) == ()
    assert upstream_resolvers([tmp_path / "missing", upstream_conf], [], subnet)[0] == "192.0.2.2"


def test_subnet_clashes_and_mac():
    net = ipaddress.IPv4Network("10.203.0.0/16")
    assert subnet_clashes(net, [("0.0.0.0", 0), ("192.0.2.0", 24)], ["192.0.2.2"]) == []
    assert subnet_clashes(net, [("10.0.0.0", 8)], []) == ["route 10.0.0.0/8"]
    assert subnet_clashes(net, [], ["10.203.7.7"]) == ["address 10.203.7.7"]
    assert mac_for(ipaddress.IPv4Address("10.203.1.2")) == "02:66:0a:cb:01:02"


# -- setup / teardown ---------------------------------------------------------------
async def test_setup_is_idempotent_and_teardown_restores_everything(make_net, tmp_path, forward_sysctl):
    Path("/proc/sys", IP_FORWARD).write_text("0")
    nm = await make_net()
    await nm.setup()
    assert nm.subnet is not None and nm.gateway == nm.subnet.network_address + 1
    addrs = json.loads(sh("ip", "-j", "addr", "show", BRIDGE))[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [
        (str(nm.gateway), nm.subnet.prefixlen)
    ]
    assert f"table inet {TABLE}" in nft_tables() and f"table bridge {TABLE}" in nft_tables()
    assert Path("/proc/sys", IP_FORWARD).read_text().strip() == "1"
    # forwarding was off: the host must not start routing between its other interfaces
    assert "\t\tdrop\n" in sh("nft", "list", "chain", "inet", TABLE, "forward")

    await nm.teardown()
    assert not link_exists(BRIDGE)
    assert TABLE not in nft_tables()
    assert Path("/proc/sys", IP_FORWARD).read_text().strip() == "0"
    assert not (tmp_path / "net.json").exists()
    await nm.teardown()  # twice is fine


async def test_setup_after_a_crash_cleans_up_and_still_restores_sysctls(
    make_net, sandboxes, tmp_path, forward_sysctl
):
    Path("/proc/sys", IP_FORWARD).write_text("0")
    first = await make_net()
    h = await first.attach(sandboxes().pid)
    # the runtime dies without teardown; a new one takes over the same state file
    second = await make_net()
    assert not link_exists(h.ifname), "a leftover sandbox device survived setup"
    assert "elements" not in sh("nft", "list", "set", "bridge", TABLE, "ports")
    assert second.subnet == first.subnet
    await second.teardown()
    assert Path("/proc/sys", IP_FORWARD).read_text().strip() == "0"
    assert not link_exists(BRIDGE)


async def test_subnet_overlapping_a_host_route_is_refused(make_net, upstream, forward_sysctl):
    with pytest.raises(NetworkError, match="198.51.100.0/24"):
        await make_net(subnet="198.51.100.0/25")
    assert not link_exists(BRIDGE)
    assert TABLE not in nft_tables()
    assert Path("/proc/sys", IP_FORWARD).read_text().strip() == forward_sysctl


# -- what a sandbox can and cannot reach ----------------------------------------------
async def test_sandbox_reaches_an_outside_host_through_nat(make_net, upstream, sandboxes):
    nm = await make_net(dns=[UP_PEER])
    box = sandboxes()
    h = await nm.attach(box.pid)
    assert (h.kind, h.prefixlen, h.gateway, h.dns) == (
        "veth",
        nm.subnet.prefixlen,
        str(nm.gateway),
        (UP_PEER,),
    )
    inside = json.loads(in_ns(box.pid, "ip", "-j", "addr", "show", "eth0"))[0]
    assert inside["address"] == h.mac
    assert inside["mtu"] == h.mtu == nm.mtu  # the uplink's: nothing the host would have to fragment
    assert [a["local"] for a in inside["addr_info"] if a["family"] == "inet"] == [h.ip]
    assert json.loads(in_ns(box.pid, "ip", "-j", "route", "show", "default"))[0]["gateway"] == h.gateway

    server, port = await serve(upstream.socket())
    async with server:
        # the outside host has no route to the sandbox subnet: only masquerade makes this work
        assert await connect(box, UP_PEER, port, timeout=5) == UP_HOST
    # DNS-style UDP to the resolver the handle names, answered through NAT too
    assert await asyncio.to_thread(udp_exchange, box.socket(socket.SOCK_DGRAM), upstream, h.dns[0]) == UP_HOST


def udp_exchange(client: socket.socket, server_ns: NetNs, server_ip: str) -> str | None:
    """Send a datagram from ``client`` to port 53 of a UDP server in ``server_ns``
    that answers with the source address it saw."""
    server = server_ns.socket(socket.SOCK_DGRAM)
    with server, client:
        server.bind((server_ip, 53))
        server.settimeout(5)
        client.settimeout(5)
        client.sendto(b"query", (server_ip, 53))
        _, peer = server.recvfrom(100)
        server.sendto(peer[0].encode(), peer)
        return client.recvfrom(100)[0].decode()


async def test_sandbox_cannot_reach_the_host(make_net, upstream, sandboxes):
    nm = await make_net()
    box = sandboxes()
    h = await nm.attach(box.pid)
    # Emulate a host where route_localnet is on (kube-proxy does this): 127/8 from the bridge is routable.
    Path(f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet").write_text("1")
    in_ns(box.pid, "sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1")
    in_ns(box.pid, "ip", "route", "add", "127.0.0.0/8", "via", h.gateway, "dev", "eth0")
    server, port = await serve()  # every host address
    async with server:
        # the listener works: the outside host reaches it
        assert await connect(upstream, UP_HOST, port, timeout=5) == UP_PEER
        targets = [h.gateway, UP_HOST, "127.0.0.1"] + [ip for ip in [host_primary_ip()] if ip]
        results = await asyncio.gather(*(connect(box, t, port, source=h.ip) for t in targets))
        assert dict(zip(targets, results, strict=True)) == dict.fromkeys(targets)  # None: no connection


async def test_sandboxes_cannot_reach_each_other(make_net, sandboxes):
    nm = await make_net()
    a, b = sandboxes(), sandboxes()
    ha = await nm.attach(a.pid)
    hb = await nm.attach(b.pid)
    server, port = await serve(b.socket(), host=hb.ip)
    async with server:
        # the host can open connections to a sandbox (and gets the replies)
        assert await from_host(hb.ip, port) == str(nm.gateway)
        # directly on the bridge (isolated ports), and routed through the host (forward rule)
        assert await connect(a, hb.ip, port) is None
        in_ns(a.pid, "ip", "route", "add", f"{hb.ip}/32", "via", ha.gateway)
        in_ns(b.pid, "ip", "route", "add", f"{ha.ip}/32", "via", hb.gateway)
        assert await connect(a, hb.ip, port) is None


async def test_outside_cannot_open_connections_to_a_sandbox(make_net, upstream, sandboxes):
    nm = await make_net()
    box = sandboxes()
    h = await nm.attach(box.pid)
    in_ns(upstream.pid, "ip", "route", "add", str(nm.subnet), "via", UP_HOST)
    server, port = await serve(box.socket(), host=h.ip)
    async with server:
        assert await from_host(h.ip, port) == str(nm.gateway)  # it is listening
        assert await connect(upstream, h.ip, port) is None


async def test_spoofed_addresses_are_dropped(make_net, upstream, sandboxes):
    nm = await make_net()
    a, b = sandboxes(), sandboxes()
    ha = await nm.attach(a.pid)
    hb = await nm.attach(b.pid)
    server, port = await serve(upstream.socket())
    async with server:
        assert await connect(a, UP_PEER, port, source=ha.ip, timeout=5) == UP_HOST
        # a takes b's address as well: nothing it sends from it leaves its port
        in_ns(a.pid, "ip", "addr", "add", f"{hb.ip}/32", "dev", "eth0")
        assert await connect(a, UP_PEER, port, source=hb.ip) is None
        # a changes its MAC: nothing it sends at all leaves its port
        in_ns(a.pid, "ip", "link", "set", "eth0", "address", "02:66:00:00:00:01")
        assert await connect(a, UP_PEER, port, source=ha.ip) is None
        assert await connect(b, UP_PEER, port, timeout=5) == UP_HOST


async def test_link_local_is_blocked_except_a_listed_resolver(make_net, upstream, sandboxes):
    metadata, resolver = "169.254.169.254", "169.254.169.253"
    for ip in (metadata, resolver):
        in_ns(upstream.pid, "ip", "addr", "add", f"{ip}/32", "dev", "eth0")
        sh("ip", "route", "add", f"{ip}/32", "via", UP_PEER, "dev", UP_LINK)
    nm = await make_net(dns=[resolver])
    box = sandboxes()
    await nm.attach(box.pid)

    dns_server, _ = await serve(upstream.socket(), port=53)
    server, port = await serve(upstream.socket())
    async with server, dns_server:
        assert await connect(box, UP_PEER, port, timeout=5) == UP_HOST
        assert await connect(box, resolver, 53, timeout=5) == UP_HOST
        assert await asyncio.gather(connect(box, metadata, port), connect(box, resolver, port)) == [
            None,
            None,
        ]


# -- lifecycle of one attachment ----------------------------------------------------------
async def test_detach_removes_the_device_and_frees_the_address(make_net, sandboxes):
    nm = await make_net()
    box = sandboxes()
    h = await nm.attach(box.pid)
    assert link_exists(h.ifname)
    assert h.ip in sh("nft", "list", "set", "bridge", TABLE, "ports")
    port = json.loads(sh("ip", "-d", "-j", "link", "show", h.ifname))[0]
    assert port["master"] == BRIDGE and port["linkinfo"]["info_slave_data"]["isolated"] is True

    await nm.detach(h)
    assert not link_exists(h.ifname)
    assert "eth0" not in in_ns(box.pid, "ip", "-o", "link")
    assert h.ip not in sh("nft", "list", "set", "bridge", TABLE, "ports")
    assert nm.handles() == []
    await nm.detach(h)  # idempotent

    # a sandbox that died first: its namespace took the veth with it; detach still works
    again = await nm.attach(box.pid)
    assert again.ip != h.ip  # addresses are reused as late as possible
    box.kill()
    await nm.detach(again)
    assert nm.handles() == []


async def test_attach_refuses_bad_targets(make_net, sandboxes):
    nm = await make_net()
    with pytest.raises(NetworkError, match="host's network namespace"):
        await nm.attach(os.getpid())
    box = sandboxes()
    pidfd = os.pidfd_open(box.pid)
    try:
        box.kill()
        with pytest.raises(NetworkError):
            await nm.attach(box.pid, pidfd=pidfd)
    finally:
        os.close(pidfd)
    other = sandboxes()
    await nm.attach(other.pid)
    with pytest.raises(NetworkError, match="already has an eth0"):
        await nm.attach(other.pid)
    assert len(nm.handles()) == 1
    assert [n for n in os.listdir("/sys/class/net") if n.startswith(nm.port_prefix)] == [
        nm.handles()[0].ifname
    ]


async def test_cancelled_attach_leaves_nothing(make_net, sandboxes):
    nm = await make_net()
    box = sandboxes()
    task = asyncio.ensure_future(nm.attach(box.pid))
    await asyncio.sleep(0)  # the worker has the job
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if not nm._leases and not any(n.startswith(nm.port_prefix) for n in os.listdir("/sys/class/net")):
            break
        await asyncio.sleep(0.01)
    assert nm.handles() == [] and not nm._leases
    assert [n for n in os.listdir("/sys/class/net") if n.startswith(nm.port_prefix)] == []
    assert "eth0" not in in_ns(box.pid, "ip", "-o", "link")
    assert "elements" not in sh("nft", "list", "set", "bridge", TABLE, "ports")


async def test_tap_for_a_microvm(make_net):
    nm = await make_net()
    h = await nm.attach_tap(uid=65534)
    assert h.kind == "tap"
    link = json.loads(sh("ip", "-d", "-j", "link", "show", h.ifname))[0]
    assert link["linkinfo"]["info_kind"] == "tun" and link["linkinfo"]["info_data"]["type"] == "tap"
    assert link["linkinfo"]["info_data"]["user"] in ("65534", "nobody", 65534)
    assert link["master"] == BRIDGE and link["linkinfo"]["info_slave_data"]["isolated"] is True
    assert link["mtu"] == h.mtu
    assert f"{h.mac} . {h.ip}" in sh("nft", "list", "set", "bridge", TABLE, "ports")
    await nm.detach(h)
    assert not link_exists(h.ifname)


async def test_teardown_removes_attached_devices(make_net, sandboxes):
    nm = await make_net()
    hs = [await nm.attach(sandboxes().pid) for _ in range(3)]
    await nm.teardown()
    assert not any(link_exists(h.ifname) for h in hs)
    assert not link_exists(BRIDGE)
    assert TABLE not in nft_tables()


# -- with the real process backend ---------------------------------------------------------
async def test_process_backend_child_gets_internet(process_backend, upstream):
    from forkd_runtime._backend import SpawnOptions
    from process_helpers import run

    snap = await process_backend.prepare("base")
    [child] = await process_backend.spawn(snap, 1, SpawnOptions(internet=True))
    [offline] = await process_backend.spawn(snap, 1)
    h = child.handle.net
    assert h is not None and offline.handle.net is None
    # The sandbox is told the host's upstream resolvers.
    resolv = (await run(child, "cat /etc/resolv.conf")).text
    assert [ln.split()[1] for ln in resolv.splitlines() if ln.startswith("nameserver")] == list(h.dns)
    assert "eth0" not in (await run(offline, "cat /proc/net/dev")).text
    server, port = await serve(upstream.socket())
    host_server, host_port = await serve()
    probe = (
        "python3 -c 'import socket,sys\n"
        "for target in sys.argv[1:]:\n"
        '    host, port, timeout = target.split(":")\n'
        "    try: print(socket.create_connection((host, int(port)), timeout=float(timeout)).recv(64).decode().strip())\n"
        "    except OSError as e: print(type(e).__name__)\n' "
    )
    async with server, host_server:
        r = await run(child, probe + f"{UP_PEER}:{port}:5 {h.gateway}:{host_port}:0.5")
        assert r.ok, r
        assert r.text.split() == [UP_HOST, "TimeoutError"]
    await process_backend.kill(child)  # detaches its network too
    assert not link_exists(h.ifname)
