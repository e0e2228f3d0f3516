"""The zygote: a warmed agent that forks whole sandboxes on request.

It runs inside a template's root filesystem (set up by the runtime's launcher:
its own mount namespace, the template bind-mounted with ownership shifted to
the sandbox uid range). It never runs an event loop, so a fork is a plain
fork: the child starts its own loop from scratch.

Per child, the zygote does the little that needs host privilege — create the
child's layer directories, ``clone()`` straight into new user, mount, pid, uts,
ipc and network namespaces (the child is PID 1 at once: one fork, not two),
write its uid/gid maps — and the child does the rest in parallel on another
core: overlay root, /proc, a minimal /dev, pivot_root, hostname, loopback,
no-new-privileges, seccomp, identity, then it serves the agent protocol on its
end of a socketpair whose other end goes back to the runtime.

Control protocol: forkd.protocol frames over a SOCK_SEQPACKET socket, one frame
per packet. A ``fork`` reports each ``chunk`` of children as a ``forked``
notification as soon as it is forked, their channel fds attached (SCM_RIGHTS),
then answers.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import random
import signal
import socket
import sys
import time

from forkd import protocol as p

from . import _linux as L
from ._branch import LAYER_FD, STATE_FD
from ._lazy import answer_until_needed, core_answer
from ._native import MAX_ID, NativeForker
from ._native import Child as NativeChild
from ._native import load as load_native
from ._server import Agent, serve_fd

log = logging.getLogger("forkd.zygote")

# The zygote is root of a user namespace already mapped to the sandbox uid
# range; children get the rest fresh. The network namespace usually comes from
# the pool below instead of CLONE_NEWNET (creating one costs milliseconds).
NS_FLAGS = L.CLONE_NEWNS | L.CLONE_NEWPID | L.CLONE_NEWUTS | L.CLONE_NEWIPC
# Each child mounts its own tmpfs here (in its private mount namespace) for its
# writable layer: a per-sandbox disk quota, charged to its memory cgroup, gone
# with the sandbox. The zygote's own view of this directory is the host's.
LAYER_DIR = "/tmp/.forkd/layer"  # prepared by the launcher
# Frozen layers captured from live sandboxes (BRANCH): the runtime writes them in
# the zygote's run directory; a branch's children stack them over the template.
SEEDS_DIR = "/opt/forkd/run/seeds"
DEFAULT_DISK_MB = 1024
LOWER_DIR = "/opt/forkd/lower"  # the template again, as the overlay's lower layer
LIB_DIR = "/opt/forkd/lib"  # forkd's own code, read-only
CHILD_DEV = "/tmp/.forkd/dev"  # prepared by the launcher
MAX_PACKET = 1 << 20
NETNS_POOL = 128
DEFAULT_CHUNK = 16  # children per ``forked`` notification
# Top up the pool only after this long without a request: a burst of fork
# requests must not pay for namespaces made between its chunks.
IDLE_BEFORE_REFILL_S = 0.05
TIMING = {"dirs": 0.0, "clone": 0.0}


class NetnsPool:
    """Network namespaces made ahead of time, with loopback up.

    Made while the zygote is idle, so a burst of forks does not pay for them.
    Each is owned by the zygote's user namespace, so a child's root can use it
    as its own. Taken ones are never reused: a child's namespace dies with it."""

    def __init__(self, target: int) -> None:
        self.target = target
        # A home of our own: setns() back to the host's namespace would need
        # privilege over it, which the zygote (root of its own userns) lacks.
        L.unshare(L.CLONE_NEWNET)
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.ready: list[int] = []

    def fill_one(self) -> bool:
        if len(self.ready) >= self.target:
            return False
        L.unshare(L.CLONE_NEWNET)
        try:
            L.set_loopback_up()
            self.ready.append(os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        finally:
            L.setns(self.home, L.CLONE_NEWNET)
        return True

    def take(self) -> int | None:
        return self.ready.pop() if self.ready else None


class Zygote:
    def __init__(
        self, control: socket.socket, warm: dict, seccomp: bytes | None, netns_pool: int = NETNS_POOL
    ) -> None:
        self.control = control
        self.warm = warm
        self.plan = ChildPlan(seccomp)
        self.netns = NetnsPool(netns_pool)
        self.native: NativeForker | None = None
        try:
            lib = load_native()
            if lib is not None:
                self.native = NativeForker(lib, self.plan, NS_FLAGS, self.netns.home, LAYER_FD, STATE_FD)
        except (OSError, ValueError) as exc:  # a broken build: Python still forks
            log.warning("native fork path unavailable: %s", exc)
        # Children point their stdout/stderr at our fd 0 once they are set up.
        null = os.open("/dev/null", os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)

    def serve(self) -> None:
        import select

        prime()
        # Objects alive now are shared with every child; keep the collector from
        # touching (and so copying) their pages.
        gc.collect()
        gc.freeze()
        # Every mapped anonymous page costs page-table copying in each fork:
        # hand free heap back to the kernel first.
        L.libc.malloc_trim(0)
        if self.native is not None:  # the Python path writes too much between forks for this to pay
            L.collapse_anonymous_memory()
        # Children are reaped by the kernel: their status matters to nobody (the
        # runtime watches each child's channel), and zombies must not pile up.
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        while True:
            # Idle: top up the network namespace pool, one at a time so a request
            # arriving meanwhile waits at most one creation.
            while not select.select([self.control], [], [], IDLE_BEFORE_REFILL_S)[0]:
                if not self.netns.fill_one():
                    select.select([self.control], [], [])
            try:
                packet = self.control.recv(MAX_PACKET)
            except InterruptedError:
                continue
            if not packet:
                return  # the runtime went away: so do we
            try:
                msg = p.decode(packet)
            except p.ProtocolError as exc:
                log.warning("bad control frame: %s", exc.message)
                continue
            if not isinstance(msg, p.Request):
                continue
            fds: list[int] = []
            try:
                result, fds = self.dispatch(msg.method, msg.params)
                reply = p.Response(msg.id, None, result)
            except p.RpcError as exc:
                reply = p.Response(msg.id, exc, None)
            except Exception as exc:
                log.exception("zygote request %s failed", msg.method)
                reply = p.Response(
                    msg.id, p.RpcError(p.ErrorCode.SANDBOX, f"{type(exc).__name__}: {exc}"), None
                )
            try:
                socket.send_fds(self.control, [p.encode(reply)], fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def dispatch(self, method: str, params: dict) -> tuple[dict, list[int]]:
        if method == "ping":
            return {
                "pid": os.getpid(),
                "warm": self.warm,
                "native": self.native is not None,
                "netns_ready": len(self.netns.ready),
                "netns_target": self.netns.target,
            }, []
        if method == "fork":
            specs = params.get("children") or []
            chunk = params.get("chunk", DEFAULT_CHUNK)
            if not isinstance(chunk, int) or chunk <= 0:
                raise p.RpcError(p.ErrorCode.INVALID_ARGUMENT, f"zygote: bad chunk {chunk!r}")
            if self.native is not None:
                self.fork_native(specs, chunk)
                return {"children": [], "errors": []}, []
            # Chunk by chunk, each reported at once: the runtime admits one chunk's
            # children while this forks the next, and this never waits for it.
            for i in range(0, len(specs), chunk):
                result, fds = self.fork_children(specs[i : i + chunk])
                self.report(result, fds)
            return {"children": [], "errors": []}, []
        raise p.RpcError(p.ErrorCode.UNKNOWN_METHOD, f"zygote: unknown method {method!r}")

    def report(self, result: dict, fds: list[int]) -> None:
        """A ``forked`` notification: these children exist, their channels attached."""
        try:
            socket.send_fds(self.control, [p.encode(p.Notification("forked", result))], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def fork_children(self, specs: list) -> tuple[dict, list[int]]:
        done, errors, fds = [], [], []
        for spec in specs:
            try:
                pid, fd = self.fork_one(spec)
            except Exception as exc:  # one child's failure must not lose the others
                errors.append({"id": str(spec.get("id")), "error": f"{type(exc).__name__}: {exc}"})
                continue
            done.append({"id": spec["id"], "pid": pid})
            fds.append(fd)
        return self.fork_result(done, errors), fds

    def fork_native(self, specs: list, chunk: int) -> None:
        """The whole request in one call into ``_forkcore.c``, which also reports
        each chunk: all the Python work (and so every write to the zygote's heap,
        each a copied page or a split 2 MiB page while children share it) happens
        once per request, before the first fork."""
        errors: list[dict] = []
        valid: list[dict] = []
        kids = (NativeChild * len(specs))()
        for spec in specs:
            try:
                self.native_child(spec, kids[len(valid)])
            except Exception as exc:
                kids[len(valid)] = NativeChild()  # nothing of it may reach the next child
                errors.append({"id": str(spec.get("id")), "error": f"{type(exc).__name__}: {exc}"})
                continue
            valid.append(spec)
        if errors:
            self.report(self.fork_result([], errors), [])
        index = self.native.fork(kids, len(valid), chunk, self.control.fileno()) if valid else 0
        if index > 0:  # a child, set up and handed over: never returns
            _native_child_main(valid[index - 1], self, self.native.pending())
        if index < 0:
            log.warning("cannot report forked children: %s", os.strerror(-index))

    def fork_result(self, done: list[dict], errors: list[dict]) -> dict:
        timing = {k: round(v * 1000, 3) for k, v in TIMING.items()}
        for k in TIMING:
            TIMING[k] = 0.0
        return {"children": done, "errors": errors, "timing_ms": timing, "netns_ready": len(self.netns.ready)}

    def native_child(self, spec: dict, kid: NativeChild) -> None:
        """Fill ``kid`` from ``spec`` (checked as ``fork_one`` checks it)."""
        cid = check_child_id(spec["id"])
        if len(cid) > MAX_ID:
            raise ValueError(f"child id longer than {MAX_ID} characters")
        hostname = (spec.get("hostname") or cid[:63]).encode()
        kid.id = cid.encode()
        kid.hostname = hostname
        kid.hostname_len = len(hostname)
        kid.tmpfs_opts = self.plan.tmpfs_options(spec.get("disk_mb") or DEFAULT_DISK_MB)
        seeds = spec.get("seeds")
        kid.overlay_opts = (self.plan.overlay(tuple(seeds)) if seeds else self.plan.plain_overlay)[4]
        state = spec.get("state")
        if state:
            self.plan.check_seed(state)
            kid.state_path = f"{SEEDS_DIR}/{state}".encode()
        resolv = spec.get("resolv_conf")
        if resolv:
            kid.resolv = resolv
            kid.resolv_len = len(resolv)
        netns = self.netns.take()
        kid.netns = -1 if netns is None else netns

    def fork_one(self, spec: dict) -> tuple[int, int]:
        check_child_id(spec["id"])
        t0 = time.perf_counter()
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        t1 = time.perf_counter()
        flags = NS_FLAGS
        netns = self.netns.take()
        if netns is None:
            flags |= L.CLONE_NEWNET
        else:
            L.setns(netns, L.CLONE_NEWNET)  # the child inherits whatever we are in
        try:
            # Single-threaded, no locks held: the children can skip Python's
            # post-fork hooks (they reseed PRNGs when the full agent starts).
            pid = L.clone(flags, python_hooks=False)
            if pid == 0:  # the child: never returns
                parent_end.close()
                _child_main(child_end, spec, self, netns is None)
        finally:
            if netns is not None:
                L.setns(self.netns.home, L.CLONE_NEWNET)
                os.close(netns)
        child_end.close()
        TIMING["dirs"] += t1 - t0
        TIMING["clone"] += time.perf_counter() - t1
        return pid, parent_end.detach()


def check_child_id(cid: object) -> str:
    if not isinstance(cid, str) or not cid or "/" in cid or cid.startswith("."):
        raise ValueError(f"bad child id {cid!r}")
    return cid


class ChildPlan:
    """Every argument a child's setup passes to the kernel, built once in the zygote.

    Each object a child creates, or touches for the first time, costs it a
    copied page (Python writes reference counts everywhere); children that sit
    in a pool should own as few pages as possible. So the child only walks this
    plan: no strings to format, no ctypes objects to make.
    """

    def __init__(self, seccomp: bytes | None) -> None:
        c = ctypes.c_ulong
        layer = LAYER_DIR
        root = f"{layer}/merged"
        self.private = (None, b"/", None, c(L.MS_REC | L.MS_PRIVATE), None)
        self.layer = layer.encode()
        self.layer_flags = c(L.MS_NOSUID | L.MS_NODEV)
        self.subdirs = tuple(f"{layer}/{d}" for d in ("upper", "work", "merged"))
        self.root = root
        self._overlay_root = root.encode()
        self._overlays: dict[tuple, tuple] = {}
        self.plain_overlay = self.overlay(())
        self.mounts = (
            (b"proc", f"{root}/proc".encode(), b"proc", c(L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC), None),
            # /dev: the launcher's read-only skeleton, plus a private devpts and shm.
            (CHILD_DEV.encode(), f"{root}/dev".encode(), None, c(L.MS_BIND | L.MS_REC), None),
            (
                b"devpts",
                f"{root}/dev/pts".encode(),
                b"devpts",
                c(L.MS_NOSUID | L.MS_NOEXEC),
                b"newinstance,ptmxmode=0666,mode=620",
            ),
            (b"tmpfs", f"{root}/dev/shm".encode(), b"tmpfs", c(L.MS_NOSUID | L.MS_NODEV), b"mode=1777"),
            # forkd's own code (read-only in the zygote already, and locked so here).
            (LIB_DIR.encode(), f"{root}{LIB_DIR}".encode(), None, c(L.MS_BIND | L.MS_REC), None),
        )
        self.dot = b"."
        self.detach = ctypes.c_int(L.MNT_DETACH)
        self.seccomp = L.SeccompProgram(seccomp) if seccomp else None
        self._tmpfs: dict[int, bytes] = {}

    def overlay(self, seeds: tuple = ()) -> tuple:
        """mount(2) arguments of the root overlay: the child's layer over the
        seeds it inherits (newest first), over the template."""
        args = self._overlays.get(seeds)
        if args is None:
            for seed in seeds:
                self.check_seed(seed)
            lower = ":".join([*(f"{SEEDS_DIR}/{s}" for s in seeds), LOWER_DIR])
            layer = LAYER_DIR
            opts = f"lowerdir={lower},upperdir={layer}/upper,workdir={layer}/work,userxattr"
            args = (b"overlay", self._overlay_root, b"overlay", ctypes.c_ulong(0), opts.encode())
            self._overlays[seeds] = args
        return args

    @staticmethod
    def check_seed(seed: object) -> None:
        if not isinstance(seed, str) or not seed or seed.startswith(".") or any(c in seed for c in "/,:"):
            raise ValueError(f"bad seed layer name {seed!r}")

    def tmpfs_options(self, disk_mb: int) -> bytes:
        opts = self._tmpfs.get(disk_mb)
        if opts is None:
            opts = self._tmpfs[disk_mb] = f"size={disk_mb}m,mode=0755".encode()
        return opts


def _child_main(channel: socket.socket, spec: dict, zygote: Zygote, fresh_netns: bool) -> None:
    code = 0
    try:
        # Drop everything inherited but the channel, before anything can fail.
        fd = channel.fileno()
        if fd != 3:
            os.dup2(fd, 3)
            channel.close()
        os.closerange(4, 1 << 16)
        _setup_sandbox(spec, zygote.plan, fresh_netns)
        _serve(spec, zygote.warm)
    except BaseException as exc:
        code = 71
        try:
            print(
                f"forkd child {spec.get('id')}: setup failed: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )
        except Exception:
            pass
    os._exit(code)


def _native_child_main(spec: dict, zygote: Zygote, pending: bytes) -> None:
    """A child the native path set up, with the bytes its ping loop left."""
    code = 0
    try:
        _serve(spec, zygote.warm, pending)
    except BaseException:
        code = 71  # stderr is /dev/null by now: the runtime sees the channel close
    os._exit(code)


def _setup_sandbox(spec: dict, plan: ChildPlan, fresh_netns: bool) -> None:
    mount = L.libc.mount
    if mount(*plan.private):
        raise L.last_error("make / private")
    disk_mb = spec.get("disk_mb") or DEFAULT_DISK_MB
    if mount(b"tmpfs", plan.layer, b"tmpfs", plan.layer_flags, plan.tmpfs_options(disk_mb)):
        raise L.last_error("mount the writable layer")
    # Held open for the runtime: /proc/<pid>/fd/4 is this layer, whatever mounts hide it.
    fd = os.open(LAYER_DIR, os.O_PATH | os.O_DIRECTORY)
    if fd != LAYER_FD:
        os.dup2(fd, LAYER_FD)
        os.close(fd)
    for d in plan.subdirs:
        os.mkdir(d, 0o755)
    seeds = spec.get("seeds")
    if mount(*(plan.overlay(tuple(seeds)) if seeds else plan.plain_overlay)):
        raise L.last_error("mount the root overlay")
    state = spec.get("state")
    if state:  # reachable only from here: the sealed root hides SEEDS_DIR
        plan.check_seed(state)
        fd = os.open(f"{SEEDS_DIR}/{state}", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        if fd != STATE_FD:
            os.dup2(fd, STATE_FD)
            os.close(fd)
    for args in plan.mounts:
        if mount(*args):
            raise L.last_error(f"mount {args[1]!r}")
    os.chdir(plan.root)
    # Stack the new root over the old one and detach the old: no path leads back.
    if L.libc.syscall(L.SYS_pivot_root, plan.dot, plan.dot) or L.libc.umount2(plan.dot, plan.detach):
        raise L.last_error("pivot_root")
    os.chdir("/")
    socket.sethostname(spec.get("hostname") or spec["id"][:63])
    if fresh_netns:  # pooled namespaces come with loopback up
        L.set_loopback_up()
    resolv = spec.get("resolv_conf")
    if resolv:  # internet access: the host's upstream resolvers
        fd = os.open("/etc/resolv.conf", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, resolv)
        os.close(fd)
    # The agent's stdout/stderr pointed at the zygote's log (a host file): a
    # sandbox must not reach it through /proc/1/fd. fd 0 is /dev/null (the zygote's).
    os.dup2(0, 1)
    os.dup2(0, 2)
    L.set_no_new_privs()
    if plan.seccomp is not None:
        plan.seccomp.install()


def _serve(spec: dict, warm: dict, initial: bytes = b"") -> None:
    sandbox_id = spec.get("sandbox_id") or spec["id"]
    pending = answer_until_needed(3, core_answer(sandbox_id), initial=initial)
    if pending is None:
        return
    # Only now can user code run: diverge from the parent's PRNG state (a fork
    # clones it). Doing it earlier would copy ~1 MiB of pages in every child
    # that is never used.
    entropy = spec.get("entropy") or os.urandom(32)
    random.seed(entropy)
    if "numpy" in sys.modules:
        try:
            sys.modules["numpy"].random.seed(int.from_bytes(entropy[:4], "little"))
        except Exception:
            pass
    run_agent(sandbox_id, warm, pending)


def run_agent(sandbox_id: str, warm: dict, pending: bytes = b"", fd: int = 3) -> None:
    os.environ["HOSTNAME"] = socket.gethostname()

    async def main() -> None:
        agent = Agent(sandbox_id=sandbox_id, warm=warm)
        await agent.start()
        await serve_fd(agent, fd, initial=pending)
        await agent.close()

    asyncio.run(main())


def prime(rounds: int = 5) -> None:
    """Run the agent's start-up, a few requests and shutdown here, before any fork.

    Python 3.11 specialises bytecode in place the first times a function runs;
    if that happened in every child it would copy the pages of every code object
    it touches. Done once in the zygote, children inherit settled code."""
    import threading

    from forkd._connection import Connection
    from forkd._transports import StreamTransport

    for _ in range(rounds):
        ours, theirs = socket.socketpair()
        fd = theirs.detach()

        # run_agent blocks in its own loop; drive it from a client loop in a
        # thread that exists only during priming (no threads survive to a fork).
        def client(ours: socket.socket = ours) -> None:
            import asyncio

            async def go() -> None:
                ours.setblocking(False)
                conn = Connection(await StreamTransport.from_socket(ours)).start()
                await conn.request("hello", {"version": p.PROTOCOL_VERSION})
                for _ in range(3):
                    await conn.request("ping")
                    await conn.request("info")
                # A command and a code cell: their first run in a process pays for
                # one-time set-up (NSS for user lookups, lazily imported modules,
                # code paths) that children should inherit done.
                out = conn.open_inbound()
                await conn.request("exec.start", {"cmd": "true", "stream": out.id})
                async for _ in out:
                    pass
                out = conn.open_inbound()
                await conn.request("code.run", {"code": "1", "stream": out.id})
                async for _ in out:
                    pass
                await conn.close()

            asyncio.run(go())

        t = threading.Thread(target=client)
        t.start()
        run_agent("prime", {}, b"", fd)
        t.join()


def run(control_fd: int, warm: dict, seccomp_path: str = "") -> None:
    seccomp = None
    if seccomp_path:
        with open(seccomp_path, "rb") as f:
            seccomp = f.read()
    control = socket.socket(fileno=control_fd)
    started = time.time()
    warm = {**warm, "zygote_started_at": started}
    Zygote(control, warm, seccomp).serve()
