"""identity.refresh against a real agent.

The host's clock and hostname must never change here: every agent that is asked
to change either runs in its own UTS namespace, and every agent asked to set the
clock to a wrong time runs in a user namespace, where it lacks CAP_SYS_TIME.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import socket
import time

import pytest

from agent_harness import AgentProcess
from forkd import protocol as p
from forkd_agent._identity import RNDADDENTROPY, RNDRESEEDCRNG, _derive

UNSHARE = shutil.which("unshare")
UTS_NS = [UNSHARE, "--uts", "--fork"]
USER_NS = [UNSHARE, "--user", "--map-root-user", "--uts", "--fork"]
# A fresh UTS namespace first, then a user namespace that does not own it: the
# agent cannot set the hostname, and even if it could, only a throwaway copy changes.
FOREIGN_UTS = [*UTS_NS, UNSHARE, "--user", "--map-root-user", "--fork"]

needs_root = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs root and util-linux unshare"
)


def _in_init_user_ns() -> bool:
    with open("/proc/self/uid_map") as f:
        return f.read().split() == ["0", "0", "4294967295"]


@pytest.fixture
def spawn(tmp_path):
    started: list[AgentProcess] = []

    async def start(prefix: list[str] | None = None, warmup: str = ""):
        d = tmp_path / f"agent{len(started)}"
        d.mkdir()
        proc = AgentProcess(d, warmup=warmup, prefix=prefix)
        started.append(proc)
        return await proc.connect()

    yield start
    for proc in started:
        proc.stop()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="values below are for x86/arm")
def test_ioctl_numbers_match_linux_random_h():
    # _IOW('R', 0x03, int[2]) and _IO('R', 0x07) as the C preprocessor computes them.
    assert RNDADDENTROPY == 0x40085203
    assert RNDRESEEDCRNG == 0x5207


async def test_refresh_without_params_reseeds_random_and_skips_the_rest(agent):
    before = await agent.request("info")
    first = await agent.request("identity.refresh")
    assert first["clock"] == {"ok": True, "action": "skipped"}
    assert first["kernel_rng"] == {"ok": True, "action": "skipped"}
    assert first["hostname"] == {"ok": True, "action": "skipped"}
    # numpy was never imported by this agent, and refreshing must not import it.
    assert first["random"] == {"ok": True, "numpy": False}
    assert first["sandbox_id"] == before["sandbox_id"]
    assert isinstance(first["kernels_reseeded"], int) and "kernels_error" not in first
    assert len(bytes.fromhex(first["random_fingerprint"])) == 8
    # Seeded from os.urandom each time: two refreshes never share a state.
    second = await agent.request("identity.refresh")
    assert second["random_fingerprint"] != first["random_fingerprint"]
    after = await agent.request("info")
    assert after["hostname"] == before["hostname"] == socket.gethostname()


async def test_random_state_follows_the_entropy(agent):
    a, b = os.urandom(32), os.urandom(64)
    r1 = await agent.request("identity.refresh", {"entropy": a})
    r2 = await agent.request("identity.refresh", {"entropy": b})
    r3 = await agent.request("identity.refresh", {"entropy": a})
    assert r1["random_fingerprint"] == r3["random_fingerprint"]
    assert r1["random_fingerprint"] != r2["random_fingerprint"]
    # The fingerprint is the agent's real next draw after seeding, not a hash of the input.
    expected = random.Random(_derive(b"random", a)).getrandbits(64).to_bytes(8, "big").hex()
    assert r1["random_fingerprint"] == expected


async def test_numpy_global_state_is_reseeded_when_loaded(spawn):
    pytest.importorskip("numpy")
    conn = await spawn(warmup="import numpy")
    report = await conn.request("identity.refresh", {"entropy": os.urandom(32)})
    assert report["random"] == {"ok": True, "numpy": True}
    await conn.close()


@needs_root
async def test_kernel_rng_is_reseeded_by_root(agent):
    if not _in_init_user_ns():
        pytest.skip("the test runner is itself in a user namespace")
    report = await agent.request("identity.refresh", {"entropy": os.urandom(48)})
    assert report["kernel_rng"] == {"ok": True, "action": "reseeded"}


@needs_root
async def test_user_namespace_agent_reports_what_it_may_not_do(spawn):
    conn = await spawn(USER_NS)
    wall_minus_mono = time.time() - time.monotonic()
    report = await conn.request("identity.refresh", {"time": time.time() + 3600, "entropy": os.urandom(32)})
    clock = report["clock"]
    assert clock["ok"] is False and clock["action"] == "failed"
    assert clock["error"].startswith("EPERM")
    assert 3500 < clock["skew_s"] < 3700
    kernel = report["kernel_rng"]
    assert kernel["ok"] is False and kernel["action"] == "failed"
    assert kernel["error"].startswith("EPERM")
    # Unprivileged writes to /dev/urandom still mix the bytes in.
    assert kernel["mixed"] is True
    # The other steps still ran.
    assert report["random"]["ok"] is True
    # Neither the host's clock nor the agent's view of it moved.
    assert abs((time.time() - time.monotonic()) - wall_minus_mono) < 60
    assert abs((await conn.request("ping"))["time"] - time.time()) < 60
    await conn.close()


@needs_root
async def test_clock_in_sync_is_left_alone(spawn):
    # In a user namespace, so a slow machine that blows the tolerance cannot set the host's clock.
    conn = await spawn(USER_NS)
    report = await conn.request("identity.refresh", {"time": time.time(), "clock_tolerance": 30.0})
    assert report["clock"]["ok"] is True and report["clock"]["action"] == "in_sync"
    assert abs(report["clock"]["skew_s"]) < 30
    await conn.close()


@needs_root
async def test_hostname_and_sandbox_id_change(spawn):
    host_name = socket.gethostname()
    conn = await spawn(UTS_NS)
    report = await conn.request(
        "identity.refresh", {"hostname": "forkd-child-7", "sandbox_id": "sbx-child-7"}
    )
    assert report["hostname"]["ok"] is True and report["hostname"]["action"] == "set"
    # Not the sandbox's init: /etc/hostname (here the host's) is left alone.
    assert report["hostname"]["etc_hostname"] is False
    assert report["sandbox_id"] == "sbx-child-7"
    info = await conn.request("info")
    assert info["hostname"] == "forkd-child-7"
    assert info["sandbox_id"] == "sbx-child-7"
    assert socket.gethostname() == host_name
    await conn.close()


@needs_root
async def test_hostname_failure_is_reported_not_raised(spawn):
    host_name = socket.gethostname()
    conn = await spawn(FOREIGN_UTS)
    report = await conn.request("identity.refresh", {"hostname": "nope", "sandbox_id": "sbx-still-set"})
    assert report["hostname"]["ok"] is False and report["hostname"]["action"] == "failed"
    assert report["hostname"]["error"].startswith("EPERM")
    info = await conn.request("info")
    assert info["hostname"] != "nope"
    assert info["sandbox_id"] == "sbx-still-set"
    assert socket.gethostname() == host_name
    await conn.close()


async def test_new_exec_sees_the_new_sandbox_id(agent):
    if "exec.start" not in (await agent.request("info"))["methods"]:
        pytest.skip("exec.start is not registered yet")
    await agent.request("identity.refresh", {"sandbox_id": "sbx-for-exec"})
    stream = agent.open_inbound()
    await agent.request(
        "exec.start",
        {"cmd": 'printf %s "$FORKD_SANDBOX_ID"', "stream": stream.id, "window": p.DEFAULT_WINDOW},
    )
    out = bytearray()
    async for fd, _offset, data in stream:
        if fd == p.FD_STDOUT:
            out += data
    assert out.decode() == "sbx-for-exec"


BAD_PARAMS = [
    {"entropy": b"short"},
    {"entropy": "not bytes but a string of more than thirty-two chars"},
    {"entropy": b"x" * 5000},
    {"time": "now"},
    {"time": -1.0},
    {"time": float("nan")},
    {"time": True},
    {"clock_tolerance": -0.1},
    {"hostname": ""},
    {"hostname": "has space"},
    {"hostname": "x" * 65},
    {"sandbox_id": ""},
    {"sandbox_id": "a\0b"},
    {"sandbox_id": 42},
]


async def test_bad_params_change_nothing(agent):
    before = await agent.request("info")
    for params in BAD_PARAMS:
        with pytest.raises(p.RpcError) as ei:
            # The valid sandbox_id next to the bad field must not be applied either.
            await agent.request("identity.refresh", {"sandbox_id": "sbx-must-not-stick", **params})
        assert ei.value.code == p.ErrorCode.INVALID_ARGUMENT, params
        assert ei.value.message, params
    after = await agent.request("info")
    assert after["sandbox_id"] == before["sandbox_id"]
    assert after["hostname"] == before["hostname"]


async def test_eval_kernels_follow_the_entropy(agent):
    if "code.eval" not in (await agent.request("info"))["methods"]:
        pytest.skip("code.eval is not registered yet")
    draw = "__import__('random').getrandbits(64)"
    await agent.request("code.eval", {"expr": "1"})  # starts the default context's kernel
    a, b = os.urandom(32), os.urandom(32)
    values = []
    for entropy in (a, b, a):
        report = await agent.request("identity.refresh", {"entropy": entropy})
        assert report["kernels_reseeded"] >= 1 and "kernels_error" not in report
        values.append((await agent.request("code.eval", {"expr": draw}))["value"])
    assert values[0] == values[2] != values[1]
