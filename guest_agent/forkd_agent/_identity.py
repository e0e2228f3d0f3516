"""``identity.refresh``: make a freshly forked sandbox stop being a copy of its parent.

Every child restored from one snapshot starts with the parent's wall clock (stale:
the snapshot may be hours old), the parent's kernel CRNG state (so its children
would draw the same "random" bytes), the agent's Python ``random`` state, the
parent's hostname and its sandbox id. The host calls this method right after the
fork with fresh values; each step reports what it did instead of failing the
whole call, because a child that cannot set its clock (no CAP_SYS_TIME) is still
worth running, and the host wants to know.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import math
import os
import platform
import random
import socket
import struct
import sys
import time
from typing import Any

from forkd.protocol import ErrorCode, RpcError

from . import _params
from ._methods import method

__all__ = ["RNDADDENTROPY", "RNDRESEEDCRNG", "refresh"]

MIN_ENTROPY = 32
MAX_ENTROPY = 4096
HOSTNAME_MAX = 64  # HOST_NAME_MAX on Linux
SANDBOX_ID_MAX = 256
DEFAULT_CLOCK_TOLERANCE = 0.05


def _ioc_layout() -> tuple[int, int, int]:
    """(size bits, _IOC_NONE, _IOC_WRITE) of <asm/ioctl.h> for this machine.

    Most architectures use the generic layout; alpha, mips, powerpc and sparc
    keep 13 size bits and a 3-bit direction field with other values.
    """
    machine = platform.machine().lower()
    if machine.startswith(("alpha", "mips", "ppc", "powerpc", "sparc")):
        return 13, 1, 4
    return 14, 0, 1


_SIZE_BITS, _IOC_NONE, _IOC_WRITE = _ioc_layout()


def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    # _IOC(dir, type, nr, size): nr in bits 0-7, type 8-15, size from bit 16, dir above it.
    return (direction << (16 + _SIZE_BITS)) | (size << 16) | (ord(kind) << 8) | nr


# <linux/random.h>: RNDADDENTROPY = _IOW('R', 0x03, int[2]); RNDRESEEDCRNG = _IO('R', 0x07).
# On x86/arm these are 0x40085203 and 0x5207.
RNDADDENTROPY = _ioc(_IOC_WRITE, "R", 0x03, struct.calcsize("ii"))
RNDRESEEDCRNG = _ioc(_IOC_NONE, "R", 0x07, 0)

_RNG_DEVICES = ("/dev/urandom", "/dev/random")


def _os_error(exc: OSError, hint: str = "") -> str:
    name = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__
    text = f"{name}: {exc.strerror or exc}"
    return f"{text} ({hint})" if hint and exc.errno == errno.EPERM else text


def _derive(label: bytes, material: bytes) -> bytes:
    # One independent seed per consumer, so the agent's `random`, numpy and the
    # eval kernels never share a state even though one entropy blob feeds them all.
    return hashlib.sha512(b"forkd.identity." + label + b"\0" + material).digest()


# -- steps ------------------------------------------------------------------


def _refresh_clock(host_time: float | None, tolerance: float) -> dict:
    if host_time is None:
        return {"ok": True, "action": "skipped"}
    skew = host_time - time.time()
    if abs(skew) <= tolerance:
        return {"ok": True, "action": "in_sync", "skew_s": skew}
    try:
        time.clock_settime(time.CLOCK_REALTIME, host_time)
    except OSError as exc:
        return {
            "ok": False,
            "action": "failed",
            "skew_s": skew,
            "error": _os_error(exc, "setting the clock needs CAP_SYS_TIME"),
        }
    return {"ok": True, "action": "set", "skew_s": skew}


def _refresh_kernel_rng(entropy: bytes | None) -> dict:
    if entropy is None:
        return {"ok": True, "action": "skipped"}
    fd, last_error = -1, None
    # Read-write so the fallback below can mix bytes in; the ioctls need neither mode.
    for path, mode in [(d, m) for d in _RNG_DEVICES for m in (os.O_RDWR, os.O_RDONLY)]:
        try:
            fd = os.open(path, mode | os.O_CLOEXEC)
            break
        except OSError as exc:
            last_error = f"{path}: {_os_error(exc)}"
    if fd < 0:
        return {"ok": False, "action": "failed", "error": last_error, "mixed": False}
    try:
        # struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        # The kernel reads buf_size bytes; a count of 8 bits per byte credits it
        # all, which is what lets RNDRESEEDCRNG then produce a fresh CRNG key.
        info = bytearray(struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy)
        try:
            # A mutable buffer is passed straight through (an immutable one is
            # copied into a 1024-byte scratch buffer, too small for big blobs).
            fcntl.ioctl(fd, RNDADDENTROPY, info, True)
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError as exc:
            # Without CAP_SYS_ADMIN over the kernel we can still mix the bytes in
            # (uncredited): the CRNG picks them up at its next periodic reseed.
            mixed = False
            try:
                os.write(fd, entropy)
                mixed = True
            except OSError:
                pass
            return {
                "ok": False,
                "action": "failed",
                "error": _os_error(exc, "reseeding the kernel RNG needs CAP_SYS_ADMIN"),
                "mixed": mixed,
            }
    finally:
        os.close(fd)
    return {"ok": True, "action": "reseeded"}


def _refresh_random(material: bytes) -> dict:
    random.seed(_derive(b"random", material))
    report: dict[str, Any] = {"ok": True, "numpy": False}
    # Only a numpy that the agent (or its warm-up) already imported has global
    # state to fix; importing it here would cost seconds and memory for nothing.
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            words = struct.unpack("16I", _derive(b"numpy", material)[:64])
            np.random.seed(list(words))
            report["numpy"] = True
        except Exception as exc:
            report["ok"] = False
            report["error"] = f"numpy: {type(exc).__name__}: {exc}"
    return report


def random_fingerprint() -> str:
    """Next 64 bits the agent's ``random`` would produce, read from a copy of its
    state so the real generator does not advance."""
    probe = random.Random()
    probe.setstate(random.getstate())
    return probe.getrandbits(64).to_bytes(8, "big").hex()


def _refresh_hostname(name: str | None) -> dict:
    if name is None:
        return {"ok": True, "action": "skipped"}
    try:
        socket.sethostname(name)
    except OSError as exc:
        return {
            "ok": False,
            "action": "failed",
            "error": _os_error(exc, "setting the hostname needs CAP_SYS_ADMIN in the UTS namespace"),
        }
    report: dict[str, Any] = {"ok": True, "action": "set", "etc_hostname": False}
    # /etc/hostname belongs to the sandbox only when the agent is its init; an
    # agent run as an ordinary process (tests, a container's side process)
    # would otherwise rewrite the host's file.
    if os.getpid() == 1 and os.access("/etc/hostname", os.W_OK):
        try:
            with open("/etc/hostname", "w") as f:
                f.write(name + "\n")
            report["etc_hostname"] = True
        except OSError as exc:
            report["etc_hostname_error"] = _os_error(exc)
    return report


async def _reseed_kernels(agent: Any, material: bytes) -> tuple[int, str | None]:
    reseed = getattr(getattr(agent, "contexts", None), "reseed", None)
    if reseed is None:
        return 0, None
    try:
        result = await reseed(_derive(b"contexts", material))
    except RpcError as exc:
        return 0, f"{exc.code.value}: {exc.message}"
    except Exception as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    if isinstance(result, bool) or not isinstance(result, int):
        # Tolerate a reseed that returns what it touched rather than a count.
        try:
            return len(result), None  # type: ignore[arg-type]
        except TypeError:
            return 0, None
    return result, None


# -- validation -------------------------------------------------------------


def _bad(message: str) -> RpcError:
    return RpcError(ErrorCode.INVALID_ARGUMENT, message)


def _check_hostname(name: str) -> str:
    raw = name.encode("utf-8", "surrogatepass")
    if not raw or len(raw) > HOSTNAME_MAX:
        raise _bad(f"hostname must be 1 to {HOSTNAME_MAX} bytes, got {len(raw)}")
    if any(c.isspace() or not c.isprintable() for c in name) or "/" in name:
        raise _bad(f"hostname {name!r} contains whitespace, control characters or '/'")
    return name


def _check_sandbox_id(sid: str) -> str:
    # The id goes into the environment of every new exec: no NUL, nothing huge.
    if not sid or len(sid) > SANDBOX_ID_MAX or "\0" in sid:
        raise _bad(f"sandbox_id must be 1 to {SANDBOX_ID_MAX} characters without NUL")
    return sid


def _parse(params: dict) -> dict:
    host_time = _params.get_number(params, "time", None)
    if host_time is not None and not (math.isfinite(host_time) and host_time > 0):
        raise _bad("parameter 'time' must be a positive, finite number of seconds since the epoch")
    tolerance = _params.get_number(params, "clock_tolerance", DEFAULT_CLOCK_TOLERANCE)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise _bad("parameter 'clock_tolerance' must be a finite number >= 0")
    entropy = _params.get(params, "entropy", bytes, None)
    if entropy is not None and not MIN_ENTROPY <= len(entropy) <= MAX_ENTROPY:
        raise _bad(f"parameter 'entropy' must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, got {len(entropy)}")
    hostname = _params.get(params, "hostname", str, None)
    sandbox_id = _params.get(params, "sandbox_id", str, None)
    return {
        "time": host_time,
        "tolerance": tolerance,
        "entropy": entropy,
        "hostname": None if hostname is None else _check_hostname(hostname),
        "sandbox_id": None if sandbox_id is None else _check_sandbox_id(sandbox_id),
    }


# -- method -----------------------------------------------------------------


async def refresh(agent: Any, params: dict) -> dict:
    args = _parse(params)  # all-or-nothing on bad input: nothing changes
    entropy = args["entropy"]
    # Everything up to the kernels' reseed happens before the first await, so a
    # request pipelined after this one (an exec reading FORKD_SANDBOX_ID) sees
    # the new identity. The clock goes first: host time ages while we work.
    clock = _refresh_clock(args["time"], args["tolerance"])
    kernel_rng = _refresh_kernel_rng(entropy)
    # Host entropy alone decides the seeds, so the host can reproduce a child.
    # Without it os.urandom is the best left: fresh only if something else
    # (vmgenid, a process fork) already made this kernel's CRNG differ.
    material = entropy if entropy is not None else os.urandom(64)
    rand = _refresh_random(material)
    hostname = _refresh_hostname(args["hostname"])
    if args["sandbox_id"] is not None:
        agent.sandbox_id = args["sandbox_id"]
    report: dict[str, Any] = {
        "clock": clock,
        "kernel_rng": kernel_rng,
        "random": rand,
        "random_fingerprint": random_fingerprint(),
        "hostname": hostname,
        "sandbox_id": agent.sandbox_id,
    }
    report["kernels_reseeded"], kernels_error = await _reseed_kernels(agent, material)
    if kernels_error is not None:
        report["kernels_error"] = kernels_error
    return report


@method("identity.refresh")
async def _identity_refresh(agent: Any, conn: Any, params: dict) -> dict:
    return await refresh(agent, params)
