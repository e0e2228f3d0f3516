"""The guest side of a forkd microVM: PID 1 once the initramfs is done.

Copied into every VM image as ``forkd_vm_guest`` and run as
``python3 -m forkd_vm_guest --port /dev/virtio-ports/NAME --warmup-file F``.
Not imported on the host.

It runs the template's warm-up, then answers ``hello``, ``ping``, ``info``,
``identity.refresh`` (and, for a child with internet access, the host's
``vm.net.configure``) from a small blocking loop on the virtio-serial port, and
only starts the full asyncio agent at the first other frame, handing it every
byte not yet answered (frames are handled strictly in order; nothing is lost).

Why: the parent VM is snapshotted while waiting in this loop. Under TCG every
child translates anew all the guest code it runs after its restore; the host's
first requests to a child (its identity refresh, then a ping) cost about half
as much here as through the event loop, the connection engine and the task
machinery, and a child that is never used never pays for them at all. Where
the runtime could compile it, ``ping`` and the identity refresh are answered
by C (``_guest_early.c``, see ``native_early``) and the parent is snapshotted
inside its read: a child then runs no Python at all until it is used.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import sys
import time

from forkd import protocol as p
from forkd._transports import StreamTransport, TransportClosed
from forkd_agent._lazy import HandOver, answer_until_needed

# Host-only method of the VM backend (not part of the agent protocol): gives a
# child with internet access its own address on eth0 (see configure_network).
NET_CONFIGURE = "vm.net.configure"
# Host-only too, the first frame a child restored from a BRANCH reads: see
# GuestPort. Its id is a msgpack uint64 (the host's control ids).
RESET = "vm.branch.reset"
# Host-only too: park the default user's login shell (exec.prepare's work) in the
# parent before its snapshot, answered here so the parent stays in this loop.
PARK = "vm.shell.park"
EARLY = frozenset({"hello", "ping", "info", "identity.refresh", PARK, NET_CONFIGURE, RESET})
# A parked shell waits this long at most for its login scripts before a snapshot (TCG: ~0.5 s).
PARK_TIMEOUT = 60.0
_CONTROL_REQUEST = b"\x94\x00\xcf"  # [0, <uint64 id>, ...]


class _EarlyProcesses:
    """What ``exec.prepare`` needs before the full agent (its Processes) exists."""

    def __init__(self, early: _Early) -> None:
        from forkd_agent._process_table import Processes
        from forkd_agent._warm_shell import WarmShell

        self.launch = Processes.launch
        self.shell = WarmShell(self, early)


class _Early:
    """The part of the agent object the early handlers use."""

    contexts = None  # no eval kernel exists before the full agent

    def __init__(self, sandbox_id: str, warm: dict) -> None:
        self.sandbox_id = sandbox_id
        self.warm = warm
        self.processes = _EarlyProcesses(self)
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        # Entropy of the last identity refresh: numpy's global state is seeded
        # from it when the full agent starts (see _refresh_early).
        self.material: bytes | None = None

    def uptime(self) -> float:
        return time.monotonic() - self.started_monotonic


def _run_now(coro):
    """Run a handler coroutine that never waits (these never do before the
    full agent exists) without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise HandOver  # it wanted to wait: the full agent must run it


def _refresh_early(handler, early: _Early, params: dict):
    """identity.refresh with numpy's global state left for the hand-over.

    Only code forked from the agent (eval kernels, which only the full agent
    starts) inherits numpy's state, and seeding it is a sixth of the guest code
    a child runs on its way to ready. So numpy is hidden from the refresh here
    and seeded from the same entropy just before the full agent starts."""
    np = sys.modules.pop("numpy", None)
    try:
        result = _run_now(handler(early, None, params))
    finally:
        if np is not None:
            sys.modules["numpy"] = np
    if np is not None and isinstance(result, dict):
        early.material = params.get("entropy") if isinstance(params.get("entropy"), bytes) else os.urandom(64)
        result.get("random", {})["numpy"] = True  # done before anything can use it
    return result


def _park_early(handler, early: _Early, params: dict):
    """Park a shell and return once it waits for its command: sent to the parent
    before its snapshot, so that every child has a ready login shell (under TCG
    a child starting one itself spends ~0.4 s translating bash and the login
    scripts; taking the parked one ~0.07 s)."""
    result = _run_now(handler(early, None, params))
    parked = early.processes.shell.parked
    if result.get("prepared") and parked is not None:
        result["prepared"] = parked.wait_ready(PARK_TIMEOUT)
    return result


def _seed_numpy(early: _Early) -> None:
    if early.material is None or "numpy" not in sys.modules:
        return
    from forkd_agent import _identity

    state = __import__("random").getstate()
    _identity._refresh_random(early.material)  # numpy, and `random` again from the same seed
    __import__("random").setstate(state)


def early_answer(early: _Early, methods: dict):
    """What the guest answers before the full agent starts (EARLY)."""

    def answer(msg: p.Request):
        if msg.method not in EARLY:
            raise HandOver
        if msg.method == RESET:
            # Nothing to drop here: this loop keeps no state of a connection.
            return _nonce(msg.params)
        handler = methods[msg.method]
        if msg.method == "identity.refresh":
            return _refresh_early(handler, early, msg.params)
        if msg.method == PARK:
            return _park_early(handler, early, msg.params)
        return _run_now(handler(early, None, msg.params))

    return answer


class _EarlyState(ctypes.Structure):
    """``struct fk_early`` of _guest_early.c: keep in step."""

    _fields_ = [
        ("fd", ctypes.c_long),
        ("buf", ctypes.c_void_p),
        ("cap", ctypes.c_long),
        ("len", ctypes.c_long),
        ("numpy", ctypes.c_long),
        ("urandom_fd", ctypes.c_long),
        ("etc_hostname", ctypes.c_long),
        ("refreshed", ctypes.c_long),
        ("sandbox_id_len", ctypes.c_long),
        ("sandbox_id", ctypes.c_char * 256),
        ("material_len", ctypes.c_long),
        ("material", ctypes.c_ubyte * 4096),
    ]


# Next to this file in the guest (the runtime's vm/_image.py puts it there when it could compile it).
EARLY_LIBRARY = "forkd_vm_early.so"


def native_early(fd: int, early: _Early, path: str | None = None):
    """The C loop of _guest_early.c serving ``fd`` (``ping`` and the common
    ``identity.refresh``) for answer_until_needed, or None where it was not built.

    The parent is snapshotted inside it, so a child runs no Python until the
    host asks for something else. What the C side did not do is done here as
    soon as it returns, before any other Python can run: `random` seeded from
    the refresh's entropy (numpy's seeding waits for the hand-over, as in
    _refresh_early), the new sandbox id."""
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), EARLY_LIBRARY)
    if not os.path.exists(path):
        return None
    try:
        serve = ctypes.CDLL(path).fk_early_serve  # the GIL is let go while it blocks
    except (OSError, AttributeError) as exc:
        print(f"forkd_vm_guest: {EARLY_LIBRARY}: {exc}", file=sys.stderr)
        return None
    serve.restype = ctypes.c_long
    serve.argtypes = [ctypes.c_void_p]
    buf = ctypes.create_string_buffer(65536)  # a bigger frame goes on through Python's reads
    try:
        # Open from here on (the children inherit it): the C side reseeds through it.
        urandom = os.open("/dev/urandom", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        urandom = -1  # the refresh is then Python's, which reports why
    state = _EarlyState(fd=fd, buf=ctypes.addressof(buf), cap=len(buf), urandom_fd=urandom)
    sid_at = ctypes.addressof(state) + _EarlyState.sandbox_id.offset
    broken = False

    def run(pending: bytes) -> bytes | None:
        nonlocal broken
        sid = early.sandbox_id.encode()
        if broken or len(sid) > _EarlyState.sandbox_id.size:
            return None
        if len(pending) >= len(buf):
            return pending  # the rest of a big frame: Python reads it
        ctypes.memmove(buf, pending, len(pending))
        ctypes.memmove(sid_at, sid, len(sid))
        state.sandbox_id_len = len(sid)
        state.numpy = "numpy" in sys.modules
        state.etc_hostname = os.getpid() == 1 and os.access("/etc/hostname", os.W_OK)
        state.len = len(pending)
        rc = serve(ctypes.byref(state))
        if state.refreshed:
            from forkd_agent import _identity

            state.refreshed = 0
            material = bytes(state.material[: state.material_len])
            __import__("random").seed(_identity._derive(b"random", material))
            if "numpy" in sys.modules:
                early.material = material
            early.sandbox_id = ctypes.string_at(sid_at, state.sandbox_id_len).decode()
        broken = rc < 0  # the port failed: plain reads find out the rest
        return buf.raw[: state.len]

    return run


# <linux/sockios.h>, <linux/if.h>, <linux/route.h>
_SIOCGIFFLAGS, _SIOCSIFFLAGS = 0x8913, 0x8914
_SIOCSIFADDR, _SIOCSIFNETMASK, _SIOCSIFMTU, _SIOCSIFHWADDR = 0x8916, 0x891C, 0x8922, 0x8924
_SIOCADDRT, _SIOCDELRT = 0x890B, 0x890C
_IFF_UP, _ARPHRD_ETHER, _RTF_UP, _RTF_UP_GATEWAY = 0x1, 1, 0x1, 0x1 | 0x2


def _ifreq(ifname: str, data: bytes = b"") -> bytes:
    return struct.pack("16s", ifname.encode()) + data.ljust(24, b"\0")  # struct ifreq: 40 bytes


def _sockaddr_in(addr: str) -> bytes:
    return struct.pack("=H2x4s8x", socket.AF_INET, socket.inet_aton(addr))


def configure_network(params: dict) -> dict:
    """Give ``eth0`` the address, MAC, MTU and default route the host allotted
    this child, and write /etc/resolv.conf.

    Every child restores the parent's eth0 (down, the snapshot's MAC); a child
    with internet access is plugged into a bridge port that only passes frames
    from its own MAC and IPv4 address, so both must be set before the link goes
    up. Plain ioctls: the template has no ``ip`` tool, and this runs in the
    early loop (no event loop, no subprocess) right after the restore."""
    ifname = str(params.get("ifname", "eth0"))
    mac = bytes.fromhex(str(params["mac"]).replace(":", ""))
    iface = ipaddress.IPv4Interface(f"{params['ip']}/{int(params['prefixlen'])}")
    gateway = str(ipaddress.IPv4Address(params["gateway"]))
    mtu = int(params.get("mtu", 1500))
    dns = [str(ipaddress.IPv4Address(a)) for a in params.get("dns", [])]
    if len(mac) != 6:
        raise ValueError(f"bad MAC {params['mac']!r}")
    # IPv4 only (the host drops anything else from the port): no IPv6
    # link-local address, router solicitations or DAD traffic.
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, _SIOCSIFHWADDR, _ifreq(ifname, struct.pack("=H6s", _ARPHRD_ETHER, mac)))
        fcntl.ioctl(s, _SIOCSIFMTU, _ifreq(ifname, struct.pack("=i", mtu)))
        fcntl.ioctl(s, _SIOCSIFADDR, _ifreq(ifname, _sockaddr_in(str(iface.ip))))
        fcntl.ioctl(s, _SIOCSIFNETMASK, _ifreq(ifname, _sockaddr_in(str(iface.netmask))))
        flags = struct.unpack_from("=H", fcntl.ioctl(s, _SIOCGIFFLAGS, _ifreq(ifname)), 16)[0]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _ifreq(ifname, struct.pack("=H", flags | _IFF_UP)))
        # struct rtentry (x86_64, 120 bytes): default route via the gateway.
        any4 = _sockaddr_in("0.0.0.0")
        rt = struct.pack(
            "@L16s16s16sHhLPhPLLH6x", 0, any4, _sockaddr_in(gateway), any4, _RTF_UP_GATEWAY,
            0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        # A child of a BRANCH of a sandbox with internet access has its
        # source's default route already.
        old = struct.pack("@L16s16s16sHhLPhPLLH6x", 0, any4, any4, any4, _RTF_UP, 0, 0, 0, 0, 0, 0, 0, 0)
        try:
            fcntl.ioctl(s, _SIOCDELRT, old)
        except OSError:
            pass
        fcntl.ioctl(s, _SIOCADDRT, rt)
    # Replaced, not rewritten in place: the template's file may be a symlink.
    tmp = "/etc/.resolv.conf.forkd"
    with open(tmp, "w") as f:
        f.write("".join(f"nameserver {a}\n" for a in dns))
    os.replace(tmp, "/etc/resolv.conf")
    return {"ifname": ifname, "ip": str(iface), "gateway": gateway, "dns": dns}


async def _net_configure(agent, conn, params: dict) -> dict:
    try:
        return configure_network(params)
    except (KeyError, ValueError, TypeError) as exc:
        raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, f"{NET_CONFIGURE}: {exc!r}") from None
    except Exception as exc:
        # Never let it escape: the early loop runs in PID 1.
        raise p.RpcError(p.ErrorCode.SANDBOX, f"{NET_CONFIGURE}: {exc}") from None


def _nonce(params: dict) -> bytes:
    nonce = params.get("nonce")
    if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
        raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, f"{RESET}: nonce must be 8 to 64 bytes")
    return nonce


class GuestPort:
    """The agent's virtio-serial port, framed, serving one agent connection at
    a time (``serve``).

    A VM restored from a BRANCH resumes inside its source's connection: the
    agent's Connection holds the source's requests and streams, and the host
    end is a new connection that knows none of them. So the host's first frame
    to such a child is ``vm.branch.reset {nonce}``: the session that reads it
    answers with the nonce (the host skips everything before that answer, see
    the runtime's ``vm/_channel.py``), then ends as if the host had hung up
    (handlers cancelled, ``drop_connection`` hooks run; processes keep running),
    and the frames after it go to a new connection. The reset arrives whole:
    the snapshot was only taken once every byte the host had sent was in the
    guest. What this side still sends of the old connection (the tail of a
    frame, its last frames) goes out before the answer, and the host skips it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rtransport, initial=b""
    ) -> None:
        self._writer = writer
        self._rtransport = rtransport
        # The framing of one byte stream, whichever agent connection it serves now.
        self._stream = StreamTransport(reader, writer, p.MAX_FRAME_SIZE, initial)
        self.reset = False

    @classmethod
    async def open(cls, fd: int, initial: bytes = b"") -> GuestPort:
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)
        rfile = os.fdopen(fd, "rb", buffering=0)
        wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
        reader = asyncio.StreamReader(limit=StreamTransport.READ_SIZE)
        rtransport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
        wtransport, wproto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
        writer = asyncio.StreamWriter(wtransport, wproto, reader, loop)
        return cls(reader, writer, rtransport, initial)

    async def serve(self, agent, name: str) -> None:
        """Until the host hangs up: a connection per session, a new one after each reset."""
        try:
            while True:
                self.reset = False
                conn = agent.attach(_Session(self), name=name)
                await conn.wait_closed()
                if not self.reset:
                    return
        finally:
            self._writer.close()
            self._rtransport.close()

    async def next_frame(self) -> bytes:
        return await self._stream.recv()

    async def send(self, body: bytes) -> None:
        await self._stream.send(body)


class _Session:
    """One agent connection's transport over the GuestPort."""

    def __init__(self, port: GuestPort) -> None:
        self._port = port
        self._ended = False

    async def recv(self) -> bytes:
        if self._ended:
            raise TransportClosed()
        body = await self._port.next_frame()
        if body[:3] == _CONTROL_REQUEST:
            try:
                msg = p.decode(body)
            except p.ProtocolError:
                return body
            if type(msg) is p.Request and msg.method == RESET:
                try:
                    reply = p.Response(msg.id, None, _nonce(msg.params))
                except p.RpcError as exc:
                    await self._port.send(p.encode(p.Response(msg.id, exc, None)))
                    return await self.recv()
                # Written before anything of the next connection, and this
                # session sends nothing more.
                self._ended = True
                self._port.reset = True
                await self._port.send(p.encode(reply))
                raise TransportClosed("the host started a new connection")
        return body

    async def send(self, body: bytes) -> None:
        if self._ended:
            raise TransportClosed()
        await self._port.send(body)

    async def close(self) -> None:
        self._ended = True


async def serve_full(fd: int, port: str, initial: bytes, early: _Early) -> None:
    from forkd_agent._server import Agent

    _seed_numpy(early)
    agent = Agent(sandbox_id=early.sandbox_id, warm=early.warm)
    agent.started_at, agent.started_monotonic = early.started_at, early.started_monotonic
    agent.processes.shell.inherit(early.processes.shell)
    await agent.start()
    name = f"device:{port}"
    await (await GuestPort.open(fd, initial)).serve(agent, name)
    # Later host connections: the port reopened after each hang-up.
    while not agent.stopping.is_set():
        await asyncio.sleep(0.05)
        try:
            fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        await (await GuestPort.open(fd)).serve(agent, name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="forkd_vm_guest")
    ap.add_argument("--port", required=True, help="the agent's virtio-serial port")
    ap.add_argument("--warmup-file", default="")
    ap.add_argument("--sandbox-id", default="forkd-parent")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="forkd-agent %(levelname)s %(message)s")

    from forkd_agent.__main__ import warm_up
    from forkd_agent._features import load_features
    from forkd_agent._methods import METHODS

    code = ""
    if args.warmup_file:
        with open(args.warmup_file) as f:
            code = f.read()
    load_features()
    # Registered in the agent's table too, so it also works after the hand-over.
    METHODS.setdefault(NET_CONFIGURE, _net_configure)
    METHODS.setdefault(PARK, METHODS["exec.prepare"])  # the same work, answered in the early loop
    early = _Early(args.sandbox_id, warm_up(code))
    while True:
        try:
            fd = os.open(args.port, os.O_RDWR | os.O_CLOEXEC)
            break
        except OSError as exc:
            print(f"forkd_vm_guest: cannot open {args.port}: {exc}", file=sys.stderr)
            time.sleep(0.1)
    answer = early_answer(early, METHODS)
    initial = answer_until_needed(fd, answer, wait_on_eof=True, native=native_early(fd, early))
    asyncio.run(serve_full(fd, args.port, initial, early))


if __name__ == "__main__":
    main()
