"""Start a template's zygote: ``python -m forkd_runtime._zygote_launch --rootfs ... -- <agent args>``.

Runs as host root in a process of its own (the runtime may have threads, so
this cannot be a preexec_fn). It builds the zygote's world and then execs the
template's own python3 as the zygote:

    /                  the template root, read-only, ownership shifted by an
                       idmapped mount so that host root's files appear owned by
                       the sandbox range (uid_base..uid_base+65535)
    /opt/forkd/lower   the same again: the children's overlay lower layer (an
                       overlay cannot use the namespace's root mount as a layer)
    /opt/forkd/run     the host's run directory: per-child layers, read-write
    /opt/forkd/lib     forkd's own code (a private copy), read-only
    /proc, /dev        the host's
    /tmp               a writable tmpfs for the zygote's warm-up
    /tmp/.forkd/dev    the minimal /dev children bind (read-only, built once)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from forkd_agent import _linux as L


def make_userns_fd(uid_base: int) -> int:
    """An fd for a user namespace that maps 0..65535 to the sandbox range (for idmapped mounts)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            L.unshare(L.CLONE_NEWUSER)
            os.write(w, b"1")
            signal.pause()
        finally:
            os._exit(0)
    os.close(w)
    try:
        if os.read(r, 1) != b"1":
            raise RuntimeError("userns helper failed")
        id_map = f"0 {uid_base} 65536\n"
        L.write_id_maps(pid, id_map, id_map)
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rootfs", required=True)
    ap.add_argument("--stage", required=True, help="empty host directory to build the new root on")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--lib-dir", required=True)
    ap.add_argument("--uid-base", type=int, required=True)
    ap.add_argument("agent_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    agent_args = args.agent_args[1:] if args.agent_args[:1] == ["--"] else args.agent_args

    t0 = time.perf_counter()
    userns = make_userns_fd(args.uid_base)
    L.unshare(L.CLONE_NEWNS)
    L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
    stage = args.stage
    L.idmapped_bind(args.rootfs, stage, userns, readonly=True)
    L.idmapped_bind(args.rootfs, f"{stage}/opt/forkd/lower", userns, readonly=True)
    os.close(userns)
    L.mount(args.run_dir, f"{stage}/opt/forkd/run", None, L.MS_BIND)
    L.mount(args.lib_dir, f"{stage}/opt/forkd/lib", None, L.MS_BIND)
    L.mount(
        None,
        f"{stage}/opt/forkd/lib",
        None,
        L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV,
    )
    L.mount("proc", f"{stage}/proc", "proc", L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC)
    L.mount("/dev", f"{stage}/dev", None, L.MS_BIND | L.MS_REC)
    # A writable /tmp for the zygote (warm-ups write caches: matplotlib's, say),
    # holding the children's read-only /dev skeleton as a mount of its own.
    L.mount("tmpfs", f"{stage}/tmp", "tmpfs", L.MS_NOSUID | L.MS_NODEV, "mode=1777,size=256m")
    os.mkdir(f"{stage}/tmp/.forkd", 0o755)
    prepare_child_dev(f"{stage}/tmp/.forkd")
    os.chdir(stage)
    L.pivot_root(".", ".")
    L.umount2(".", L.MNT_DETACH)
    os.chdir("/")
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": "/opt/forkd/lib",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        # The template's root is read-only: matplotlib keeps its config and font cache here.
        "MPLCONFIGDIR": "/tmp/forkd-mpl",
        "FORKD_LAUNCH_MS": f"{(time.perf_counter() - t0) * 1000:.1f}",
    }
    enter_userns_and_exec(args.uid_base, ["python3", "-m", "forkd_agent", *agent_args], env)


ZYGOTE_NICE = 10
CHILD_DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


def prepare_child_dev(where: str) -> None:
    """Build, once, the minimal /dev every child binds as its own (read-only):
    the device nodes, mount points for its private devpts and shm, and the
    usual symlinks. Children then spend one bind instead of dozens of calls."""
    L.mount("tmpfs", where, "tmpfs", L.MS_NOSUID | L.MS_NOEXEC, "mode=0755,size=64k")
    dev = f"{where}/dev"
    os.mkdir(dev, 0o755)
    for name in CHILD_DEV_NODES:
        os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        L.mount(f"/dev/{name}", f"{dev}/{name}", None, L.MS_BIND)
    os.mkdir(f"{dev}/pts", 0o755)
    os.mkdir(f"{dev}/shm", 0o1777)
    # Where each child mounts its own writable layer (a tmpfs, in its own mount
    # namespace): outside /opt/forkd/run, which holds the layers branches stack on.
    os.mkdir(f"{where}/layer", 0o755)
    os.symlink("pts/ptmx", f"{dev}/ptmx")
    os.symlink("/proc/self/fd", f"{dev}/fd")
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", f"{dev}/{name}")
    # Shared by every child, so it must never be writable by one: read-only, and
    # since children get it through a less privileged namespace, locked that way.
    L.mount(None, where, None, L.MS_REMOUNT | L.MS_RDONLY | L.MS_NOSUID | L.MS_NOEXEC)


def enter_userns_and_exec(uid_base: int, argv: list[str], env: dict) -> None:
    """Run the zygote as root of a user namespace mapped to the sandbox range.

    Its children then need no id maps of their own (no per-child map writes, no
    handshake): they are forked already unprivileged on the host. A process
    cannot map a whole range for itself, so a forked helper enters the namespace
    and this process, still host root, writes its maps; then the helper execs
    the zygote and this process waits for it (and dies with it)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            launcher = os.getppid()
            L.unshare(L.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            if os.read(go_r, 1) != b"1":
                os._exit(70)
            os.setresgid(0, 0, 0)
            os.setgroups([])
            os.setresuid(0, 0, 0)
            # Forking and warming children is background work: it must never slow
            # down sandboxes serving requests. A child gets normal priority when the
            # runtime hands it out (Backend.activate).
            os.nice(ZYGOTE_NICE)
            # After the credential change, which clears it: die with the launcher.
            L.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != launcher:  # it died before the line above
                os._exit(72)
            sys.stdout.flush()
            os.execve("/usr/bin/python3", argv, env)
        finally:
            os._exit(71)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) != b"1":
        sys.exit("zygote helper failed to enter its user namespace")
    id_map = f"0 {uid_base} 65536\n"
    L.write_id_maps(pid, id_map, id_map)
    os.write(go_w, b"1")
    # Hold no fds the runtime watches: the zygote alone owns the control socket.
    os.closerange(3, 1 << 16)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
